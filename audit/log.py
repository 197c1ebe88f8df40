"""AuditLog: the append-only, hash-chained event log of bbrx runs, in one SQLite file."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from audit.errors import AuditError
from audit.schema import (
    COLUMN_NAMES,
    GENESIS_HASH,
    HASH_ORDER,
    INSTANCE_COLUMNS,
    MIGRATED_TO_PREFIX,
    MODES,
    OUTCOMES,
    SCHEMA_VERSION,
    TERMINAL_STATES,
    TRIGGERS,
    V1_COLUMN_NAMES,
    VIEWS,
    canonical_json,
    create_schema,
    create_views,
    migrate_to_2,
    row_hash,
)

if TYPE_CHECKING:  # annotations only: AuditLog imports it when it opens a log
    import sqlite_utils

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_ENV = "BBRX_AUDIT_BUSY_TIMEOUT"
DEFAULT_BUSY_TIMEOUT = 10.0
_AMBIGUOUS_LISTED = 10


def busy_timeout_from_env() -> float:
    """Seconds a writer waits for another process's write lock: `$BBRX_AUDIT_BUSY_TIMEOUT`,
    else 10. Busy shared jump boxes may want more; tests want less."""
    raw = os.environ.get(BUSY_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_BUSY_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise AuditError(f"{BUSY_TIMEOUT_ENV} must be a number of seconds (0 or more), not {raw!r}")
    return value


def _fs_cause(path: Path) -> str | None:
    """Why the file system refuses writes next to ``path``, if it visibly does."""
    directory = path.parent if not path.is_dir() else path
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return f"the file system holding {directory} is mounted read-only"
    except OSError:
        return None
    if not os.access(directory, os.W_OK):
        return f"the directory {directory} is not writable by this user"
    if path.exists() and not os.access(path, os.W_OK):
        return "the file is not writable by this user"
    return None


def _disk_full(path: Path) -> bool:
    try:
        stat = os.statvfs(path.parent)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < 64 * 1024


def explain(path: Path, exc: BaseException, doing: str, busy_timeout: float) -> AuditError:
    """An AuditError naming the file, the cause in plain words and what to do.

    SQLite's own words ("attempt to write a readonly database", "database is locked")
    mean little to an operator at 2 a.m.; this is the one place they are translated,
    for the log, the lease table and the read-only paths alike.
    """
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    where = f"cannot {doing} the audit log {path}"
    use_other = "or point --audit-db (BBRX_AUDIT_DB) at a writable file"
    if isinstance(exc, IsADirectoryError) or path.is_dir():
        return AuditError(f"{where}: it is a directory; give the path of the audit log file")
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        # Its directory could not be made: something on the way is a file, not a directory.
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            return AuditError(f"{where}: {blocker} is a file, not a directory").with_hint(
                f"Point --audit-db (BBRX_AUDIT_DB) at a file in a directory, or move {blocker} "
                "away."
            )
    if name.startswith("SQLITE_BUSY") or "database is locked" in text or "is busy" in text:
        # Never a stale lock: SQLite's locks die with their process, so someone is writing.
        return AuditError(
            f"{where}: another process has held its write lock for more than "
            f"{busy_timeout:g} s (the busy timeout)"
        ).with_hint(
            f"Find the process that has the file open (`fuser {path}`), let it finish, "
            f"and try again; or set {BUSY_TIMEOUT_ENV} to wait longer."
        )
    if (
        name.startswith("SQLITE_FULL")
        or "disk is full" in text
        or getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        # A full disk often shows as an I/O error (the -shm file cannot grow).
        or ((name.startswith("SQLITE_IOERR") or "I/O error" in text) and _disk_full(path))
    ):
        return AuditError(f"{where}: the disk holding it is full").with_hint(
            f"Free space on the file system of {path.parent}, {use_other}."
        )
    if name.startswith("SQLITE_NOTADB") or "not a database" in text:
        return AuditError(f"{where}: it is not a SQLite database").with_hint(
            "Check the path points at a bbrx audit log, or move the file away so a new "
            "log can be created."
        )
    if name.startswith("SQLITE_CORRUPT") or "malformed" in text:
        return AuditError(f"{where}: the database file is damaged ({text})").with_hint(
            "Keep it as evidence, restore a copy, or start a new log elsewhere."
        )
    readonly = (
        name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH"))
        or "readonly" in text
        or "unable to open" in text
        or isinstance(exc, PermissionError)
        or getattr(exc, "errno", None) == errno.EROFS
    )
    cause = _fs_cause(path)
    if readonly and cause is not None:
        return AuditError(f"{where}: {cause}").with_hint(
            f"Make it writable (a remount, a chmod), {use_other}."
        )
    if readonly:
        return AuditError(f"{where}: it cannot be opened for writing ({text})").with_hint(
            f"Check the file and its directory exist and are writable, {use_other}."
        )
    if name.startswith("SQLITE_IOERR") or isinstance(exc, OSError):
        return AuditError(f"{where}: the file system reported an I/O error ({text})").with_hint(
            f"Check the disk holding {path.parent} (dmesg), {use_other}."
        )
    return AuditError(f"{where}: {text}")


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
    if required and not value.strip():
        # PCI DSS asks every row to say who, what and where: blank says nothing.
        raise AuditError(f"cannot append to {path}: {name} must not be empty or blank")
    # A str subclass could stringify differently in sqlite and in json; store plain str.
    return _spellable("".join((value,)))


def _spellable(text: str) -> str:
    """`text` with what UTF-8 cannot spell (lone surrogates: a file name decoded with
    surrogateescape) written as backslash escapes, so the row can be stored and hashed."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


