"""AuditLog: the append-only, hash-chained event log of bbrx runs, in one SQLite file."""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import sqlite_utils

from audit.errors import AuditError
from audit.schema import (
    COLUMN_NAMES,
    GENESIS_HASH,
    HASH_ORDER,
    MODES,
    OUTCOMES,
    SCHEMA_VERSION,
    TERMINAL_STATES,
    TRIGGERS,
    canonical_json,
    create_schema,
    row_hash,
)

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000
_AMBIGUOUS_LISTED = 10


@dataclass(frozen=True)
class AppendedEvent:
    """Where an appended event landed in the chain."""

    seq: int
    ts: str
    hash: str


@dataclass(frozen=True)
class RunSummary:
    """One run, summarised from its events.

    Convention: run-level rows (transitions of the run itself) have ``job`` NULL;
    job-level rows carry the job name. ``outcome`` is the ``to_state`` of the run's last
    run-level row (None if the run has no run-level row), and ``finished`` is True when
    that state is in ``TERMINAL_STATES``. ``operation``, ``target``, ``mode``,
    ``operator`` and ``reason`` come from the run's first row; ``start`` and ``end`` are
    the timestamps of its first and last rows.
    """

    run_id: str
    operation: str
    target: str
    mode: str
    operator: str
    reason: str | None
    start: str
    end: str
    events: int
    outcome: str | None
    finished: bool


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _text(path: Path, name: str, value: Any, *, required: bool) -> str | None:
    # Enum members are unwrapped so the stored and hashed text is the plain value.
    if isinstance(value, Enum):
        value = value.value
    if value is None:
        if required:
            raise AuditError(f"cannot append to {path}: {name} is required")
        return None
    if not isinstance(value, str):
        raise AuditError(
            f"cannot append to {path}: {name} must be a string, got {type(value).__name__}"
        )
    if required and not value:
        raise AuditError(f"cannot append to {path}: {name} must not be empty")
    # A str subclass could stringify differently in sqlite and in json; store plain str.
    return "".join((value,))


