"""What a compliance reviewer runs: verify the audit chain, and tie a backup to its run."""

from __future__ import annotations

from pathlib import Path

import yaml

from audit import AuditLog, journal_path, merged_timeline, read_journal, verify_log
from audit.render import format_timeline
from orchestrator.artifact import AUDIT_HEAD_FILE
from orchestrator.errors import ArtifactError, AuditBrokenError
from orchestrator.recovery import target_state


def verify(audit_db: Path, artifact: Path | None = None) -> list[str]:
    """Lines to show when the log (and the artifact's tie to it) is intact; raise otherwise."""
    report = verify_log(audit_db)
    if not report.ok:
        raise AuditBrokenError(
            f"audit log {audit_db} is BROKEN: {report.problem}",
            hint="Keep the file as evidence; compare it with a copy or the chain heads "
            "recorded in the backups (bbrx-audit.yml)."
            + "".join(f"\n{line}" for line in report.journal_lines()),
        )
    lines = [
        f"audit log {audit_db} intact: {report.count} events, "
        f"head seq {report.head_seq} hash {report.head_hash}",
        *report.journal_lines(),
    ]
    if artifact is not None:
        lines.append(_tie(audit_db, artifact))
    return lines


def _tie(audit_db: Path, artifact: Path) -> str:
    path = artifact / AUDIT_HEAD_FILE
    try:
        head = yaml.safe_load(path.read_text(encoding="utf-8"))
        seq, digest, run_id = int(head["seq"]), str(head["hash"]), str(head["run_id"])
    except FileNotFoundError:
        raise ArtifactError(
            f"{artifact} has no {AUDIT_HEAD_FILE}: it was not made by bbrx (or was altered)"
        ) from None
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path} is not a valid audit head: {exc}") from exc
    with AuditLog(audit_db, readonly=True) as audit:
        row = audit.event(seq)
    if row is None or row["hash"] != digest or row["run_id"] != run_id:
        raise AuditBrokenError(
            f"{artifact} says it was sealed at seq {seq} (hash {digest}) of run {run_id}, "
            f"but {audit_db} has no such event",
            hint="The backup comes from another audit log, or this log was rewritten.",
        )
    return f"backup {artifact} is tied to run {run_id} (seq {seq}) of this log"


def status(audit_db: Path, target: str) -> str:
    """The target's state as the audit log and its lease show it."""
    if not audit_db.exists():
        return f"{target}: idle (no audit log at {audit_db} yet)"
    with AuditLog(audit_db, readonly=True) as audit:
        return target_state(audit, target).describe()


def timeline(audit_db: Path, run: str) -> str:
    """A run's timeline: its log rows, then any rows its fallback journal holds."""
    with AuditLog(audit_db, readonly=True) as audit:
        run_id = audit.resolve_run(run)
        rows = audit.timeline(run_id)
    journaled = read_journal(audit_db).of(run_id)
    text = format_timeline(merged_timeline(rows, journaled))
    if journaled:
        text += (
            f"\n{len(journaled)} event(s) of this run are in the fallback journal "
            f"{journal_path(audit_db)}: the audit log could not be written then, so they are "
            "outside its hash chain"
        )
    return text
