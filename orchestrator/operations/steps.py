"""Actions shared by several operations: discovery, checks, lock, unlock, remote cleanup.

Each action takes the `Run`, does its side effects through the instance contract, and
returns the trigger that says how it went (optionally with a detail for the audit row).
An action that raises a `BbrxError` takes its state's failure transition.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

from audit.render import printable
from orchestrator import BBR_COMPATIBLE_VERSION
from orchestrator.bbr.ordering import JobMetadata, lock_levels, parse_metadata
from orchestrator.engine.machine import SCRIPTS, cleanup_for
from orchestrator.engine.run import JobTracker, Run
from orchestrator.errors import (
    BbrxError,
    CheckError,
    CleanupError,
    CyclicLockOrderError,
    MetadataError,
    ScriptError,
    UnlockError,
)
from orchestrator.state import recovery
from orchestrator.transport.instance import REMOTE_WORK_DIR, Job, ScriptCall
from orchestrator.transport.scriptio import STDOUT_LIMIT

log = logging.getLogger(__name__)

Step = str | tuple[str, dict[str, Any]]


def discover(run: Run, *, lenient: bool = False) -> tuple[str, dict[str, Any]]:
    """List the jobs and their scripts, read each job's metadata, drop skipped jobs.

    `lenient` (the cleanups): a job whose metadata fails is still unlocked, in no order,
    because leaving it locked is worse than unlocking it out of order.
    """
    log.info("Looking for scripts on %s", run.instance.address)
    jobs = run.instance.discover()
    broken: dict[str, str] = {}

    def read(job: Job) -> tuple[str, JobMetadata]:
        try:
            return _metadata(run, job)
        except MetadataError as error:
            if not lenient:
                raise
            log.warning("%s; unlocking job %s anyway", error.message, job.name)
            broken[job.name] = error.message
            return job.name, JobMetadata()

    metadata = dict(run.parallel([j for j in jobs if j.has("metadata")], read))
    skipped = sorted(name for name, meta in metadata.items() if meta.skip_bbr_scripts)
    for name in skipped:
        log.info("Job %s sets skip_bbr_scripts: it takes no part in this run", name)
    active = [job for job in jobs if job.name not in skipped]
    for job in active:
        meta = metadata.get(job.name, JobMetadata())
        for key in meta.discontinued_keys:
            if run.operation == "restore":
                raise MetadataError(
                    f"metadata of job {job.name} uses {key}, which bbr no longer supports: "
                    "refusing to restore",
                    job=job.name,
                    hint="Remove backup_name/restore_name from the job's metadata script.",
                )
            log.warning("Job %s: metadata key %s is discontinued and ignored", job.name, key)
    run.data["metadata"] = metadata
    run.track(active)
    scripts = {job.name: sorted(job.scripts) for job in active}
    for name, names in scripts.items():
        log.info("Found job %s with scripts: %s", name, ", ".join(names))
    detail: dict[str, Any] = {"jobs": scripts, "skipped": skipped}
    if broken:
        detail["metadata_errors"] = broken
    if run.instance.info:
        detail["instance"] = dict(run.instance.info)
    return "discovered", detail


def _metadata(run: Run, job: Job) -> tuple[str, JobMetadata]:
    result = run.instance.run_script(
        ScriptCall(
            job.name,
            "metadata",
            {"BBR_VERSION": BBR_COMPATIBLE_VERSION},
            timeout=run.timeouts.metadata,
        )
    )
    if not result.ok:
        how = (
            f"was killed ({result.killed_by})" if result.killed_by else f"exited {result.exit_code}"
        )
        raise MetadataError(
            f"metadata script for job {job.name} on {run.instance.address} failed: it {how}"
            + (f"\n  stderr: {result.stderr_tail()}" if result.stderr_tail() else ""),
            job=job.name,
            killed_by=result.killed_by,
        )
    if result.stdout_truncated:
        # Only the head was kept: parsing it could take half a document for the whole.
        raise MetadataError(
            f"metadata script for job {job.name} on {run.instance.address} printed more than "
            f"{STDOUT_LIMIT >> 20} MiB: refusing it",
            job=job.name,
        )
    return job.name, parse_metadata(job.name, result.stdout)


def jobs_with(run: Run, phase: str) -> list[JobTracker]:
    """The run's jobs that have the script of `phase` in this operation."""
    script = SCRIPTS[run.operation].get(phase)
    return [t for t in run.jobs.values() if script and t.job.has(script)]


