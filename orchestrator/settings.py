"""Where bbrx keeps its state, who is running it, and its config file. Environment in."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

# Imported by the command line to parse: the audit log and YAML are imported where they
# are used, so that a live director's connection can open before they load (yaml alone is
# some 20 ms; see operations/procedures.py). A config file, read before the target is
# opened, still loads YAML first.
from orchestrator.engine.options import Identity, Timeouts
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
    from audit.errors import AuditError
    from audit.log import BUSY_TIMEOUT_ENV, busy_timeout_from_env

    try:
        return busy_timeout_from_env()
    except AuditError as error:
        hint = f"Unset {BUSY_TIMEOUT_ENV}, or give it a number of seconds."
        raise UsageError(error.message, hint=hint) from error


def identity(operator: str | None, reason: str | None) -> Identity:
    """--operator, else `$BBRX_OPERATOR`, else user@hostname."""
    for given, where in (
        (operator, "--operator"),
        (os.environ.get("BBRX_OPERATOR"), "BBRX_OPERATOR"),
    ):
        if given is not None and given and not given.strip():
            raise UsageError(
                f"{where} is blank: the audit log must say who ran this",
                hint="Give a name (user@host, an employee id), or leave it out for user@hostname.",
            )
    name = operator or os.environ.get("BBRX_OPERATOR") or Identity.default_operator()
    return Identity(operator=name, reason=reason or None)


TIMEOUT_PHASES = tuple(f.name for f in fields(Timeouts))


def config_path() -> Path:
    """`$BBRX_CONFIG`, defaulting to `$BBRX_HOME/config.yml`."""
    configured = os.environ.get("BBRX_CONFIG")
    return Path(configured).expanduser() if configured else bbrx_home() / "config.yml"


CONFIG_SECTIONS = ("timeouts", "audit")
CHECKPOINT_KEYS = ("checkpoint_key", "checkpoint_file")


def _config(path: Path | None) -> tuple[Path, dict[str, Any]]:
    """The config file's sections (none when there is no file); UsageError naming the
    file and what is wrong with it. Unknown keys are refused by name, so a typo never
    silently leaves a default in force."""
    path = path or config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return path, {}
    except OSError as error:
        raise UsageError(f"cannot read the config file {path}: {error.strerror}") from error
    import yaml

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
        return path, {}
    hint = f"Expected, for example:\n{EXAMPLE_CONFIG}"
    if not isinstance(document, dict) or set(document) - set(CONFIG_SECTIONS):
        unknown = (
            sorted(map(str, set(document) - set(CONFIG_SECTIONS)))
            if isinstance(document, dict)
            else []
        )
        what = f"unknown key(s) {', '.join(unknown)}" if unknown else "not a mapping"
        raise UsageError(f"the config file {path}: {what}", hint=hint)
    for name, section in document.items():
        if section is not None and not isinstance(section, dict):
            raise UsageError(f"the config file {path}: {name} must be a mapping", hint=hint)
    return path, {name: section or {} for name, section in document.items()}


def configured_timeouts(path: Path | None = None) -> Timeouts:
    """The built-in timeouts, as the config file (if there is one) changes them.

    The config file is YAML; its `timeouts:` section gives seconds per phase (0: no
    limit); its `audit:` section is read by `configured_checkpoint`.
    """
    path, sections = _config(path)
    section = sections.get("timeouts", {})
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


@dataclass(frozen=True)
class CheckpointSigning:
    """The key a checkpoint is signed with, and the file it is appended to."""

    key: Path
    file: Path


def configured_checkpoint(path: Path | None = None) -> CheckpointSigning | None:
    """The config file's `audit:` section: with `checkpoint_key` and `checkpoint_file`,
    every run signs a checkpoint of the log at its end. None when it has neither."""
    path, sections = _config(path)
    section = sections.get("audit", {})
    unknown = sorted(map(str, set(section) - set(CHECKPOINT_KEYS)))
    if unknown:
        raise UsageError(
            f"the config file {path}: unknown audit key(s) {', '.join(unknown)}",
            hint=f"Keys: {', '.join(CHECKPOINT_KEYS)}.",
        )
    given = {k: v for k, v in section.items() if v is not None}
    if not given:
        return None
    for key in CHECKPOINT_KEYS:
        value = given.get(key)
        if not isinstance(value, str) or not value:
            raise UsageError(
                f"the config file {path}: audit.{key} must be a file path"
                + ("" if key in given else " (it is missing)"),
                hint="Give both audit.checkpoint_key and audit.checkpoint_file, or neither.",
            )
    return CheckpointSigning(
        Path(given["checkpoint_key"]).expanduser(), Path(given["checkpoint_file"]).expanduser()
    )


def checkpoint_signing(key: Path | None, file: Path | None) -> CheckpointSigning:
    """`bbrx audit checkpoint`'s key and file: each option, else the config file's."""
    configured = configured_checkpoint() if key is None or file is None else None
    key = key or (configured.key if configured else None)
    file = file or (configured.file if configured else None)
    if key is None or file is None:
        missing = " and ".join(
            name for name, value in (("--key", key), ("--output", file)) if value is None
        )
        raise UsageError(
            f"no {missing} given, and the config file {config_path()} names none",
            hint="Give --key KEY --output FILE, or set audit.checkpoint_key and "
            "audit.checkpoint_file in the config file.",
        )
    return CheckpointSigning(key.expanduser(), file.expanduser())


EXAMPLE_CONFIG = """\
timeouts:        # seconds each script of a phase may run; 0: no limit
  metadata: 60
  lock: 600
  backup: 21600
  unlock: 600
  restore: 21600
audit:           # optional: every run signs a checkpoint of the log at its end
  checkpoint_key: ~/.ssh/bbrx-audit        # ssh-keygen -Y sign -f this
  checkpoint_file: /mnt/evidence/bbrx-checkpoints.txt"""