class AuditLog:
    """An append-only audit log in a SQLite file.

    Writers open the file with WAL journaling and ``synchronous=FULL`` so an appended
    event survives a crash once ``append`` returns; several processes may append to the
    same file (each append is one ``BEGIN IMMEDIATE`` transaction). One connection is
    shared by all threads of an ``AuditLog`` and guarded by a lock.

    ``readonly=True`` is for reviewers: the file is opened with ``mode=ro`` and nothing
    is ever created or changed.
    """

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.Lock()
        self._closed = False
        conn = self._connect()
        try:
            self._db = sqlite_utils.Database(conn, execute_plugins=False)
            self._prepare()
        except sqlite3.OperationalError as exc:
            conn.close()
            raise AuditError(f"cannot open audit log {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise AuditError(
                f"{self.path} is not a readable SQLite database ({exc}): "
                "check the path points at a bbrx audit log"
            ) from exc
        except BaseException:
            conn.close()
            raise

    # -- opening -------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        timeout = BUSY_TIMEOUT_MS / 1000
        if self.readonly:
            if not self.path.is_file():
                raise AuditError(f"no audit log at {self.path}")
            uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
            try:
                return sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=timeout)
            except sqlite3.Error as exc:
                raise AuditError(f"cannot open audit log {self.path} read-only: {exc}") from exc
        if self.path.is_dir():
            raise AuditError(f"{self.path} is a directory: give the path of the audit log file")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return sqlite3.connect(str(self.path), check_same_thread=False, timeout=timeout)
        except (OSError, sqlite3.Error) as exc:
            raise AuditError(
                f"cannot open audit log {self.path}: {exc}; check the directory is writable"
            ) from exc

    def _prepare(self) -> None:
        conn = self._db.conn
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # Look before touching anything, so pointing bbrx at some other SQLite file
        # does not switch its journal mode or add tables to it.
        tables = set(self._db.table_names())
        if tables and "events" not in tables:
            raise self._not_audit_log("it has no events table")
        if self.readonly:
            if not tables:
                raise self._not_audit_log("it is empty")
            self._check_schema()
            return
        mode = self._switch_to_wal(conn)
        if str(mode).lower() != "wal":
            logger.warning("audit log %s: journal_mode is %s, not wal", self.path, mode)
        conn.execute("PRAGMA synchronous=FULL")
        if not tables:
            self._create_schema_once()
        self._check_schema()
        missing = self.missing_triggers() + self.altered_triggers()
        if missing:
            # Recreating them would hide the tampering from verify; say so loudly instead.
            logger.warning(
                "audit log %s: append-only triggers missing or altered: %s; "
                "run `python -m audit verify %s`",
                self.path,
                ", ".join(missing),
                self.path,
            )

    def _switch_to_wal(self, conn: sqlite3.Connection) -> str:
        """WAL, once per file. Switching needs the file to itself for a moment, and SQLite
        answers "database is locked" at once (no busy wait) while another process is
        writing: so look first, and retry within the busy timeout."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0])
                if mode.lower() == "wal":
                    return mode
                return str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _create_schema_once(self) -> None:
        conn = self._db.conn
        # Another process may be creating the same file right now: decide under the
        # write lock whether the schema still needs creating.
        conn.execute("BEGIN IMMEDIATE")
        try:
            if "events" not in self._db.table_names():
                create_schema(self._db)
                logger.info("created audit log %s", self.path)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _not_audit_log(self, why: str) -> AuditError:
        return AuditError(
            f"{self.path} is not a bbrx audit log ({why}): check the path, "
            "or move the file away so a new log can be created"
        )

    def _check_schema(self) -> None:
        if "meta" not in self._db.table_names():
            raise self._not_audit_log("it has no meta table")
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            raise self._not_audit_log("meta has no schema_version")
        try:
            version = int(row[0])
        except (TypeError, ValueError):
            raise self._not_audit_log(f"schema_version is {row[0]!r}") from None
        if version > SCHEMA_VERSION:
            raise AuditError(
                f"{self.path} has audit schema version {version}, but this bbrx understands "
                f"only up to {SCHEMA_VERSION}: upgrade bbrx to read or write it"
            )
        if version < 1:
            raise self._not_audit_log(f"schema_version is {version}")
        columns = tuple(c.name for c in self._db.table("events").columns)
        if columns != COLUMN_NAMES:
            raise self._not_audit_log(
                f"events columns are {', '.join(columns)}; expected {', '.join(COLUMN_NAMES)}"
            )

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.conn.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def _using(self) -> Iterator[sqlite_utils.Database]:
        """The database, under the lock, with SQLite errors turned into AuditError."""
        with self._lock:
            if self._closed:
                raise AuditError(f"audit log {self.path} is closed: open a new AuditLog")
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise AuditError(f"cannot read or write audit log {self.path}: {exc}") from exc

    # -- writing -------------------------------------------------------------------------

    def append(
        self,
        *,
        run_id: str,
        operation: str,
        target: str,
        mode: str,
        operator: str,
        origin_host: str,
        reason: str | None,
        from_state: str | None,
        to_state: str,
        trigger: str,
        job: str | None = None,
        script: str | None = None,
        outcome: str = "ok",
        exit_code: int | None = None,
        duration: float | None = None,
        detail: dict[str, Any] | None = None,
        tool_version: str,
    ) -> AppendedEvent:
        """Append one event at the end of the chain and return where it landed.

        Durable when this returns. Raises AuditError on invalid input or if the file
        cannot be written; nothing is appended in that case.
        """
        if self.readonly:
            raise AuditError(f"audit log {self.path} was opened read-only: cannot append")
        p = self.path
        fields: dict[str, Any] = {
            "run_id": _text(p, "run_id", run_id, required=True),
            "operation": _text(p, "operation", operation, required=True),
            "target": _text(p, "target", target, required=True),
            "mode": _text(p, "mode", mode, required=True),
            "operator": _text(p, "operator", operator, required=True),
            "origin_host": _text(p, "origin_host", origin_host, required=True),
            "reason": _text(p, "reason", reason, required=False),
            "from_state": _text(p, "from_state", from_state, required=False),
            "to_state": _text(p, "to_state", to_state, required=True),
            "trigger": _text(p, "trigger", trigger, required=True),
            "job": _text(p, "job", job, required=False),
            "script": _text(p, "script", script, required=False),
            "outcome": _text(p, "outcome", outcome, required=True),
            "exit_code": self._exit_code(exit_code),
            "duration": self._duration(duration),
            "detail": self._detail(detail),
            "tool_version": _text(p, "tool_version", tool_version, required=True),
        }
        if fields["mode"] not in MODES:
            raise AuditError(f"cannot append to {p}: mode must be sim or live, got {mode!r}")
        if fields["outcome"] not in OUTCOMES:
            raise AuditError(
                f"cannot append to {p}: outcome must be one of {', '.join(sorted(OUTCOMES))}, "
                f"got {outcome!r}"
            )
        with self._using() as db:
            return self._append_locked(db, fields)

    def _append_locked(self, db: sqlite_utils.Database, fields: dict[str, Any]) -> AppendedEvent:
        conn = db.conn
        # IMMEDIATE takes the write lock before reading the head, so two processes
        # cannot both chain onto the same previous row.
        conn.execute("BEGIN IMMEDIATE")
        try:
            last = conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev_hash = (last[0] + 1, last[1]) if last else (1, GENESIS_HASH)
            row: dict[str, Any] = {"seq": seq, "ts": utc_now(), **fields, "prev_hash": prev_hash}
            row["hash"] = row_hash(row)
            db.table("events").insert(row)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        logger.debug("audit %s: appended seq %d (%s)", self.path, seq, fields["to_state"])
        return AppendedEvent(seq=seq, ts=row["ts"], hash=row["hash"])

    def _exit_code(self, value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise AuditError(f"cannot append to {self.path}: exit_code must be an int or None")
        return int(value)

    def _duration(self, value: Any) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise AuditError(f"cannot append to {self.path}: duration must be a number or None")
        # Stored as REAL, so hash the float that will be read back, not an int.
        number = float(value)
        if not math.isfinite(number):
            raise AuditError(f"cannot append to {self.path}: duration must be finite")
        return number

    def _detail(self, value: Any) -> str | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise AuditError(f"cannot append to {self.path}: detail must be a dict or None")
        try:
            return canonical_json(value)
        except (TypeError, ValueError) as exc:
            raise AuditError(
                f"cannot append to {self.path}: detail is not JSON-serialisable ({exc})"
            ) from exc

    # -- reading -------------------------------------------------------------------------

    def head(self) -> AppendedEvent | None:
        """The last event, or None for an empty log."""
        with self._using() as db:
            row = db.execute(
                "SELECT seq, ts, hash FROM events ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        return AppendedEvent(seq=row[0], ts=row[1], hash=row[2]) if row else None

    def count(self) -> int:
        with self._using() as db:
            return int(db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def event(self, seq: int) -> dict[str, Any] | None:
        """One event as a dict (``detail`` decoded), or None if there is no such seq."""
        with self._using() as db:
            rows = list(db.query("SELECT * FROM events WHERE seq = ?", [seq]))
        return _decoded(rows[0]) if rows else None

    def runs(self) -> list[RunSummary]:
        """One summary per run_id, ordered by the run's first seq (see RunSummary)."""
        sql = """
            WITH spans AS (
                SELECT run_id, MIN(seq) AS first_seq, MAX(seq) AS last_seq, COUNT(*) AS n
                FROM events GROUP BY run_id
            ),
            run_level AS (
                SELECT run_id, MAX(seq) AS seq FROM events WHERE job IS NULL GROUP BY run_id
            )
            SELECT s.run_id, a.operation, a.target, a.mode, a.operator, a.reason,
                   a.ts AS start, b.ts AS "end", s.n AS events, c.to_state AS outcome
            FROM spans s
            JOIN events a ON a.seq = s.first_seq
            JOIN events b ON b.seq = s.last_seq
            LEFT JOIN run_level r ON r.run_id = s.run_id
            LEFT JOIN events c ON c.seq = r.seq
            ORDER BY s.first_seq
        """
        with self._using() as db:
            rows = list(db.query(sql))
        return [RunSummary(**row, finished=row["outcome"] in TERMINAL_STATES) for row in rows]

    def resolve_run(self, run: str) -> str:
        """The full run_id for ``run``, an exact id or a unique prefix of one."""
        if not run:
            raise AuditError(f"no run given for audit log {self.path}: give a run id or prefix")
        with self._using() as db:
            if db.execute("SELECT 1 FROM events WHERE run_id = ? LIMIT 1", [run]).fetchone():
                return run
            matches = [
                r[0]
                for r in db.execute(
                    "SELECT DISTINCT run_id FROM events WHERE substr(run_id, 1, ?) = ? "
                    "ORDER BY run_id",
                    [len(run), run],
                )
            ]
        if not matches:
            raise AuditError(
                f"no run in audit log {self.path} matches {run!r}: list the runs to find its id"
            )
        if len(matches) > 1:
            listed = ", ".join(matches[:_AMBIGUOUS_LISTED])
            more = len(matches) - _AMBIGUOUS_LISTED
            if more > 0:
                listed += f" and {more} more"
            raise AuditError(
                f"run prefix {run!r} matches {len(matches)} runs in audit log {self.path}: "
                f"{listed}; give more characters"
            )
        return matches[0]

    def timeline(self, run: str) -> list[dict[str, Any]]:
        """The events of one run in seq order; ``run`` may be a unique prefix of its id."""
        run_id = self.resolve_run(run)
        with self._using() as db:
            sql = "SELECT * FROM events WHERE run_id = ? ORDER BY seq"
            rows = list(db.query(sql, [run_id]))
        return [_decoded(row) for row in rows]

    # -- for verify ----------------------------------------------------------------------

    def missing_triggers(self) -> list[str]:
        """Names of the append-only triggers that are absent."""
        with self._using() as db:
            present = db.triggers_dict
        return [name for name in TRIGGERS if name not in present]

    def altered_triggers(self) -> list[str]:
        """Names of the append-only triggers present with SQL other than bbrx wrote."""
        with self._using() as db:
            present = db.triggers_dict
        return [n for n, sql in TRIGGERS.items() if n in present and present[n] != sql]

    def iter_chain(self) -> Generator[tuple[Any, ...], None, None]:
        """Every row as ``(seq, prev_hash, hash, *values in HASH_ORDER)``, in seq order.

        Streamed from a live cursor on the shared connection, so the lock is held until
        the generator is exhausted or closed.
        """
        columns = ", ".join(("seq", "prev_hash", "hash", *HASH_ORDER))
        with self._using() as db:
            yield from db.execute(f"SELECT {columns} FROM events ORDER BY seq")


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    if row.get("detail") is not None:
        try:
            row = {**row, "detail": json.loads(row["detail"])}
        except ValueError:
            # A tampered detail must still be readable by the reviewer; verify flags it.
            logger.warning("audit event seq %s: detail is not JSON", row.get("seq"))
    return row
