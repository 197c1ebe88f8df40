"""Transfer progress: what the library reports, and the three ways the CLI shows it.

The library only calls `ProgressSink.start(label, total)` and the returned `advance(n)`;
the CLI picks the renderer: a rich progress bar per artifact (bytes, rate, ETA) on a
terminal, a plain line every few seconds when stderr is not a terminal (CI, logs), and
nothing with --quiet.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rich.progress import TaskID

log = logging.getLogger(__name__)

Advance = Callable[[int], None]


class ProgressSink(Protocol):
    def start(self, label: str, total: int | None) -> Advance: ...

    def done(self, label: str) -> None: ...


class NoProgress:
    def start(self, label: str, total: int | None) -> Advance:
        return lambda _n: None

    def done(self, label: str) -> None:
        return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


class PlainProgress:
    """A log line per artifact every `interval` seconds, and one when it is done."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._state: dict[str, list[float]] = {}

    def start(self, label: str, total: int | None) -> Advance:
        now = time.monotonic()
        with self._lock:
            self._state[label] = [0.0, now, now, float(total or 0)]

        def advance(n: int) -> None:
            with self._lock:
                state = self._state[label]
                state[0] += n
                now = time.monotonic()
                if now - state[2] < self.interval:
                    return
                state[2] = now
                done, started, _, total = state
            rate = done / max(now - started, 1e-6)
            of = f" of {_size(total)} ({min(done / total, 1):.0%})" if total else ""
            log.info("%s: %s%s, %s/s", label, _size(done), of, _size(rate))

        return advance

    def done(self, label: str) -> None:
        with self._lock:
            done, started, _, _ = self._state.pop(label, [0.0, time.monotonic(), 0.0, 0.0])
        seconds = max(time.monotonic() - started, 1e-6)
        log.info("%s: %s in %.1fs (%s/s)", label, _size(done), seconds, _size(done / seconds))


class RichProgress:
    """One rich progress bar per artifact, on stderr."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}
        self._started = False

    def start(self, label: str, total: int | None) -> Advance:
        if not self._started:
            self._progress.start()
            self._started = True
        task = self._progress.add_task(label, total=total)
        self._tasks[label] = task
        return lambda n: self._progress.advance(task, n)

    def done(self, label: str) -> None:
        task = self._tasks.get(label)
        if task is not None:
            completed = next(t.completed for t in self._progress.tasks if t.id == task)
            self._progress.update(task, total=completed, completed=completed)

    def stop(self) -> None:
        if self._started:
            self._progress.stop()


@contextmanager
def rich_progress() -> Iterator[RichProgress]:
    sink = RichProgress()
    try:
        yield sink
    finally:
        sink.stop()


def progress_for(quiet: bool, terminal: bool) -> AbstractContextManager[ProgressSink]:
    """The sink the CLI should use, as a context manager (a rich bar must be stopped)."""
    if quiet:
        return nullcontext(NoProgress())
    if terminal:
        return rich_progress()
    return nullcontext(PlainProgress())
