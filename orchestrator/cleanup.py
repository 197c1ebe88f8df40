"""backup-cleanup and restore-cleanup (bbr contract section 7).

After a run that did not finish, first end the scripts it left running on the VM (the
audit log has their pids), so none of them can lock after the unlock. Then run every
job's unlock script in reverse lock order (post-backup-unlock with
BBR_AFTER_BACKUP_SCRIPTS_SUCCESSFUL=false, or post-restore-unlock), then remove the
remote work dir. Local files are untouched. A lock-order cycle does not stop a
cleanup: unlocking everything matters more than the order.
"""

from __future__ import annotations

from orchestrator import recovery, steps
from orchestrator.run import Action, Run


def cleanup_actions() -> dict[str, Action]:
    def discover(run: Run) -> steps.Step:
        trigger, detail = steps.discover(run, lenient=True)
        steps.plan_levels(run, strict=False)
        unfinished = recovery.refuse_if_unfinished(run.audit, run.target, run.operation, run.run_id)
        if unfinished is not None:
            run.data["recovering"] = unfinished
            detail["recovering"] = unfinished.run_id
            ended = recovery.end_left_running(run.audit, run.instance, unfinished)
            if ended:
                detail["ended_scripts"] = ended
        return trigger, {**detail, "levels": run.data["levels"]}

    return {
        "discovering": discover,
        "unlocking": steps.unlock,
        "cleaning": steps.remove_work_dir,
    }
