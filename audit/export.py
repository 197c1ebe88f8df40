"""Export of the audit log for SIEMs and spreadsheets, and verification of an exported copy.

Two formats, both one event a line (row), every column in ``COLUMN_NAMES`` order:

``jsonl``
    A compact JSON object per line (no spaces), keys in column order, each value exactly
    as stored: text as text, integers and reals as JSON numbers (reals written with
    ``repr``, so they read back as the same float), NULL as ``null``. ``detail`` stays
    its stored canonical JSON *text* (a JSON string holding JSON), not a nested object:
    the row's hash covers that text, so ``audit.schema.row_hash`` of a line's columns
    recomputes its ``hash`` from the line alone, and ``verify_export`` checks a copy
    without the log. UTF-8 (``ensure_ascii=False``), ``\\n`` line ends. A value SQLite can
    hold but JSON cannot (only a tampered row has one: a BLOB, an infinite REAL) does not
    stop the export: a BLOB is written as the string ``x'0a1b'`` (its SQL literal), an
    infinity as ``"Inf"`` or ``"-Inf"``, and ``verify_export`` then reports that row's
    hash as not matching.

``csv``
    A header row of the column names, then a row per event (the ``csv`` module's excel
    dialect: ``\\r\\n`` row ends, so open the output with ``newline=""``). NULL is an
    empty cell; numbers are written as in JSONL. The one deliberate change from the
    stored value: a text cell beginning with ``=``, ``+``, ``-``, ``@``, a tab or a
    carriage return (an operator named ``=HYPERLINK(...)``) is prefixed with a single
    quote ``'`` so that a spreadsheet shows it as text instead of running it as a
    formula. Only text is touched, never a number (an ``exit_code`` of ``-1`` stays
    ``-1``). Since CSV also cannot tell NULL from empty text nor a number from text, CSV
    is for reading; the JSONL export is the one to verify (``verify_export`` refuses CSV).

``follow`` streams rows as they are appended, for ``--follow`` to a SIEM.
This module uses only the standard library and the rest of the ``audit`` package.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from audit.errors import AuditError
from audit.log import AuditLog
from audit.schema import COLUMN_NAMES, GENESIS_HASH, row_hash

logger = logging.getLogger(__name__)

FORMATS = ("jsonl", "csv")

# What a spreadsheet reads as the start of a formula (OWASP's list for CSV injection).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
# Gaps kept in ExportCheck.gap_list (all are counted in ExportCheck.gaps).
GAPS_LISTED = 20
# A log row further ahead than this is looked up afresh rather than read up to.
_SKIP_AHEAD = 256
_COLUMN_SET = frozenset(COLUMN_NAMES)
_CSV_HEADER = ",".join(COLUMN_NAMES)


# -- writing -------------------------------------------------------------------------------


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise AuditError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")


def _exportable(value: Any) -> Any:
    """``value`` as JSON can carry it: itself, or a string for what JSON cannot hold."""
    if value is None or type(value) is int:
        return value
    if type(value) is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # Not from SQLite (it hands back valid UTF-8), but never crash the export.
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if type(value) is float:
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Inf" if value > 0 else "-Inf")
    if isinstance(value, bytes | bytearray | memoryview):
        return f"x'{bytes(value).hex()}'"
    if isinstance(value, int):  # a bool or an int subclass: plain int, as SQLite stores it
        return int(value)
    return str(value)


def _json_line(row: Mapping[str, Any]) -> str:
    obj = {name: _exportable(row.get(name)) for name in COLUMN_NAMES}
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"


def _csv_cell(value: Any) -> str | int | float:
    value = _exportable(value)
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def write_rows(
    rows: Iterable[Mapping[str, Any]], out: TextIO, fmt: str, *, header: bool = True
) -> int:
    """Write ``rows`` (as ``AuditLog.rows()`` yields them) to ``out`` in ``fmt``; the count.

    ``header`` writes the CSV header row first (ignored for JSONL, which has none); pass
    False when appending to an export already begun. See the module docstring for the
    exact rules of each format. ``out`` should be UTF-8.
    """
    _check_format(fmt)
    count = 0
    if fmt == "jsonl":
        for row in rows:
            out.write(_json_line(row))
            count += 1
        return count
    writer = csv.writer(out)
    if header:
        writer.writerow(COLUMN_NAMES)
    for row in rows:
        writer.writerow([_csv_cell(row.get(name)) for name in COLUMN_NAMES])
        count += 1
    return count


# -- following -----------------------------------------------------------------------------


def _transient(exc: AuditError) -> bool:
    """Whether a read of the log failed for a moment (locked, I/O hiccup), not for good."""
    cause = exc.__cause__
    if not isinstance(cause, sqlite3.Error):
        return False  # not an audit log, a schema this bbrx cannot read, ...
    name = str(getattr(cause, "sqlite_errorname", "") or "")
    text = str(cause)
    return (
        name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_PROTOCOL"))
        or "locked" in text
        or "is busy" in text
    )


def _identity(db: Path) -> tuple[int, int]:
    try:
        stat = os.stat(db)
    except FileNotFoundError:
        raise AuditError(
            f"the audit log {db} disappeared while it was being followed: "
            "the export so far is complete up to the last row written"
        ).with_hint("Find out who moved or deleted it; then export again from the log.") from None
    except OSError as exc:
        raise AuditError(f"cannot follow the audit log {db}: {exc}") from exc
    return stat.st_dev, stat.st_ino


class _Follower:
    """The state of one ``follow``: where the export stands in the log's chain."""

    def __init__(self, db: Path, poll: float, after_seq: int) -> None:
        self.db = db
        self.busy_timeout = min(max(poll, 0.05), 5.0)
        self.log: AuditLog | None = None
        self.identity: tuple[int, int] | None = None
        self.last_seq = after_seq
        # Hash of row last_seq, learnt from the log on first opening it (None until then).
        self.last_hash: str | None = GENESIS_HASH if after_seq == 0 else None
        self.failing = False

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None

    def _open(self) -> AuditLog:
        identity = _identity(self.db)
        if self.log is not None and identity == self.identity:
            return self.log
        if self.log is not None:
            logger.info("audit log %s was replaced: reopening it to follow on", self.db)
            self.close()
        log = AuditLog(self.db, readonly=True, busy_timeout=self.busy_timeout)
        try:
            self._check_anchor(log)
        except BaseException:
            log.close()
            raise
        self.log, self.identity = log, identity
        return log

    def _check_anchor(self, log: AuditLog) -> None:
        """The log still holds row ``last_seq`` with the hash already exported."""
        if self.last_seq == 0:
            return
        row = next(log.rows(after_seq=self.last_seq - 1, batch=1), None)
        if row is None or row["seq"] != self.last_seq:
            raise AuditError(
                f"the audit log {self.db} has no seq {self.last_seq}, which the export has "
                "reached: it was truncated or replaced"
            ).with_hint(f"Verify it (`bbrx audit verify`, `python -m audit verify {self.db}`).")
        if self.last_hash is None:
            self.last_hash = row["hash"]
        elif row["hash"] != self.last_hash:
            raise AuditError(
                f"the audit log {self.db} now holds a seq {self.last_seq} whose hash differs "
                "from the one exported: it was replaced or tampered with"
            ).with_hint(f"Verify it (`bbrx audit verify`, `python -m audit verify {self.db}`).")

    def _chained(self, row: Mapping[str, Any]) -> None:
        seq = row["seq"]
        if seq != self.last_seq + 1 or row["prev_hash"] != self.last_hash:
            raise AuditError(
                f"the audit log {self.db} no longer continues the chain being exported: "
                f"after seq {self.last_seq} comes seq {seq} with prev_hash {row['prev_hash']}, "
                f"not {self.last_hash} (rows removed, or the log replaced or tampered with)"
            ).with_hint(f"Verify it (`bbrx audit verify`, `python -m audit verify {self.db}`).")
        self.last_seq, self.last_hash = seq, row["hash"]

    def new_rows(self) -> Iterator[Mapping[str, Any]]:
        """The rows appended since the last call, checked to continue the chain."""
        log = self._open()
        for row in log.rows(after_seq=self.last_seq):
            self._chained(row)
            yield row


