"""The artifact on disk, byte-compatible with bbr's: write, publish, read, validate.

Layout (bbr contract section 8)::

    <artifact-path>/<name>_<YYYYMMDDTHHMMSSZ>/   mode 0700
        bosh-0-<job>.tar                        one uncompressed tar per job
        metadata                                YAML: per-file SHA-256, backup_activity
        bbrx-audit.yml                          bbrx's own: the audit chain head of the run

A backup is built in `<final>.incomplete/` (with an `INCOMPLETE` marker file and no
`metadata`) and renamed to its final name only once every tar is written, synced, and
read back: the SHA-256 of every file inside it (for `metadata`) and of the whole tar
(which the backup compares with the VM's own digest of what it sent) come from one read
of the file after its fsync, so they describe the copy as it is on the jump box's disk,
not the bytes as they streamed past.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

from orchestrator.bbr import localdisk, safeyaml
from orchestrator.bbr.localdisk import Readable
from orchestrator.bbr.tardigest import TarDigest
from orchestrator.bbr.tarstream import TarHasher, TarStreamError, UnsafeMemberError
from orchestrator.errors import ArtifactCorruptError, ArtifactError

log = logging.getLogger(__name__)

METADATA_FILE = "metadata"
AUDIT_HEAD_FILE = "bbrx-audit.yml"
MANIFEST_FILE = "manifest.yml"  # a deployment backup's, with --with-manifest
INCOMPLETE_MARKER = "INCOMPLETE"
INCOMPLETE_SUFFIX = ".incomplete"
# The audit detail key of a backup's checks_passed row: the `.incomplete` directory it
# writes in (what a run killed after that point leaves on the jump box).
WRITING_IN_KEY = "writing_in"
CHUNK = 1 << 20
TIME_FORMAT = "%Y/%m/%d %H:%M:%S UTC"  # bbr's backup_activity format

Checksums = dict[str, str]


def artifact_dir_name(name: str, started: datetime) -> str:
    return f"{name}_{started.astimezone(UTC):%Y%m%dT%H%M%SZ}"


def tar_name(group: str, index: str, job: str) -> str:
    return f"{group}-{index}-{job}.tar"


def custom_tar_name(name: str) -> str:
    return f"{name}.tar"


@dataclass(frozen=True)
class JobArtifact:
    """One job's tar as the metadata describes it."""

    name: str
    checksums: Checksums


@dataclass(frozen=True)
class InstanceArtifacts:
    name: str
    index: str
    artifacts: tuple[JobArtifact, ...]


@dataclass(frozen=True)
class Manifest:
    """A parsed `metadata` file."""

    path: Path
    instances: tuple[InstanceArtifacts, ...]
    start_time: str
    finish_time: str
    #: A deployment backup's `backup_one_restore_all` copies, each `<name>.tar`.
    custom: tuple[JobArtifact, ...] = ()

    def jobs(self) -> list[tuple[InstanceArtifacts, JobArtifact]]:
        return [(inst, art) for inst in self.instances for art in inst.artifacts]

    @property
    def is_director_backup(self) -> bool:
        """What bbr's director mode writes: one instance, `bosh/0`, and no custom artifacts."""
        names = {(i.name, i.index) for i in self.instances}
        return not self.custom and names <= {("bosh", "0")}

    def instance_names(self) -> list[str]:
        return [f"{i.name}/{i.index}" for i in self.instances]

    def tar_names(self) -> list[str]:
        return [tar_name(i.name, i.index, a.name) for i, a in self.jobs()] + [
            custom_tar_name(c.name) for c in self.custom
        ]


# --- writing -----------------------------------------------------------------------------


def _chunks(source: Readable, check: Callable[[], None] | None) -> Iterator[bytes]:
    """CHUNK-sized reads until EOF, calling `check` (the interruption test) before each."""
    while True:
        if check is not None:
            check()
        chunk = source.read(CHUNK)
        if not chunk:
            return
        yield chunk


