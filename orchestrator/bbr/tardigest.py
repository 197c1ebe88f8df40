"""The tar digest: one SHA-256 that covers every byte of a tar stream, computed with one
SHA-256 pass over each file's data.

The VM and the jump box must agree on what a backup's tar holds, and the jump box must
hash every file's data anyway (bbr's metadata lists each file's SHA-256). A digest of the
whole stream beside those would hash all the data twice. This one hashes it once: every
byte that is not a regular file's data (headers, long names, pax records, padding, the
end-of-archive blocks, record padding) goes into a running SHA-256, the *frame*, and each
regular file's data goes into a SHA-256 of its own, whose 32 bytes then go into the frame
where the data was. The frame ends with the stream's length. Two streams with the same
tar digest are the same bytes, as far as SHA-256 can tell.

The framing needs only the headers: a member's size (a pax `size` record applies to the
next member that is not itself a long-name or pax header), and whether it is a regular
file (types `0`, NUL and `7`). It never raises: a header that does not parse sends the
rest of the stream into the frame as it is. It does not judge what a tar holds;
`tarstream.TarHasher` does, on top of it, and takes each file's checksum from here.

This module is also the program the VM runs beside its tar (see `transport.ssh`): it
uses the standard library alone and the syntax of Python 3.4, as a stemcell's python3
may be old. Run as a script, it copies its standard input to its standard output and
writes `bbrx-tar-sha256 <digest>` on standard error at the end; given an older Python,
it runs its first argument with /bin/sh instead (the shell's fallback).
"""

import os
import sys

try:
    import hashlib
    import tarfile
except ImportError:  # a python3 without its standard library (Debian's python3-minimal)
    if __name__ == "__main__":  # the VM's side: stdin is untouched yet, the shell can take it
        os.execv("/bin/sh", ["sh", "-c", sys.argv[1]])
    raise

if False:  # for type checkers only (typing may be missing from a VM's python3)
    from typing import Any  # noqa: F401

VERSION = b"bbrx tar digest 1\n"
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_META = (b"L", b"K", b"x", b"g")
_MAX_PAX = 1 << 20  # pax records read for a size; past a longer one the rest is framed raw


class TarDigest:
    """Feed it a tar stream in any chunks; `hexdigest()` once it has ended.

    With `record`, `members` maps each regular file's data offset in the stream to its
    size and the SHA-256 (hex) of its data, for `TarHasher` to take its checksums from
    (and to remove as it does: a job of a million files would hold them all otherwise).
    """

    def __init__(self, record=True):
        # type: (bool) -> None
        self.record = record
        self.members = {}  # type: dict[int, tuple[int, str]]
        self.bytes = 0
        self._frame = hashlib.sha256(VERSION)
        self._header = bytearray()
        self._remaining = 0
        self._padding = 0
        self._file_size = 0
        self._file = None  # type: Any  # the SHA-256 of the regular file whose data is passing
        self._file_offset = 0
        self._pax = None  # type: bytearray | None  # the data of a pax header, read for its size record
        self._pax_size = None  # type: int | None  # for the next member that is not a meta header
        self._zero_blocks = 0
        self._rest_framed = False  # after the end-of-archive blocks, or a broken header

    def feed(self, chunk):
        # type: (bytes | bytearray | memoryview) -> None
        view = memoryview(chunk)
        end = len(view)
        position = 0
        while position < end:
            if self._rest_framed:
                self._frame.update(view[position:])
                position = end
            elif self._remaining:
                take = min(self._remaining, end - position)
                piece = view[position : position + take]
                if self._file is not None:
                    self._file.update(piece)
                else:
                    self._frame.update(piece)
                    if self._pax is not None:
                        self._pax += piece
                self._remaining -= take
                position += take
                if not self._remaining:
                    self._member_done()
            elif self._padding:
                take = min(self._padding, end - position)
                self._frame.update(view[position : position + take])
                self._padding -= take
                position += take
            else:
                take = min(_BLOCK - len(self._header), end - position)
                self._header += view[position : position + take]
                position += take
                if len(self._header) == _BLOCK:
                    block = bytes(self._header)
                    self._header = bytearray()
                    self._on_header(block, self.bytes + position)
        self.bytes += end

    def hexdigest(self):
        # type: () -> str
        """The tar digest of what was fed (a stream cut short has its own)."""
        frame = self._frame.copy()
        if self._file is not None:
            frame.update(self._file.digest())
        frame.update(bytes(self._header))
        frame.update(("\nend %d\n" % self.bytes).encode("ascii"))
        return frame.hexdigest()

    def _on_header(self, block, data_offset):
        self._frame.update(block)
        if block == _ZERO_BLOCK:
            self._zero_blocks += 1
            self._rest_framed = self._zero_blocks >= 2
            return
        self._zero_blocks = 0
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except Exception:  # any header tarfile cannot read: no framing past it
            self._rest_framed = True
            return
        kind = info.type
        size = info.size
        if kind not in _META:
            if self._pax_size is not None:
                size = self._pax_size
            self._pax_size = None
        if size < 0:
            self._rest_framed = True
            return
        self._remaining = size
        self._padding = -size % _BLOCK
        if kind in _REGULAR:
            self._file = hashlib.sha256()
            self._file_offset = data_offset
            self._file_size = size
        elif kind == b"x":
            if size > _MAX_PAX:  # its size record could not be read: no framing past it
                self._rest_framed = True
                return
            self._pax = bytearray()
        if not size:
            self._member_done()

    def _member_done(self):
        if self._file is not None:
            digest = self._file.digest()
            self._frame.update(digest)
            if self.record:
                self.members[self._file_offset] = (self._file_size, self._file.hexdigest())
            self._file = None
        elif self._pax is not None:
            self._pax_size = _pax_size(bytes(self._pax))
            self._pax = None


