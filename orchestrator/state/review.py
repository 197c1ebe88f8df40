"""What a compliance reviewer runs: verify the audit chain (against signed checkpoints and
an exported copy too), tie a backup to its run, list runs by filter. The export, report
and evidence pack are `audit.reviewer`'s own, which `python -m audit` shares."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from audit import AuditError, AuditLog, AuditRecord
from audit.query import RunFilter
from audit.reads import Reader
from audit.render import format_runs, format_timeline
from orchestrator.bbr.artifact import AUDIT_HEAD_FILE
from orchestrator.errors import ArtifactError, AuditBrokenError, BbrxError
from orchestrator.state.recovery import target_state

log = logging.getLogger(__name__)


def verify(
    audit_db: Path,
    reader: Reader,
    artifact: Path | None = None,
    *,
    checkpoints: Path | None = None,
    allowed_signers: Path | None = None,
    exported: Path | None = None,
    against_log: bool = True,
) -> list[str]:
    """Lines to show when the log (its checkpoints, an exported copy, the artifact's tie
    to it) is intact; raise otherwise, naming the first thing wrong."""
    from audit import reviewer  # a reviewer's command: not every run's import

    outcome = reviewer.verify(
        audit_db,
        reader,
        checkpoints=checkpoints,
        allowed_signers=allowed_signers,
        exported=exported,
        against_log=against_log,
    )
    if not outcome.ok:
        first = outcome.problems[0] if outcome.problems else "verification failed"
        raise AuditBrokenError(
            first,
            hint="\n".join(
                [
                    *[line for line in outcome.all_lines() if line != first],
                    "Keep the file as evidence; compare it with a copy, the signed "
                    "checkpoints or the chain heads recorded in the backups (bbrx-audit.yml).",
                ]
            ),
        )
    lines = outcome.all_lines()
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


def status(audit_db: Path, target: str, home: Path | None = None) -> str:
    """The target's state as the audit log and its lease show it. With `home`, a look at
    a training session's director is recorded in the session."""
    if not audit_db.exists():
        return f"{target}: idle (no audit log at {audit_db} yet)"
    with AuditLog(audit_db, readonly=True) as audit:
        shown = target_state(audit, target).describe()
    _looked(home, target, "status", {})
    return shown


def _looked(home: Path | None, target: str, what: str, detail: dict[str, object]) -> None:
    """Best effort: a look that cannot be recorded must not cost the operator the answer."""
    if home is None or not target.startswith("sim://"):
        return
    from orchestrator.training.session import record_look  # sim targets only

    try:
        record_look(home, target, what, detail)
    except (AuditError, BbrxError, OSError) as error:
        log.warning("this look at %s is not in the training session's rows: %s", target, error)


def runs(audit_db: Path, flt: RunFilter | None = None) -> str:
    """One line a run the filter selects, the fallback journal's rows counted in (a run
    whose end went there shows how it ended, not the last state the log could take)."""
    flt = flt or RunFilter()
    with AuditLog(audit_db, readonly=True) as audit:
        record = AuditRecord(audit)
        selected = flt.select(record.runs())
        text = format_runs(selected)
    if not flt.empty:
        text += f"\n{len(selected)} run(s) match {flt.describe()}"
    chosen = {r.run_id for r in selected}
    journaled = [run for run in record.journal.run_ids() if run in chosen]
    if journaled:
        text += (
            f"\n{len(journaled)} run(s) have events in the fallback journal "
            f"{record.journal.path}, outside the hash chain: {', '.join(journaled)}"
        )
    return text


def timeline(audit_db: Path, run: str, home: Path | None = None) -> str:
    """A run's timeline: its log rows, then any rows its fallback journal holds. With
    `home`, a look at a run of a training session's director is recorded in the session."""
    with AuditLog(audit_db, readonly=True) as audit:
        record = AuditRecord(audit)
        run_id = record.resolve(run)
        rows = record.timeline(run_id)
        text = format_timeline(rows)
    if rows:
        _looked(home, str(rows[0]["target"]), "audit", {"run": run_id})
    journaled = record.journal.of(run_id)
    if journaled:
        text += (
            f"\n{len(journaled)} event(s) of this run are in the fallback journal "
            f"{record.journal.path}: the audit log could not be written then, so they are "
            "outside its hash chain"
        )
    return text
