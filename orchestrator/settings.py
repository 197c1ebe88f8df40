"""Where bbrx keeps its state, and who is running it. Environment in, paths out."""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.run import Identity


def bbrx_home() -> Path:
    """`$BBRX_HOME`, defaulting to ~/.local/share/bbrx."""
    configured = os.environ.get("BBRX_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".local/share/bbrx"


def audit_db_path(explicit: Path | None = None) -> Path:
    """--audit-db, else `$BBRX_AUDIT_DB`, else `$BBRX_HOME/audit.db`."""
    if explicit is not None:
        return explicit.expanduser()
    configured = os.environ.get("BBRX_AUDIT_DB")
    return Path(configured).expanduser() if configured else bbrx_home() / "audit.db"


def identity(operator: str | None, reason: str | None) -> Identity:
    """--operator, else `$BBRX_OPERATOR`, else user@hostname."""
    name = operator or os.environ.get("BBRX_OPERATOR") or Identity.default_operator()
    return Identity(operator=name, reason=reason or None)
