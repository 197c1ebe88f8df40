"""The artifact format: bbr's layout and metadata schema, one-pass checksums, safe publish."""

import errno
import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from orchestrator.bbr import artifact, safeyaml
from orchestrator.bbr.tardigest import TarDigest
from orchestrator.errors import ArtifactCorruptError, ArtifactError

STARTED = datetime(2026, 5, 30, 15, 49, 2, tzinfo=UTC)
FINISHED = datetime(2026, 5, 30, 15, 51, 40, tzinfo=UTC)


def make_tree(root: Path) -> dict[str, str]:
    """Files like a job's artifact directory, and their SHA-256 computed independently."""
    files = {
        "director.sql": b"-- dump\n" * 1000,
        "blobs/ab/cd": os.urandom(300_000),
        "empty": b"",
        "deep/a/b/c.txt": b"x",
    }
    sums = {}
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        sums["./" + name] = hashlib.sha256(data).hexdigest()
    return sums


def write_from_tar(writer: artifact.ArtifactWriter, directory: Path, job: str = "director"):
    """Stream a real GNU tar of `directory` into the writer, as a VM would send it."""
    with subprocess.Popen(
        ["tar", "-C", str(directory), "-cf", "-", "."], stdout=subprocess.PIPE
    ) as proc:
        path = writer.write_job("bosh", "0", job, proc.stdout)
    assert proc.returncode == 0
    sums = writer.read_back(path, job).checksums()
    writer.add_job("bosh", "0", job, sums)
    return sums


def test_stream_hashes_equal_an_independent_computation_and_bytes_are_kept(tmp_path):
    source = tmp_path / "job"
    source.mkdir()
    expected = make_tree(source)
    writer = artifact.ArtifactWriter(tmp_path, "demo", STARTED, "run-1")
    writer.create()
    sums = write_from_tar(writer, source)
    assert sums == expected
    raw = subprocess.run(["tar", "-C", str(source), "-cf", "-", "."], capture_output=True).stdout
    written = (writer.partial / "bosh-0-director.tar").read_bytes()
    assert written == raw  # byte for byte what the VM's tar produced, padding included


def test_read_back_describes_the_copy_on_disk_not_the_stream(tmp_path):
    """The tar digest (what a backup compares with the VM's), the whole tar's SHA-256 (for a
    VM without python3) and every file's come from the file as it is on disk: a byte
    changed there after it was written shows in all of them."""
    source = tmp_path / "job"
    source.mkdir()
    make_tree(source)
    raw = subprocess.run(["tar", "-C", str(source), "-cf", "-", "."], capture_output=True).stdout
    writer = artifact.ArtifactWriter(tmp_path, "demo", STARTED, "run-1")
    writer.create()
    good = writer.read_back(writer.write_job("bosh", "0", "director", io.BytesIO(raw)), "director")
    assert good.tar_digest == tar_digest(raw)
    assert good.sha256 is None  # only when asked for

    copy = writer.write_job("bosh", "0", "blobstore", io.BytesIO(raw))
    with open(copy.path, "r+b") as handle:  # a byte of ./blobs/ab/cd's data, changed on disk
        offset = raw.index((source / "blobs/ab/cd").read_bytes()) + 4096
        handle.seek(offset)
        handle.write(bytes([raw[offset] ^ 1]))
    local = writer.read_back(copy, "blobstore", whole=True)
    assert local.sha256 == hashlib.sha256(copy.path.read_bytes()).hexdigest()
    assert local.sha256 != hashlib.sha256(raw).hexdigest()
    assert local.tar_digest == tar_digest(copy.path.read_bytes()) != good.tar_digest
    assert local.size == len(raw)
    changed = {k: v for k, v in local.checksums().items() if v != make_sums(source)[k]}
    assert list(changed) == ["./blobs/ab/cd"]


class ChangesTheCopy:
    """A stream that, at its first read after the copy on disk holds the byte at `offset`,
    changes that byte there (as the simulator's corrupt-local fault does), while the rest
    is still to come."""

    def __init__(self, data: bytes, copy: Path, offset: int) -> None:
        self.data, self.copy, self.offset, self.given = data, copy, offset, 0
        self.changed_at: int | None = None  # how much of the stream had been read by then

    def read(self, size: int = -1) -> bytes:
        written = self.copy.stat().st_size if self.copy.exists() else 0
        if self.changed_at is None and written > self.offset:
            with open(self.copy, "r+b") as handle:
                handle.seek(self.offset)
                handle.write(bytes([self.data[self.offset] ^ 1]))
            self.changed_at = self.given
        chunk = self.data[self.given : self.given + size]
        self.given += len(chunk)
        return chunk


