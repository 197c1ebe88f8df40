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
from orchestrator.engine.fleet import DEPLOYMENT
from orchestrator.engine.machine import SCRIPTS, cleanup_for
from orchestrator.engine.run import JobTracker, Run
from orchestrator.errors import (
    BbrxError,
    CheckError,
    CleanupError,
    CyclicLockOrderError,
    DiscoveryError,
    MetadataError,
    ScriptError,
    UnlockError,
)
from orchestrator.state import recovery
from orchestrator.transport.instance import (
    REMOTE_WORK_DIR,
    Instance,
    Job,
    ScriptCall,
    instance_name,
)
from orchestrator.transport.scriptio import STDOUT_LIMIT

log = logging.getLogger(__name__)

Step = str | tuple[str, dict[str, Any]]


def discover(run: Run, *, lenient: bool = False) -> tuple[str, dict[str, Any]]:
    """Reach the run's instances, list their jobs and scripts, read each job's metadata,
    drop skipped jobs. In deployment mode reaching them is the director's part (VMs, the
    manifest, access group by group); instances are then read in parallel, bounded.

    `lenient` (the cleanups): a job whose metadata fails is still unlocked, in no order,
    because leaving it locked is worse than unlocking it out of order.
    """
    unreachable: dict[str, str] = {}
    reached = run.fleet.open(unreachable if lenient else None)

    def discover_one(
        instance: Instance,
    ) -> tuple[list[Job], dict[str, JobMetadata], list[str], dict[str, str]]:
        try:
            return _discover_one(run, instance, lenient)
        except BbrxError as error:
            if not lenient:
                raise
            # A cleanup unlocks what it can reach: one VM down must not keep the rest locked.
            log.error("%s; its jobs are not unlocked by this cleanup", error.message)
            unreachable[instance_name(instance)] = error.message
            return [], {}, [], {}

    found = run.parallel(list(run.instances), discover_one)
    metadata: dict[str, JobMetadata] = {}
    scripts: dict[str, list[str]] = {}
    skipped: list[str] = []
    broken: dict[str, str] = {}
    info: dict[str, dict[str, str]] = {}
    for instance, (active, job_metadata, job_skipped, job_broken) in zip(
        run.instances, found, strict=True
    ):
        for tracker in run.track(active, instance):
            metadata[tracker.label] = job_metadata.get(tracker.name, JobMetadata())
            scripts[tracker.label] = sorted(tracker.job.scripts)
            log.info(
                "Found job %s with scripts: %s", tracker.label, ", ".join(scripts[tracker.label])
            )
        skipped += [run.fleet.label(instance, name) for name in job_skipped]
        broken.update({run.fleet.label(instance, n): m for n, m in job_broken.items()})
        if instance.info:
            info[instance_name(instance)] = dict(instance.info)
    run.data["metadata"] = metadata
    detail: dict[str, Any] = {"jobs": scripts, "skipped": sorted(skipped), **reached}
    if unreachable:
        detail["unreachable"] = unreachable
        run.fail(
            DiscoveryError(
                f"this {run.operation} could not reach {', '.join(sorted(unreachable))}: the "
                "jobs there were not unlocked (every other instance's were)",
                hint=f"Once they are reachable, run `{run.fleet.command(run.operation)}` again.",
            )
        )
    if broken:
        detail["metadata_errors"] = broken
    if info:
        # Director mode keeps its one instance's facts where they always were.
        detail["instance"] = next(iter(info.values())) if len(info) == 1 else info
    return "discovered", detail


def _discover_one(
    run: Run, instance: Instance, lenient: bool
) -> tuple[list[Job], dict[str, JobMetadata], list[str], dict[str, str]]:
    log.info("Looking for scripts on %s", run.fleet.where(instance))
    jobs = instance.discover()
    broken: dict[str, str] = {}

    def read(job: Job) -> tuple[str, JobMetadata]:
        try:
            return _metadata(run, instance, job)
        except MetadataError as error:
            if not lenient:
                raise
            log.warning("%s; unlocking job %s anyway", error.message, job.name)
            broken[job.name] = error.message
            return job.name, JobMetadata()

    # Many instances are read in parallel already: then one instance's jobs in turn.
    with_metadata = [j for j in jobs if j.has("metadata")]
    if len(run.instances) == 1:
        metadata = dict(run.parallel(with_metadata, read))
    else:
        metadata = dict(map(read, with_metadata))
    skipped = sorted(name for name, meta in metadata.items() if meta.skip_bbr_scripts)
    for name in skipped:
        log.info("Job %s on %s sets skip_bbr_scripts: it takes no part in this run", name,
                 run.fleet.where(instance))  # fmt: skip
    active = [job for job in jobs if job.name not in skipped]
    for job in active:
        meta = metadata.get(job.name, JobMetadata())
        for key in meta.discontinued_keys:
            if run.operation == "restore":
                raise MetadataError(
                    f"metadata of job {job.name} on {run.fleet.where(instance)} uses {key}, "
                    "which bbr no longer supports: refusing to restore",
                    job=job.name,
                    hint="Remove backup_name/restore_name from the job's metadata script.",
                )
            log.warning("Job %s: metadata key %s is discontinued and ignored", job.name, key)
    return active, metadata, skipped, broken