def follow(
    db: Path,
    out: TextIO,
    fmt: str,
    *,
    keep: Callable[[Mapping[str, Any]], bool],
    after_seq: int,
    stop: threading.Event,
    poll: float = 0.5,
) -> int:
    """Write to ``out`` the rows appended to the log ``db`` after ``after_seq``, as they
    arrive, until ``stop`` is set; the number of rows written.

    ``after_seq`` is the last seq of the log the caller has already read (exported or
    not): rows after it are read every ``poll`` seconds, those ``keep`` accepts are
    written (CSV without a header: the caller wrote it), and ``out`` is flushed after each
    batch, so a SIEM tailing the file sees each row within a poll. Each row is checked to
    continue the chain (its prev_hash is the hash of the row before), so a log replaced
    or cut short under the follower is not silently exported as if it went on.

    ``keep`` gets each row as ``AuditLog.rows()`` gives it (``detail`` as its JSON text).
    A busy log (another process holding a lock; each read waits at most about ``poll``
    seconds for it, so ``stop`` is honoured promptly) or a transient read error is logged
    and retried at the next poll. The log disappearing, ceasing to be an audit log, or no
    longer continuing the chain raises AuditError; rows written until then stay written.
    """
    _check_format(fmt)
    follower = _Follower(Path(db), poll, after_seq)
    written = 0
    try:
        while not stop.is_set():
            batch: list[Mapping[str, Any]] = []
            error: AuditError | None = None
            try:
                for row in follower.new_rows():
                    if keep(row):
                        batch.append(row)
                    if len(batch) >= 1000:
                        written += write_rows(batch, out, fmt, header=False)
                        out.flush()
                        batch.clear()
            except AuditError as exc:
                error = exc
            if batch:
                written += write_rows(batch, out, fmt, header=False)
                out.flush()
            if error is not None:
                if not _transient(error) or not follower.db.exists():
                    _identity(follower.db)  # a log gone says so, rather than "locked"
                    raise error
                follower.close()
                log_it = logger.debug if follower.failing else logger.warning
                log_it("following %s: %s; retrying in %g s", db, error.message, poll)
                follower.failing = True
            elif follower.failing:
                logger.info("following %s: reading again after seq %d", db, follower.last_seq)
                follower.failing = False
            stop.wait(poll)
    finally:
        follower.close()
    return written