def test_the_read_back_follows_the_writer_and_sees_a_change_made_behind_it(tmp_path):
    """A large copy is read back while it is written, behind the writer: a change to bytes
    already written, made while the stream goes on, is what the read-back sees."""
    source = tmp_path / "job"
    source.mkdir()
    (source / "big").write_bytes(os.urandom(12 << 20))
    raw = subprocess.run(["tar", "-C", str(source), "-cf", "-", "."], capture_output=True).stdout
    writer = artifact.ArtifactWriter(tmp_path, "demo", STARTED, "run-1")
    writer.create()
    path = writer.partial / "bosh-0-director.tar"
    stream = ChangesTheCopy(raw, path, 600_000)
    copy = writer.write_job("bosh", "0", "director", stream)
    assert stream.changed_at is not None and stream.changed_at < len(raw) // 2  # mid-stream
    local = writer.read_back(copy, "director")
    on_disk = path.read_bytes()
    assert on_disk != raw and len(on_disk) == len(raw)
    assert local.tar_digest == tar_digest(on_disk) != tar_digest(raw)
    assert local.checksums()["./big"] != hashlib.sha256((source / "big").read_bytes()).hexdigest()


def tar_digest(data: bytes) -> str:
    digest = TarDigest()
    digest.feed(data)
    return digest.hexdigest()


def make_sums(root: Path) -> dict[str, str]:
    return {
        "./" + p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def test_publish_writes_bbr_layout_and_metadata(tmp_path):
    source = tmp_path / "job"
    source.mkdir()
    expected = make_tree(source)
    out = tmp_path / "backups"
    out.mkdir()
    writer = artifact.ArtifactWriter(out, "10.0.0.6", STARTED, "run-1")
    writer.create()
    assert (writer.partial / artifact.INCOMPLETE_MARKER).exists()
    assert not (writer.partial / "metadata").exists()
    write_from_tar(writer, source)
    final = writer.publish(FINISHED, {"run_id": "run-1", "seq": 7, "hash": "ab"})

    assert final == out / "10.0.0.6_20260530T154902Z"
    assert stat.S_IMODE(final.stat().st_mode) == 0o700
    assert sorted(p.name for p in final.iterdir()) == [
        "bbrx-audit.yml",
        "bosh-0-director.tar",
        "metadata",
    ]
    assert not writer.partial.exists()
    text = (final / "metadata").read_text()
    assert 'index: "0"' in text
    document = yaml.safe_load(text)
    assert document == {
        "instances": [
            {
                "name": "bosh",
                "index": "0",
                "artifacts": [{"name": "director", "checksums": expected}],
            }
        ],
        "custom_artifacts": [],
        "backup_activity": {
            "start_time": "2026/05/30 15:49:02 UTC",
            "finish_time": "2026/05/30 15:51:40 UTC",
        },
    }
    assert artifact.validate(final).jobs()[0][1].checksums == expected


def test_artifact_path_must_exist(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        artifact.ArtifactWriter(tmp_path / "nope", "demo", STARTED, "r")


def test_discard_leaves_nothing(tmp_path):
    writer = artifact.ArtifactWriter(tmp_path, "demo", STARTED, "r")
    writer.create()
    writer.discard()
    assert list(tmp_path.iterdir()) == []


def published(tmp_path: Path) -> Path:
    source = tmp_path / "job"
    source.mkdir()
    make_tree(source)
    writer = artifact.ArtifactWriter(tmp_path, "demo", STARTED, "r")
    writer.create()
    write_from_tar(writer, source)
    return writer.publish(FINISHED, {"run_id": "r"})


def test_one_changed_byte_is_caught(tmp_path):
    final = published(tmp_path)
    tar = final / "bosh-0-director.tar"
    data = bytearray(tar.read_bytes())
    # Flip a byte inside director.sql's content (the first member's data block).
    offset = data.index(b"-- dump")
    data[offset] ^= 0x01
    tar.write_bytes(bytes(data))
    with pytest.raises(
        ArtifactCorruptError,
        match=r"Backup is corrupted: bosh-0-director.tar: ./director.sql has SHA-256",
    ):
        artifact.validate(final)


def test_missing_tar_and_extra_file_are_caught(tmp_path):
    final = published(tmp_path)
    metadata = yaml.safe_load((final / "metadata").read_text())
    metadata["instances"][0]["artifacts"][0]["checksums"]["./ghost"] = "0" * 64
    (final / "metadata").write_text(yaml.safe_dump(metadata))
    with pytest.raises(
        ArtifactCorruptError, match=r"\./ghost is listed in the metadata but missing"
    ):
        artifact.validate(final)
    (final / "bosh-0-director.tar").unlink()
    with pytest.raises(ArtifactCorruptError, match=r"bosh-0-director\.tar is missing"):
        artifact.validate(final)


def test_incomplete_backups_are_refused(tmp_path):
    writer = artifact.ArtifactWriter(tmp_path, "demo", STARTED, "r")
    writer.create()
    with pytest.raises(ArtifactError, match="incomplete backup"):
        artifact.read_manifest(writer.partial)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(ArtifactError, match="has no metadata file"):
        artifact.read_manifest(bare)


def test_reads_a_bbr_made_artifact(tmp_path):
    """An artifact as bbr writes it (Go yaml, its own tar) restores the same way."""
    final = tmp_path / "10.0.0.6_20260530T154902Z"
    final.mkdir()
    content = b"credhub dump\n"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("./credhub.sql")
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    (final / "bosh-0-bbr-credhubdb.tar").write_bytes(buffer.getvalue())
    (final / "metadata").write_text(
        "instances:\n"
        "- name: bosh\n"
        '  index: "0"\n'
        "  artifacts:\n"
        "  - name: bbr-credhubdb\n"
        "    checksums:\n"
        f"      ./credhub.sql: {hashlib.sha256(content).hexdigest()}\n"
        "custom_artifacts: []\n"
        "backup_activity:\n"
        "  start_time: 2026/05/30 15:49:02 UTC\n"
        "  finish_time: 2026/05/30 15:51:40 UTC\n"
        "some_future_key: ignored\n"
    )
    manifest = artifact.validate(final)
    assert [(i.name, i.index, a.name) for i, a in manifest.jobs()] == [
        ("bosh", "0", "bbr-credhubdb")
    ]


# --- bounded input, and the file set -----------------------------------------------------------

FIXTURES = Path("/work/shared/fixtures/bbr")


@pytest.mark.parametrize("name", ["director-backup", "director-backup-integration", "redis-backup"])
def test_artifacts_bbr_itself_wrote_validate(name):
    """Read where they lie (never copied in): bbr's own GNU tar and Go YAML output."""
    if not (FIXTURES / name).is_dir():
        pytest.skip("bbr's fixtures are not on this machine")
    manifest = artifact.validate(FIXTURES / name)
    assert all(job.checksums for _, job in manifest.jobs())


def test_the_metadata_cap_is_named(tmp_path, monkeypatch):
    final = published(tmp_path)
    monkeypatch.setattr(safeyaml, "ARTIFACT_METADATA_CAP", 100)
    with pytest.raises(ArtifactError, match=r"metadata was refused: it is 101 bytes, over the 100"):
        artifact.read_manifest(final)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &x [1]\nb: *x\n", "it uses the YAML anchor &x (line 1)"),
        ("b: *x\n", "it uses the YAML alias *x (line 1)"),
        ("a: !!python/object:os.system {}\n", "could not determine a constructor"),
        ("a: [\n", "while parsing a flow node (line 2, column 1)"),
        ("x" * 2000, "over the 1024 bytes cap"),
    ],
)
def test_bounded_yaml_refuses(text, message):
    with pytest.raises(safeyaml.YamlRefused, match=re.escape(message)):
        safeyaml.load(text, cap=1024)