class ArtifactWriter:
    """Builds one backup under a temporary name and publishes it by rename."""

    def __init__(self, parent: Path, name: str, started: datetime, run_id: str) -> None:
        if not parent.is_dir():
            what = "is not a directory" if parent.exists() else "does not exist"
            raise ArtifactError(
                f"artifact path {parent} {what}",
                hint="Create it first, or pass --artifact-path with a directory that exists.",
            )
        self.parent = parent
        self.base = artifact_dir_name(name, started)
        self.final = parent / self.base
        self.partial = self.final.with_name(self.final.name + INCOMPLETE_SUFFIX)
        self.run_id = run_id
        self.started = started
        self.checksums: dict[tuple[str, str, str], Checksums] = {}
        self.custom_checksums: dict[str, Checksums] = {}
        self._custom_claimed: set[str] = set()
        self._lock = threading.Lock()  # drains of many instances write in parallel
        # Only what this writer made is ever removed: another run's backup that happens to
        # have the same name is left alone.
        self.created = False

    def create(self) -> None:
        """Make `<name>_<time>.incomplete/`, or `<name>_<time>-2.incomplete/` and so on when
        another backup of a same-named target started in the same second."""
        for attempt in range(1, 100):
            name = self.base if attempt == 1 else f"{self.base}-{attempt}"
            final = self.parent / name
            partial = self.parent / (name + INCOMPLETE_SUFFIX)
            if final.exists():
                continue
            try:
                partial.mkdir(mode=0o700)  # atomic: of two writers, one gets each name
            except FileExistsError:
                continue
            except OSError as exc:
                raise ArtifactError(
                    f"cannot create artifact directory {partial}: {exc.strerror or exc}",
                    hint="Check that the artifact path is writable and has space.",
                ) from exc
            if final.exists():  # published between our look and our mkdir
                partial.rmdir()
                continue
            self.final, self.partial, self.created = final, partial, True
            break
        else:
            raise ArtifactError(
                f"cannot find a free name for the backup in {self.parent}: "
                f"{self.base} and 98 variants exist",
                hint="Move old backups away, or pick another --artifact-path.",
            )
        try:
            (self.partial / INCOMPLETE_MARKER).write_text(
                f"This backup is incomplete: bbrx run {self.run_id} was writing it and did not\n"
                "finish. It has no metadata file; neither bbr nor bbrx will restore from it.\n"
                "Find out why with: bbrx audit show " + self.run_id + "\n"
            )
        except OSError as exc:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.created = False
            raise ArtifactError(
                f"cannot write in {self.partial.parent}: {exc.strerror or exc}",
                hint="Free some space (or pick another --artifact-path) and try again.",
            ) from exc
        log.info("Writing the backup in %s", self.partial)

    def write_job(
        self,
        group: str,
        index: str,
        job: str,
        stream: Readable,
        check: Callable[[], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> PendingCopy:
        """Write one job's tar from `stream` and sync it; `read_back` then checks it."""
        return self._write_tar(tar_name(group, index, job), stream, check, progress)

    def write_custom(
        self,
        name: str,
        stream: Readable,
        check: Callable[[], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> PendingCopy:
        """Write a custom artifact (a `backup_one_restore_all` job's bootstrap copy)."""
        with self._lock:  # claimed here: of two groups draining at once, one gets the name
            taken = name in self._custom_claimed or (self.partial / custom_tar_name(name)).exists()
            self._custom_claimed.add(name)
        if taken:
            # bbr overwrites one with the other, silently: a backup that lost a group's data.
            raise ArtifactError(
                f"two instance groups back up {name}: the same backup_one_restore_all job of the "
                "same release runs in both, and bbr's artifact has room for one copy",
                hint="Set backup_one_restore_all on that job in one instance group only, then "
                "back up again (the copy to the jump box comes after the unlocks).",
            )
        return self._write_tar(custom_tar_name(name), stream, check, progress)

    def add_job(self, group: str, index: str, job: str, checksums: Checksums) -> None:
        """Record a job's checksums for `metadata`, once its tar has been checked."""
        with self._lock:
            self.checksums[(group, index, job)] = checksums

    def add_custom(self, name: str, checksums: Checksums) -> None:
        with self._lock:
            self.custom_checksums[name] = checksums

    def write_manifest(self, text: str) -> None:
        """The deployment's manifest, exactly as the director gave it (--with-manifest)."""
        try:
            _write_synced(self.partial / MANIFEST_FILE, text)
        except OSError as exc:
            raise ArtifactError(
                f"cannot write {self.partial / MANIFEST_FILE}: {exc.strerror or exc}",
                hint="Free some space (or pick another --artifact-path) and try again. "
                "Nothing was locked.",
            ) from exc

    def _write_tar(
        self,
        filename: str,
        stream: Readable,
        check: Callable[[], None] | None,
        progress: Callable[[int], None] | None,
    ) -> PendingCopy:
        path = self.partial / filename
        started = time.monotonic()
        reading = _TarReading()
        try:
            readback = localdisk.write_new(path, stream, check, progress, reading.feed)
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise ArtifactError(
                f"cannot write {path}: {exc.strerror or exc}",
                hint="The jump box's disk (or this user's quota) is full: free some space or "
                "pick another --artifact-path, then run backup again. The copy to the jump box "
                "comes after the unlocks, and this partial backup is removed."
                if full
                else None,
            ) from exc
        log.debug(
            "Wrote and synced %s (%d bytes%s) in %.2f s",
            path.name,
            readback.size,
            ", direct I/O" if readback.direct_write else "",
            time.monotonic() - started,
        )
        return PendingCopy(path, readback, reading)

    def read_back(
        self,
        copy: PendingCopy,
        job: str,
        check: Callable[[], None] | None = None,
        *,
        whole: bool = False,
    ) -> LocalTar:
        """Finish reading a written (and synced) tar back from the disk (see `localdisk`):
        the SHA-256 of every file inside it and the tar digest of the whole, from one
        SHA-256 pass over the data (see `tardigest`); with `whole`, for a VM that reported
        the stream's SHA-256, also that of the whole file, in a second read.

        A tar that does not parse, or holds what a restore refuses, is reported by
        `LocalTar.checksums()`: the caller compares the digests first, as a copy that
        changed on its way may well not parse.
        """
        path, reading = copy.path, copy.reading
        started = time.monotonic()
        digest = None
        try:
            copy.readback.finish(check)
            if whole:
                whole_sha = hashlib.sha256()
                with localdisk.read_chunks(path, check) as pieces:
                    for piece in pieces:
                        whole_sha.update(piece)
                digest = whole_sha.hexdigest()
        except OSError as exc:
            raise ArtifactError(f"cannot read back {path}: {exc.strerror or exc}") from exc
        finally:
            copy.close()
        hasher, broken = reading.hasher, reading.broken
        try:
            checksums = hasher.finish() if broken is None else None
        except TarStreamError as exc:
            broken, checksums = exc, None
        problem: ArtifactError | None = None
        if broken is not None:
            problem = ArtifactError(f"the tar stream of job {job} is not a valid tar: {broken}")
        elif hasher.unsafe:
            named = "; ".join(str(unsafe) for unsafe in hasher.unsafe[:5])
            more = len(hasher.unsafe) - 5
            problem = ArtifactError(
                f"the backup of job {job} holds what bbrx will not restore ({path.name}: "
                f"{named}{f'; and {more} more' if more > 0 else ''}): it is not published",
                hint="A restore places only regular files and directories, each one covered by "
                "a checksum. Make the job's backup script write only those, then back up again "
                "(the copy to the jump box comes after the unlocks).",
            )
        tar_digest = hasher.tar.hexdigest()
        log.debug(
            "Finished reading %s back in %.2f s (%d bytes, tar digest %s%s)",
            path.name,
            time.monotonic() - started,
            hasher.tar.bytes,
            tar_digest,
            f", SHA-256 {digest}" if digest else "",
        )
        return LocalTar(path, tar_digest, digest, hasher.tar.bytes, checksums, problem)

    def publish(self, finished: datetime, audit_head: dict[str, object]) -> Path:
        """Write metadata and the audit head, then rename to the final name."""
        document = metadata_document(
            self.checksums, self.started, finished, custom=self.custom_checksums
        )
        try:
            _write_synced(self.partial / METADATA_FILE, _dump_metadata(document))
            _write_synced(
                self.partial / AUDIT_HEAD_FILE,
                "# Ties this backup to its audited bbrx run: the audit chain head when it was "
                "sealed.\n# Check it with: bbrx audit verify --artifact THIS_DIRECTORY\n"
                + yaml.safe_dump(audit_head, sort_keys=False),
            )
            (self.partial / INCOMPLETE_MARKER).unlink()
            _fsync_dir(self.partial)
            os.rename(self.partial, self.final)
        except OSError as exc:
            raise ArtifactError(
                f"cannot seal the backup in {self.partial}: {exc.strerror or exc}",
                hint="Free some space (or pick another --artifact-path) and back up again "
                "(the copy to the jump box comes after the unlocks); the partial backup is "
                "removed.",
            ) from exc
        try:
            _fsync_dir(self.final.parent)
        except OSError as exc:  # published already: say so, do not undo it
            log.warning("could not sync %s after publishing: %s", self.final.parent, exc)
        log.info("Backup published: %s", self.final)
        return self.final

    def discard(self) -> None:
        """Remove the partial backup: a failed run leaves nothing that looks like a backup."""
        if self.created and self.partial.exists():
            shutil.rmtree(self.partial, ignore_errors=True)
            log.info("Removed the incomplete backup %s", self.partial)
        self.created = False


class _TarReading:
    """The per-file hashing of a copy as it is read back from the disk, piece by piece.
    Past a point where it stops being a tar, the tar digest still takes every byte."""

    def __init__(self) -> None:
        self.hasher = TarHasher(strict=False)
        self.broken: TarStreamError | None = None

    def feed(self, piece: memoryview) -> None:
        if self.broken is None:
            try:
                self.hasher.feed(piece)  # the tar digest first, whatever it raises
            except TarStreamError as exc:
                self.broken = exc
        else:
            self.hasher.tar.feed(piece)


@dataclass
class PendingCopy:
    """A job's tar written and synced, read back from the disk up to near its end:
    `ArtifactWriter.read_back` reads the rest. `close` lets go of it unread."""

    path: Path
    readback: localdisk.ReadBack
    reading: _TarReading

    def close(self) -> None:
        self.readback.close()


@dataclass(frozen=True)
class LocalTar:
    """One job's tar as it is on the jump box's disk, read back after its fsync."""

    path: Path
    tar_digest: str  # see tardigest
    sha256: str | None  # of the whole file, when read_back was asked for it
    size: int
    _checksums: Checksums | None
    _problem: ArtifactError | None

    def digest(self, kind: str) -> str | None:
        """Its digest of the kind a VM reported (`SentDigest.kind`)."""
        return self.tar_digest if kind == "tar" else self.sha256

    def checksums(self) -> Checksums:
        """Every regular file's SHA-256, keyed `./path`; raises ArtifactError if the tar
        does not parse or holds what a restore refuses."""
        if self._problem is not None:
            raise self._problem
        assert self._checksums is not None
        return self._checksums


def check_free_space(directory: Path, needed: int) -> None:
    """Refuse a drain that cannot fit, before a byte is written (bbr never checks)."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError as exc:
        raise ArtifactError(
            f"cannot tell the free space in {directory}: {exc.strerror or exc}",
            hint="Check the artifact path, then back up again (the copy to the jump box comes "
            "after the unlocks).",
        ) from exc
    # tar's headers and padding, and the metadata, add a little to the data's size.
    margin = 64 * 1024 * 1024
    if needed + margin > free:
        raise ArtifactError(
            f"not enough space for the backup in {directory.parent}: it needs about "
            f"{_mib(needed)} MiB (plus a {_mib(margin)} MiB margin), {_mib(free)} MiB are free",
            hint="Free some space or pick another --artifact-path, then run backup again "
            "(the copy to the jump box comes after the unlocks).",
        )


def _mib(n: int) -> int:
    return -(-n // (1024 * 1024))


def metadata_document(
    checksums: dict[tuple[str, str, str], Checksums],
    started: datetime,
    finished: datetime,
    custom: dict[str, Checksums] | None = None,
) -> dict[str, object]:
    instances: dict[tuple[str, str], list[dict[str, object]]] = {}
    for (group, index, job), sums in sorted(checksums.items()):
        instances.setdefault((group, index), []).append(
            {"name": job, "checksums": dict(sorted(sums.items()))}
        )
    return {
        "instances": [
            {"name": group, "index": index, "artifacts": artifacts}
            for (group, index), artifacts in instances.items()
        ],
        "custom_artifacts": [
            {"name": name, "checksums": dict(sorted(sums.items()))}
            for name, sums in sorted((custom or {}).items())
        ],
        "backup_activity": {
            "start_time": started.astimezone(UTC).strftime(TIME_FORMAT),
            "finish_time": finished.astimezone(UTC).strftime(TIME_FORMAT),
        },
    }


class _QuotedStr(str):
    """A string YAML writes double-quoted, as bbr writes `index: "0"`."""


def _represent_quoted(dumper: yaml.SafeDumper, value: _QuotedStr) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(value), style='"')


# libyaml's C emitter where PyYAML has it: a blobstore's metadata lists every blob, and
# the pure-Python one takes seconds over tens of thousands of entries. (Reading: safeyaml.)
_SafeDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _MetadataDumper(_SafeDumper):  # type: ignore[misc, valid-type]
    pass


_MetadataDumper.add_representer(_QuotedStr, _represent_quoted)


def _dump_metadata(document: dict[str, object]) -> str:
    for instance in document["instances"]:  # type: ignore[attr-defined]
        instance["index"] = _QuotedStr(instance["index"])
    return yaml.dump(document, Dumper=_MetadataDumper, sort_keys=False, default_flow_style=False)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "x", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading -----------------------------------------------------------------------------

# Names in metadata become file names (`<name>-<index>-<job>.tar`) and remote paths
# (`/var/vcap/store/bbr-backup/<job>`): one safe path component each, as BOSH spells
# instance groups and jobs. No leading dot, so never `.` or `..`.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
# Files an artifact may hold besides its tars: bbr's metadata and bbrx's audit head.
_OWN_FILES = frozenset({METADATA_FILE, AUDIT_HEAD_FILE})
INTACT_COPY = "Restore from an intact copy of this backup."


def read_manifest(directory: Path) -> Manifest:
    """Parse and sanity-check an artifact's metadata, naming what is wrong."""
    try:
        return _read_manifest(directory)
    except OSError as exc:  # a directory on the way that this user may not search, say
        raise _unreadable(Path(exc.filename or directory), exc) from exc


def _read_manifest(directory: Path) -> Manifest:
    if not directory.exists():
        raise ArtifactError(
            f"artifact directory {directory} does not exist",
            hint="Pass --artifact-path the directory a backup created (it holds a metadata file).",
        )
    if not directory.is_dir():
        raise ArtifactError(
            f"artifact path {directory} is a file, not a backup directory",
            hint="Pass --artifact-path the directory a backup created (it holds a metadata file), "
            "not a file inside it.",
        )
    if (directory / INCOMPLETE_MARKER).exists() or directory.name.endswith(INCOMPLETE_SUFFIX):
        raise ArtifactError(
            f"{directory} is an incomplete backup (it has an {INCOMPLETE_MARKER} marker)",
            hint="Restore from a backup that finished; this one failed or was interrupted.",
        )
    path = directory / METADATA_FILE
    if not path.is_file():
        raise ArtifactError(
            f"{directory} has no metadata file: it is not a finished bbr/bbrx backup",
            hint="Pass --artifact-path the directory a backup created.",
        )
    cap = safeyaml.ARTIFACT_METADATA_CAP
    try:
        with open(path, "rb") as handle:
            text = handle.read(cap + 1)  # never more than the cap into memory
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    try:
        data = safeyaml.load(text, cap=cap)
    except safeyaml.YamlRefused as exc:
        what = "is not valid YAML" if exc.invalid else "was refused"
        raise ArtifactError(
            f"{path} {what}: {exc}",
            hint="This is not metadata that bbr or bbrx wrote. " + INTACT_COPY,
        ) from None
    return _parse_manifest(path, data)


def _parse_manifest(path: Path, data: object) -> Manifest:
    def bad(what: str) -> ArtifactError:
        return ArtifactError(
            f"{path} does not follow bbr's metadata schema: {what}",
            hint="This is not metadata that bbr or bbrx wrote. " + INTACT_COPY,
        )

    if not isinstance(data, dict):
        raise bad("it is not a mapping")
    # bbr leaves `instances` out when no instance has an artifact of its own (a deployment
    # whose one backup is a backup_one_restore_all job's custom artifact).
    if data.get("instances") is None:
        data = {**data, "instances": []}
    if not isinstance(data["instances"], list):
        raise bad("instances is not a list")
    instances = []
    seen: set[tuple[str, str, str]] = set()
    for position, instance in enumerate(data["instances"]):
        where = f"instances[{position}]"
        if not isinstance(instance, dict) or not isinstance(instance.get("name"), str):
            raise bad(f"{where} has no name")
        name, index = instance["name"], str(instance.get("index", "0"))
        for label, value in (("name", name), ("index", index)):
            if not _SAFE_NAME.fullmatch(value):
                raise bad(f"{where} has the {label} {value!r}, which is not a plain name")
        entries = instance.get("artifacts") or []
        if not isinstance(entries, list):
            raise bad(f"{where}.artifacts is not a list")
        artifacts = []
        for art_pos, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise bad(f"{where}.artifacts[{art_pos}] has no name")
            job = entry["name"]
            if not _SAFE_NAME.fullmatch(job):
                raise bad(f"{where}.artifacts[{art_pos}] names the job {job!r}, not a plain name")
            if (name, index, job) in seen:
                raise bad(f"job {job} of instance {name}/{index} is listed twice")
            seen.add((name, index, job))
            sums = entry.get("checksums") or {}
            if not isinstance(sums, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in sums.items()
            ):
                raise bad(f"checksums of artifact {job} are not a map of strings")
            artifacts.append(JobArtifact(job, dict(sums)))
        instances.append(InstanceArtifacts(name, index, tuple(artifacts)))
    custom: list[JobArtifact] = []
    entries = data.get("custom_artifacts") or []
    if not isinstance(entries, list):
        raise bad("custom_artifacts is not a list")
    for position, entry in enumerate(entries):
        where = f"custom_artifacts[{position}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise bad(f"{where} has no name")
        if not _SAFE_NAME.fullmatch(entry["name"]):
            raise bad(f"{where} has the name {entry['name']!r}, which is not a plain name")
        if any(c.name == entry["name"] for c in custom):
            raise bad(f"custom artifact {entry['name']} is listed twice")
        sums = entry.get("checksums") or {}
        if not isinstance(sums, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in sums.items()
        ):
            raise bad(f"checksums of custom artifact {entry['name']} are not a map of strings")
        custom.append(JobArtifact(entry["name"], dict(sums)))
    if not instances and not custom:
        raise bad("it lists no instance and no custom artifact: there is nothing to restore")
    activity = data.get("backup_activity")
    activity = activity if isinstance(activity, dict) else {}
    return Manifest(
        path=path,
        instances=tuple(instances),
        start_time=str(activity.get("start_time", "")),
        finish_time=str(activity.get("finish_time", "")),
        custom=tuple(custom),
    )


def _unreadable(path: Path, exc: OSError) -> ArtifactError:
    return ArtifactError(
        f"cannot read {path}: {exc.strerror or exc}",
        hint="Run bbrx as a user who can read the whole backup directory, or fix its "
        "permissions (e.g. chmod -R u+rX), then restore again.",
    )


def check_files(manifest: Manifest) -> None:
    """The backup's file set matches its metadata: every listed tar is there and readable,
    and every tar there is listed (a tar nobody checks would be a tar nobody restores)."""
    directory = manifest.path.parent
    listed = set(manifest.tar_names())
    for name in sorted(listed):
        path = directory / name
        if not path.exists():
            raise ArtifactCorruptError(
                f"Backup is corrupted: {name} is missing from {directory}", hint=INTACT_COPY
            )
        if not path.is_file():
            raise ArtifactCorruptError(
                f"Backup is corrupted: {path} is not a regular file", hint=INTACT_COPY
            )
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise _unreadable(path, exc) from exc
    try:
        present = sorted(entry.name for entry in directory.iterdir())
    except OSError as exc:
        raise _unreadable(directory, exc) from exc
    for name in present:
        if name.endswith(".tar") and name not in listed and name not in _OWN_FILES:
            raise ArtifactCorruptError(
                f"Backup is corrupted: {name} is in {directory} but its metadata does not "
                "list it, so nothing vouches for its content",
                hint="Remove the file if it does not belong to this backup, or restore from "
                "an intact copy.",
            )


class TarReader:
    """One job's tar, read once and checked as it goes.

    `chunks()` hands on each chunk only after the hasher has seen it: a member that must
    not be restored (see tarstream), or a file the metadata does not list, stops the
    stream before its header leaves the jump box. The SHA-256 of the whole stream is kept
    (`digest`) for the VM's own digest of what its tar read to be compared with, and
    `verify()` compares every file's checksum with the metadata once the stream has ended.
    """

    def __init__(
        self, directory: Path, instance: InstanceArtifacts | None, job: JobArtifact
    ) -> None:
        """`instance` None: `job` is a custom artifact (`<name>.tar`)."""
        self.job = job
        self.name = (
            custom_tar_name(job.name)
            if instance is None
            else tar_name(instance.name, instance.index, job.name)
        )
        self.path = directory / self.name
        self._hasher = TarHasher(listed=job.checksums)
        self._whole: ThreadedDigest | None = None  # started by chunks(): no idle thread
        self._digest: str | None = None

    @property
    def digest(self) -> str:
        """The SHA-256 of every byte `chunks()` handed on (once it has ended)."""
        if self._digest is None:
            if self._whole is None:
                raise RuntimeError("the digest is known once chunks() has run")
            self._digest = self._whole.hexdigest()
        return self._digest

    @property
    def sent_bytes(self) -> int:
        return self._hasher.bytes

    def chunks(self, check: Callable[[], None] | None = None) -> Iterator[bytes]:
        whole = self._whole = ThreadedDigest()
        try:
            with open(self.path, "rb") as source:
                for chunk in _chunks(source, check):
                    self._hasher.feed(chunk)
                    whole.update(chunk)
                    yield chunk
        except UnsafeMemberError as exc:
            raise ArtifactCorruptError(
                f"Backup is corrupted: {self.name}: {exc}: a restore plants only regular "
                "files and directories that the metadata's checksums cover",
                hint=f"Nothing was locked or restored. {INTACT_COPY}",
            ) from None
        except TarStreamError as exc:
            raise self._not_a_tar(exc) from None
        except OSError as exc:
            raise _unreadable(self.path, exc) from exc
        finally:
            whole.close()

    def verify(self) -> Checksums:
        """Every file's checksum against the metadata (after `chunks()` has ended)."""
        try:
            actual = self._hasher.finish()
        except TarStreamError as exc:
            raise self._not_a_tar(exc) from None
        _compare(self.name, self.job.checksums, actual, "the metadata")
        return actual

    def _not_a_tar(self, exc: TarStreamError) -> ArtifactCorruptError:
        return ArtifactCorruptError(
            f"Backup is corrupted: {self.name} cannot be read as a tar: {exc}",
            hint=f"Nothing was locked or restored. {INTACT_COPY}",
        )


class ThreadedDigest:
    """SHA-256 of a stream (or, given one, a `TarDigest`), computed in a thread of its own.

    A restore's reader hashes every file's data for the metadata and the whole stream for
    the VM's digest: two passes of SHA-256 over the same bytes. hashlib releases the GIL
    on large updates, so the second runs beside the first instead of after it. At most
    DEPTH chunks wait in the queue.
    """

    DEPTH = 8

    def __init__(self, digest: TarDigest | None = None) -> None:
        self._digest: TarDigest | hashlib._Hash = digest or hashlib.sha256()
        self._queue: queue.Queue[bytes | None] = queue.Queue(self.DEPTH)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def update(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        return self._digest.hexdigest()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if isinstance(self._digest, TarDigest):
                self._digest.feed(chunk)
            else:
                self._digest.update(chunk)


def validate(directory: Path) -> Manifest:
    """Read every tar against the metadata, locally (bbr's "Backup is corrupted" check).

    A restore does not call this: it makes the same checks in the pass that copies each
    tar to the VM. This is for checking a backup on its own.
    """
    manifest = read_manifest(directory)
    check_files(manifest)
    pairs: list[tuple[InstanceArtifacts | None, JobArtifact]] = [*manifest.jobs()]
    pairs += [(None, custom) for custom in manifest.custom]
    for instance, job in pairs:
        reader = TarReader(directory, instance, job)
        for _ in reader.chunks():
            pass
        reader.verify()
    return manifest


def _compare(where: str, expected: Checksums, actual: Checksums, source: str) -> None:
    for key in sorted(expected.keys() | actual.keys()):
        if key not in actual:
            problem = f"{key} is listed in {source} but missing"
        elif key not in expected:
            problem = f"{key} is present but not listed in {source}"
        elif expected[key] != actual[key]:
            problem = f"{key} has SHA-256 {actual[key]}, {source} says {expected[key]}"
        else:
            continue
        raise ArtifactCorruptError(
            f"Backup is corrupted: {where}: {problem}",
            hint=f"Nothing was locked or restored. {INTACT_COPY}",
        )
