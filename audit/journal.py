"""The fallback journal: where a run's events go once the audit log cannot take them.

When the SQLite log stops being writable mid-run (held by another writer past the busy
timeout, a read-only remount, a full disk), the run still has to unlock every job, and
what it does then must not be lost. Those events go to ``<audit.db>.journal.jsonl``
beside the database: one JSON object per line with the columns of an ``events`` row
(``seq``, ``prev_hash`` and ``hash`` null: the rows are outside the hash chain), each
line fsync'd before the write returns. Readers (``bbrx status``, the cleanups,
``verify``) merge a run's journal rows after its log rows. A line written before schema
version 2 lacks the instance keys; it reads with them None, like a version 1 row.

A disk that is full would refuse the journal too, so each run reserves space for it when
it starts (a preallocated file, released the moment the journal is first needed). If
even that fails, the event is logged at ERROR, as one JSON line, so that it at least
reaches the operator's terminal or the job's log.

Like the rest of this package, it imports nothing of bbrx.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit.errors import AuditError
from audit.log import AuditLog, RunSummary, explain, utc_now
from audit.schema import COLUMN_NAMES, TERMINAL_STATES

logger = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".journal.jsonl"
RESERVE_BYTES = 1 << 20  # some 2,000 events: far more than one run writes
_NOT_CHAINED = ("seq", "prev_hash", "hash")


def journal_path(db: str | Path) -> Path:
    """Where the fallback journal of the audit log ``db`` lives."""
    db = Path(db)
    return db.with_name(db.name + JOURNAL_SUFFIX)


def journal_row(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A journal line's object: every events column, in order; not chained."""
    row = {name: fields.get(name) for name in COLUMN_NAMES}
    row["ts"] = row["ts"] or utc_now()
    for name in _NOT_CHAINED:
        row[name] = None
    return row


@dataclass(frozen=True)
class JournalContents:
    """What a journal holds: its rows in file order and the lines that are not events
    (a write torn by a crash, or a line someone wrote by hand; their line numbers)."""

    path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)

    def run_ids(self) -> list[str]:
        """The runs with rows in the journal, in the order they first appear."""
        return list(dict.fromkeys(str(r["run_id"]) for r in self.rows))

    def of(self, run_id: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["run_id"] == run_id]


def read_journal(db: str | Path) -> JournalContents:
    """The journal of the audit log ``db``; empty when there is none."""
    path = journal_path(db)
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return JournalContents(path)
    except OSError as exc:
        raise AuditError(
            f"cannot read the audit journal {path}: {exc.strerror or exc}",
            hint="Check the file's permissions; it holds events the audit log could not take.",
        ) from exc
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad.append(number)
            continue
        if not _well_formed(row):
            bad.append(number)
            continue
        rows.append({name: row.get(name) for name in COLUMN_NAMES})
    if bad:
        logger.warning("audit journal %s: lines %s are not events", path, bad)
    return JournalContents(path, rows, bad)


# The journal is outside the hash chain, and anyone who can write the file can write a
# line: a line the readers (status, the cleanups, verify) could trip on is not an event.
_TEXT_REQUIRED = ("run_id", "operation", "target", "mode", "operator", "to_state", "trigger", "ts")
_TEXT_OPTIONAL = (
    "reason",
    "from_state",
    "job",
    "script",
    "outcome",
    "origin_host",
    # Schema version 2; a line written before it has none of them, which reads as None.
    "instance_group",
    "instance_index",
    "instance_id",
)


def _well_formed(row: Any) -> bool:
    if not isinstance(row, dict):
        return False
    if not all(isinstance(row.get(key), str) for key in _TEXT_REQUIRED):
        return False
    if not all(isinstance(row.get(key), str | None) for key in _TEXT_OPTIONAL):
        return False
    duration, exit_code = row.get("duration"), row.get("exit_code")
    if duration is not None and (
        isinstance(duration, bool) or not isinstance(duration, int | float)
    ):
        return False
    if exit_code is not None and (isinstance(exit_code, bool) or not isinstance(exit_code, int)):
        return False
    detail = row.get("detail")
    if detail is not None and not isinstance(detail, dict):
        return False
    if row["trigger"] == "script_started":
        pid = (detail or {}).get("pid")
        return isinstance(pid, int) and not isinstance(pid, bool) and pid > 0
    return True