def test_bounded_yaml_keeps_ampersands_and_stars_in_strings():
    assert safeyaml.load("'./blobs/a&b*': abc\n", cap=1024) == {"./blobs/a&b*": "abc"}


def test_the_file_set_must_match_the_metadata(tmp_path):
    final = published(tmp_path)
    manifest = artifact.read_manifest(final)
    artifact.check_files(manifest)  # metadata, bbrx-audit.yml and the listed tar: fine
    (final / "notes.txt").write_text("an operator's note is not a tar\n")
    artifact.check_files(manifest)
    (final / "bosh-0-stray.tar").write_bytes(bytes(1024))
    with pytest.raises(ArtifactCorruptError, match=r"bosh-0-stray\.tar is in .* does not list"):
        artifact.check_files(manifest)
    (final / "bosh-0-stray.tar").unlink()
    (final / "bosh-0-director.tar").unlink()
    (final / "bosh-0-director.tar").mkdir()
    with pytest.raises(ArtifactCorruptError, match="is not a regular file"):
        artifact.check_files(manifest)


def test_one_pass_reader_checks_as_it_streams(tmp_path):
    final = published(tmp_path)
    manifest = artifact.read_manifest(final)
    [(instance, job)] = manifest.jobs()
    reader = artifact.TarReader(final, instance, job)
    sent = b"".join(reader.chunks())
    assert reader.digest == hashlib.sha256(sent).hexdigest()
    assert sent == (final / "bosh-0-director.tar").read_bytes()
    assert reader.verify() == job.checksums


FILLS_A_SMALL_DISK = """
import errno, io, json, os, sys, threading
from pathlib import Path
from orchestrator.bbr import localdisk
path = Path(sys.argv[1]) / "bosh-0-director.tar"
try:
    localdisk.write_new(path, io.BytesIO(os.urandom(12 << 20)), None, None, lambda piece: None)
    error = None
except OSError as exc:
    error = exc.errno
print(json.dumps({"errno": error, "threads": threading.active_count(), "exists": path.exists()}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small filesystem needs root")
def test_a_disk_that_fills_during_the_copy_fails_it_with_the_writers_error(tmp_path):
    """The writing thread's error (here a real ENOSPC from a 4 MiB tmpfs, in a mount
    namespace of its own) is what the copy raises, and no thread of it is left running."""
    disk = tmp_path / "small"
    disk.mkdir()
    script = f'mount -t tmpfs -o size=4m tmpfs {disk} && exec "$0" -c "$1" {disk}'
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
         sys.executable, FILLS_A_SMALL_DISK],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"errno": errno.ENOSPC, "threads": 1, "exists": True}
