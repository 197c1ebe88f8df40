"""SHA-256 of every file in a tar stream, computed from chunks as they pass by.

bbr downloads a tar and then reads it again to hash it. bbrx hashes the bytes on their
way to disk: `TarHasher.feed` takes the stream in whatever chunks arrive and hashes each
regular file's data in place (memoryview slices, no copies). Headers are parsed by the
standard library's `tarfile.TarInfo.frombuf`; GNU long names and pax headers are
applied to the member they describe, as tar itself does.
"""

from __future__ import annotations

import hashlib
import tarfile
from typing import Any

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = {tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE}
_META = {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE}


class TarStreamError(ValueError):
    """The bytes are not a whole, well-formed tar."""


class TarHasher:
    """Feed it a tar stream; `checksums` maps `./path` to the SHA-256 of each regular file."""

    def __init__(self) -> None:
        self.checksums: dict[str, str] = {}
        self.bytes = 0
        self._header = bytearray()
        self._remaining = 0  # data bytes left in the current member
        self._padding = 0  # bytes up to the next 512-byte boundary
        self._digest: Any = None
        self._name: str | None = None
        self._meta: bytearray | None = None  # data of a long-name or pax member
        self._meta_type = b""
        self._long_name: str | None = None
        self._pax: dict[str, str] = {}
        self._zero_blocks = 0
        self.ended = False

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        view = memoryview(chunk)
        self.bytes += len(view)
        position, end = 0, len(view)
        while position < end:
            if self.ended:
                return  # record padding after the end-of-archive marker
            if self._remaining:
                take = min(self._remaining, end - position)
                piece = view[position : position + take]
                if self._digest is not None:
                    self._digest.update(piece)
                elif self._meta is not None:
                    self._meta += piece
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
                    self._on_header(block)

    def finish(self) -> dict[str, str]:
        """The checksums, once the stream has ended where a tar may end."""
        if self._remaining or self._header or (not self.ended and self._zero_blocks == 0):
            raise TarStreamError(f"the tar stream ended early (after {self.bytes} bytes)")
        return self.checksums

    def _on_header(self, block: bytes) -> None:
        if block == _ZERO_BLOCK:
            self._zero_blocks += 1
            self.ended = self._zero_blocks >= 2
            return
        self._zero_blocks = 0
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise TarStreamError(f"bad tar header at byte {self.bytes}: {exc}") from None
        try:
            size = int(self._pax.get("size", info.size)) if info.type not in _META else info.size
        except ValueError:
            raise TarStreamError(f"bad pax size at byte {self.bytes}") from None
        self._remaining = size
        self._padding = -size % BLOCK
        if info.type in _META:
            self._meta, self._meta_type = bytearray(), info.type
        else:
            name = self._pax.get("path") or self._long_name or info.name
            pax, self._long_name, self._pax = self._pax, None, {}
            if info.type in _REGULAR:
                self._digest = hashlib.sha256()
                self._name = _key(name)
            elif info.type == tarfile.LNKTYPE:
                # A hard link is the same file under a second name: on the VM, and to bbr,
                # both names are files with the target's checksum.
                target = self.checksums.get(_key(pax.get("linkpath") or info.linkname))
                if target is not None:
                    self.checksums[_key(name)] = target
        if not size:
            self._member_done()

    def _member_done(self) -> None:
        if self._digest is not None and self._name is not None:
            self.checksums[self._name] = self._digest.hexdigest()
        elif self._meta is not None:
            data = bytes(self._meta)
            if self._meta_type == tarfile.GNUTYPE_LONGNAME:
                self._long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif self._meta_type == tarfile.XHDTYPE:
                self._pax = _pax_records(data)
        self._digest = self._name = self._meta = None


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
