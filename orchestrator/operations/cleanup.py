"""backup-cleanup and restore-cleanup (bbr contract section 7).

After a run that did not finish, first end the scripts it left running on the VM (the
audit log has their pids), so none of them can lock after the unlock. Then run every
job's unlock script in reverse lock order (post-backup-unlock with
BBR_AFTER_BACKUP_SCRIPTS_SUCCESSFUL=false, or post-restore-unlock), then remove the
remote work dir. Local files are untouched. A lock-order cycle does not stop a
cleanup: unlocking everything matters more than the order.
"""

from __future__ import annotations

import re

from audit.render import printable
from orchestrator.engine.run import Action, Run
from orchestrator.errors import CheckError
from orchestrator.operations import steps
from orchestrator.state import recovery
from orchestrator.transport.instance import REMOTE_WORK_DIR, Instance


def cleanup_actions(*, force: bool = False) -> dict[str, Action]:
    def discover(run: Run) -> steps.Step:
        trigger, detail = steps.discover(run, lenient=True)
        steps.plan_levels(run, strict=False)
        unfinished = recovery.refuse_if_unfinished(run.audit, run.target, run.operation, run.run_id)
        if not force:
            _refuse_a_claim_this_log_does_not_know(run)
        if unfinished is not None:
            run.data["recovering"] = unfinished
            detail["recovering"] = unfinished.run_id
            ended = recovery.end_left_running(run.audit, run.instances, unfinished)
            if ended:
                detail["ended_scripts"] = ended
            user = recovery.access_user_of(run.audit, unfinished)
            if user is not None and user != run.fleet.access_user:
                # The killed run could not tear its access down: its user (with sudo) is
                # still on the instances it reached.
                run.fleet.revoke_access(user)
                detail["revoked_access"] = user
        return trigger, {**detail, "levels": run.data["levels"]}

    return {
        "discovering": discover,
        "unlocking": steps.unlock,
        "cleaning": steps.remove_work_dir,
    }


_OWNER_RUN = re.compile(r"run (\S+) \(")


def _refuse_a_claim_this_log_does_not_know(run: Run) -> None:
    """A cleanup unlocks every job and removes the work dir: done under a run that is still
    going on from another jump box or audit log, it would wreck that run. bbr cannot tell;
    bbrx can, from the owner file the claiming run wrote. A run this audit log knows is
    this log's to judge (the lease and the recovery above have done so)."""
    for instance in steps.instances_with_jobs(run):
        _refuse_an_unknown_claim(run, instance)


def _refuse_an_unknown_claim(run: Run, instance: Instance) -> None:
    owner = instance.work_dir_owner()
    match = _OWNER_RUN.match(owner or "")
    if match is None:
        return  # no work dir, or one bbr or an older bbrx left: clean it, as bbr does
    if any(summary.run_id == match.group(1) for summary in run.audit.runs()):
        return
    raise CheckError(
        f"{REMOTE_WORK_DIR} on {run.fleet.where(instance)} was created by bbrx "
        f"{printable(owner or '')[:300]}, which this audit log ({run.audit.path}) does not know: "
        "that run may still be going on from another jump box or audit log, and this cleanup "
        "would unlock its jobs under it",
        hint=f"Check with whoever runs it (or `{run.fleet.status_command()} --audit-db "
        "THEIR_LOG`). If that run is over, run this cleanup again with --force. Nothing was "
        "unlocked or removed.",
    )
