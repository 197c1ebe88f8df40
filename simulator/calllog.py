"""The call log the simulated job scripts append to, one tab-separated line per event."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

CALL_LOG = Path("var/vcap/sys/log/bbr-sim/calls.log")


@dataclass(frozen=True)
class ScriptCallRecord:
    """One `start` or `exit` line written by a script (see lib.sh `sim_log_event`)."""

    time: float
    job: str
    script: str
    event: Literal["start", "exit"]
    pid: int
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def rc(self) -> int | None:
        """The exit code of an `exit` line."""
        value = self.extra.get("rc")
        return int(value) if value is not None else None


def _parse_extra(text: str) -> dict[str, str]:
    extra: dict[str, str] = {}
    for pair in text.split(";"):
        if pair:
            key, _, value = pair.partition("=")
            extra[key] = value
    return extra


def parse_call_log(text: str) -> list[ScriptCallRecord]:
    """Records in file order. A torn or foreign line is skipped rather than failing a test."""
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split("\t")
        if len(parts) != 6 or parts[3] not in ("start", "exit"):
            log.warning("call log line %d is malformed; skipped: %r", number, line)
            continue
        time, job, script, event, pid, extra = parts
        try:
            records.append(
                ScriptCallRecord(
                    time=float(time),
                    job=job,
                    script=script,
                    event="start" if event == "start" else "exit",
                    pid=int(pid),
                    extra=_parse_extra(extra),
                )
            )
        except ValueError:
            log.warning("call log line %d is malformed; skipped: %r", number, line)
    return records


def append_call(root: Path, job: str, script: str, pid: int, extra: str = "") -> None:
    """Log a `start` line as the scripts do (lib.sh `sim_log_event`): one write per line."""
    path = root / CALL_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    line = f"{time.time():.9f}\t{job}\t{script}\tstart\t{pid}\t{extra}\n"
    with path.open("a") as handle:
        handle.write(line)
