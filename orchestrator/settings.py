"""Where bbrx keeps its state, who is running it, and its config file. Environment in."""

from __future__ import annotations

import os
from dataclasses import fields, replace
from pathlib import Path

import yaml

from audit import AuditError, busy_timeout_from_env
from audit.log import BUSY_TIMEOUT_ENV
from orchestrator.engine.run import Identity, Timeouts
from orchestrator.errors import UsageError


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


def audit_busy_timeout() -> float:
    """`$BBRX_AUDIT_BUSY_TIMEOUT`: seconds to wait for another writer of the audit log
    (default 10). Past it, a run refuses to start, or goes on with its journal."""
    try:
        return busy_timeout_from_env()
    except AuditError as error:
        hint = f"Unset {BUSY_TIMEOUT_ENV}, or give it a number of seconds."
        raise UsageError(error.message, hint=hint) from error


def identity(operator: str | None, reason: str | None) -> Identity:
    """--operator, else `$BBRX_OPERATOR`, else user@hostname."""
    name = operator or os.environ.get("BBRX_OPERATOR") or Identity.default_operator()
    return Identity(operator=name, reason=reason or None)


TIMEOUT_PHASES = tuple(f.name for f in fields(Timeouts))


def config_path() -> Path:
    """`$BBRX_CONFIG`, defaulting to `$BBRX_HOME/config.yml`."""
    configured = os.environ.get("BBRX_CONFIG")
    return Path(configured).expanduser() if configured else bbrx_home() / "config.yml"


def configured_timeouts(path: Path | None = None) -> Timeouts:
    """The built-in timeouts, as the config file (if there is one) changes them.

    The file is YAML with one section bbrx reads, `timeouts:`, of seconds per phase
    (0: no limit). Anything else in it is refused by name, so a typo never silently
    leaves a default in force.
    """
    path = path or config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Timeouts()
    except OSError as error:
        raise UsageError(f"cannot read the config file {path}: {error.strerror}") from error
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(
            f"the config file {path} is not valid YAML{where}",
            hint="Fix it, or point BBRX_CONFIG at another file.",
        ) from error
    if document is None:
        return Timeouts()
    hint = f"Expected, for example:\n{EXAMPLE_CONFIG}"
    if not isinstance(document, dict) or set(document) - {"timeouts"}:
        unknown = sorted(set(document) - {"timeouts"}) if isinstance(document, dict) else []
        what = f"unknown key(s) {', '.join(map(str, unknown))}" if unknown else "not a mapping"
        raise UsageError(f"the config file {path}: {what}", hint=hint)
    section = document.get("timeouts") or {}
    if not isinstance(section, dict):
        raise UsageError(f"the config file {path}: timeouts must be a mapping", hint=hint)
    chosen: dict[str, float | None] = {}
    for phase, value in section.items():
        if phase not in TIMEOUT_PHASES:
            raise UsageError(
                f"the config file {path}: unknown timeout {phase!r}",
                hint=f"Phases: {', '.join(TIMEOUT_PHASES)}.",
            )
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise UsageError(
                f"the config file {path}: timeouts.{phase} must be a number of seconds "
                f"(0: no limit), not {value!r}"
            )
        chosen[phase] = None if value == 0 else float(value)
    return replace(Timeouts(), **chosen)


EXAMPLE_CONFIG = """\
timeouts:        # seconds each script of a phase may run; 0: no limit
  metadata: 60
  lock: 600
  backup: 21600
  unlock: 600
  restore: 21600"""