# -- verifying -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportCheck:
    """The result of ``verify_export``.

    ``rows``: lines holding an event, up to the first problem. ``links``: consecutive-seq
    pairs of lines whose prev_hash link was checked. ``gaps``: places where seq jumps
    (a filtered export, or lines removed from one: the file alone cannot tell which, so
    they are listed in ``gap_list`` as ``(line, seq before, seq at that line)`` and named
    by ``lines()``, and ``complete=True`` makes the first one a problem).
    ``compared_with_log``: a log was given and each row compared with it;
    ``matched_in_log``: rows found in it with the same hash and values. ``problem`` names
    the first problem (``first_bad_line``/``first_bad_seq``); None when ``ok``.
    ``last_seq``/``last_hash``: the export's last row, to compare with a remembered head
    (rows cut off the end leave a valid export).
    """

    ok: bool
    rows: int
    links: int
    gaps: int
    compared_with_log: bool
    matched_in_log: int
    first_bad_line: int | None
    first_bad_seq: int | None
    problem: str | None
    path: Path | None = None
    db: Path | None = None
    gap_list: tuple[tuple[int, int, int], ...] = ()
    last_seq: int | None = None
    last_hash: str | None = None

    def lines(self) -> list[str]:
        """What to tell a reviewer."""
        name = f"export {self.path}" if self.path is not None else "export"
        if not self.ok:
            lines = [
                f"{name} BROKEN: {self.problem}",
                f"{self.rows} row(s) before it checked",
                "what to do: treat this copy as altered; export again from the audit log "
                "and verify the log itself (`bbrx audit verify`)",
            ]
            return lines
        if self.rows == 0:
            return [f"{name}: no events in it (nothing to verify)"]
        lines = [
            f"{name}: {self.rows} event(s) intact: each row's hash matches its content, "
            f"{self.links} prev_hash link(s) between consecutive seqs checked",
            f"last row: seq {self.last_seq}, hash {self.last_hash}",
        ]
        if self.gaps:
            shown = ", ".join(
                f"line {line} (seq {before} -> {seq})" for line, before, seq in self.gap_list
            )
            more = self.gaps - len(self.gap_list)
            if more > 0:
                shown += f" and {more} more"
            lines.append(
                f"{self.gaps} gap(s) where seq jumps, the link there unchecked: {shown}. "
                "Expected in a filtered export; in a full export each is a row removed"
            )
        if self.compared_with_log:
            lines.append(
                f"compared with the audit log {self.db}: all {self.matched_in_log} row(s) "
                "are in it with the same hash and values"
            )
        else:
            lines.append(
                "not compared with the audit log: this shows the copy is consistent, not "
                "that the log holds these rows (a copy re-chained after an edit is "
                "consistent too); give the log to compare"
            )
        return lines


