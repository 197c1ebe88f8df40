"""SHA-256 of every file in a tar stream, and a check of every member, as chunks pass by.

bbr downloads a tar and then reads it again to hash it. bbrx hashes the bytes on their
way: `TarHasher.feed` takes the stream in whatever chunks arrive; the tar digest under it
(`tardigest.TarDigest`) hashes each regular file's data in place (memoryview slices, no
copies), and the digest of the whole stream comes with it at no second pass. Headers are
parsed by the standard library's `tarfile.TarInfo.frombuf`; GNU long names/links and pax
headers are applied to the member they describe, as tar itself does.

A restore feeds each chunk through the hasher *before* sending it to the VM's tar, so a
member the hasher refuses never reaches the VM: tar cannot act on a header it has not
received whole. Only what a checksum covers may be planted: regular files (hashed),
directories, and hard links to an earlier regular file of the same tar (they get that
file's checksum). Symlinks, devices, FIFOs, set-id/sticky modes, absolute names and `..`
components are refused (`UnsafeMemberError`).
"""

from __future__ import annotations

import tarfile
from collections.abc import Container

from orchestrator.bbr.tardigest import TarDigest

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = {tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE}
_META = {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE}
_SPECIAL_BITS = 0o7000  # setuid, setgid, sticky
_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.GNUTYPE_SPARSE: "a GNU sparse file",
}
# GNU tar's magic: in its headers bytes 345..500 hold atimes and sparse maps, which
# Python's parser would read as a ustar name prefix. A GNU header with anything there
# means tar and this parser could disagree on the member's name: refused.
_GNU_MAGIC = b"ustar  \0"
_PREFIX = slice(345, 500)
# Pax keys that change what a member is; with a value they would redefine it in a way
# this hasher does not follow (a global default name, a sparse map).
_GLOBAL_REFUSED = ("path", "linkpath", "size")


class TarStreamError(ValueError):
    """The bytes are not a whole, well-formed tar."""