def merged_timeline(
    chained: Iterable[Mapping[str, Any]], journaled: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """One run's rows: its own log rows, then its journal rows (written after the log
    failed), then the rows others appended to it later (a cleanup's ``recovered``)."""
    own: list[dict[str, Any]] = []
    later: list[dict[str, Any]] = []
    for row in chained:
        (later if row["trigger"] == "recovered" else own).append(dict(row))
    return own + [dict(r) for r in journaled] + later


def summarise(run_id: str, rows: list[dict[str, Any]]) -> RunSummary:
    """A RunSummary of a run's (merged) rows, by the conventions of ``AuditLog.runs``."""
    first, last = rows[0], rows[-1]
    run_level = [r for r in rows if r["job"] is None]
    outcome = run_level[-1]["to_state"] if run_level else None
    return RunSummary(
        run_id=run_id,
        operation=first["operation"],
        target=first["target"],
        mode=first["mode"],
        operator=first["operator"],
        reason=first["reason"],
        start=first["ts"],
        end=max(str(first["ts"]), str(last["ts"])),
        events=len(rows),
        outcome=outcome,
        finished=outcome in TERMINAL_STATES,
    )


class AuditRecord:
    """The audit log and its fallback journal, read as one: a run's journal rows (written
    after the log failed it) follow its log rows. What status, the cleanups and a reviewer
    read: a killed run whose lock row went to the journal is still seen as maybe locked,
    with its pids, and a run whose end went there still shows how it ended."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self.journal: JournalContents = read_journal(audit.path)

    def runs(self) -> list[RunSummary]:
        summaries = []
        known = set()
        for summary in self.audit.runs():
            known.add(summary.run_id)
            extra = self.journal.of(summary.run_id)
            if extra:
                summary = summarise(summary.run_id, self.timeline(summary.run_id))
            summaries.append(summary)
        for run_id in self.journal.run_ids():
            if run_id not in known:  # every row of it went to the journal
                summaries.append(summarise(run_id, self.journal.of(run_id)))
        return summaries

    def resolve(self, run: str) -> str:
        """The run id for an id or a unique prefix, among the log's runs and the journal's."""
        try:
            return self.audit.resolve_run(run)
        except AuditError:
            matches = [r for r in self.journal.run_ids() if run and r.startswith(run)]
            if len(matches) == 1:
                return matches[0]  # every row of it went to the journal
            raise

    def timeline(self, run: str) -> list[dict[str, Any]]:
        """One run's rows (``run``: an id or a unique prefix): the log's, then the journal's."""
        run_id = self.resolve(run)
        journaled = self.journal.of(run_id)
        # One indexed lookup: a report asks this of every run it shows.
        chained = self.audit.timeline(run_id) if self.audit.has_run(run_id) else []
        return merged_timeline(chained, journaled)


class Journal:
    """The writing side, for one process. Thread-safe; each ``write`` is durable when it
    returns True."""

    def __init__(self, db: str | Path) -> None:
        self.db = Path(db)
        self.path = journal_path(self.db)
        self._reserve = self.path.with_name(
            f"{self.path.name}.reserve-{socket.gethostname()}-{os.getpid()}"
        )
        self._lock = threading.Lock()

    # -- the space reservation -----------------------------------------------------------

    def reserve(self, nbytes: int = RESERVE_BYTES) -> None:
        """Set aside room for the journal now, while there is some: raise AuditError if
        the disk beside the log is already too full (or read-only) to take it."""
        self._forget_dead_reserves()
        try:
            fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, nbytes)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self._reserve.unlink(missing_ok=True)
            raise explain(self.db, exc, "reserve journal space beside", 0) from exc

    def release(self) -> None:
        """Give the reserved space back (at the end of the run, or for the journal)."""
        try:
            self._reserve.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("could not remove the journal reserve %s: %s", self._reserve, exc)

    def _forget_dead_reserves(self) -> None:
        # A run that was killed leaves its reserve behind; this host's are ours to clear.
        prefix = f"{self.path.name}.reserve-{socket.gethostname()}-"
        try:
            entries = list(self.path.parent.glob(prefix + "*"))
        except OSError:
            return
        for entry in entries:
            pid = entry.name.removeprefix(prefix)
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                entry.unlink(missing_ok=True)

    # -- writing -------------------------------------------------------------------------

    def write(self, fields: Mapping[str, Any]) -> bool:
        """Append one event; True once it is on disk. Never raises: an event that cannot
        be written even here is logged at ERROR as a JSON line, and False returned."""
        try:
            row = journal_row(fields)
            # ASCII escapes: a value no UTF-8 can spell (a lone surrogate from a file name
            # decoded with surrogateescape) still makes a line, and the same line on any disk.
            line = json.dumps(row, sort_keys=False, ensure_ascii=True, default=str) + "\n"
        except Exception as exc:  # never raises, as promised: say what was lost
            return self._lose(repr(dict(fields)), exc)
        data = line.encode("ascii")
        with self._lock:
            try:
                self._append(data)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    return self._lose(line, exc)
                # The disk filled up: this is what the reserve was kept for.
                self.release()
                try:
                    self._append(data)
                except OSError as again:
                    return self._lose(line, again)
        return True

    def _append(self, data: bytes) -> None:
        created = not self.path.exists()
        # O_APPEND: one write() per line, so lines of processes sharing the file never
        # interleave within a line.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, "short write to the audit journal")
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_directory(self.path.parent)

    def _lose(self, line: str, exc: Exception) -> bool:
        logger.error(
            "audit event NOT RECORDED (the audit journal %s cannot be written either: %s): %s",
            self.path,
            getattr(exc, "strerror", None) or exc,
            line.rstrip("\n"),
        )
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
