"""Append-only, hash-chained audit log of bbrx runs, usable on its own by reviewers.

This package depends only on the standard library and sqlite-utils, so a compliance
reviewer can verify and read a log (``python -m audit``) without the rest of bbrx.
"""

from typing import TYPE_CHECKING

from audit.errors import AuditError

if TYPE_CHECKING:
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

# Each name is imported from its module when first asked for (PEP 562): `from audit import
# AuditError` must not load the whole log (sqlite-utils among it) for the command line.
_WHERE = {
    "AuditRecord": "journal",
    "Journal": "journal",
    "JournalContents": "journal",
    "journal_path": "journal",
    "merged_timeline": "journal",
    "read_journal": "journal",
    "summarise": "journal",
    "AppendedEvent": "log",
    "AuditLog": "log",
    "RunSummary": "log",
    "busy_timeout_from_env": "log",
    "format_runs": "render",
    "format_timeline": "render",
    "EVENT_COLUMNS": "schema",
    "TERMINAL_STATES": "schema",
    "row_hash": "schema",
    "VerifyReport": "verify",
    "verify_log": "verify",
}


def __getattr__(name: str) -> object:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'audit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"audit.{module}"), name)
    globals()[name] = value
    return value


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