def plan_levels(run: Run, *, strict: bool = True) -> list[list[str]]:
    """Kahn levels over the run's jobs; cleanups fall back to one level on a cycle."""
    order_of = "restore" if run.operation.startswith("restore") else "backup"
    try:
        levels = lock_levels(run.jobs, run.data["metadata"], order_of)
    except CyclicLockOrderError as error:
        if strict:
            raise
        log.warning("%s; unlocking every job anyway", error.message)
        levels = [sorted(run.jobs)]
    run.data["levels"] = levels
    return levels


def check_work_dir_absent(run: Run) -> None:
    if run.instance.work_dir_exists():
        raise _work_dir_busy(run)


def claim_work_dir(run: Run) -> None:
    """Take the VM itself for this run: create the remote work dir, which bbr and bbrx
    both refuse to run over. The lease only covers runs sharing this audit log; this
    covers any other jump box, audit log or spelling of the host (`host:22`, `host:2222`).
    Done last among the checks, so a run refused by a check never creates it."""
    owner = (
        f"run {run.run_id} ({run.operation}) by {run.identity.operator} "
        f"from {run.identity.origin_host}, pid {os.getpid()}, "
        f"since {run.started:%Y-%m-%dT%H:%M:%SZ}"
    )
    try:
        claimed = run.instance.claim_work_dir(owner)
    except BbrxError:
        # The mkdir may have happened before the connection broke. If the owner file is
        # this run's, take the dir away again: no later run is to be refused for it.
        with contextlib.suppress(BbrxError):
            if run.instance.work_dir_owner() == owner:
                run.instance.remove_work_dir()
        raise
    if not claimed:
        raise _work_dir_busy(run)
    run.data["claimed_work_dir"] = True


def _work_dir_busy(run: Run) -> CheckError:
    where = f"instance {run.instance.group}/{run.instance.index} of {run.instance.address}"
    owner = run.instance.work_dir_owner()
    if owner:
        # It comes from the VM: shown as text, never as terminal control sequences.
        who = printable(owner)[:300]
        why = f"it was created by bbrx {who}: that run is in progress or did not finish"
    else:
        why = "another run (bbr or bbrx) is in progress, or an earlier run did not finish"
    return CheckError(
        f"Directory {REMOTE_WORK_DIR} already exists on {where}: {why}",
        hint=f"If no other backup or restore of {run.target} is running, run "
        f"`bbrx director --host {run.target} {cleanup_for(run.operation)}`, then try again. "
        "Nothing was locked.",
    )


def check_backupable(run: Run, *, claiming: bool = False) -> tuple[str, dict[str, Any]]:
    """bbr's pre-backup-check: backup scripts exist, no leftover work dir, no lock cycle.

    `claiming`: the caller claims the work dir next, which checks it atomically."""
    recovery.refuse_if_unfinished(run.audit, run.target, run.operation, run.run_id)
    if not jobs_with(run, "backup"):
        raise CheckError(
            f"no job on {run.instance.address} has a backup script: nothing to back up",
            hint="Check that the director's jobs ship bin/bbr/backup scripts.",
        )
    if not claiming:
        check_work_dir_absent(run)
    levels = plan_levels(run)
    plan = lock_plan(run, levels)
    # bbr runs such a job's lock and never unlocks it; say so before it happens.
    one_way = sorted(
        t.name for t in run.jobs.values() if t.job.has("pre-backup-lock")
        and not t.job.has("post-backup-unlock")
    )  # fmt: skip
    for name in one_way:
        log.warning(
            "Job %s has a pre-backup-lock script but no post-backup-unlock: "
            "it will stay locked after the backup (bbr behaves the same)",
            name,
        )
    detail: dict[str, Any] = {"lock_plan": plan}
    if one_way:
        detail["lock_without_unlock"] = one_way
    return "checks_passed", detail


