"""Reading a running script's output, bounded in bytes and in time (both transports).

A job script is code bbrx does not control: it may print megabytes, or leave a daemon
behind that holds its stdout open for ever. So bbrx keeps a fixed number of bytes of each
stream (the head of stdout, which is where metadata lives; the tail of stderr, which is
where the reason for a failure lives), and waits for the *script* to end, not for its
pipes' EOF: once it has ended, its output gets a short grace to drain, then bbrx stops
reading, whoever still holds the pipes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import time
from collections.abc import Callable
from typing import IO

from orchestrator.transport.instance import ScriptCall

log = logging.getLogger(__name__)

#: Each script run carries this variable with a value of its own; everything it starts
#: inherits it, sessions of their own (setsid, double forks) included, so a timeout or an
#: interruption can end them all by scanning /proc/PID/environ. A process that scrubs its
#: environment (env -i, or a daemon that execs with an empty one) escapes that scan; only
#: its process group then finds it, if it stayed in the script's.
MARKER_VAR = "BBRX_SCRIPT_ID"

#: Bytes of stdout kept: enough for any metadata (bbr's is a few hundred bytes).
STDOUT_LIMIT = 1 << 20
#: Bytes of stderr kept: its tail.
STDERR_LIMIT = 64 << 10
#: How long a script's output may go on draining after the script itself has ended.
OUTPUT_GRACE_SECONDS = 1.5
# Lines longer than this are never transport markers and are not scanned for them.
_SCAN_LIMIT = 256
_READ = 1 << 16
_TICK = 0.05


class ScriptOutput:
    """Pumps a script's stdout and stderr pipes from the calling thread.

    `on_stderr_line` sees each complete short stderr line (a transport's markers), in the
    caller's thread, as it arrives.
    """

    def __init__(
        self,
        stdout: IO[bytes],
        stderr: IO[bytes],
        on_stderr_line: Callable[[bytes], None] | None = None,
    ) -> None:
        self._streams = (stdout, stderr)
        self._selector = selectors.DefaultSelector()
        for stream in self._streams:
            os.set_blocking(stream.fileno(), False)
            self._selector.register(stream.fileno(), selectors.EVENT_READ, stream is stderr)
        self._open = 2
        self._on_line = on_stderr_line
        self._line = bytearray()
        self._line_too_long = False
        self.stdout = bytearray()
        self.stdout_truncated = False
        self._stderr = bytearray()
        self.stderr_dropped = 0

    @property
    def at_eof(self) -> bool:
        return self._open == 0

    def pump(self, timeout: float) -> None:
        """Read whatever arrives within `timeout` seconds."""
        if self._open == 0:
            time.sleep(timeout)
            return
        for key, _ in self._selector.select(timeout):
            try:
                data = os.read(key.fd, _READ)
            except BlockingIOError:
                continue
            if not data:
                self._selector.unregister(key.fd)
                self._open -= 1
            elif key.data:
                self._take_stderr(data)
            else:
                self._take_stdout(data)

    def pump_until(self, done: Callable[[], bool], deadline: float | None) -> bool:
        """Pump until `done()` (True) or `deadline` on the monotonic clock (False)."""
        while not done():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            self.pump(_TICK if deadline is None else min(_TICK, deadline - now))
        return True

    def drain(self, seconds: float = OUTPUT_GRACE_SECONDS) -> bool:
        """Pump until both pipes are at EOF, for at most `seconds`; True if they are."""
        return self.pump_until(lambda: self.at_eof, time.monotonic() + seconds)

    def close(self) -> None:
        """Stop reading: whoever still holds the pipes' other ends gets EPIPE."""
        self._selector.close()
        for stream in self._streams:
            with contextlib.suppress(OSError):
                stream.close()

    @property
    def stderr(self) -> bytes:
        return bytes(self._stderr[-STDERR_LIMIT:])

    @property
    def stderr_bytes_dropped(self) -> int:
        return self.stderr_dropped + max(len(self._stderr) - STDERR_LIMIT, 0)

    def _take_stdout(self, data: bytes) -> None:
        room = STDOUT_LIMIT - len(self.stdout)
        if len(data) > room:
            self.stdout_truncated = True
            data = data[: max(room, 0)]
        self.stdout += data

    def _take_stderr(self, data: bytes) -> None:
        self._stderr += data
        if len(self._stderr) > 2 * STDERR_LIMIT:  # trimmed in steps: amortised O(1)
            excess = len(self._stderr) - STDERR_LIMIT
            del self._stderr[:excess]
            self.stderr_dropped += excess
        if self._on_line is not None:
            self._scan(data)

    def _scan(self, data: bytes) -> None:
        assert self._on_line is not None
        *complete, rest = data.split(b"\n")
        for piece in complete:
            if not self._line_too_long and len(self._line) + len(piece) <= _SCAN_LIMIT:
                self._on_line(bytes(self._line) + piece + b"\n")
            self._line.clear()
            self._line_too_long = False
        if self._line_too_long or len(self._line) + len(rest) > _SCAN_LIMIT:
            self._line.clear()
            self._line_too_long = True
        else:
            self._line += rest


def warn_leftovers(
    call: ScriptCall, address: str, exit_code: int | None, killed_by: str | None, *, ended: bool
) -> None:
    """Both transports' one word on a script that ended while a process it started
    still held its output."""
    how = f"was killed ({killed_by})" if killed_by else f"exited {exit_code}"
    log.warning(
        "%s/%s on %s %s, but a process it started still holds its output: bbrx stopped "
        "reading it%s",
        call.job,
        call.script,
        address,
        how,
        " and ended it" if ended else " (left running)",
    )
