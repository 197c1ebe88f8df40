"""The tar digest: the VM's program and the jump box's reading agree on real GNU tar output,
every byte counts, and a VM without python3 falls back to the stream's SHA-256.

The VM's side is run here as a VM runs it: GNU tar with the filter of a backup's copy as
its `-I` program (`transport.ssh.pack_filter`), under `sh`, as real processes.
"""

from __future__ import annotations

import ast
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from orchestrator.bbr import tardigest
from orchestrator.bbr.tardigest import TarDigest
from orchestrator.bbr.tarstream import TarHasher, TarStreamError
from orchestrator.transport.ssh import pack_filter

SOURCE = Path(tardigest.__file__).read_text(encoding="utf-8")
TAR_LINE = re.compile(r"^bbrx-tar-sha256 ([0-9a-f]{64})$", re.MULTILINE)
SHA_LINE = re.compile(r"^bbrx-sha256 ([0-9a-f]{64}) ", re.MULTILINE)


def make_tree(root: Path) -> Path:
    """Members of every kind GNU tar writes for a job: long names and links, empty and
    block-sized files, hard links, nested directories, a name that is not ASCII."""
    (root / "a" / "b").mkdir(parents=True)
    (root / "empty").write_bytes(b"")
    (root / "block").write_bytes(b"x" * 512)
    (root / "odd").write_bytes(os.urandom(1000))
    (root / "a" / "b" / "big").write_bytes(os.urandom(300_000))
    long_dir = root / ("d" * 90) / ("e" * 90)
    long_dir.mkdir(parents=True)
    (long_dir / ("f" * 120)).write_bytes(b"long name\n")
    os.link(long_dir / ("f" * 120), root / "a" / "hard-link")
    os.link(root / "odd", long_dir / ("g" * 110))
    (root / "naïve café.txt").write_text("ünïcode\n")
    return root


def tar_of(root: Path, *options: str) -> bytes:
    return subprocess.run(
        ["tar", "-C", str(root), *options, "-cf", "-", "."], capture_output=True, check=True
    ).stdout


