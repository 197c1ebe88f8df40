"""How a backup's tar reaches the jump box's disk, and how it is read back from there.

A tar is written with direct I/O (O_DIRECT) where the filesystem allows it: the bytes go
from one page-aligned buffer of this process to the device, with no copy into the page
cache and no dirty pages for the kernel to write back later. A backup is fsynced before
it is published in any case, so the page cache's copy would only ever be written once
and thrown away; on this project's machines the buffered write and its writeback cost
about as much CPU as the SSH client's decryption. The tar's last bytes (a tar's length is
a multiple of 512, not of the 4096 that direct I/O needs) are written through the page
cache, and a filesystem that refuses direct I/O gets the whole file that way, flushed in
the background as it grows (`_BackgroundSync`) so the final fsync has little left to do.

The read-back that checks the copy (`ReadBack`, and `read_chunks` for a second read)
reads it with direct I/O too, so what it hashes came from the device, not from memory that
held the bytes on their way there. It follows the writer: each READ_CHUNK is read once the
writer is FOLLOW_LAG past its end (so 3 to 7 MiB behind it), and what is left once the
file is synced and the stream has ended. Dirty pages of the file (its tail, or a change
another process wrote through the page cache) are written back by the kernel before a
direct read of their range, so the read sees them as the disk now holds them. A change
to a piece after it was read is not seen: the price of not reading the whole tar again
after the stream.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

#: Offsets and lengths of direct I/O must be multiples of the device's logical block
#: size: 4096 covers every one Linux has (512 and 4096).
ALIGN = 4096
#: One write per MiB from the stream (what the transports deliver per read), the next ones
#: filled while one is written (a direct write waits for the device); reads back in larger
#: pieces, a few ahead of the hashing.
WRITE_CHUNK = 1 << 20
WRITE_BUFFERS = 3
READ_CHUNK = 4 << 20
READ_AHEAD = 3
#: How far behind the writer the read-back follows: as far as the stream can be ahead of
#: the file. A byte changed in the file by the stream's first read after the file holds
#: it (the simulator's `corrupt-local`) is then read as changed, however the writing thread
#: is scheduled: by then at most WRITE_BUFFERS - 1 more chunks can have been written.
FOLLOW_LAG = WRITE_CHUNK * WRITE_BUFFERS


class Readable(Protocol):
    """What a tar is written from: a transport's stream (`VmStream`), or a file."""

    def read(self, size: int = -1, /) -> bytes: ...


def aligned_buffer(size: int) -> mmap.mmap:
    """Anonymous memory: page-aligned, as direct I/O needs its buffers to be."""
    return mmap.mmap(-1, size)


def fill(stream: Readable, view: memoryview) -> int:
    """Read from `stream` into `view` until it is full or the stream ends; the count."""
    readinto = getattr(stream, "readinto", None)
    filled = 0
    while filled < len(view):
        if readinto is not None:
            count = readinto(view[filled:])
        else:
            data = stream.read(len(view) - filled)
            count = len(data)
            view[filled : filled + count] = data
        if not count:
            break
        filled += count
    return filled


def write_new(
    path: Path,
    stream: Readable,
    check: Callable[[], None] | None,
    progress: Callable[[int], None] | None,
    consume: Callable[[memoryview], None],
) -> ReadBack:
    """Create `path` (it must not exist) with everything `stream` gives, fsync it, and read
    it back from the disk as it grows: `consume` gets the file's bytes, in order, in a
    thread of its own, each piece once the writer is at least FOLLOW_LAG past its end.

    The stream is read into one WRITE_CHUNK while a thread writes the ones before it
    (`_WriteBehind`): a direct write waits for the device, and the stream must not wait
    with it. At most WRITE_BUFFERS chunks are in this process's memory, not yet in the
    file. `check` (the interruption test) runs before each read, and while a free buffer
    is awaited. Returns the `ReadBack`, whose `finish` reads the rest: call it once nothing
    may change the file any more in a way the check should see. Raises OSError.
    """
    follower: ReadBack | None = None
    try:
        with _Sink(path) as sink:
            follower = ReadBack(path, consume, direct=sink.direct)
            behind = _WriteBehind(sink, follower)
            try:
                while True:
                    if check is not None:
                        check()
                    index, view = behind.take(check)
                    count = fill(stream, view)
                    behind.give(index, count)
                    if not count:
                        break
                    if progress is not None:
                        progress(count)
                behind.finish()
            finally:
                behind.close()
            sink.sync()
            follower.direct_write = sink.started_direct
    except BaseException:
        if follower is not None:  # its thread and descriptor go with the failed copy
            follower.close()
        raise
    return follower


