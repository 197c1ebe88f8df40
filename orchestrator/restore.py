"""The restore operation (bbr contract section 6).

validate the local artifact (every checksum, before anything remote is touched)
-> discover -> check the target can take it -> copy each tar to the VM and confirm its
checksums there -> pre-restore-lock (serially, in lock order) -> restore scripts
-> post-restore-unlock (reverse order) -> remove the remote work dir.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from orchestrator import artifact, recovery, steps
from orchestrator.errors import (
    BbrxError,
    CheckError,
    PreRestoreLockError,
    RestoreScriptError,
)
from orchestrator.run import Action, Run

log = logging.getLogger(__name__)


def restore_actions(artifact_path: Path) -> dict[str, Action]:
    def validate(run: Run) -> steps.Step:
        log.info("Validating the checksums of %s", artifact_path)
        manifest = artifact.validate(artifact_path)
        run.data["manifest"] = manifest
        return "validated", {
            "artifact": str(artifact_path),
            "jobs": [job.name for _, job in manifest.jobs()],
        }

    return {
        "validating": validate,
        "discovering": steps.discover,
        "checking": check_restorable,
        "copying": copy,
        "locking": lambda run: steps.lock(run, PreRestoreLockError, parallel=False),
        "restoring": run_restore_scripts,
        "unlocking": lambda run: steps.unlock(run, parallel=False),
        "cleaning": steps.remove_work_dir,
    }


def check_restorable(run: Run) -> steps.Step:
    recovery.refuse_if_unfinished(run.audit, run.target, run.operation, run.run_id)
    manifest: artifact.Manifest = run.data["manifest"]
    group, index = run.instance.group, run.instance.index
    for instance, job in manifest.jobs():
        if (instance.name, instance.index) != (group, index):
            raise CheckError(
                f"the backup holds instance {instance.name}/{instance.index}, "
                f"which {run.instance.address} does not have (it has {group}/{index})",
                hint="Restore a director backup onto a director.",
            )
        tracker = run.jobs.get(job.name)
        if tracker is None or not tracker.job.has("restore"):
            raise CheckError(
                f"the backup holds job {job.name}, but {run.instance.address} has no "
                f"{job.name} job with a restore script",
                hint="Restore onto a director deployed with the same jobs as the one backed up. "
                "Nothing on the target was touched.",
            )
    levels = steps.plan_levels(run)
    plan = steps.lock_plan(run, levels)
    steps.claim_work_dir(run)
    return "checks_passed", {"lock_plan": plan}


def copy(run: Run) -> steps.Step:
    manifest: artifact.Manifest = run.data["manifest"]
    directory = manifest.path.parent
    for instance, job in manifest.jobs():
        if run.interrupted_by:
            return "copy_failed"
        tracker = run.jobs[job.name]
        tracker.trigger("copy")
        path = directory / artifact.tar_name(instance.name, instance.index, job.name)
        try:
            run.instance.make_artifact_directory(job.name)
            run.instance.stream_in(job.name, _checked(run, artifact.iter_file(path)))
            remote = run.instance.checksum_artifact_directory(job.name)
            artifact.compare_checksums(
                f"{job.name} after copying to {run.instance.address}",
                job.checksums,
                remote,
                "the metadata",
                hint="The copy is removed from the VM's work dir and nothing was locked or "
                "restored. Check the jump box's disk and the network, then restore again.",
            )
        except BbrxError as error:
            tracker.trigger("copy_error", outcome="error", error=error)
            run.fail(error)
            return "copy_failed"
        tracker.trigger("copy_ok", detail={"files": len(remote)})
        log.info(
            "Copied %s to %s and verified its checksums there", path.name, run.instance.address
        )
    return "copied"


def _checked(run: Run, chunks: Iterator[bytes]) -> Iterator[bytes]:
    for chunk in chunks:
        run.check_interrupt()
        yield chunk


def run_restore_scripts(run: Run) -> steps.Step:
    manifest: artifact.Manifest = run.data["manifest"]
    for _, job in manifest.jobs():
        if run.interrupted_by:
            return "restore_failed"
        tracker = run.jobs[job.name]
        directory = run.instance.artifact_directory(job.name)
        env = {"BBR_ARTIFACT_DIRECTORY": directory, "ARTIFACT_DIRECTORY": directory}
        log.info("Running the restore script of %s", job.name)
        error = run.run_job_script(tracker, "restore", "restore", RestoreScriptError, env)
        if error:
            # bbr runs every restore script and collects the errors; bbrx stops here on
            # purpose: the director is half-restored either way, and the later scripts
            # would restore on top of a broken one. Unlock, and let the operator act.
            run.fail(error)
            return "restore_failed"
    return "restored"
