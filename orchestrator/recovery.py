"""What the audit log says about a target: idle, in progress, or left unfinished.

A run killed outright (SIGKILL, power loss, the jump box rebooting) cannot unlock, but
its audit rows say what it had done: each job's intent row is written before its script
runs. A later run on the same target reads them: a backup or restore refuses while the
last run is unfinished and names the jobs that may still be locked; a cleanup proceeds,
unlocks everything, and records the old run as recovered.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit import AuditLog, RunSummary
from orchestrator.errors import CheckError
from orchestrator.lease import holder_alive
from orchestrator.machine import JOB_MAY_BE_LOCKED

CLEANUPS = ("backup-cleanup", "restore-cleanup")


@dataclass(frozen=True)
class TargetState:
    target: str
    state: str  # "idle", "in progress" or "interrupted"
    run: RunSummary | None = None
    phase: str | None = None
    holder: dict[str, Any] | None = None
    maybe_locked: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.state == "idle":
            last = f" (last run {self.run.run_id}: {self.run.outcome})" if self.run else ""
            return f"{self.target}: idle{last}"
        assert self.run is not None
        head = (
            f"{self.target}: {self.state}: run {self.run.run_id} ({self.run.operation}) by "
            f"{self.run.operator}, since {self.run.start}, phase {self.phase}"
        )
        if self.holder:
            head += f", pid {self.holder['pid']} on {self.holder['host']}"
        if self.state == "interrupted":
            jobs = ", ".join(self.maybe_locked) or "none"
            head += (
                f"\n  its process is gone; jobs that may still be locked: {jobs}"
                f"\n  recover with: bbrx director --host {self.target} "
                f"{_cleanup_for(self.run.operation)}"
            )
        return head


def _cleanup_for(operation: str) -> str:
    return "restore-cleanup" if operation.startswith("restore") else "backup-cleanup"


def _lease(db: Path, target: str) -> dict[str, Any] | None:
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as connection:
            connection.row_factory = sqlite3.Row
            row = connection.execute("SELECT * FROM leases WHERE target = ?", (target,)).fetchone()
    except sqlite3.Error:
        return None
    return dict(row) if row else None


def target_state(audit: AuditLog, target: str, *, exclude: str | None = None) -> TargetState:
    """The target as the log and the lease table see it."""
    runs = [r for r in audit.runs() if r.target == target and r.run_id != exclude]
    if not runs:
        return TargetState(target, "idle")
    # The latest unfinished run since the last successful cleanup (which unlocked all);
    # runs refused in between (they touched nothing) do not hide it.
    pending: RunSummary | None = None
    for summary in runs:
        if summary.operation in CLEANUPS and summary.outcome == "succeeded":
            pending = None
        elif not summary.finished:
            pending = summary
    if pending is None:
        return TargetState(target, "idle", run=runs[-1])
    last = pending
    rows = audit.timeline(last.run_id)
    phase = next((r["to_state"] for r in reversed(rows) if r["job"] is None), None)
    job_states: dict[str, str] = {}
    for row in rows:
        if row["job"]:
            job_states[row["job"]] = row["to_state"]
    maybe_locked = sorted(job for job, state in job_states.items() if state in JOB_MAY_BE_LOCKED)
    holder = _lease(Path(audit.path), target)
    if (
        holder is not None
        and holder["run_id"] == last.run_id
        and holder_alive(holder["pid"], holder["host"], holder["heartbeat"])
    ):
        return TargetState(target, "in progress", last, phase, holder, maybe_locked)
    return TargetState(target, "interrupted", last, phase, None, maybe_locked)


def refuse_if_unfinished(
    audit: AuditLog, target: str, operation: str, run_id: str
) -> RunSummary | None:
    """Called under this run's lease: a cleanup gets the run to recover, others refuse."""
    state = target_state(audit, target, exclude=run_id)
    if state.state != "interrupted":
        return None
    assert state.run is not None
    if operation in CLEANUPS:
        return state.run
    jobs = ", ".join(state.maybe_locked) or "none recorded"
    raise CheckError(
        f"the last run on {target}, {state.run.run_id} ({state.run.operation} by "
        f"{state.run.operator}, since {state.run.start}), did not finish and its process is "
        f"gone; jobs that may still be locked: {jobs}",
        hint=f"Run `bbrx director --host {target} {_cleanup_for(state.run.operation)}` first: "
        "it unlocks every job, removes the work dir and records that run as recovered.",
    )


def mark_recovered(audit: AuditLog, old: RunSummary, by: Any) -> None:
    """Close the unfinished run's story: a row of its own saying who recovered it."""
    audit.append(
        run_id=old.run_id,
        operation=old.operation,
        target=old.target,
        mode=old.mode,
        operator=by.identity.operator,
        origin_host=by.identity.origin_host,
        reason=f"recovered by {by.operation} run {by.run_id}",
        from_state=old.outcome,
        to_state="recovered",
        trigger="recovered",
        outcome="ok",
        detail={"recovered_by": by.run_id},
        tool_version=by.tool_version,
    )