def lock_plan(run: Run, levels: list[list[str]]) -> list[dict[str, Any]]:
    """The levels and the scripts that will run in them, for the log and the audit."""
    lock_script = SCRIPTS[run.operation].get("lock")
    plan = []
    for number, level in enumerate(levels):
        locks = [n for n in level if lock_script and run.jobs[n].job.has(lock_script)]
        plan.append({"level": number, "jobs": level, "lock_scripts": locks})
        log.info("Lock level %d: %s", number, ", ".join(level))
    return plan


def lock(run: Run, error_class: type[ScriptError], *, parallel: bool = True) -> Step:
    """Lock level by level; stop at the first level with a failure.

    Serial mode (restore: bbr runs restore locks one at a time, in order) also stops at
    the first failed job. Here bbrx differs from bbr on purpose: bbr runs every job's lock
    script and collects the errors; bbrx locks nothing more once a lock has failed, since
    the run will not back up or restore and each further lock only lengthens the outage.
    """
    script = SCRIPTS[run.operation]["lock"]
    for number, level in enumerate(run.data["levels"]):
        trackers = [run.jobs[name] for name in level if run.jobs[name].job.has(script)]
        if not trackers:
            continue
        log.info("Locking level %d: %s", number, ", ".join(t.name for t in trackers))

        def lock_one(tracker: JobTracker) -> ScriptError | None:
            # No lock once the run is interrupted: a job of this level whose turn comes
            # after the signal stays as it is (run_job_script checks again at the start).
            if run.interrupted_by:
                return None
            return run.run_job_script(tracker, "lock", script, error_class)

        if parallel:
            errors = [e for e in run.parallel(trackers, lock_one) if e]
        else:
            errors = []
            for tracker in trackers:
                if run.interrupted_by:
                    break
                error = lock_one(tracker)
                if error:
                    errors.append(error)
                    break
        for error in errors:
            run.fail(error)
        if errors or run.interrupted_by:
            return "lock_failed"
    return "locked"


def unlock(run: Run, *, parallel: bool = True) -> Step:
    """Run every job's unlock script, levels in reverse order, whatever happened before."""
    script = SCRIPTS[run.operation]["unlock"]
    env: dict[str, str] = {}
    if script == "post-backup-unlock":
        successful = run.operation == "backup" and run.backup_succeeded()
        env["BBR_AFTER_BACKUP_SCRIPTS_SUCCESSFUL"] = "true" if successful else "false"
    failed = False
    for level in reversed(run.data.get("levels") or [sorted(run.jobs)]):
        trackers = [run.jobs[name] for name in reversed(level) if run.jobs[name].job.has(script)]
        if not trackers:
            continue
        if run.abandoned:
            break
        log.info("Unlocking %s", ", ".join(t.name for t in trackers))

        def unlock_one(tracker: JobTracker) -> ScriptError | None:
            if run.abandoned:
                return None  # the operator chose to leave it locked; the audit row says so
            return run.run_job_script(tracker, "unlock", script, UnlockError, env)

        results = run.parallel(trackers, unlock_one) if parallel else map(unlock_one, trackers)
        for error in results:
            if error:
                run.fail(error)
                failed = True
    return "unlock_failed" if failed else "unlocked"


def remove_work_dir(run: Run) -> Step:
    """Remove the remote work dir: a cleanup's job, and a run's only if it created it
    (one refused for a work dir already there must not remove another run's)."""
    if not run.operation.endswith("-cleanup") and not run.data.get("claimed_work_dir"):
        return "cleaned"
    try:
        run.instance.remove_work_dir()
    except Exception as exc:
        run.fail(
            CleanupError(
                f"could not remove {REMOTE_WORK_DIR} on {run.instance.address}: {exc}",
                hint=f"Run `bbrx director --host {run.target} {cleanup_for(run.operation)}` "
                "to try again.",
            )
        )
        return "cleanup_failed"
    log.info("Removed %s on %s", REMOTE_WORK_DIR, run.instance.address)
    return "cleaned"