def _metadata(run: Run, instance: Instance, job: Job) -> tuple[str, JobMetadata]:
    result = instance.run_script(
        ScriptCall(
            job.name,
            "metadata",
            {"BBR_VERSION": BBR_COMPATIBLE_VERSION},
            timeout=run.timeouts.metadata,
        )
    )
    where = run.fleet.where(instance)
    if not result.ok:
        how = (
            f"was killed ({result.killed_by})" if result.killed_by else f"exited {result.exit_code}"
        )
        raise MetadataError(
            f"metadata script for job {job.name} on {where} failed: it {how}"
            + (f"\n  stderr: {result.stderr_tail()}" if result.stderr_tail() else ""),
            job=job.name,
            killed_by=result.killed_by,
        )
    if result.stdout_truncated:
        # Only the head was kept: parsing it could take half a document for the whole.
        raise MetadataError(
            f"metadata script for job {job.name} on {where} printed more than "
            f"{STDOUT_LIMIT >> 20} MiB: refusing it",
            job=job.name,
        )
    return job.name, parse_metadata(job.name, result.stdout)


def jobs_with(run: Run, phase: str) -> list[JobTracker]:
    """The run's jobs that have the script of `phase` in this operation."""
    script = SCRIPTS[run.operation].get(phase)
    return [t for t in run.jobs.values() if script and t.job.has(script)]


def instances_with(run: Run, phase: str) -> list[Instance]:
    """The run's instances, in order, that have a job with the script of `phase`."""
    having = {id(t.instance) for t in jobs_with(run, phase)}
    return [instance for instance in run.instances if id(instance) in having]


def instances_with_jobs(run: Run) -> list[Instance]:
    having = {id(t.instance) for t in run.jobs.values()}
    return [instance for instance in run.instances if id(instance) in having]


def plan_levels(run: Run, *, strict: bool = True) -> list[list[str]]:
    """Kahn levels over the run's jobs (of every instance); cleanups fall back to one level
    on a cycle."""
    order_of = "restore" if run.operation.startswith("restore") else "backup"
    identities = {label: (t.name, t.release) for label, t in run.jobs.items()}
    try:
        levels = lock_levels(
            run.jobs,
            run.data["metadata"],
            order_of,
            identities=identities,
            match_release=run.fleet.kind == DEPLOYMENT,
        )
    except CyclicLockOrderError as error:
        if strict:
            raise
        log.warning("%s; unlocking every job anyway", error.message)
        levels = [sorted(run.jobs)]
    run.data["levels"] = levels
    return levels


def check_work_dir_absent(run: Run, instances: list[Instance]) -> None:
    present = run.parallel(instances, lambda instance: instance.work_dir_exists())
    for instance, exists in zip(instances, present, strict=True):
        if exists:
            raise _work_dir_busy(run, instance)


def claim_work_dir(run: Run, instances: list[Instance]) -> None:
    """Take the VMs themselves for this run: create the remote work dir on each, which bbr
    and bbrx both refuse to run over. The lease only covers runs sharing this audit log;
    this covers any other jump box, audit log or spelling of the host (`host:22`,
    `host:2222`). Done last among the checks, so a run refused by a check never creates
    it; a claim refused on one VM gives back the others before the run fails."""
    owner = (
        f"run {run.run_id} ({run.operation}) by {run.identity.operator} "
        f"from {run.identity.origin_host}, pid {os.getpid()}, "
        f"since {run.started:%Y-%m-%dT%H:%M:%SZ}"
    )
    claimed: set[str] = run.data.setdefault("claimed_work_dirs", set())

    def claim(instance: Instance) -> BbrxError | None:
        try:
            if instance.claim_work_dir(owner):
                claimed.add(instance_name(instance))
                return None
            return _work_dir_busy(run, instance)
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, BbrxError)
                else BbrxError(
                    f"claiming {REMOTE_WORK_DIR} on {run.fleet.where(instance)} failed: {exc!r}"
                )
            )
            # The mkdir may have happened before the connection broke. If the owner file is
            # this run's, take the dir away again: no later run is to be refused for it.
            with contextlib.suppress(BbrxError):
                if instance.work_dir_owner() == owner:
                    instance.remove_work_dir()
            return error

    errors = [e for e in run.parallel(instances, claim) if e is not None]
    if errors:
        for instance in instances:
            if instance_name(instance) in claimed:
                with contextlib.suppress(BbrxError):
                    instance.remove_work_dir()
                claimed.discard(instance_name(instance))
        raise errors[0]
    run.data["claimed_work_dir"] = True


