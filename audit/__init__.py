"""Append-only, hash-chained audit log of bbrx runs, usable on its own by reviewers.

This package depends only on the standard library and sqlite-utils, so a compliance
reviewer can verify and read a log (``python -m audit``) without the rest of bbrx.
"""

from audit.errors import AuditError
from audit.journal import (
    AuditRecord,
    Journal,
    JournalContents,
    journal_path,
    merged_timeline,
    read_journal,
    summarise,
)
from audit.log import AppendedEvent, AuditLog, RunSummary, busy_timeout_from_env
from audit.render import format_runs, format_timeline
from audit.schema import EVENT_COLUMNS, TERMINAL_STATES, row_hash
from audit.verify import VerifyReport, verify_log

__all__ = [
    "EVENT_COLUMNS",
    "TERMINAL_STATES",
    "AppendedEvent",
    "AuditError",
    "AuditLog",
    "AuditRecord",
    "Journal",
    "JournalContents",
    "RunSummary",
    "VerifyReport",
    "busy_timeout_from_env",
    "format_runs",
    "format_timeline",
    "journal_path",
    "merged_timeline",
    "read_journal",
    "row_hash",
    "summarise",
    "verify_log",
]
