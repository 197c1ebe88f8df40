"""SimDirector: a simulated BOSH director VM kept as a directory tree.

The tree mirrors the VM's filesystem (`var/vcap/jobs`, `var/vcap/store`, ...). Its bbr
scripts are real bash scripts copied from package data; this class only builds, breaks
and inspects the tree, it never plays a script's part.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import tempfile
from importlib.resources.abc import Traversable
from pathlib import Path

from orchestrator.errors import TargetError
from orchestrator.transport.instance import SCRIPT_NAMES
from simulator.calllog import CALL_LOG, ScriptCallRecord, parse_call_log
from simulator.director_db import Deployment, parse_dump, render_dump, render_vms_table
from simulator.faults import TRANSFER, validate_fault, validate_transfer_fault
from simulator.seed_data import default_credentials, default_deployments, write_blobs

log = logging.getLogger(__name__)

MARKER = ".bbrx-sim"
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")

JOBS_DIR = Path("var/vcap/jobs")
PACKAGE_DIR = Path("var/vcap/packages/bbr-sim")
STORE_DIR = Path("var/vcap/store")
SYS_DIR = Path("var/vcap/sys")
RUN_DIR = SYS_DIR / "run/bbr-sim"
LOCKS_DIR = RUN_DIR / "locks"
FAULTS_DIR = RUN_DIR / "faults"
DIRECTOR_DB = STORE_DIR / "director/bosh.sql"
BLOBSTORE_DIR = STORE_DIR / "blobstore/store"
CREDHUB_DB = STORE_DIR / "credhub/credentials.yml"
# The stores whose bytes a backup must preserve (data_digest covers exactly these).
DATA_STORES = ("director", "blobstore", "credhub")


def sim_root(home: Path, name: str) -> Path:
    """`$BBRX_HOME/sim/<name>/`, after checking the name is safe as one path component."""
    if not NAME_PATTERN.fullmatch(name):
        raise TargetError(
            f"invalid simulator name {name!r}",
            hint="A simulator name is 1-63 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit (e.g. sim://demo).",
        )
    return home / "sim" / name


def _package_jobs() -> Traversable:
    # A path next to this module rather than importlib.resources.files("simulator"): the
    # latter fails when an editable install exposes the package as a namespace package.
    return Path(__file__).resolve().parent / "jobs"


def _copy_tree(source: Traversable, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.name == "__pycache__":
            continue
        if entry.is_dir():
            _copy_tree(entry, dest / entry.name)
        else:
            (dest / entry.name).write_bytes(entry.read_bytes())


class SimDirector:
    """One simulated director VM rooted at `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.name = self.root.name

    def __repr__(self) -> str:
        return f"SimDirector({str(self.root)!r})"

    # -- lifecycle -----------------------------------------------------------------

    def exists(self) -> bool:
        return (self.root / MARKER).is_file()

    def create(self, empty: bool = False) -> None:
        """Build the VM: jobs, scripts and config always; the data unless `empty`."""
        if self.exists():
            raise TargetError(f"simulated director sim://{self.name} already exists at {self.root}")
        if self.root.exists() and any(self.root.iterdir()):
            raise TargetError(
                f"cannot create sim://{self.name}: {self.root} exists, is not empty and is "
                "not a simulated director"
            )
        log.info("creating simulated director %s at %s (empty=%s)", self.name, self.root, empty)
        # Built aside and renamed into place, so two bbrx processes creating the same
        # director at once never see, or build on, each other's half-built tree.
        self.root.parent.mkdir(parents=True, exist_ok=True)
        staging = SimDirector(
            Path(tempfile.mkdtemp(prefix=f".{self.name}.creating-", dir=self.root.parent))
        )
        try:
            staging._install_jobs()
            (staging.root / STORE_DIR).mkdir(parents=True, exist_ok=True)
            (staging.root / SYS_DIR).mkdir(parents=True, exist_ok=True)
            if not empty:
                staging._seed_data()
            (staging.root / MARKER).write_text(
                "bbrx simulated director; safe to delete with bbrx\n"
            )
            os.chmod(staging.root, 0o755)  # mkdtemp's 0700 is not what a VM root has
            try:
                # Replaces a missing or empty directory; fails if another process won.
                staging.root.rename(self.root)
            except OSError as error:
                if error.errno in (errno.ENOTEMPTY, errno.EEXIST) and self.exists():
                    raise TargetError(
                        f"simulated director sim://{self.name} already exists at {self.root}"
                    ) from None
                raise
        finally:
            shutil.rmtree(staging.root, ignore_errors=True)

    def ensure(self) -> bool:
        """Create the director with its data if it does not exist. True if it was created."""
        if self.exists():
            return False
        try:
            self.create()
        except TargetError:
            if self.exists():  # another process created it meanwhile: that is fine
                return False
            raise
        return True

    def wipe(self) -> None:
        """The disaster: the VM recreated empty. Jobs, config and packages survive."""
        self._require_exists()
        log.info("wiping simulated director %s", self.name)
        for relative in (STORE_DIR, SYS_DIR):
            shutil.rmtree(self.root / relative, ignore_errors=True)
        (self.root / STORE_DIR).mkdir(parents=True)
        (self.root / SYS_DIR).mkdir(parents=True)

    def destroy(self) -> None:
        if not (self.root / MARKER).is_file():
            raise TargetError(
                f"refusing to delete {self.root}: it is not a simulated director "
                f"(no {MARKER} marker)"
            )
        log.info("destroying simulated director %s at %s", self.name, self.root)
        shutil.rmtree(self.root)

    def _require_exists(self) -> None:
        if not self.exists():
            raise TargetError(f"simulated director sim://{self.name} does not exist ({self.root})")

    def _install_jobs(self) -> None:
        source = _package_jobs()
        package_dir = self.root / PACKAGE_DIR
        package_dir.mkdir(parents=True, exist_ok=True)
        (package_dir / "lib.sh").write_bytes(source.joinpath("lib.sh").read_bytes())
        for job in source.iterdir():
            if not job.is_dir() or job.name == "__pycache__":
                continue
            dest = self.root / JOBS_DIR / job.name
            _copy_tree(job, dest)
            # Set modes explicitly: wheels and resource readers do not keep exec bits.
            scripts = dest / "bin/bbr"
            if scripts.is_dir():
                for script in scripts.iterdir():
                    script.chmod(0o755)

    def _seed_data(self) -> None:
        db = self.root / DIRECTOR_DB
        db.parent.mkdir(parents=True, exist_ok=True)
        db.write_text(render_dump(default_deployments()))
        write_blobs(self.root / BLOBSTORE_DIR)
        credhub = self.root / CREDHUB_DB
        credhub.parent.mkdir(parents=True, exist_ok=True)
        credhub.write_text(default_credentials())

    # -- inspection ----------------------------------------------------------------

    def jobs(self) -> list[str]:
        jobs_dir = self.root / JOBS_DIR
        if not jobs_dir.is_dir():
            return []
        return sorted(p.name for p in jobs_dir.iterdir() if p.is_dir())

    def deployments(self) -> list[Deployment]:
        db = self.root / DIRECTOR_DB
        if not db.is_file():
            return []
        return parse_dump(db.read_text())

    def render_vms(self) -> str:
        lock = self.root / LOCKS_DIR / "director"
        if lock.is_file():
            script, _, pid = lock.read_text().strip().partition(" ")
            return (
                f"director API is locked by {script or 'unknown script'} (pid {pid or '?'}): "
                "deployments unavailable\n"
            )
        deployments = self.deployments()
        if not deployments:
            return "No deployments (the director database is empty)\n"
        return render_vms_table(deployments)

    def locked_jobs(self) -> list[str]:
        locks = self.root / LOCKS_DIR
        if not locks.is_dir():
            return []
        return sorted(p.name for p in locks.iterdir() if p.is_file())

    def calls(self) -> list[ScriptCallRecord]:
        path = self.root / CALL_LOG
        if not path.is_file():
            return []
        return parse_call_log(path.read_text(errors="replace"))

    def clear_calls(self) -> None:
        (self.root / CALL_LOG).unlink(missing_ok=True)

    def data_digest(self) -> dict[str, str]:
        """SHA-256 of every data file, keyed by its path relative to var/vcap/store."""
        store = self.root / STORE_DIR
        digest: dict[str, str] = {}
        for name in DATA_STORES:
            for dirpath, dirnames, filenames in os.walk(store / name):
                dirnames.sort()
                for filename in sorted(filenames):
                    path = Path(dirpath) / filename
                    if path.is_file() and not path.is_symlink():
                        digest[path.relative_to(store).as_posix()] = _sha256(path)
        return digest

    # -- faults --------------------------------------------------------------------

    def set_fault(self, job: str, script: str, spec: str) -> None:
        """Make `job`'s `script` misbehave on its next runs (until cleared)."""
        self._require_exists()
        if job not in self.jobs():
            raise TargetError(
                f"no job {job!r} on sim://{self.name}", hint=f"Jobs: {', '.join(self.jobs())}"
            )
        scripts = self.root / JOBS_DIR / job / "bin/bbr"
        if script == TRANSFER:
            normalised = validate_transfer_fault(spec)
        elif script not in SCRIPT_NAMES or not (scripts / script).is_file():
            present = sorted(p.name for p in scripts.iterdir()) if scripts.is_dir() else []
            raise TargetError(
                f"job {job!r} on sim://{self.name} has no {script!r} script",
                hint=f"Scripts of {job}: {', '.join(present) or 'none'} "
                f"(or '{TRANSFER}' for the copy of its artifact)",
            )
        else:
            normalised = validate_fault(spec)
        path = self.root / FAULTS_DIR / job / script
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(normalised + "\n")
        log.info("fault set on sim://%s %s/%s: %s", self.name, job, script, normalised)

    def clear_faults(self, job: str | None = None, script: str | None = None) -> None:
        """Clear every fault, a job's faults, or one script's fault."""
        target = self.root / FAULTS_DIR
        if job is not None:
            target = target / job
            if script is not None:
                target.joinpath(script).unlink(missing_ok=True)
                return
        shutil.rmtree(target, ignore_errors=True)

    def faults(self) -> dict[tuple[str, str], str]:
        """Every fault in place, keyed (job, script)."""
        faults_dir = self.root / FAULTS_DIR
        result: dict[tuple[str, str], str] = {}
        if faults_dir.is_dir():
            for path in sorted(faults_dir.glob("*/*")):
                if path.is_file():
                    result[(path.parent.name, path.name)] = path.read_text().strip()
        return result


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