class _Bad(Exception):
    """The first problem of an export: the line, seq and sentence for ExportCheck."""

    def __init__(self, line: int, seq: int | None, problem: str) -> None:
        super().__init__(problem)
        self.line = line
        self.seq = seq
        self.problem = problem


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"key {key!r} appears twice")
        obj[key] = value
    return obj


def _parse(number: int, raw: bytes) -> dict[str, Any]:
    where = f"line {number}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Bad(number, None, f"{where} is not UTF-8 ({exc})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys)
    except ValueError as exc:
        raise _Bad(number, None, f"{where} is not a JSON object ({exc})") from None
    if not isinstance(obj, dict):
        raise _Bad(number, None, f"{where} is not a JSON object but a {type(obj).__name__}")
    seq = obj.get("seq")
    if type(seq) is not int or seq < 1:
        raise _Bad(number, None, f"{where}: seq is {seq!r}, not a positive integer")
    where = f"line {number} (seq {seq})"
    missing = [name for name in COLUMN_NAMES if name not in obj]
    if missing:
        raise _Bad(number, seq, f"{where} lacks the column(s) {', '.join(missing)}")
    unknown = sorted(key for key in obj if key not in _COLUMN_SET)
    if unknown:
        raise _Bad(number, seq, f"{where} has unknown key(s) {', '.join(unknown)}")
    for name in ("hash", "prev_hash"):
        if not isinstance(obj[name], str):
            raise _Bad(number, seq, f"{where}: {name} is {obj[name]!r}, not a string")
    return obj


