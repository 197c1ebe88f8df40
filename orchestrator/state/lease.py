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
from typing import Any
from urllib.parse import quote

from audit import AuditError
from audit.log import DEFAULT_BUSY_TIMEOUT, explain
from orchestrator.errors import BbrxError, TargetError

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


def holder_alive(pid: int, host: str, heartbeat: str, acquired: str | None = None) -> bool:
    """Whether the lease's owner still runs. On another jump box only its heartbeat can
    tell. On this one its process can: a live (not zombie) process that is no younger than
    the lease holds it, even if its heartbeats could not be written for a while (another
    writer held the database); a younger one is a reused pid."""
    beat = _parse(heartbeat)
    fresh = beat is not None and _now() - beat < STALE_AFTER
    if host != socket.gethostname():
        return fresh
    started = _process_start(pid)
    if started is None:
        return False  # gone, or a zombie
    since = _parse(acquired) if acquired is not None else None
    if since is None:
        return fresh
    return started <= since + timedelta(seconds=2)


def _parse(moment: str | None) -> datetime | None:
    try:
        return datetime.strptime(str(moment), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None  # a lease row bbrx did not write: nobody's, so stale


def _process_start(pid: int) -> datetime | None:
    """When process `pid` started, or None if it is gone or a zombie."""
    try:
        # The name in parentheses may hold spaces and parentheses: the fields follow
        # the last ')'.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            return None
        ticks = int(fields[19])  # starttime, field 22 of proc(5)
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, IndexError, ValueError, StopIteration):
        return None
    return datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"), UTC)


def _connect(db: Path, busy_timeout: float) -> sqlite3.Connection:
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(
            db, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
    except (OSError, sqlite3.Error) as exc:
        raise explain(db, exc, "open", busy_timeout) from exc
    try:
        connection.execute(_SCHEMA)
    except sqlite3.Error as exc:
        connection.close()
        raise explain(db, exc, "take the run's lease in", busy_timeout) from exc
    return connection


def read(db: Path, target: str) -> dict[str, Any] | None:
    """The lease row of `target`, read-only; None if there is none or it cannot be read."""
    # Quoted: a '#' or '?' in the path would otherwise end the file name in the URI, and
    # the lease of a live run would not be found.
    uri = f"file:{quote(str(db.resolve()))}?mode=ro"
    try:
        with closing(sqlite3.connect(uri, uri=True)) as connection:
            connection.row_factory = sqlite3.Row
            row = connection.execute("SELECT * FROM leases WHERE target = ?", (target,)).fetchone()
    except sqlite3.Error as exc:
        log.debug("lease of %s in %s not readable: %s", target, db, exc)
        return None
    return dict(row) if row else None


@contextmanager
def hold(
    db: Path,
    target: str,
    run_id: str,
    operation: str,
    operator: str,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
) -> Iterator[None]:
    """Hold `target`'s lease for the duration of the block, or raise TargetBusyError.

    Taking it is the run's first write to the audit database, so a database that cannot
    be written (read-only, held by another writer, full) refuses the run here, with an
    AuditError naming the file and the cause, before anything is touched.
    """
    me = (os.getpid(), socket.gethostname())
    with closing(_connect(db, busy_timeout)) as connection:
        try:
            _take(connection, target, run_id, operation, operator, me)
        except sqlite3.Error as exc:
            raise explain(db, exc, "take the run's lease in", busy_timeout) from exc
        stop = threading.Event()
        beating = threading.Thread(
            target=_heartbeat, args=(db, target, run_id, stop, busy_timeout), daemon=True
        )
        beating.start()
        try:
            yield
        finally:
            stop.set()
            beating.join()
            _give_back(connection, db, target, run_id)


def _give_back(connection: sqlite3.Connection, db: Path, target: str, run_id: str) -> None:
    try:
        connection.execute("DELETE FROM leases WHERE target = ? AND run_id = ?", (target, run_id))
    except sqlite3.Error as exc:
        # The run is over whatever happens here: a left-over lease is stale as soon as
        # this process exits, and the next run takes it over. It must not turn the run's
        # own outcome (a good backup, say) into an error.
        log.warning(
            "Could not remove the lease of %s from %s (%s); it is stale once bbrx exits, "
            "and the next run takes it over",
            target,
            db,
            exc,
        )


def _take(
    connection: sqlite3.Connection,
    target: str,
    run_id: str,
    operation: str,
    operator: str,
    me: tuple[int, str],
) -> None:
    connection.execute("BEGIN IMMEDIATE")
    try:
        held = connection.execute(
            "SELECT run_id, operation, operator, pid, host, acquired, heartbeat "
            "FROM leases WHERE target = ?",
            (target,),
        ).fetchone()
        if held is not None:
            run, op, who, pid, host, since, beat = held
            if holder_alive(pid, host, beat, since):
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
        # A failed COMMIT (a full disk) may have rolled back already.
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def _heartbeat(
    db: Path, target: str, run_id: str, stop: threading.Event, busy_timeout: float
) -> None:
    try:
        connection = _connect(db, busy_timeout)
    except AuditError as error:  # the run goes on; a stale-looking lease is the price
        log.warning("lease heartbeat stopped: %s", error.message)
        return
    with closing(connection):
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                connection.execute(
                    "UPDATE leases SET heartbeat = ? WHERE target = ? AND run_id = ?",
                    (_iso(_now()), target, run_id),
                )
            except sqlite3.Error as error:  # a busy database must not stop the run
                log.debug("lease heartbeat skipped: %s", error)


def refuse_if_running(db: Path, director: str, doing: str) -> None:
    """Refuse `doing` to a simulated director while a live run holds its lease or one of
    its deployments': removing the tree under a run makes its locks land on the next one."""
    uri = f"file:{quote(str(db.resolve()))}?mode=ro"
    try:
        with closing(sqlite3.connect(uri, uri=True)) as connection:
            connection.row_factory = sqlite3.Row
            rows = connection.execute(
                "SELECT * FROM leases WHERE target = ? OR substr(target, 1, ?) = ?",
                (director, len(director) + 1, f"{director}/"),
            ).fetchall()
    except sqlite3.Error as exc:
        log.debug("leases of %s in %s not readable: %s", director, db, exc)
        return
    for row in rows:
        if holder_alive(row["pid"], row["host"], row["heartbeat"], row["acquired"]):
            raise TargetError(
                f"cannot {doing} {director}: run {row['run_id']} (pid {row['pid']}) is running "
                f"on {row['target']}",
                hint=f"Let it finish, or stop it (Ctrl-C in its terminal), then {doing} it.",
            )
