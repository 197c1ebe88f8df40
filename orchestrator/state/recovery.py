"""What the audit log says about a target: idle, in progress, or left unfinished.

A run killed outright (SIGKILL, power loss, the jump box rebooting) cannot unlock, but
its audit rows say what it had done: each job's intent row is written before its script
runs. A later run on the same target reads them: a backup or restore refuses while the
last run is unfinished and names the jobs that may still be locked; a cleanup proceeds,
unlocks everything, and records the old run as recovered.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit import (
    AuditLog,
    AuditRecord,
    RunSummary,
)
from audit.render import printable
from orchestrator.engine.fleet import ACCESS_USER_KEY, command_for, job_label
from orchestrator.engine.machine import OPERATIONS, cleanup_for, lock_held_after
from orchestrator.errors import BbrxError, CheckError
from orchestrator.state import lease
from orchestrator.state.lease import holder_alive
from orchestrator.transport.instance import Instance, instance_name

log = logging.getLogger(__name__)

CLEANUPS = ("backup-cleanup", "restore-cleanup")


@dataclass(frozen=True)
class TargetState:
    target: str
    state: str  # IDLE, IN_PROGRESS, INTERRUPTED or NEEDS_CLEANUP
    run: RunSummary | None = None
    phase: str | None = None
    holder: dict[str, Any] | None = None
    maybe_locked: list[str] = field(default_factory=list)

    @property
    def blocks_new_runs(self) -> bool:
        return self.state in (INTERRUPTED, NEEDS_CLEANUP)

    def describe(self) -> str:
        # Every value comes from the log, written by operators and scripts: escaped, so a
        # newline or an escape sequence in a name cannot forge a line or drive the terminal.
        target = printable(self.target)
        if self.state == IDLE:
            last = (
                f" (last run {printable(self.run.run_id)}: {printable(str(self.run.outcome))})"
                if self.run
                else ""
            )
            return f"{target}: idle{last}"
        assert self.run is not None
        run = self.run
        head = (
            f"{target}: {self.state}: run {printable(run.run_id)} ({printable(run.operation)}) "
            f"by {printable(run.operator)}, since {printable(run.start)}"
        )
        if self.state == NEEDS_CLEANUP:
            head += f", ended {printable(str(run.outcome))}"
        else:
            head += f", phase {printable(str(self.phase))}"
        if self.holder:
            head += (
                f", pid {printable(str(self.holder['pid']))} "
                f"on {printable(str(self.holder['host']))}"
            )
        if self.blocks_new_runs:
            why = "its process is gone" if self.state == INTERRUPTED else "its unlock failed"
            jobs = ", ".join(printable(job) for job in self.maybe_locked) or "none"
            head += (
                f"\n  {why}; jobs that may still be locked: {jobs}"
                f"\n  recover with: {command_for(target, cleanup_for(run.operation))}"
            )
        return head


IDLE = "idle"
IN_PROGRESS = "in progress"
INTERRUPTED = "interrupted"
NEEDS_CLEANUP = "needs cleanup"


def row_label(row: dict[str, Any]) -> str:
    """A job row's job as the run named it: `redis-server on redis/1`, or the job's name
    alone for a director's one instance (and in rows older bbrx wrote, which have none)."""
    return job_label(
        row["job"], row.get("instance_group"), row.get("instance_index"), row["target"]
    )


def maybe_locked(rows: list[dict[str, Any]]) -> list[str]:
    """Jobs of one run that may hold a lock: as the run said when it ended, else (a run
    that was killed) those whose lock script started and whose unlock never succeeded."""
    for row in reversed(rows):
        if row["job"] is None:
            verdict = (row["detail"] or {}).get("jobs_left_locked")
            if isinstance(verdict, list):
                return sorted(str(job) for job in verdict)
            break
    held: dict[str, bool] = {}
    for row in rows:
        if row["job"]:
            label = row_label(row)
            held[label] = lock_held_after(held.get(label, False), row["to_state"])
    return sorted(job for job, is_held in held.items() if is_held)


@dataclass(frozen=True)
class LeftRunning:
    """A script a run started and saw no end of: it may still be running on the VM."""

    job: str
    script: str
    pid: int
    marker: str | None = None  # its BBRX_SCRIPT_ID (rows of older bbrx have none)
    instance: str | None = None  # `group/index`; None in rows of older bbrx (the director)


def left_running(rows: list[dict[str, Any]]) -> list[LeftRunning]:
    """The scripts of one run with a pid row and no outcome row after it."""
    started: dict[tuple[str, str, str], LeftRunning] = {}
    for row in rows:
        if not row["job"] or not row["script"]:
            continue
        group, index = row.get("instance_group"), row.get("instance_index")
        instance = f"{group}/{index}" if group is not None and index is not None else None
        key = (instance or "", row["job"], row["script"])
        if row["trigger"] == "script_started":
            detail = row["detail"] or {}
            marker = detail.get("marker")
            started[key] = LeftRunning(
                row["job"],
                row["script"],
                int(detail["pid"]),
                marker if _a_marker(marker) else None,
                instance,
            )
        elif row["trigger"].endswith(("_ok", "_error")):
            started.pop(key, None)
    return list(started.values())


def _a_marker(value: object) -> bool:
    # It goes into a shell command on the VM: only the hex token bbrx itself writes.
    return (
        isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value)
    )


