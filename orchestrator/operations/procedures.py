"""The one entry point the CLI calls for `bbrx director ... SUBCOMMAND`.

It opens the audit log and the target, drives the operation's machine to its end, and
closes both. A run with errors raises `RunFailed`, which carries every error (and so
the exit-code bits) and the run id.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from audit import AuditError, AuditLog
from orchestrator import settings
from orchestrator.engine.progress import ProgressSink
from orchestrator.engine.run import Identity, Outcome, Run, Timeouts
from orchestrator.errors import AuditUnwritableError, RunFailed, UsageError
from orchestrator.operations import backup, cleanup, restore
from orchestrator.state import lease, recovery
from orchestrator.transport.instance import Instance
from orchestrator.transport.targets import Target, open_instance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    operation: str
    target: Target
    identity: Identity
    audit_db: Path
    home: Path
    artifact_path: Path | None = None
    username: str | None = None
    private_key_path: Path | None = None
    accept_new_host_key: bool = False
    known_hosts: Path | None = None
    progress: ProgressSink | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    # Asked after a second Ctrl-C while unlocking; None where there is no terminal.
    confirm_abandon: Callable[[list[str], threading.Event], bool] | None = None
    # A cleanup even over a work dir that a run this audit log does not know created.
    force: bool = False


def run_director(request: Request) -> Outcome:
    """Open the target named by the request and run one operation on it."""
    if request.operation == "restore" and request.artifact_path is None:
        raise UsageError("restore needs --artifact-path DIR (a directory a backup created)")
    instance = open_instance(
        request.target,
        home=request.home,
        username=request.username,
        private_key_path=request.private_key_path,
        accept_new_host_key=request.accept_new_host_key,
        known_hosts=request.known_hosts,
    )
    try:
        return run_on(request, instance)
    finally:
        instance.close()


def run_on(request: Request, instance: Instance) -> Outcome:
    """Run one director operation on `instance`, recording it in the audit log."""
    operation = request.operation
    busy_timeout = settings.audit_busy_timeout()
    with AuditLog(request.audit_db, busy_timeout=busy_timeout) as audit:
        run = Run(
            operation,
            instance,
            audit,
            request.identity,
            request.target.address,
            progress=request.progress,
            timeouts=request.timeouts,
            confirm_abandon=request.confirm_abandon,
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
    if outcome.errors:
        raise RunFailed(operation, outcome.errors, outcome.run_id, outcome=outcome)
    return outcome


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
    start = {"artifact_path": str(artifact_path) if artifact_path else None}
    here = (artifact_path or Path.cwd()).resolve()
    operation = request.operation
    if operation == "backup":
        try:
            return run.drive(backup.backup_actions(here, request.target.name), **start)
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
