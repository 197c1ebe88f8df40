"""The streaming tar hasher against GNU tar and Python's tarfile, fed in awkward chunks,
and its refusal of every member a restore must not plant."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile

import pytest

from orchestrator.bbr.tarstream import TarHasher, TarStreamError, UnsafeMemberError


def feed_in(data: bytes, size: int, **options) -> dict[str, str]:
    hasher = TarHasher(**options)
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
    assert feed_in(data, chunk, strict=False) == expected  # the tree holds a symlink
    with pytest.raises(UnsafeMemberError, match=r"member \./link is a symbolic link \(to a.txt\)"):
        feed_in(data, chunk)


@pytest.mark.parametrize("tar_format", ["gnu", "posix"])
def test_long_names_pass_strict_checks(tree, tar_format):
    source, expected = tree
    (source / "link").unlink()
    data = subprocess.run(
        ["tar", f"--format={tar_format}", "-C", str(source), "-cf", "-", "."],
        capture_output=True,
        check=True,
    ).stdout
    assert feed_in(data, 4096, listed=expected) == expected


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


# --- members a restore refuses --------------------------------------------------------------


def member(
    name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **fields
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def make_tar(*members: tarfile.TarInfo, data: dict[str, bytes] | None = None, **options) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", **options) as archive:
        for info in members:
            content = (data or {}).get(info.name, b"")
            info.size = len(content) if info.isreg() else 0
            archive.addfile(info, io.BytesIO(content) if info.isreg() else None)
    return buffer.getvalue()


GOOD = member("./good")
REFUSED = [
    (member("./ln", tarfile.SYMTYPE, linkname="/etc/shadow"), "a symbolic link (to /etc/shadow)"),
    (member("./null", tarfile.CHRTYPE, devmajor=1, devminor=3), "a character device"),
    (member("./sda", tarfile.BLKTYPE, devmajor=8), "a block device"),
    (member("./pipe", tarfile.FIFOTYPE), "a FIFO"),
    (member("./su", mode=0o4755), "of mode 4755, with setuid, setgid or sticky bits"),
    (member("./sg", mode=0o2755), "of mode 2755"),
    (member("./tmp", tarfile.DIRTYPE, mode=0o1777), "of mode 1777"),
    (member("/etc/cron.d/x"), "named with an absolute path (/etc/cron.d/x)"),
    (member("./a/../../x"), "named with a '..' component (./a/../../x)"),
    (member("./h", tarfile.LNKTYPE, linkname="./later"), "a hard link to ./later, which is not"),
    (member("./h", tarfile.LNKTYPE, linkname="../../etc/passwd"), "a hard link whose target"),
    (member("./dir", tarfile.DIRTYPE), None),  # a directory is fine
]


@pytest.mark.parametrize(("bad", "reason"), REFUSED, ids=lambda v: getattr(v, "name", ""))
@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_unsafe_members_are_refused_at_their_header(bad, reason, tar_format):
    data = make_tar(GOOD, bad, member("./later"), format=tar_format)
    if reason is None:
        assert feed_in(data, 512)
        return
    hasher = TarHasher()
    # The bad member's header ends where tarfile says its data starts (after any long-name
    # or pax member): the hasher refuses in the feed that completes it, and not before.
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        end = next(i for i in archive if i.name == bad.name).offset_data
    hasher.feed(data[: end - 1])
    with pytest.raises(UnsafeMemberError) as caught:
        hasher.feed(data[end - 1 : end])
    assert reason in str(caught.value)
    assert caught.value.member.endswith(bad.name.lstrip("./").rsplit("/", 1)[-1])


def test_not_strict_lists_the_unsafe_and_hashes_the_rest():
    data = make_tar(GOOD, member("./su", mode=0o4755), data={"./su": b"x"})
    hasher = TarHasher(strict=False)
    hasher.feed(data)
    assert set(hasher.finish()) == {"./good", "./su"}
    assert [e.member for e in hasher.unsafe] == ["./su"]


def test_a_long_symlink_name_is_refused_like_a_short_one():
    long = "./" + "d" * 150 + "/target"
    data = make_tar(
        member(long, tarfile.SYMTYPE, linkname="/" + "x" * 200), format=tarfile.GNU_FORMAT
    )
    with pytest.raises(UnsafeMemberError, match="symbolic link") as caught:
        feed_in(data, 100)
    assert caught.value.member == long


def test_a_hard_link_with_a_long_target_gets_its_checksum():
    long = "./" + "t" * 200
    data = make_tar(
        member(long),
        member("./copy", tarfile.LNKTYPE, linkname=long),
        data={long: b"blob"},
        format=tarfile.GNU_FORMAT,
    )
    digest = hashlib.sha256(b"blob").hexdigest()
    assert feed_in(data, 300) == {long: digest, "./copy": digest}


def test_a_global_pax_header_that_renames_members_is_refused():
    data = make_tar(GOOD, format=tarfile.PAX_FORMAT, pax_headers={"path": "evil"})
    with pytest.raises(UnsafeMemberError, match="setting 'path' for every later member"):
        feed_in(data, 512)


def test_a_file_the_metadata_does_not_list_is_refused_at_its_header():
    data = make_tar(GOOD, member("./extra"))
    with pytest.raises(UnsafeMemberError, match=r"member \./extra is not listed in the metadata"):
        feed_in(data, 512, listed={"./good"})


def test_a_gnu_sparse_member_is_refused():
    header = member("./sparse", tarfile.GNUTYPE_SPARSE).tobuf(tarfile.GNU_FORMAT)
    with pytest.raises(UnsafeMemberError, match="a GNU sparse file"):
        feed_in(header + bytes(1024), 512)