def through_vm_filter(
    root: Path, *options: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[bytes, str]:
    """The tar a backup's copy sends, and what its filter said on stderr."""
    command = ["tar", "-C", str(root), *options, f"--use-compress-program={pack_filter()}"]
    proc = subprocess.run([*command, "-cf", "-", "."], capture_output=True, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr.decode()


def jump_box_digest(data: bytes, chunk: int = 65536) -> str:
    """As a backup's read-back gets it: from the per-file hashing, in chunks."""
    hasher = TarHasher(strict=False)
    for start in range(0, len(data), chunk):
        hasher.feed(data[start : start + chunk])
    hasher.finish()
    return hasher.tar.hexdigest()


def digest_of(data: bytes) -> str:
    digest = TarDigest()
    digest.feed(data)
    return digest.hexdigest()


@pytest.mark.parametrize("options", [(), ("--format=posix",), ("--format=oldgnu",)])
def test_the_vms_program_and_the_jump_box_agree(tmp_path, options):
    root = make_tree(tmp_path / "job")
    sent, stderr = through_vm_filter(root, *options)
    if "--format=posix" not in options:  # pax headers carry each file's atime: it moves
        assert sent == tar_of(root, *options)  # the filter passes the stream through as is
    [reported] = TAR_LINE.findall(stderr)
    assert reported == jump_box_digest(sent) == jump_box_digest(sent, chunk=7) == digest_of(sent)
    # and the per-file checksums taken from it are each file's SHA-256
    hasher = TarHasher(strict=False)
    hasher.feed(sent)
    expected = {
        "./" + p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }
    assert hasher.finish() == expected


def test_every_byte_counts(tmp_path):
    """Any one byte changed (header, data, padding, the end blocks, the record's padding),
    a byte cut off or a byte added: a different digest."""
    root = tmp_path / "job"
    root.mkdir()
    (root / "one").write_bytes(b"first file\n")
    (root / "two").write_bytes(os.urandom(700))
    data = tar_of(root)
    good = digest_of(data)
    seen = {good}
    for offset in range(len(data)):
        changed = bytearray(data)
        changed[offset] ^= 0x01
        seen.add(digest_of(bytes(changed)))
    assert len(seen) == len(data) + 1
    assert digest_of(data[:-1]) != good
    assert digest_of(data + b"\0") != good
    assert digest_of(data[: len(data) // 2]) != good


def test_not_a_tar_still_has_a_digest_of_every_byte():
    noise = bytes(range(256)) * 20
    assert digest_of(noise) == jump_box_digest_loose(noise)
    assert digest_of(noise) != digest_of(noise[:-1])


def jump_box_digest_loose(data: bytes) -> str:
    """A backup's read-back of a copy that does not parse keeps the digest going."""
    hasher = TarHasher(strict=False)
    with pytest.raises(Exception, match="tar"):
        hasher.feed(data)
        hasher.finish()
    return hasher.tar.hexdigest()


def test_the_program_runs_on_the_python3_a_vm_may_have():
    """Python 3.4's syntax (the module says so), and, where this machine has older or newer
    interpreters (pyenv's), the same digest from each of them."""
    ast.parse(SOURCE, feature_version=(3, 4))
    interpreters = sorted(Path("/root/.pyenv/versions").glob("3.*/bin/python3"))
    if not interpreters:
        pytest.skip("no other python3 on this machine (pyenv's) to run the VM's program with")
    # A tar's start, and then what is not a tar: the digest covers both the same way.
    data = tarfile.TarInfo("x").tobuf() + bytes(range(256)) * 41
    for python in interpreters:
        proc = subprocess.run(
            [str(python), "-E", "-s", "-c", SOURCE, "echo fallback >&2"],
            input=data,
            capture_output=True,
        )
        assert proc.returncode == 0, (python, proc.stderr)
        assert proc.stdout == data, python
        assert TAR_LINE.findall(proc.stderr.decode()) == [digest_of(data)], python


def test_a_python_older_than_3_4_runs_the_shell_fallback():
    python2 = sorted(Path("/root/.pyenv/versions").glob("2.*/bin/python2"))
    if not python2:
        pytest.skip("no Python 2 on this machine (pyenv's) to stand for an old python3")
    proc = subprocess.run(
        [str(python2[0]), "-E", "-s", "-c", SOURCE, "cat; echo fell back >&2"],
        input=b"stream",
        capture_output=True,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"stream", b"fell back\n")


def path_without(tmp_path: Path, *hidden: str) -> dict[str, str]:
    """An environment whose PATH has what the VM's filter uses, but not `hidden`."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("sh", "tar", "tee", "cat", "openssl", "sha256sum", "python3", "gzip"):
        found = shutil.which(tool)
        if found and tool not in hidden:
            (tools / tool).symlink_to(found)
    return {"PATH": str(tools), "LC_ALL": "C"}


@pytest.mark.parametrize("hidden", [("python3",), ("python3", "openssl")])
def test_a_vm_without_python3_reports_the_streams_sha256(tmp_path, hidden):
    root = make_tree(tmp_path / "job")
    sent, stderr = through_vm_filter(root, env=path_without(tmp_path, *hidden))
    assert sent == tar_of(root)
    assert TAR_LINE.findall(stderr) == []
    assert SHA_LINE.findall(stderr) == [hashlib.sha256(sent).hexdigest()]


def test_modules_in_the_users_directory_are_not_run(tmp_path):
    """python3 -c looks for modules in its working directory first: the filter runs from /,
    so a hashlib.py in the bbr user's home does not run as root."""
    root = make_tree(tmp_path / "job")
    home = tmp_path / "home"
    home.mkdir()
    marker = tmp_path / "ran"
    for module in ("hashlib", "tarfile", "os"):
        (home / f"{module}.py").write_text(f"open({str(marker)!r}, 'a').write('{module}')\n")
    sent, stderr = through_vm_filter(root, cwd=home)
    assert not marker.exists()
    assert TAR_LINE.findall(stderr) == [digest_of(sent)]


def test_a_python3_without_its_standard_library_runs_the_shell_fallback(tmp_path):
    """Debian's python3-minimal has no tarfile: the program hands the stream, unread, to
    the shell filter, and the VM reports the stream's SHA-256."""
    env = path_without(tmp_path, "python3")
    fake = Path(env["PATH"]) / "python3"
    real = os.path.realpath(sys.executable)
    fake.write_text(
        "#!/bin/sh\n"  # python3 -E -s -c SOURCE FALLBACK, with tarfile unimportable
        'src="$4"; shift 4\n'
        f'exec {real} -E -s -c "import sys; sys.modules[\'tarfile\'] = None\n$src" "$@"\n'
    )
    fake.chmod(0o755)
    root = make_tree(tmp_path / "job")
    sent, stderr = through_vm_filter(root, env=env)
    assert sent == tar_of(root)
    assert TAR_LINE.findall(stderr) == []
    assert SHA_LINE.findall(stderr) == [hashlib.sha256(sent).hexdigest()]


def test_a_pax_header_too_long_to_read_stops_the_framing(tmp_path):
    """Past a pax header longer than the digest reads for a size, the rest of the stream is
    hashed as it is, and the per-file reading refuses the tar rather than guess sizes."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.size = 5
        info.pax_headers = {"comment": "x" * (2 << 20)}
        tar.addfile(info, io.BytesIO(b"hello"))
    raw = data.getvalue()
    hasher = TarHasher(strict=False)
    with pytest.raises(TarStreamError, match="size is unclear"):
        hasher.feed(raw)
        hasher.finish()
    assert hasher.tar.hexdigest() == digest_of(raw)


# The VM's program, run with a source and a sink of each kind: it says which way it copied
# (splice: tee(2) and splice(2); read: through its memory), then the digest.
PASS_THROUGH = f"""
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("vm_tardigest", {tardigest.__file__!r})
vm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(vm)
digest = vm.TarDigest(record=False)
spliced = vm.splice_through(digest, 0, 1)
if not spliced:
    vm.read_through(digest, 0, 1)
os.close(1)
sys.stderr.write("%s %s" % ("splice" if spliced else "read", digest.hexdigest()))
"""


@pytest.mark.parametrize(
    ("source", "sink", "way"),
    [("pipe", "pipe", "splice"), ("pipe", "file", "splice"), ("file", "pipe", "read")],
)
def test_the_stream_passes_through_whole_whichever_way_it_is_copied(tmp_path, source, sink, way):
    # More than one chunk of the copy, and not a whole number of pages.
    root = tmp_path / "job"
    root.mkdir()
    (root / "blob").write_bytes(os.urandom(3 * (1 << 20) + 1234))
    data = tar_of(root)
    given = tmp_path / "given.tar"
    given.write_bytes(data)
    kept = tmp_path / "kept.tar"
    with open(given, "rb") as stdin_file, open(kept, "wb") as stdout_file:
        proc = subprocess.run(
            [sys.executable, "-c", PASS_THROUGH],
            input=data if source == "pipe" else None,
            stdin=None if source == "pipe" else stdin_file,
            stdout=subprocess.PIPE if sink == "pipe" else stdout_file,
            stderr=subprocess.PIPE,
        )
    assert proc.returncode == 0, proc.stderr
    sent = proc.stdout if sink == "pipe" else kept.read_bytes()
    assert sent == data
    assert proc.stderr.decode() == f"{way} {digest_of(data)}"
