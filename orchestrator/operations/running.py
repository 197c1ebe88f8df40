"""Driving one run to its end: the audit log and the lease opened, the operation's machine
driven, the checkpoint signed, and `RunFailed` raised for a run with errors. Reached through
`procedures`, once the target is open (a live director's connection is then already on its
way, and this module and all it needs load meanwhile).
"""

from __future__ import annotations

import logging
from pathlib import Path

from audit import AuditError, AuditLog
from orchestrator import settings
from orchestrator.engine.fleet import ACCESS_USER_KEY, DeploymentFleet, Fleet
from orchestrator.engine.options import DEFAULT_MAX_PARALLEL, Outcome
from orchestrator.engine.run import Run
from orchestrator.errors import AuditUnwritableError, RunFailed, UsageError
from orchestrator.operations import backup, cleanup, restore
from orchestrator.operations.procedures import Request
from orchestrator.state import lease, recovery
from orchestrator.transport.instance import Instance

log = logging.getLogger(__name__)


DIRECTOR_MAX_PARALLEL = 8


def _bound(request: Request, target: Instance | Fleet) -> int:
    if request.max_parallel is not None:
        return request.max_parallel
    return DEFAULT_MAX_PARALLEL if isinstance(target, DeploymentFleet) else DIRECTOR_MAX_PARALLEL


def run_on(request: Request, instance: Instance | Fleet) -> Outcome:
    """Run one operation on `instance` (a director) or a deployment's fleet, recording it in
    the audit log."""
    operation = request.operation
    busy_timeout = settings.audit_busy_timeout()
    target = instance.target if isinstance(instance, Fleet) else request.target.address
    with AuditLog(request.audit_db, busy_timeout=busy_timeout) as audit:
        run = Run(
            operation,
            instance,
            audit,
            request.identity,
            target,
            progress=request.progress,
            timeouts=request.timeouts,
            confirm_abandon=request.confirm_abandon,
            max_parallel=_bound(request, instance),
            signal_relay=request.signal_relay,
        )
        log.info("Run %s: %s of %s (audit log %s)", run.run_id, operation, run.target, audit.path)
        # One run per target: a second bbrx on this target refuses here, before anything.
        # Taking the lease is also the run's first write: a log that cannot be written
        # (read-only, held by another writer, full) refuses the run here, with the cause.
        with lease.hold(
            request.audit_db,
            run.target,
            run.run_id,
            operation,
            request.identity.operator,
            busy_timeout=busy_timeout,
        ):
            # Room for the fallback journal, taken while there is some: a disk too full
            # for it refuses the run now, not halfway through its locks.
            run.journal.reserve()
            try:
                outcome = _drive(request, run)
                unfinished = run.data.get("recovering")
                if unfinished is not None and outcome.state == "succeeded":
                    _mark_recovered(run, unfinished, outcome)
            finally:
                run.journal.release()
    _sign_checkpoint(request, outcome.run_id)
    if request.target.simulated:
        _training_events(request, run.target, outcome)
    if outcome.errors:
        raise RunFailed(operation, outcome.errors, outcome.run_id, outcome=outcome)
    return outcome


def _training_events(request: Request, target: str, outcome: Outcome) -> None:
    """What a training scenario makes happen once this run is over (the director's loss
    after the trainee's backup, say): done now, and said on the log."""
    from orchestrator.training.session import after_run  # sim runs only

    succeeded = outcome.state == "succeeded" and not outcome.errors
    for message in after_run(request.home, target, request.operation, succeeded):
        log.warning("Training scenario: %s", message)


def _sign_checkpoint(request: Request, run_id: str) -> None:
    """The run-end checkpoint the config file asks for. A failure to sign is loud but
    changes nothing of the run: its backup (or unlock) is done and recorded."""
    signing = request.checkpoint
    if signing is None:
        return
    try:
        from audit.checkpoint import sign_checkpoint  # only with a configured key

        signed = sign_checkpoint(request.audit_db, signing.key, signing.file)
    except (AuditError, OSError) as error:
        # An OSError (a temp dir that cannot be made) must not turn a done run into an
        # internal error either.
        message = error.message if isinstance(error, AuditError) else str(error)
        hint = error.hint if isinstance(error, AuditError) else None
        log.warning(
            "run %s: no checkpoint signed into %s: %s%s",
            run_id,
            signing.file,
            message,
            f" ({hint})" if hint else "",
        )
        return
    log.info(
        "Checkpoint %d signed into %s: seq %d hash %s",
        signed.number,
        signing.file,
        signed.seq,
        signed.hash,
    )


def _mark_recovered(run: Run, unfinished: recovery.RunSummary, outcome: Outcome) -> None:
    try:
        recovery.mark_recovered(run.audit, unfinished, run)
    except AuditError as error:
        # Everything was unlocked; only the record of it is missing. Say so, exit 1.
        outcome.errors.append(
            AuditUnwritableError(
                f"the cleanup unlocked every job, but run {unfinished.run_id} could not be "
                f"recorded as recovered: {error.message}",
                hint=(error.hint + " " if error.hint else "")
                + "Then run the cleanup again: it records the run as recovered.",
            )
        )


def _drive(request: Request, run: Run) -> Outcome:
    """Pick the operation's actions and drive its machine to the end."""
    artifact_path = request.artifact_path.resolve() if request.artifact_path else None
    start: dict[str, object] = {"artifact_path": str(artifact_path) if artifact_path else None}
    if request.deployment is not None:
        start["deployment"] = request.deployment
    if request.batch_id is not None:
        start["batch_id"] = request.batch_id
    if request.unsafe_lock_free:
        start["unsafe_lock_free"] = True
    start["max_parallel"] = run.max_parallel
    access_user = run.fleet.access_user
    if access_user is not None:
        # Before any access is set up: a run killed during it is cleaned up by this name.
        start[ACCESS_USER_KEY] = access_user
    if request.target.simulated:
        from orchestrator.training.session import tie  # sim runs only

        # A run of a trainee's session: its debrief reads what this row ties to it.
        start.update(tie(request.home, run.target, request.operation, artifact_path) or {})
    here = (artifact_path or Path.cwd()).resolve()
    operation = request.operation
    if operation == "backup":
        try:
            name = request.deployment or request.target.name
            actions = backup.backup_actions(
                here,
                name,
                with_manifest=request.with_manifest,
                unsafe_lock_free=request.unsafe_lock_free,
            )
            return run.drive(actions, **start)
        finally:
            # However the drive ended, a raise included: no partial backup that looks like one.
            backup.finish(run)
    if operation == "pre-backup-check":
        return run.drive(backup.check_actions(here), **start)
    if operation == "restore":
        assert artifact_path is not None
        return run.drive(restore.restore_actions(artifact_path), **start)
    if operation in ("backup-cleanup", "restore-cleanup"):
        return run.drive(cleanup.cleanup_actions(force=request.force), **start)
    raise UsageError(f"unknown operation {operation}")
