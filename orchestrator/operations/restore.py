"""The restore operation (bbr contract section 6).

validate the artifact's metadata and file set (every listed tar there and readable, no
tar unlisted) -> discover -> check the target can take it -> copy each tar to the VM,
checking it in the same pass -> pre-restore-lock (serially, in lock order) -> restore
scripts -> post-restore-unlock (reverse order) -> remove the remote work dir.

One read per tar: bbr re-hashes every tar before it starts and hashes the files again on
the VM; bbrx checks each chunk (member types and names, then every file's checksum
against the metadata) on its way to the VM, and the VM reports the SHA-256 of the stream
its tar read, which must be the digest of what bbrx checked and sent. Any difference
fails the copy, which precedes every lock: nothing is locked or restored, and cleaning
removes what was copied.
"""

from __future__ import annotations

import logging
from pathlib import Path

from orchestrator.bbr import artifact
from orchestrator.engine.run import Action, Run
from orchestrator.errors import (
    ArtifactCorruptError,
    BbrxError,
    CheckError,
    PreRestoreLockError,
    RestoreScriptError,
)
from orchestrator.operations import steps
from orchestrator.state import recovery

log = logging.getLogger(__name__)


def restore_actions(artifact_path: Path) -> dict[str, Action]:
    def validate(run: Run) -> steps.Step:
        log.info("Reading the metadata of %s", artifact_path)
        manifest = artifact.read_manifest(artifact_path)
        artifact.check_files(manifest)
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
        reader = artifact.TarReader(directory, instance, job)
        try:
            received = run.instance.stream_in(job.name, reader.chunks(run.check_interrupt))
            files = reader.verify()
            if received != reader.digest:
                raise ArtifactCorruptError(
                    f"the copy of {reader.name} to {run.instance.address} is corrupted: "
                    f"the VM's tar read a stream with SHA-256 {received}, bbrx checked and "
                    f"sent {reader.digest}",
                    hint="The tar itself is intact (every checksum matched the metadata). "
                    "Nothing was locked or restored, and the copy is removed from the VM's "
                    "work dir. Check the network and the VM's disk, then restore again.",
                )
        except BbrxError as error:
            tracker.trigger("copy_error", outcome="error", error=error)
            run.fail(error)
            return "copy_failed"
        tracker.trigger("copy_ok", detail={"files": len(files), "sha256": received})
        log.info(
            "Copied %s to %s (%d bytes, SHA-256 %s on both ends; every checksum matched)",
            reader.name,
            run.instance.address,
            reader.sent_bytes,
            received,
        )
    return "copied"


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
