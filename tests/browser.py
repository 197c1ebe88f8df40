"""A small driver for headless Chromium over the Chrome DevTools Protocol, on a pipe.

``--remote-debugging-pipe`` makes the browser read NUL-terminated JSON messages on fd 3
and write its own on fd 4: no port, no websocket, no third-party package. One Browser is
one process (the one this module started, and only it is ever killed, by its PID) with
one page attached in flattened-session mode.

Every wait is bounded: a hung browser fails the test with BrowserError, never hangs it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

CHROMIUM = "/usr/bin/chromium"
NOT_INSTALLED = "chromium not installed: apt-get install chromium"
DEFAULT_TIMEOUT = 20.0


_TRAMPOLINE = """
import os, sys
read_end, write_end = int(sys.argv[1]), int(sys.argv[2])
os.dup2(read_end, 3)
os.dup2(write_end, 4)
os.close(read_end)
os.close(write_end)
os.execv(sys.argv[3], sys.argv[3:])
"""


class BrowserError(RuntimeError):
    pass


def chromium_path() -> str | None:
    """The Chromium to drive, or None when there is none (tests then skip)."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    return shutil.which("chromium")


def _high_fd(fd: int) -> int:
    """``fd`` moved to 10 or above (closing the original), so that putting one pipe end
    on fd 3 or 4 cannot clobber the other."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Browser:
    """Headless Chromium with one page. Use as a context manager; ``close`` always ends
    the process."""

    def __init__(self, executable: str | None = None, *, timeout: float = DEFAULT_TIMEOUT):
        executable = executable or chromium_path()
        if executable is None:
            raise BrowserError(NOT_INSTALLED)
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="bbrx-chromium-")
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._events: list[dict[str, Any]] = []
        self._inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._proc: subprocess.Popen[bytes] | None = None
        self._session: str | None = None
        to_browser_r, to_browser_w = map(_high_fd, os.pipe())
        from_browser_r, from_browser_w = map(_high_fd, os.pipe())
        args = [
            "--headless",
            "--no-sandbox",  # root here; the page is our own file
            "--no-zygote",  # helpers are the browser's own children, reaped by it
            "--disable-gpu",
            "--remote-debugging-pipe",
            f"--user-data-dir={self._profile}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1100,900",
            "about:blank",
        ]
        # A trampoline puts the pipe ends on fds 3 and 4 and execs the browser in its
        # place, so the PID Popen reports is the browser's. (Not the shell: dash's
        # redirections take single-digit fds only.)
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _TRAMPOLINE,
                    str(to_browser_r),
                    str(from_browser_w),
                    executable,
                    *args,
                ],
                pass_fds=(to_browser_r, from_browser_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        finally:
            os.close(to_browser_r)
            os.close(from_browser_w)
        self._write_fd = to_browser_w
        self._read_fd = from_browser_r
        self._stderr: list[bytes] = []
        self._reader = threading.Thread(target=self._read_loop, name="cdp-reader", daemon=True)
        self._reader.start()
        self._err_reader = threading.Thread(target=self._stderr_loop, daemon=True)
        self._err_reader.start()
        try:
            self._attach()
        except BaseException:
            self.close()
            raise

    # --- the protocol ---------------------------------------------------------------------

    def _read_loop(self) -> None:
        buffer = b""
        try:
            while True:
                chunk = os.read(self._read_fd, 1 << 16)
                if not chunk:
                    break
                buffer += chunk
                while b"\0" in buffer:
                    raw, buffer = buffer.split(b"\0", 1)
                    if raw:
                        self._inbox.put(json.loads(raw))
        except OSError:
            pass
        finally:
            self._inbox.put(None)  # the browser went away

    def _stderr_loop(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stderr is not None
        with contextlib.suppress(OSError, ValueError):
            for line in proc.stderr:
                self._stderr = [*self._stderr[-40:], line]

    def _stderr_text(self) -> str:
        return b"".join(self._stderr).decode(errors="replace")[-2000:]

    def _pump(self, deadline: float) -> bool:
        """Take one message off the pipe; False when the browser has gone."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise BrowserError(f"browser did not answer in {self.timeout:g} s")
        try:
            message = self._inbox.get(timeout=left)
        except queue.Empty as exc:
            raise BrowserError(f"browser did not answer in {self.timeout:g} s") from exc
        if message is None:
            self._inbox.put(None)
            return False
        if "id" in message:
            self._replies[message["id"]] = message
        else:
            self._events.append(message)
        return True

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: bool = True,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send one command and return its result; BrowserError on an error reply."""
        self._next_id += 1
        ident = self._next_id
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session and self._session is not None:
            message["sessionId"] = self._session
        data = json.dumps(message).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self._write_fd, data) :]
        except OSError as exc:
            raise BrowserError(f"cannot send {method}: {exc}; {self._stderr_text()}") from exc
        deadline = time.monotonic() + (timeout or self.timeout)
        while ident not in self._replies:
            if not self._pump(deadline):
                raise BrowserError(f"browser exited during {method}: {self._stderr_text()}")
        reply = self._replies.pop(ident)
        if "error" in reply:
            raise BrowserError(f"{method} failed: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    def wait_event(self, method: str, timeout: float | None = None) -> dict[str, Any]:
        """The first event ``method`` of our page's session (already received or next)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for n, event in enumerate(self._events):
                if event.get("method") == method and event.get("sessionId") == self._session:
                    del self._events[n]
                    params: dict[str, Any] = event.get("params", {})
                    return params
            if not self._pump(deadline):
                raise BrowserError(f"browser exited waiting for {method}: {self._stderr_text()}")

    def take_events(self, method: str) -> list[dict[str, Any]]:
        """The params of every event ``method`` of our page received so far (after
        reading what is waiting), removed from the backlog."""
        while not self._inbox.empty():
            if not self._pump(time.monotonic() + self.timeout):
                break
        taken = [e for e in self._events if e.get("method") == method]
        self._events = [e for e in self._events if e.get("method") != method]
        return [e.get("params", {}) for e in taken if e.get("sessionId") == self._session]

    def _attach(self) -> None:
        targets = self.send("Target.getTargets", session=False)["targetInfos"]
        pages = [t for t in targets if t.get("type") == "page"]
        if pages:
            target = pages[0]["targetId"]
        else:
            target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)[
                "targetId"
            ]
        self._session = self.send(
            "Target.attachToTarget", {"targetId": target, "flatten": True}, session=False
        )["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")

    # --- what tests use -------------------------------------------------------------------

    def open(self, url: str) -> None:
        """Navigate the page to ``url`` (e.g. ``Path.as_uri()``) and wait for its load."""
        self._events = [e for e in self._events if e.get("method") != "Page.loadEventFired"]
        reply = self.send("Page.navigate", {"url": url})
        if reply.get("errorText"):
            raise BrowserError(f"cannot open {url}: {reply['errorText']}")
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression evaluated in the page."""
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript error: {text}")
        return result["result"].get("value")

    def screenshot(self, path: Path | str, *, full_page: bool = True) -> Path:
        """Save a PNG of the page (the whole of it when ``full_page``) and return its path."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = self.send("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            params["captureBeyondViewport"] = True
            params["clip"] = {
                "x": 0,
                "y": 0,
                "width": size["width"],
                "height": size["height"],
                "scale": 1,
            }
        data = self.send("Page.captureScreenshot", params)["data"]
        out = Path(path)
        out.write_bytes(base64.b64decode(data))
        return out

    def close(self) -> None:
        """Ask the browser to quit, then end it by its PID if it has not; always."""
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        try:
            if proc.poll() is None:
                with contextlib.suppress(BrowserError, OSError):
                    self._session = None
                    self.send("Browser.close", session=False, timeout=3)
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(timeout=5)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
            # Helpers the browser started (renderer, zygote) are in its own new session,
            # whose id is the browser's PID: end any it left behind.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            # The pipes reach EOF once the browser is gone: let the readers see it first.
            self._reader.join(timeout=5)
            self._err_reader.join(timeout=5)
            for fd in (self._write_fd, self._read_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
            if proc.stderr is not None:
                proc.stderr.close()
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