class UnsafeMemberError(TarStreamError):
    """A member that a restore must not plant: it names the member and why."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"member {member} is {reason}")
        self.member = member
        self.reason = reason


class TarHasher:
    """Feed it a tar stream; `checksums` maps `./path` to the SHA-256 of each regular file.

    strict (a restore): an unsafe member raises `UnsafeMemberError` from the `feed` whose
    chunk completes its header. Not strict (a backup, which only records what the VM
    gave): unsafe members are listed in `unsafe` and the stream goes on. `listed` (a
    restore: the metadata's checksums) refuses a file it does not name, at its header.
    """

    def __init__(self, *, strict: bool = True, listed: Container[str] | None = None) -> None:
        self.strict = strict
        self.listed = listed
        self.unsafe: list[UnsafeMemberError] = []
        self.checksums: dict[str, str] = {}
        self.bytes = 0
        #: Hashes every file's data (checksums are taken from it) and the whole stream.
        self.tar = TarDigest()
        self._header = bytearray()
        self._remaining = 0  # data bytes left in the current member
        self._padding = 0  # bytes up to the next 512-byte boundary
        self._name: str | None = None  # of the regular file whose data is passing
        self._data_offset = 0
        self._size = 0
        self._meta: bytearray | None = None  # data of a long-name or pax member
        self._meta_type = b""
        self._long_name: str | None = None
        self._long_link: str | None = None
        self._pax: dict[str, str] = {}
        self._zero_blocks = 0
        self.ended = False

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        view = memoryview(chunk)
        self.tar.feed(view)  # first: a member ending in this chunk has its checksum there
        start = self.bytes
        self.bytes += len(view)
        position, end = 0, len(view)
        while position < end:
            if self.ended:
                return  # record padding after the end-of-archive marker
            if self._remaining:
                take = min(self._remaining, end - position)
                if self._meta is not None:
                    self._meta += view[position : position + take]
                self._remaining -= take
                position += take
                if not self._remaining:
                    self._member_done()
            elif self._padding:
                take = min(self._padding, end - position)
                self._padding -= take
                position += take
            else:
                take = min(BLOCK - len(self._header), end - position)
                self._header += view[position : position + take]
                position += take
                if len(self._header) == BLOCK:
                    block = bytes(self._header)
                    self._header.clear()
                    self._on_header(block, start + position)

    def finish(self) -> dict[str, str]:
        """The checksums, once the stream has ended where a tar may end."""
        if self._remaining or self._header or (not self.ended and self._zero_blocks == 0):
            raise TarStreamError(f"the tar stream ended early (after {self.bytes} bytes)")
        return self.checksums

    def _on_header(self, block: bytes, data_offset: int) -> None:
        if block == _ZERO_BLOCK:
            self._zero_blocks += 1
            self.ended = self._zero_blocks >= 2
            return
        if self._zero_blocks:
            # GNU tar stops at a zero block ("A lone zero block") and exits 0: whatever
            # follows would be hashed here and never unpacked there.
            raise TarStreamError(
                f"a lone zero block before byte {self.bytes}: tar stops reading there, so the "
                "members after it would not be restored"
            )
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise TarStreamError(f"bad tar header at byte {self.bytes}: {exc}") from None
        try:
            size = int(self._pax.get("size", info.size)) if info.type not in _META else info.size
        except ValueError:
            raise TarStreamError(f"bad pax size at byte {self.bytes}") from None
        if size < 0:
            raise TarStreamError(f"bad member size at byte {self.bytes}")
        self._remaining = size
        self._padding = -size % BLOCK
        if info.type in _META:
            self._meta, self._meta_type = bytearray(), info.type
        else:
            name = self._pax.get("path") or self._long_name or info.name
            link = self._pax.get("linkpath") or self._long_link or info.linkname
            pax, self._long_name, self._long_link, self._pax = self._pax, None, None, {}
            problem = _problem(info, name, link, pax, block, self.checksums)
            if problem is None and size and info.type not in _REGULAR:
                # GNU tar reads no data after a directory or a hard link: these bytes would
                # be skipped here as data and read there as further, unchecked members.
                problem = f"a {_what(info)} with {size} bytes of data after its header"
            if (
                problem is None
                and self.listed is not None
                and info.type != tarfile.DIRTYPE
                and _key(name) not in self.listed
            ):
                problem = "not listed in the metadata"
            if problem is not None:
                self._refuse(UnsafeMemberError(_key(name), problem))  # raises when strict
            if info.type in _REGULAR:
                self._name = _key(name)
                self._data_offset = data_offset
                self._size = size
            elif info.type == tarfile.LNKTYPE and _key(link) in self.checksums:
                # A hard link is the same file under a second name: on the VM, and to bbr,
                # both names are files with the target's checksum.
                self.checksums[_key(name)] = self.checksums[_key(link)]
        if not size:
            self._member_done()

    def _refuse(self, error: UnsafeMemberError) -> None:
        if self.strict:
            raise error
        self.unsafe.append(error)

    def _member_done(self) -> None:
        if self._name is not None:
            member = self.tar.members.pop(self._data_offset, None)
            if member is None or member[0] != self._size:
                # The two readings of the headers disagree: not a tar either can vouch for.
                raise TarStreamError(f"a member whose size is unclear before byte {self.bytes}")
            self.checksums[self._name] = member[1]
        elif self._meta is not None:
            data = bytes(self._meta)
            if self._meta_type == tarfile.GNUTYPE_LONGNAME:
                self._long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif self._meta_type == tarfile.GNUTYPE_LONGLINK:
                self._long_link = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif self._meta_type == tarfile.XHDTYPE:
                self._pax = _pax_records(data)
            elif self._meta_type == tarfile.XGLTYPE:
                records = _pax_records(data)
                for key in records:
                    if key in _GLOBAL_REFUSED or key.startswith("GNU.sparse"):
                        self._refuse(
                            UnsafeMemberError(
                                "(global pax header)", f"setting {key!r} for every later member"
                            )
                        )
        self._name = self._meta = None


def _problem(
    info: tarfile.TarInfo,
    name: str,
    link: str,
    pax: dict[str, str],
    block: bytes,
    checksums: dict[str, str],
) -> str | None:
    """Why this member must not be restored, or None."""
    if info.type in _KINDS:
        what = _KINDS[info.type]
        return f"{what} (to {link})" if info.type == tarfile.SYMTYPE else what
    if info.type not in _REGULAR and info.type not in (tarfile.DIRTYPE, tarfile.LNKTYPE):
        return f"of tar type {info.type!r}, which is neither a regular file nor a directory"
    if bad := _bad_name(name):
        return f"named with {bad}"
    if info.mode & _SPECIAL_BITS:
        return f"of mode {info.mode:04o}, with setuid, setgid or sticky bits"
    if any(key.startswith("GNU.sparse") for key in pax):
        return "a GNU sparse file (pax sparse map)"
    if block[257:265] == _GNU_MAGIC and any(block[_PREFIX]):
        return "a GNU header with data in its prefix field (tar would read its name differently)"
    if info.type == tarfile.LNKTYPE:
        if bad := _bad_name(link):
            return f"a hard link whose target is named with {bad}"
        if _key(link) not in checksums:
            return f"a hard link to {_key(link)}, which is not an earlier regular file of this tar"
    return None


def _what(info: tarfile.TarInfo) -> str:
    return "directory" if info.type == tarfile.DIRTYPE else "hard link"


def _bad_name(name: str) -> str | None:
    if not name:
        return "an empty name"
    if name.startswith("/"):
        return f"an absolute path ({name})"
    if ".." in name.split("/"):
        return f"a '..' component ({name})"
    return None


def _key(name: str) -> str:
    """Member names as bbr keys them: `./path`."""
    return name if name.startswith("./") else "./" + name.lstrip("/")


def _pax_records(data: bytes) -> dict[str, str]:
    """`LENGTH key=value\\n` records of a pax extended header."""
    records: dict[str, str] = {}
    position = 0
    while position < len(data):
        space = data.find(b" ", position)
        if space < 0:
            break
        try:
            length = int(data[position:space])
        except ValueError:
            raise TarStreamError("bad pax header record") from None
        if length <= space - position:
            raise TarStreamError("bad pax header record length")
        record = data[space + 1 : position + length - 1]
        key, _, value = record.partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records