def _events(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of each non-blank line; blank lines only at the end."""
    blank: int | None = None
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            if not raw.strip():
                blank = number if blank is None else blank
                continue
            if blank is not None:
                raise _Bad(blank, None, f"line {blank} is blank (a line removed?)")
            yield number, raw


def _refuse_csv(path: Path) -> None:
    with path.open("rb") as file:
        first = file.readline().strip().decode("utf-8", "replace")
    if path.suffix.lower() == ".csv" or first == _CSV_HEADER:
        raise AuditError(
            f"{path} is a CSV export, which cannot be verified: CSV neutralises spreadsheet "
            "formulas (a ' before a cell starting with = + - @) and cannot tell NULL from "
            "empty text, so its cells are not the stored values the hashes cover"
        ).with_hint("Export as JSONL (--format jsonl) and verify that file.")


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


class _LogRows:
    """The log's stored rows by seq, read in order (for an export in seq order)."""

    def __init__(self, log: AuditLog) -> None:
        self.log = log
        self.rows: Iterator[dict[str, Any]] | None = None
        self.current: dict[str, Any] | None = None

    def get(self, seq: int) -> dict[str, Any] | None:
        current = self.current
        if self.rows is None or current is None or seq > current["seq"] + _SKIP_AHEAD:
            self.rows = self.log.rows(after_seq=seq - 1)
            current = self.current = next(self.rows, None)
        while current is not None and current["seq"] < seq:
            current = self.current = next(self.rows, None)
        if current is not None and current["seq"] == seq:
            return current
        return None


def _compare(number: int, obj: dict[str, Any], stored: dict[str, Any] | None) -> None:
    seq = obj["seq"]
    where = f"line {number} (seq {seq})"
    if stored is None:
        raise _Bad(number, seq, f"{where}: the log has no seq {seq}")
    if stored["hash"] != obj["hash"]:
        raise _Bad(
            number,
            seq,
            f"{where}: the log's seq {seq} has hash {stored['hash']}, the export's {obj['hash']}",
        )
    for name in COLUMN_NAMES:
        value = _exportable(stored[name])
        if not _same(value, stored[name]):
            raise _Bad(
                number,
                seq,
                f"{where}: the log's seq {seq} holds in {name} a value JSON cannot (a BLOB?), "
                "which bbrx never writes: the log was tampered with; verify it",
            )
        if not _same(value, obj[name]):
            raise _Bad(
                number,
                seq,
                f"{where}: {name} is {obj[name]!r} in the export but {value!r} in the log "
                "under the same hash: the log's row was edited; verify it",
            )


def verify_export(path: Path, db: Path | None = None, *, complete: bool = False) -> ExportCheck:
    """Verify a JSONL export, alone or (``db`` given) against the log it came from.

    Each line must be a JSON object with exactly the columns; its hash is recomputed from
    its columns (``row_hash``), seqs must increase, and where consecutive lines have
    consecutive seqs the later's prev_hash must be the earlier's hash (seq 1's the
    genesis value). A jump in seq (a filtered export) is counted and listed, not a
    problem, unless ``complete`` says the export is meant to hold every row from seq 1.
    With ``db`` every row is also looked up in the log: it must be there with the same
    hash and values. The first problem wins. Raises AuditError for an unreadable file, a
    CSV export (verify the JSONL) or an unreadable log.
    """
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"no export file at {path}: give the path of a JSONL export")
    try:
        _refuse_csv(path)
    except OSError as exc:
        raise AuditError(f"cannot read the export {path}: {exc}") from exc
    log = AuditLog(db, readonly=True) if db is not None else None
    rows = links = gaps = matched = 0
    gap_list: list[tuple[int, int, int]] = []
    prev: dict[str, Any] | None = None
    bad: _Bad | None = None
    try:
        lookup = _LogRows(log) if log is not None else None
        for number, raw in _events(path):
            obj = _parse(number, raw)
            seq = obj["seq"]
            where = f"line {number} (seq {seq})"
            try:
                content = row_hash(obj)
            except (TypeError, ValueError) as exc:
                raise _Bad(number, seq, f"{where}: a value no stored row holds ({exc})") from None
            if content != obj["hash"]:
                raise _Bad(number, seq, f"{where}: hash does not match its content (edited)")
            before = prev["seq"] if prev is not None else 0
            if seq <= before:
                raise _Bad(
                    number, seq, f"{where}: out of order after seq {before} (moved or repeated)"
                )
            if seq == before + 1:
                expected = prev["hash"] if prev is not None else GENESIS_HASH
                if obj["prev_hash"] != expected:
                    previous = (
                        "the genesis value"
                        if prev is None
                        else f"the hash of seq {before} on line {number - 1}"
                    )
                    raise _Bad(number, seq, f"{where}: prev_hash does not match {previous}")
                if prev is not None:
                    links += 1
            else:
                if complete:
                    missing = f"seq {before + 1}" + (f"-{seq - 1}" if seq - 1 > before + 1 else "")
                    raise _Bad(
                        number,
                        seq,
                        f"{where}: prev_hash links to no line: {missing} missing from an "
                        "export said to be complete (line removed)",
                    )
                if prev is not None:
                    gaps += 1
                    if len(gap_list) < GAPS_LISTED:
                        gap_list.append((number, before, seq))
            if lookup is not None:
                _compare(number, obj, lookup.get(seq))
                matched += 1
            rows += 1
            prev = obj
    except _Bad as exc:
        bad = exc
    except OSError as exc:
        raise AuditError(f"cannot read the export {path}: {exc}") from exc
    finally:
        if log is not None:
            log.close()
    check = ExportCheck(
        ok=bad is None,
        rows=rows,
        links=links,
        gaps=gaps,
        compared_with_log=db is not None,
        matched_in_log=matched,
        first_bad_line=bad.line if bad else None,
        first_bad_seq=bad.seq if bad else None,
        problem=bad.problem if bad else None,
        path=path,
        db=Path(db) if db is not None else None,
        gap_list=tuple(gap_list),
        last_seq=prev["seq"] if prev is not None else None,
        last_hash=prev["hash"] if prev is not None else None,
    )
    if check.ok:
        logger.debug("export %s intact: %d rows, %d gaps", path, rows, gaps)
    else:
        logger.warning("export %s BROKEN: %s", path, check.problem)
    return check