class _WriteBehind:
    """A thread that writes the chunks the stream filled, in order, to a `_Sink`, and tells
    the read-back how far the file has grown."""

    #: How often a wait for a free buffer runs the interruption test.
    POLL = 0.5

    def __init__(self, sink: _Sink, follower: ReadBack) -> None:
        self._sink = sink
        self._follower = follower
        self._buffers = [aligned_buffer(WRITE_CHUNK) for _ in range(WRITE_BUFFERS)]
        self._views = [memoryview(buffer) for buffer in self._buffers]
        self._free: queue.Queue[int | None] = queue.Queue()
        self._full: queue.Queue[tuple[int, int] | None] = queue.Queue()
        for index in range(WRITE_BUFFERS):
            self._free.put(index)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write, daemon=True)
        self._thread.start()

    def take(self, check: Callable[[], None] | None) -> tuple[int, memoryview]:
        """A free buffer to fill. Raises what the writing thread met, or what `check` does."""
        while True:
            try:
                index = self._free.get(timeout=self.POLL)
            except queue.Empty:
                if check is not None:
                    check()
                continue
            if index is None:
                assert self._error is not None
                raise self._error
            return index, self._views[index]

    def give(self, index: int, count: int) -> None:
        """Hand a buffer back, with `count` bytes to write (none: it goes back to the free)."""
        if count:
            self._full.put((index, count))
        else:
            self._free.put(index)

    def finish(self) -> None:
        """Wait until every chunk given is in the file. Raises what the writing thread met."""
        self._full.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop writing (after the chunk being written, if any) and free the buffers."""
        if self._thread.is_alive():
            self._full.put(None)
            self._thread.join()
        for buffer, view in zip(self._buffers, self._views, strict=True):
            _free(buffer, view)

    def _write(self) -> None:
        while (item := self._full.get()) is not None:
            index, count = item
            try:
                self._sink.write(self._views[index][:count])
                self._follower.written(self._sink.size)
            except BaseException as exc:  # raised in the stream's thread by take or finish
                self._error = exc
                self._free.put(None)
                return
            self._free.put(index)


class ReadBack:
    """A file read back from the disk while it is being written, a FOLLOW_LAG behind the
    writer (so a change made to the file right after a write is there to be read: the
    simulator's `corrupt-local` fault, a faulty disk), and to its end by `finish`."""

    def __init__(self, path: Path, consume: Callable[[memoryview], None], *, direct: bool) -> None:
        self.path = path
        self.direct_write = direct
        self._consume = consume
        self._fd = _open_for_reading(path)
        self._buffer = aligned_buffer(READ_CHUNK)
        self._view = memoryview(self._buffer)
        self._offset = 0  # read back and consumed up to here
        self._written = 0
        self._stopping = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    @property
    def size(self) -> int:
        return self._written

    def written(self, size: int) -> None:
        with self._changed:
            self._written = size
            self._changed.notify()

    def finish(self, check: Callable[[], None] | None = None) -> int:
        """Read what is left, to the end of the file; the byte count. Raises OSError."""
        self.stop()
        try:
            if self._error is not None:
                raise self._error
            while True:
                if check is not None:
                    check()
                if self._read() < READ_CHUNK:  # the end: no read at an unaligned offset
                    return self._offset
        finally:
            self._close()

    def close(self) -> None:
        """Stop following and let the file go, read to its end or not."""
        self.stop()
        self._close()

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify()
        self._thread.join()

    def _follow(self) -> None:
        try:
            while True:
                with self._changed:
                    while not self._stopping and (
                        self._written - FOLLOW_LAG - self._offset < READ_CHUNK
                    ):
                        self._changed.wait()
                    if self._stopping:
                        return
                self._read()
        except BaseException as exc:  # re-raised by finish
            self._error = exc

    def _read(self) -> int:
        count = _pread(self._fd, self._view, self._offset)
        if count:
            self._consume(self._view[:count])
            self._offset += count
        return count

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            _free(self._buffer, self._view)

    def __del__(self) -> None:  # a copy abandoned on an error: its descriptor goes too
        with contextlib.suppress(Exception):
            self._close()


def _pread(fd: int, view: memoryview, offset: int) -> int:
    """One read at `offset`; a direct read the filesystem refuses once the file is open
    (some FUSE and network filesystems accept O_DIRECT at open only) is made buffered."""
    try:
        return os.preadv(fd, [view], offset)
    except OSError as exc:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if exc.errno != errno.EINVAL or not flags & os.O_DIRECT:
            raise
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        return os.preadv(fd, [view], offset)


def _open_direct(path: Path, flags: int) -> tuple[int, bool]:
    """Open with O_DIRECT, or without it where the filesystem refuses it at open; the
    descriptor, and whether it is direct."""
    try:
        return os.open(path, flags | os.O_CLOEXEC | os.O_DIRECT, 0o666), True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        log.debug("%s: the filesystem refuses direct I/O; going through the cache", path)
        return os.open(path, flags | os.O_CLOEXEC, 0o666), False


def _open_for_reading(path: Path) -> int:
    return _open_direct(path, os.O_RDONLY)[0]


class _Sink:
    """A new file, written with direct I/O for as long as the filesystem and the
    alignment allow, and through the page cache after that."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._fd, self.direct = _open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        self.started_direct = self.direct
        self._syncer: _BackgroundSync | None = None if self.direct else _BackgroundSync(self._fd)

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._syncer is not None:
            self._syncer.stop()
        os.close(self._fd)

    def write(self, view: memoryview) -> None:
        if self.direct:
            aligned = len(view) - len(view) % ALIGN
            if aligned:
                before = self.size
                try:
                    self._write_all(view[:aligned])
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    # Accepted at open, refused at a write (some FUSE and network
                    # filesystems): the rest goes through the cache, from where it stopped.
                    log.debug("%s: direct writes refused; writing through the cache", self.path)
                    self._buffered()
                    self._write_all(view[self.size - before :])
                    return
            if aligned == len(view):
                return
            view = view[aligned:]
            # Only a stream's end is not a whole number of blocks: its last bytes go
            # through the cache, and the fsync writes them.
            self._buffered()
        self._write_all(view)
        if self._syncer is not None:
            self._syncer.wrote(len(view))

    def sync(self) -> None:
        os.fsync(self._fd)

    def _buffered(self) -> None:
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        self.direct = False
        if self._syncer is None:
            self._syncer = _BackgroundSync(self._fd)

    def _write_all(self, view: memoryview) -> None:
        while view:
            written = os.write(self._fd, view)
            if not written:
                raise OSError(errno.EIO, "a write to the file made no progress")
            self.size += written
            view = view[written:]


class _BackgroundSync:
    """Flushes a file written through the page cache to disk while it is still being written.

    A backup must be on disk before it is published, but one fsync of a large tar at the
    end would stall the run for as long as the disk takes to catch up. A thread flushes
    every SYNC_EVERY bytes as they come, so the final fsync finds little left to do.
    """

    SYNC_EVERY = 64 << 20

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pending = 0
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def wrote(self, count: int) -> None:
        self._pending += count
        if self._pending >= self.SYNC_EVERY:
            self._pending = 0
            self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                os.fdatasync(self._fd)
            except OSError:
                return  # the writer's own fsync reports real trouble


@contextlib.contextmanager
def read_chunks(
    path: Path, check: Callable[[], None] | None = None
) -> Iterator[Iterator[memoryview]]:
    """The file's bytes in READ_CHUNK pieces, read a few pieces ahead in a thread.

    Direct reads where the filesystem allows them (see the module's docstring). Each
    piece is valid until the next is asked for: a consumer that hands it to another
    thread must be done with it by then. `check` runs before each piece. Raises OSError.
    """
    fd = _open_for_reading(path)
    try:
        ahead = _ReadAhead(fd)
        try:
            yield ahead.pieces(check)
        finally:
            ahead.stop()
    finally:
        os.close(fd)


class _ReadAhead:
    """A thread that reads a file into a ring of aligned buffers, ahead of its consumer."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffers = [aligned_buffer(READ_CHUNK) for _ in range(READ_AHEAD)]
        self._views = [memoryview(buffer) for buffer in self._buffers]
        self._free: queue.Queue[int | None] = queue.Queue()
        self._full: queue.Queue[tuple[int, int] | OSError | None] = queue.Queue()
        for index in range(READ_AHEAD):
            self._free.put(index)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def pieces(self, check: Callable[[], None] | None) -> Iterator[memoryview]:
        while True:
            if check is not None:
                check()
            item = self._full.get()
            if item is None:
                return
            if isinstance(item, OSError):
                raise item
            index, count = item
            try:
                yield self._views[index][:count]
            finally:
                self._free.put(index)

    def stop(self) -> None:
        self._free.put(None)
        self._thread.join()
        for buffer, view in zip(self._buffers, self._views, strict=True):
            _free(buffer, view)

    def _read(self) -> None:
        offset = 0
        while (index := self._free.get()) is not None:
            try:
                count = _pread(self._fd, self._views[index], offset)
            except OSError as exc:
                self._full.put(exc)
                return
            if count:
                self._full.put((index, count))
                offset += count
            if count < READ_CHUNK:  # the end of the file
                self._full.put(None)
                return


def _free(buffer: mmap.mmap, view: memoryview) -> None:
    view.release()
    # A slice still referenced somewhere keeps the memory exported: the mapping is then
    # unmapped when the last reference goes, not now.
    with contextlib.suppress(BufferError):
        buffer.close()