def access_user_of(audit: AuditLog, run: RunSummary) -> str | None:
    """The user a run's director set up access as, from its start row (a live deployment's)."""
    rows = AuditRecord(audit).timeline(run.run_id)
    detail = (rows[0]["detail"] or {}) if rows else {}
    user = detail.get(ACCESS_USER_KEY) if isinstance(detail, dict) else None
    return user if isinstance(user, str) and _ACCESS_USER.fullmatch(user) else None


def end_left_running(audit: AuditLog, instances: list[Instance], run: RunSummary) -> list[str]:
    """End, on the VMs, the scripts an unfinished run left running; what was ended.

    A lock script a killed bbrx left hanging would otherwise take its lock after the
    cleanup's unlock. Only groups still running that very script are ended.
    """
    ended = []
    by_name = {instance_name(instance): instance for instance in instances}
    for script in left_running(AuditRecord(audit).timeline(run.run_id)):
        instance = by_name.get(script.instance) if script.instance else instances[0]
        if instance is None:
            log.warning(
                "run %s left %s of job %s running on %s, which this cleanup does not reach",
                run.run_id,
                script.script,
                script.job,
                script.instance,
            )
            continue
        try:
            if instance.end_script(script.job, script.script, script.pid, script.marker):
                log.warning(
                    "Ended the %s script of job %s (pid %d) that run %s left running",
                    script.script,
                    script.job,
                    script.pid,
                    run.run_id,
                )
                where = f" on {script.instance}" if script.instance not in (None, "bosh/0") else ""
                ended.append(f"{script.job}/{script.script}{where} (pid {script.pid})")
        except BbrxError as error:
            log.error(
                "could not end the %s script of job %s (pid %d): %s",
                script.script,
                script.job,
                script.pid,
                error.message,
            )
    return ended


# What a run's director names its access user (bosh_ and 15 hex digits): a name read
# back from the log goes into a Director cleanup's user_regex, so nothing else is taken.
_ACCESS_USER = re.compile(r"bosh_[0-9a-f]{15}")

# The one-row action that records a simulated director made anew (training/session.py).
ANEW = ("sim-create",)


def target_state(audit: AuditLog, target: str, *, exclude: str | None = None) -> TargetState:
    """The target as the log and the lease table see it.

    Read from the newest run back: an unfinished run, or a finished one that may have
    left jobs locked, needs a cleanup; a run recovered by its cleanup, or a backup or
    restore that succeeded (it unlocked everything it locked), closes the story. Runs that
    failed or were refused without locking anything do not hide one, and nor does a
    cleanup of the other kind.
    """
    record = AuditRecord(audit)
    every = record.runs()
    holder = lease.read(Path(audit.path), target)
    live = (
        holder["run_id"]
        if holder is not None
        and holder_alive(holder["pid"], holder["host"], holder["heartbeat"], holder["acquired"])
        else None
    )
    # A training session's one-row actions on the target (a hint, a `sim vms`, a look) lock
    # nothing and must not hide a run that did; but a simulated director made anew (a
    # session's world, a `sim create` in a session) has no past, nor have its deployments:
    # a run whose last row came before that, and that is not running now, is over.
    director = (
        target.rsplit("/", 1)[0]
        if target.startswith("sim://") and target.count("/") == 3
        else target
    )
    anew = [r.start for r in every if r.operation in ANEW and r.target in (target, director)]
    cut = anew[-1] if anew else None
    runs = [
        r
        for r in every
        if r.target == target
        and r.run_id != exclude
        and r.operation in OPERATIONS
        and (cut is None or r.end >= cut or r.run_id == live)
    ]
    if not runs:
        return TargetState(target, IDLE)
    for summary in reversed(runs):
        if summary.outcome == "recovered":
            break
        if summary.finished and summary.outcome == "succeeded":
            if summary.operation in CLEANUPS:
                continue  # it recovered the run it was for, if any: that run says so
            break
        rows = record.timeline(summary.run_id)
        locked = maybe_locked(rows)
        if summary.finished:
            if locked:
                return TargetState(target, NEEDS_CLEANUP, summary, summary.outcome, None, locked)
            continue
        phase = next((r["to_state"] for r in reversed(rows) if r["job"] is None), None)
        if holder is not None and live == summary.run_id:
            return TargetState(target, IN_PROGRESS, summary, phase, holder, locked)
        return TargetState(target, INTERRUPTED, summary, phase, None, locked)
    return TargetState(target, IDLE, run=runs[-1])


def refuse_if_unfinished(
    audit: AuditLog, target: str, operation: str, run_id: str
) -> RunSummary | None:
    """Called under this run's lease: a cleanup gets the run to recover, others refuse."""
    state = target_state(audit, target, exclude=run_id)
    if not state.blocks_new_runs:
        return None
    assert state.run is not None
    if operation in CLEANUPS:
        wanted = cleanup_for(state.run.operation)
        if operation != wanted:
            # Its unlock scripts are not the ones that run locked: leave it unrecovered.
            log.warning(
                "The unfinished run %s was a %s: this %s does not recover it; run %s.",
                state.run.run_id,
                state.run.operation,
                operation,
                wanted,
            )
            return None
        return state.run
    jobs = ", ".join(state.maybe_locked) or "none recorded"
    why = (
        "did not finish and its process is gone"
        if state.state == INTERRUPTED
        else f"ended {state.run.outcome} without unlocking every job"
    )
    raise CheckError(
        f"the last run on {target}, {state.run.run_id} ({state.run.operation} by "
        f"{state.run.operator}, since {state.run.start}), {why}; jobs that may still be "
        f"locked: {jobs}",
        hint=f"Run `{command_for(target, cleanup_for(state.run.operation))}` first: "
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
