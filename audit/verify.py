"""Verification of an audit log: contiguous seqs, an unbroken hash chain, intact triggers."""

from __future__ import annotations

import logging
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit.fields import field_problem
from audit.journal import read_journal
from audit.log import AuditLog
from audit.schema import GENESIS_HASH, HASH_ORDER, hash_values

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyReport:
    """The result of verify_log.

    ``problem`` is a sentence naming the first bad seq and what is wrong with it; it is
    None when ``ok``. ``head_seq``/``head_hash`` describe the last row, so a reviewer can
    compare them with a previously recorded head (deleting rows at the very end leaves
    a valid chain, and only a remembered head reveals that).
    """

    ok: bool
    count: int
    head_seq: int | None
    head_hash: str | None
    first_bad_seq: int | None
    problem: str | None
    # The fallback journal beside the log: events a run could not append to it.
    journal_path: Path | None = None
    journal_events: int = 0
    journal_runs: list[str] = field(default_factory=list)
    journal_bad_lines: list[int] = field(default_factory=list)

    def journal_lines(self) -> list[str]:
        """What to tell a reviewer about the journal; nothing when there is none."""
        if not self.journal_events and not self.journal_bad_lines:
            return []
        lines = [
            f"journal {self.journal_path}: {self.journal_events} events of "
            f"{len(self.journal_runs)} run(s) ({', '.join(self.journal_runs) or 'none'}) "
            "written when the audit log could not be, OUTSIDE the hash chain: they are "
            "not tamper-evident"
        ]
        if self.journal_bad_lines:
            lines.append(
                f"journal lines {', '.join(map(str, self.journal_bad_lines))} are not events "
                "(a write cut short by a crash, or an edit)"
            )
        lines.append(
            "what to do: keep the journal with the log as the record of how those runs "
            "ended (`bbrx status` and the cleanups read it); read it with any JSON tool"
        )
        return lines


def _deleted(expected: int, found: int) -> str:
    if found == expected + 1:
        return f"row {expected} deleted"
    return f"rows {expected}-{found - 1} deleted"


def _content_hash(values: list[Any]) -> str | None:
    try:
        return hash_values(values)
    except (TypeError, ValueError):
        # A value JSON cannot encode (a BLOB, an infinity) was never written by append.
        return None


# The columns the PCI DSS field check reads, and where each is in a chain row's values.
_FIELD_AT = {
    name: HASH_ORDER.index(name)
    for name in (
        *("ts", "operator", "trigger", "outcome", "origin_host"),
        *("target", "operation", "to_state", "mode"),
    )
}


def _fields(values: list[Any]) -> dict[str, Any]:
    return {name: values[at] for name, at in _FIELD_AT.items()}


def _trigger_problem(log: AuditLog) -> str | None:
    parts = []
    missing = log.missing_triggers()
    if missing:
        parts.append(f"append-only triggers missing: {', '.join(missing)}")
    altered = log.altered_triggers()
    if altered:
        parts.append(f"append-only triggers altered: {', '.join(altered)}")
    views = log.altered_views()
    if views:
        parts.append(f"reviewers' views altered (they may hide rows): {', '.join(views)}")
    return "; ".join(parts) or None


def verify_log(path: str | Path) -> VerifyReport:
    """Verify the audit log at ``path``, opened read-only. Raises AuditError if unreadable.

    Rows are walked in seq order and the first problem wins: a missing seq (deleted
    row), then a prev_hash that is not the previous row's hash (reordered or removed
    rows), then a hash that does not match the row's content (edited row), then a row
    lacking a field PCI DSS requires (see audit.fields). Only an intact chain is then
    checked for missing or altered append-only triggers and altered views.
    """
    with AuditLog(path, readonly=True) as log:
        expected = 1
        prev_hash = GENESIS_HASH
        bad_seq: int | None = None
        problem: str | None = None
        with closing(log.iter_chain()) as rows:
            for seq, row_prev_hash, stored_hash, *values in rows:
                if seq != expected:
                    bad_seq = expected
                    problem = (
                        f"seq {expected}: expected seq {expected}, found {seq} "
                        f"({_deleted(expected, seq)})"
                    )
                elif row_prev_hash != prev_hash:
                    bad_seq = seq
                    previous = "the genesis value" if seq == 1 else f"the hash of seq {seq - 1}"
                    problem = (
                        f"seq {seq}: prev_hash does not match {previous} "
                        "(rows reordered or removed)"
                    )
                elif _content_hash(values) != stored_hash:
                    bad_seq = seq
                    problem = f"seq {seq}: hash does not match its content (row edited)"
                elif (lacking := field_problem(_fields(values))) is not None:
                    # append refuses such a row: only a rewritten chain (or a row an old
                    # bbrx wrote) holds one.
                    bad_seq = seq
                    problem = f"seq {seq}: {lacking} (PCI DSS 10.2 fields; row rewritten)"
                if problem is not None:
                    break
                prev_hash = stored_hash
                expected += 1
        if problem is None:
            problem = _trigger_problem(log)
        head = log.head()
        count = expected - 1 if bad_seq is None else log.count()
    journal = read_journal(path)
    report = VerifyReport(
        ok=problem is None,
        count=count,
        head_seq=head.seq if head else None,
        head_hash=head.hash if head else None,
        first_bad_seq=bad_seq,
        problem=problem,
        journal_path=journal.path,
        journal_events=len(journal.rows),
        journal_runs=journal.run_ids(),
        journal_bad_lines=journal.bad_lines,
    )
    if report.ok:
        logger.debug("audit log %s intact: %d events", path, count)
    else:
        logger.warning("audit log %s BROKEN: %s", path, problem)
    return report
