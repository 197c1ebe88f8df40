"""The streaming tar hasher against GNU tar and Python's tarfile, fed in awkward chunks."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile

import pytest

from orchestrator.tarstream import TarHasher, TarStreamError


def feed_in(data: bytes, size: int) -> dict[str, str]:
    hasher = TarHasher()
    for start in range(0, len(data), size):
        hasher.feed(data[start : start + size])
    return hasher.finish()


@pytest.fixture
def tree(tmp_path):
    files = {
        "a.txt": b"hello\n",
        "empty": b"",
        "blob": os.urandom(70_001),
        ("d" * 120) + "/" + ("e" * 120): b"a long name needs a GNU or pax header",
        "dir/ünïcode name": b"x" * 513,
    }
    for name, data in files.items():
        path = tmp_path / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (tmp_path / "src" / "link").symlink_to("a.txt")
    (tmp_path / "src" / "emptydir").mkdir()
    return tmp_path / "src", {"./" + n: hashlib.sha256(d).hexdigest() for n, d in files.items()}


@pytest.mark.parametrize("tar_format", ["gnu", "posix", "ustar-python"])
@pytest.mark.parametrize("chunk", [1, 511, 512, 4096, 1 << 20])
def test_checksums_match_an_independent_computation(tree, tar_format, chunk):
    source, expected = tree
    if tar_format == "ustar-python":
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
            archive.add(source, arcname=".")
        data = buffer.getvalue()
    else:
        data = subprocess.run(
            ["tar", f"--format={tar_format}", "-C", str(source), "-cf", "-", "."],
            capture_output=True,
            check=True,
        ).stdout
    assert feed_in(data, chunk) == expected


def test_a_truncated_stream_is_refused(tree):
    source, _ = tree
    data = subprocess.run(["tar", "-C", str(source), "-cf", "-", "."], capture_output=True).stdout
    with pytest.raises(TarStreamError, match="ended early"):
        feed_in(data[: len(data) // 2], 4096)


def test_garbage_is_refused():
    with pytest.raises(TarStreamError, match="bad tar header"):
        feed_in(os.urandom(2048), 512)


def test_hard_links_carry_their_targets_checksum(tmp_path):
    source = tmp_path / "src"
    (source / "blobs").mkdir(parents=True)
    (source / "blobs" / "one").write_bytes(b"same blob")
    (source / "blobs" / "two").hardlink_to(source / "blobs" / "one")
    data = subprocess.run(["tar", "-C", str(source), "-cf", "-", "."], capture_output=True).stdout
    digest = hashlib.sha256(b"same blob").hexdigest()
    assert feed_in(data, 100) == {"./blobs/one": digest, "./blobs/two": digest}


def test_a_zero_length_pax_record_is_refused_not_looped_on():
    info = tarfile.TarInfo("././@PaxHeader")
    record = b"0 path=x\n"
    info.size = len(record)
    info.type = tarfile.XHDTYPE
    header = info.tobuf(tarfile.USTAR_FORMAT)
    data = header + record + bytes(-len(record) % 512) + bytes(1024)
    with pytest.raises(TarStreamError, match="bad pax header record"):
        feed_in(data, 512)