def _work_dir_busy(run: Run, instance: Instance) -> CheckError:
    where = f"instance {instance_name(instance)} of {instance.address}"
    owner = instance.work_dir_owner()
    if owner:
        # It comes from the VM: shown as text, never as terminal control sequences.
        who = printable(owner)[:300]
        why = f"it was created by bbrx {who}: that run is in progress or did not finish"
    else:
        why = "another run (bbr or bbrx) is in progress, or an earlier run did not finish"
    return CheckError(
        f"Directory {REMOTE_WORK_DIR} already exists on {where}: {why}",
        hint=f"If no other backup or restore of {run.target} is running, run "
        f"`{run.fleet.command(cleanup_for(run.operation))}`, then try again. "
        "Nothing was locked.",
    )


def check_backupable(run: Run, *, claiming: bool = False) -> tuple[str, dict[str, Any]]:
    """bbr's pre-backup-check: backup scripts exist, no leftover work dir, no lock cycle.

    `claiming`: the caller claims the work dir next, which checks it atomically."""
    recovery.refuse_if_unfinished(run.audit, run.target, run.operation, run.run_id)
    if not jobs_with(run, "backup"):
        if run.fleet.kind == DEPLOYMENT:
            raise CheckError(
                f"Deployment '{run.fleet.deployment}' has no backup scripts: nothing to back up",
                hint="Check that its releases' jobs ship bin/bbr/backup scripts, and that no "
                "metadata sets skip_bbr_scripts.",
            )
        raise CheckError(
            f"no job on {run.instance.address} has a backup script: nothing to back up",
            hint="Check that the director's jobs ship bin/bbr/backup scripts.",
        )
    if not claiming:
        check_work_dir_absent(run, instances_with(run, "backup"))
    levels = plan_levels(run)
    plan = lock_plan(run, levels)
    # bbr runs such a job's lock and never unlocks it; say so before it happens.
    one_way = sorted(
        t.label for t in run.jobs.values() if t.job.has("pre-backup-lock")
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
        log.info("Locking level %d: %s", number, ", ".join(t.label for t in trackers))

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
        log.info("Unlocking %s", ", ".join(t.label for t in trackers))

        def unlock_one(tracker: JobTracker) -> ScriptError | None:
            if run.abandoned:
                return None  # the operator chose to leave it locked; the audit row says so
            try:
                return run.run_job_script(tracker, "unlock", script, UnlockError, env)
            except Exception as exc:  # a bug here must not skip the other jobs' unlocks
                log.error("internal error unlocking %s", tracker.label, exc_info=True)
                why = f"internal error: {exc!r}"
                return UnlockError(
                    job=tracker.name, script=script, host=tracker.where, exit_code=None,
                    stderr_tail=why,
                )  # fmt: skip

        if parallel:
            results = run.parallel(trackers, unlock_one)
        else:
            results = [unlock_one(tracker) for tracker in trackers]
        for error in results:
            if error:
                run.fail(error)
                failed = True
    return "unlock_failed" if failed else "unlocked"


def remove_work_dir(run: Run) -> Step:
    """Remove the remote work dir: a cleanup's job on every instance with jobs, and a run's
    only where it created it (one refused for a work dir already there must not remove
    another run's). Then the run's access to its instances ends (deployment mode)."""
    if run.operation.endswith("-cleanup"):
        instances = instances_with_jobs(run)
    else:
        claimed = run.data.get("claimed_work_dirs") or set()
        instances = [i for i in run.instances if instance_name(i) in claimed]

    def remove(instance: Instance) -> BbrxError | None:
        try:
            instance.remove_work_dir()
        except Exception as exc:
            message = exc.message if isinstance(exc, BbrxError) else str(exc)
            return CleanupError(
                f"could not remove {REMOTE_WORK_DIR} on {run.fleet.where(instance)}: {message}",
                hint=f"Run `{run.fleet.command(cleanup_for(run.operation))}` to try again.",
            )
        log.info("Removed %s on %s", REMOTE_WORK_DIR, run.fleet.where(instance))
        return None

    errors = [error for error in run.parallel(instances, remove) if error is not None]
    for error in errors:
        run.fail(error)
    return "cleanup_failed" if errors else "cleaned"