class AuditLog:
    """An append-only audit log in a SQLite file.

    Writers open the file with WAL journaling and ``synchronous=FULL`` so an appended
    event survives a crash once ``append`` returns; several processes may append to the
    same file (each append is one ``BEGIN IMMEDIATE`` transaction). One connection is
    shared by all threads of an ``AuditLog`` and guarded by a lock.

    ``readonly=True`` is for reviewers: the file is opened with ``mode=ro`` and nothing
    is ever created or changed.

    Schema versions: new logs are created at ``SCHEMA_VERSION`` (2). A writer opening a
    version 1 log migrates it first, once, in one ``BEGIN IMMEDIATE`` transaction (see
    ``schema.migrate_to_2``; a second process opening it meanwhile finds it migrated).
    A reader leaves a version 1 log as it is and reads its instance columns as None.
    A log of a higher version than this code knows is refused, read-only or not.
    """

    def __init__(
        self, path: str | Path, readonly: bool = False, busy_timeout: float | None = None
    ) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.busy_timeout = busy_timeout_from_env() if busy_timeout is None else busy_timeout
        self._lock = threading.Lock()
        self._closed = False
        # Whether events has the instance columns (schema version 2). A writer migrates
        # a version 1 log when it opens it; a read-only reader of one selects them as NULL.
        self._has_instance_columns = False
        # The effective schema version of the file, once read (see _check_schema).
        self.schema_version = 0
        doing = "read" if readonly else "open"
        conn = self._connect()
        try:
            # Imported here, not at the top: sqlite-utils takes some 70 ms to import (its
            # plugin hooks, dateutil), which the command line does not wait for; a run
            # against a real director loads it while its SSH connection opens.
            import sqlite_utils

            self._db = sqlite_utils.Database(conn, execute_plugins=False)
            self._prepare()
        except sqlite3.Error as exc:
            conn.close()
            raise self.explain(exc, doing) from exc
        except BaseException:
            conn.close()
            raise

    def explain(self, exc: BaseException, doing: str) -> AuditError:
        """``exc`` (a sqlite3 or OS error on this file) as an AuditError a user can act on."""
        return explain(self.path, exc, doing, self.busy_timeout)

    # -- opening -------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        timeout = self.busy_timeout
        if self.readonly:
            if self.path.is_dir():
                raise self.explain(IsADirectoryError(str(self.path)), "read")
            if not self.path.is_file():
                raise AuditError(f"no audit log at {self.path}")
            uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
            try:
                return self._open_readonly(uri, timeout)
            except sqlite3.Error as exc:
                if not str(getattr(exc, "sqlite_errorname", "")).startswith("SQLITE_CANTOPEN"):
                    raise self.explain(exc, "read") from exc
                if _fs_cause(self.path.resolve()) is None:
                    raise self.explain(exc, "read") from exc
            # A WAL database cannot be opened even to read where its -shm file cannot be
            # created (a read-only mount, a copy handed to a reviewer in a read-only
            # directory). No writer can be at work there (it would have made the -shm),
            # so read it as the immutable file it is.
            try:
                return self._open_readonly(uri + "&immutable=1", timeout)
            except sqlite3.Error as exc:
                raise self.explain(exc, "read") from exc
        if self.path.is_dir():
            raise self.explain(IsADirectoryError(str(self.path)), "open")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return sqlite3.connect(str(self.path), check_same_thread=False, timeout=timeout)
        except (OSError, sqlite3.Error) as exc:
            raise self.explain(exc, "open") from exc

    @staticmethod
    def _open_readonly(uri: str, timeout: float) -> sqlite3.Connection:
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=timeout)
        try:
            # connect() is lazy: read the schema so that an unopenable file fails here.
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self) -> None:
        conn = self._db.conn
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        # Look before touching anything, so pointing bbrx at some other SQLite file
        # does not switch its journal mode or add tables to it.
        tables = set(self._db.table_names())
        if tables and "events" not in tables:
            raise self._not_audit_log("it has no events table")
        if self.readonly:
            if not tables:
                raise self._not_audit_log("it is empty")
            # A reader never changes the file: a version 1 log is read as it is.
            self._check_schema()
            return
        mode = self._switch_to_wal(conn)
        if str(mode).lower() != "wal":
            logger.warning("audit log %s: journal_mode is %s, not wal", self.path, mode)
        conn.execute("PRAGMA synchronous=FULL")
        if not tables:
            self._create_schema_once()
        if self._check_schema() < SCHEMA_VERSION:
            self._migrate_once()
            self._check_schema()
        self._create_views_once()
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
        deadline = time.monotonic() + self.busy_timeout
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

    def _create_views_once(self) -> None:
        """The reviewers' views, on a log made before they existed (no version change:
        they add no column and change no row)."""
        conn = self._db.conn
        if set(VIEWS) <= set(self._db.view_names()):
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            created = create_views(self._db)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if created:
            logger.info("audit log %s: created the views %s", self.path, ", ".join(created))

    def _migrate_once(self) -> None:
        conn = self._db.conn
        # Another process may be migrating the same file right now: decide under the
        # write lock whether it still needs migrating, and migrate in one transaction.
        conn.execute("BEGIN IMMEDIATE")
        try:
            migrated = self._effective_version() < 2
            if migrated:
                migrate_to_2(self._db, utc_now())
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if migrated:
            logger.info(
                "migrated audit log %s from schema version 1 to 2 (instance columns added; "
                "no row changed)",
                self.path,
            )

    def _not_audit_log(self, why: str) -> AuditError:
        return AuditError(
            f"{self.path} is not a bbrx audit log ({why}): check the path, "
            "or move the file away so a new log can be created"
        )

    def _effective_version(self) -> int:
        """The highest of ``schema_version`` and every ``migrated_to_N`` in meta."""
        rows = self._db.execute(
            "SELECT key, value FROM meta WHERE key = 'schema_version' OR substr(key, 1, ?) = ?",
            [len(MIGRATED_TO_PREFIX), MIGRATED_TO_PREFIX],
        ).fetchall()
        found = dict(rows)
        if "schema_version" not in found:
            raise self._not_audit_log("meta has no schema_version")
        try:
            version = int(found["schema_version"])
        except (TypeError, ValueError):
            raise self._not_audit_log(f"schema_version is {found['schema_version']!r}") from None
        if version < 1:
            raise self._not_audit_log(f"schema_version is {version}")
        for key in found:
            if key == "schema_version":
                continue
            number = key.removeprefix(MIGRATED_TO_PREFIX)
            if not (number.isascii() and number.isdigit()):
                raise self._not_audit_log(f"meta key {key!r} names no schema version")
            version = max(version, int(number))
        return version

    def _check_schema(self) -> int:
        """Check the file is an audit log this bbrx can read; its effective version."""
        if "meta" not in self._db.table_names():
            raise self._not_audit_log("it has no meta table")
        # Version and columns from one snapshot: a writer may be migrating the file.
        with self._snapshot():
            version = self._effective_version()
            if version > SCHEMA_VERSION:
                raise AuditError(
                    f"{self.path} has audit schema version {version}, but this bbrx "
                    f"understands only up to {SCHEMA_VERSION}: upgrade bbrx to read or write it"
                )
            columns = tuple(c.name for c in self._db.table("events").columns)
        expected = V1_COLUMN_NAMES if version == 1 else COLUMN_NAMES
        if columns != expected:
            raise self._not_audit_log(
                f"events columns are {', '.join(columns)} at schema version {version}; "
                f"expected {', '.join(expected)}"
            )
        self._has_instance_columns = version >= 2
        self.schema_version = version
        return version

    @contextmanager
    def _snapshot(self) -> Iterator[None]:
        """One read transaction around the block, so that what it reads (the schema among
        it) is one state of the file, whatever other processes commit meanwhile."""
        conn = self._db.conn
        if conn.in_transaction:
            yield
            return
        conn.execute("BEGIN")
        try:
            # The first read fixes the snapshot, and with it the schema the block sees.
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchall()
            yield
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    @contextmanager
    def _reading(self) -> Iterator[tuple[sqlite_utils.Database, Callable[[Iterable[str]], str]]]:
        """``_using`` for reads of events rows, with the select list to use for columns:
        a version 1 log's missing instance columns as NULL. For such a log (a read-only
        reader's) the read is one snapshot, since a writer may migrate it meanwhile."""
        with self._using() as db:
            if self._has_instance_columns:
                yield db, ", ".join
                return
            with self._snapshot():
                present = {c.name for c in db.table("events").columns}
                self._has_instance_columns = all(n in present for n in INSTANCE_COLUMNS)

                def select(names: Iterable[str]) -> str:
                    return ", ".join(
                        n if n in present or n not in INSTANCE_COLUMNS else f"NULL AS {n}"
                        for n in names
                    )

                yield db, select

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
    def _using(self, doing: str = "read") -> Iterator[sqlite_utils.Database]:
        """The database, under the lock, with SQLite errors turned into AuditError."""
        with self._lock:
            if self._closed:
                raise AuditError(f"audit log {self.path} is closed: open a new AuditLog")
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise self.explain(exc, doing) from exc

    # -- writing -------------------------------------------------------------------------

    def append(self, **columns: Any) -> AppendedEvent:
        """Append one event at the end of the chain and return where it landed.

        `columns` are `validated`'s keyword arguments (`run_id`, `operation`, ... ,
        `tool_version`). Job-level rows name their instance: ``instance_group`` (``bosh``
        for a director), ``instance_index`` (as text, e.g. ``"1"``) and ``instance_id``
        (its UUID, None when unknown); run-level rows leave them None.

        Durable when this returns. Raises AuditError on invalid input or if the file
        cannot be written; nothing is appended in that case.
        """
        return self.append_validated([self.validated(**columns)])[0]

    def validated(
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
        instance_group: str | None = None,
        instance_index: str | None = None,
        instance_id: str | None = None,
    ) -> dict[str, Any]:
        """An event's columns as `append` stores them; AuditError naming a bad value."""
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
            "instance_group": _text(p, "instance_group", instance_group, required=False),
            "instance_index": _text(p, "instance_index", instance_index, required=False),
            "instance_id": _text(p, "instance_id", instance_id, required=False),
        }
        if fields["mode"] not in MODES:
            raise AuditError(
                f"cannot append to {p}: mode must be one of {', '.join(sorted(MODES))}, "
                f"got {mode!r}"
            )
        if fields["outcome"] not in OUTCOMES:
            raise AuditError(
                f"cannot append to {p}: outcome must be one of {', '.join(sorted(OUTCOMES))}, "
                f"got {outcome!r}"
            )
        return fields

    def append_validated(self, batch: list[dict[str, Any]]) -> list[AppendedEvent]:
        """Append events (each from `validated`) at the end of the chain, in order, in one
        transaction: all are durable when this returns, or none was appended.

        One commit, so one fsync, for the lot: this is how a run whose parallel scripts
        report at the same moment keeps up with them (group commit), each row still in the
        chain before the script it announces starts.
        """
        if not batch:
            return []
        with self._using("write to") as db:
            return self._append_locked(db, batch)

    def _append_locked(
        self, db: sqlite_utils.Database, batch: list[dict[str, Any]]
    ) -> list[AppendedEvent]:
        conn = db.conn
        # IMMEDIATE takes the write lock before reading the head, so two processes
        # cannot both chain onto the same previous row.
        conn.execute("BEGIN IMMEDIATE")
        appended = []
        try:
            last = conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev_hash = (last[0], last[1]) if last else (0, GENESIS_HASH)
            for fields in batch:
                seq += 1
                row: dict[str, Any] = {
                    "seq": seq,
                    "ts": utc_now(),
                    **fields,
                    "prev_hash": prev_hash,
                }
                row["hash"] = prev_hash = row_hash(row)
                db.table("events").insert(row)
                appended.append(AppendedEvent(seq=seq, ts=row["ts"], hash=row["hash"]))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        logger.debug("audit %s: appended seq %d..%d", self.path, appended[0].seq, seq)
        return appended

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
            return _spellable(canonical_json(value))
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
        """One event as a dict (``detail`` decoded), or None if there is no such seq.

        Every column is a key; the instance columns are None in a version 1 log."""
        with self._reading() as (db, select):
            sql = f"SELECT {select(COLUMN_NAMES)} FROM events WHERE seq = ?"
            rows = list(db.query(sql, [seq]))
        return _decoded(rows[0]) if rows else None

    def rows(self, after_seq: int = 0, batch: int = 1000) -> Iterator[dict[str, Any]]:
        """Every event with seq > ``after_seq``, in seq order, as stored: a dict keyed by
        ``COLUMN_NAMES`` in that order, ``detail`` as its JSON text (so the row hashes as
        it is). Read in batches, the lock released between them, so a long export does
        not hold back a run's appends; rows appended meanwhile are read too."""
        last = after_seq
        while True:
            with self._reading() as (db, select):
                columns = select(COLUMN_NAMES)
                sql = f"SELECT {columns} FROM events WHERE seq > ? ORDER BY seq LIMIT ?"
                chunk = list(db.query(sql, [last, batch]))
            yield from chunk
            if len(chunk) < batch:
                return
            last = chunk[-1]["seq"]

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

    def has_run(self, run_id: str) -> bool:
        """Whether the log holds a row of exactly this run."""
        with self._using() as db:
            found = db.execute("SELECT 1 FROM events WHERE run_id = ? LIMIT 1", [run_id])
            return found.fetchone() is not None

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
        with self._reading() as (db, select):
            sql = f"SELECT {select(COLUMN_NAMES)} FROM events WHERE run_id = ? ORDER BY seq"
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

    def altered_views(self) -> list[str]:
        """Names of the reviewers' views present with SQL other than bbrx wrote."""
        with self._using() as db:
            present = {
                name: sql
                for name, sql in db.execute(
                    "SELECT name, sql FROM sqlite_master WHERE type = 'view'"
                )
            }
        return [n for n, sql in VIEWS.items() if n in present and present[n] != sql]

    def iter_chain(self) -> Generator[tuple[Any, ...], None, None]:
        """Every row as ``(seq, prev_hash, hash, *values in HASH_ORDER)``, in seq order;
        the instance values are None in a version 1 log.

        Streamed from a live cursor on the shared connection, so the lock is held until
        the generator is exhausted or closed.
        """
        with self._reading() as (db, select):
            columns = select(("seq", "prev_hash", "hash", *HASH_ORDER))
            cursor = db.execute(f"SELECT {columns} FROM events ORDER BY seq")
            try:
                yield from cursor
            finally:
                cursor.close()


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    if row.get("detail") is not None:
        try:
            row = {**row, "detail": json.loads(row["detail"])}
        except ValueError:
            # A tampered detail must still be readable by the reviewer; verify flags it.
            logger.warning("audit event seq %s: detail is not JSON", row.get("seq"))
    return row