def _pax_size(data):
    """The `size` record of a pax header's data, or None."""
    size = None
    position = 0
    while position < len(data):
        space = data.find(b" ", position)
        if space < 0:
            return size
        try:
            length = int(data[position:space])
        except ValueError:
            return size
        if length <= space - position:
            return size
        key, _, value = data[space + 1 : position + length - 1].partition(b"=")
        if key == b"size":
            try:
                size = int(value)
            except ValueError:
                size = None
        position += length
    return size


_F_SETPIPE_SZ = 1031
_F_GETPIPE_SZ = 1032
_SPLICE_F_MOVE = 1
_CHUNK = 1 << 20


def _enlarge(fd):
    # type: (int) -> None
    """Fewer, larger pipe reads and writes; a descriptor that is not a pipe, or a size
    not allowed, keeps its default."""
    try:
        import fcntl

        fcntl.fcntl(fd, _F_SETPIPE_SZ, _CHUNK)
    except Exception:
        pass


def _copy_and_digest():
    """The VM's side: standard input to standard output, the tar digest on stderr."""
    for fd in (0, 1):
        _enlarge(fd)
    digest = TarDigest(record=False)
    if not splice_through(digest, 0, 1):
        read_through(digest, 0, 1)
    os.close(1)
    sys.stderr.write("bbrx-tar-sha256 %s\n" % digest.hexdigest())


def read_through(digest, source, sink):
    # type: (TarDigest, int, int) -> None
    """Copy `source` to `sink` through this process's memory, feeding `digest` on the way."""
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    while True:
        count = os.readv(source, [view])
        if not count:
            break
        chunk = view[:count]
        digest.feed(chunk)
        written = 0
        while written < count:
            written += os.write(sink, chunk[written:])


def splice_through(digest, source, sink):
    # type: (TarDigest, int, int) -> bool
    """Copy the pipe `source` to `sink` with Linux's tee(2) and splice(2), feeding `digest`:
    tee duplicates what the pipe holds into a pipe of this process's, splice moves the
    original pages on to `sink`, and only the duplicate is read, to be hashed. That is one
    copy of the stream instead of two (a read and a write): about a third less CPU for
    tar, this filter and the ssh server together, measured on 1 GiB.

    False, having consumed nothing of `source`, where this cannot work: no ctypes (a
    minimal python3), no such calls (not Linux), or descriptors they refuse (`source` not
    a pipe, `sink` not something splice can write to). The caller then reads through."""
    try:
        import ctypes
        import errno

        libc = ctypes.CDLL(None, use_errno=True)
        tee = libc.tee
        splice = libc.splice
    except Exception:
        return False
    tee.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
    tee.restype = ctypes.c_ssize_t
    splice.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_uint,
    ]
    splice.restype = ctypes.c_ssize_t
    # What a kernel, a filter (seccomp answers EPERM) or a descriptor says to a call it will
    # not make.
    refused = (
        errno.EINVAL,
        errno.ENOSYS,
        errno.ESPIPE,
        errno.EBADF,
        errno.EPERM,
        errno.EOPNOTSUPP,
    )
    duplicate, into_duplicate = os.pipe()
    try:
        _enlarge(into_duplicate)
        try:
            import fcntl

            chunk = min(_CHUNK, fcntl.fcntl(into_duplicate, _F_GETPIPE_SZ))
        except Exception:
            chunk = 1 << 16  # a pipe's default capacity
        buffer = bytearray(chunk)
        view = memoryview(buffer)
        started = False  # once a byte has moved on, there is no going back
        while True:
            count = tee(source, into_duplicate, chunk, 0)
            if count < 0:
                code = ctypes.get_errno()
                if code == errno.EINTR:
                    continue
                if not started and code in refused:
                    return False
                raise OSError(code, os.strerror(code))
            if not count:
                return True
            moved = 0
            while moved < count:
                step = splice(source, None, sink, None, count - moved, _SPLICE_F_MOVE)
                if step < 0:
                    code = ctypes.get_errno()
                    if code == errno.EINTR:
                        continue
                    if not started and code in refused:
                        return False  # the duplicate is dropped with its pipe, below
                    raise OSError(code, os.strerror(code))
                if not step:  # the pipe emptied under us: another reader, never ours
                    raise OSError(errno.EIO, "splice moved nothing of what tee saw")
                moved += step
                started = True
            got = 0
            while got < count:
                got += os.readv(duplicate, [view[got:count]])
            digest.feed(view[:count])
    finally:
        os.close(duplicate)
        os.close(into_duplicate)


if __name__ == "__main__":
    if sys.version_info < (3, 4):
        os.execv("/bin/sh", ["sh", "-c", sys.argv[1]])
    _copy_and_digest()
