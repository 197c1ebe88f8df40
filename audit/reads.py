"""Reads are audited: each export, report, verify, evidence pack and checkpoint appends a
row of its own (who, which filters, the result), so the trail shows who looked at it.

A read is a run of one row: mode ``review``, operation ``audit-<command>``, target the
log's own path (the resource the read touched), from no state to ``succeeded`` or
``failed``, its filters and result in ``detail``. A log that cannot be written (a copy on
read-only media, say) is still read: the reviewer is told the read went unrecorded.
"""

from __future__ import annotations

import getpass
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from audit.errors import AuditError
from audit.log import AppendedEvent, AuditLog
from audit.schema import SCHEMA_VERSION

logger = logging.getLogger(__name__)

REVIEW_MODE = "review"
OPERATOR_ENV = "BBRX_OPERATOR"


def tool_version() -> str:
    # importlib.metadata costs some 20 ms to import: only a reviewer's recorded read pays it,
    # not every bbrx start (the command line imports this module).
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bbrx")
    except PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        return "0.0.0+unknown"


def default_operator() -> str:
    """``$BBRX_OPERATOR``, else user@hostname: who a read is recorded as."""
    return os.environ.get(OPERATOR_ENV) or f"{getpass.getuser()}@{socket.gethostname()}"


def new_read_id(now: datetime | None = None) -> str:
    """A run id, spelled as bbrx's runs are (UTC second, then six hex digits)."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Reader:
    """Who is reading, and why."""

    operator: str
    reason: str | None = None

    @classmethod
    def default(cls, operator: str | None = None, reason: str | None = None) -> Reader:
        name = operator or default_operator()
        if not name.strip():
            raise AuditError(
                "the reader's name is blank: the audit log must say who read it",
                hint="Give --as NAME (or set BBRX_OPERATOR), or leave both out for user@host.",
            )
        return cls(name, reason or None)


@dataclass(frozen=True)
class ReadRecord:
    """Where a read was recorded: ``event`` None when the log could not take it."""

    run_id: str
    event: AppendedEvent | None
    unrecorded_because: str | None = None

    def line(self) -> str:
        if self.event is not None:
            return (
                f"this read is recorded in the audit log: run {self.run_id}, seq {self.event.seq}"
            )
        return (
            f"this read could NOT be recorded in the audit log ({self.unrecorded_because}); "
            "note it in the ticket yourself"
        )


def record_read(
    db: str | Path,
    command: str,
    reader: Reader,
    *,
    ok: bool,
    detail: dict[str, Any],
) -> ReadRecord:
    """Append the read's row to the log at ``db``; never raises for a log that cannot be
    written (the read itself is what the reviewer came for), but says so."""
    path = Path(db)
    run_id = new_read_id()
    try:
        with AuditLog(path, readonly=True) as peek:
            old = peek.schema_version < SCHEMA_VERSION
        if old:
            # Recording would migrate it, and a read never changes a log's schema.
            why = f"the log is at schema version {peek.schema_version}; a run migrates it"
            return ReadRecord(run_id, None, why)
        with AuditLog(path) as log:
            event = log.append(
                run_id=run_id,
                operation=f"audit-{command}",
                target=str(path.resolve()),
                mode=REVIEW_MODE,
                operator=reader.operator,
                origin_host=socket.gethostname(),
                reason=reader.reason,
                from_state=None,
                to_state="succeeded" if ok else "failed",
                trigger=command,
                outcome="ok" if ok else "error",
                detail=detail,
                tool_version=tool_version(),
            )
    except AuditError as error:
        logger.warning("audit %s of %s not recorded in it: %s", command, path, error.message)
        return ReadRecord(run_id, None, error.message)
    logger.debug("audit %s recorded as run %s seq %d", command, run_id, event.seq)
    return ReadRecord(run_id, event)
