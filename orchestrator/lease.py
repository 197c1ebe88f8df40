"""One run per target: a lease kept in the audit database.

Two bbrx processes working one director would unlock each other's jobs and remove each
other's work directory. Before a run starts it takes the target's lease (owner, pid, host,
heartbeat) in a `leases` table of the audit log's SQLite file, in one IMMEDIATE
transaction; a second process finds it and refuses at once, naming who holds it. A lease
whose owner is gone (its pid no longer runs on this host, or its heartbeat stopped) is
stale and is taken over, with a warning. The table is bookkeeping, not part of the
append-only, hash-chained `events`.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from orchestrator.errors import BbrxError

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
STALE_AFTER = timedelta(seconds=30)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    target TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    operation TEXT NOT NULL,
    operator TEXT NOT NULL,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    acquired TEXT NOT NULL,
    heartbeat TEXT NOT NULL
)
"""


class TargetBusyError(BbrxError):
    """Another bbrx run holds the target."""


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def holder_alive(pid: int, host: str, heartbeat: str) -> bool:
    beat = datetime.strptime(heartbeat, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    fresh = _now() - beat < STALE_AFTER
    if host != socket.gethostname():
        return fresh  # another jump box: only its heartbeat can tell
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X") and fresh


def _connect(db: Path) -> sqlite3.Connection:
    db.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(db, timeout=10, isolation_level=None, check_same_thread=False)
    connection.execute(_SCHEMA)
    return connection


@contextmanager
def hold(db: Path, target: str, run_id: str, operation: str, operator: str) -> Iterator[None]:
    """Hold `target`'s lease for the duration of the block, or raise TargetBusyError."""
    me = (os.getpid(), socket.gethostname())
    with closing(_connect(db)) as connection:
        connection.execute("BEGIN IMMEDIATE")
        try:
            held = connection.execute(
                "SELECT run_id, operation, operator, pid, host, acquired, heartbeat "
                "FROM leases WHERE target = ?",
                (target,),
            ).fetchone()
            if held is not None:
                run, op, who, pid, host, since, beat = held
                if holder_alive(pid, host, beat):
                    raise TargetBusyError(
                        f"{target} is busy: run {run} ({op}) by {who}, pid {pid} on {host}, "
                        f"since {since}",
                        hint="Wait for it to finish (bbrx audit show " + run + "), "
                        "then try again. bbrx runs one operation per target at a time.",
                    )
                log.warning(
                    "Taking over the stale lease of %s: run %s (pid %d on %s) is gone",
                    target,
                    run,
                    pid,
                    host,
                )
            now = _iso(_now())
            connection.execute(
                "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (target, run_id, operation, operator, me[0], me[1], now, now),
            )
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        stop = threading.Event()
        beating = threading.Thread(target=_heartbeat, args=(db, target, run_id, stop), daemon=True)
        beating.start()
        try:
            yield
        finally:
            stop.set()
            beating.join()
            connection.execute(
                "DELETE FROM leases WHERE target = ? AND run_id = ?", (target, run_id)
            )


def _heartbeat(db: Path, target: str, run_id: str, stop: threading.Event) -> None:
    with closing(_connect(db)) as connection:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                connection.execute(
                    "UPDATE leases SET heartbeat = ? WHERE target = ? AND run_id = ?",
                    (_iso(_now()), target, run_id),
                )
            except sqlite3.Error as error:  # a busy database must not stop the run
                log.debug("lease heartbeat skipped: %s", error)
