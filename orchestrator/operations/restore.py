"""The restore operation (bbr contract section 6; deployment mode: bbr-deployment-mode §6).

validate the artifact's metadata and file set (every listed tar there and readable, no
tar unlisted) -> discover -> check the target can take it (in deployment mode: every
instance the backup holds exists, by group and index) -> copy each tar to its VM,
checking it in the same pass -> pre-restore-lock (serially, in lock order, across every
instance) -> restore scripts (instance by instance) -> post-restore-unlock (reverse order)
-> remove the remote work dirs.

One read per tar: bbr re-hashes every tar before it starts and hashes the files again on
the VM; bbrx checks each chunk (member types and names, then every file's checksum
against the metadata) on its way to the VM, and the VM reports the SHA-256 of the stream
its tar read, which must be the digest of what bbrx checked and sent. Any difference
fails the copy, which precedes every lock: nothing is locked or restored, and cleaning
removes what was copied.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from orchestrator.bbr import artifact
from orchestrator.engine.fleet import DEPLOYMENT, custom_artifact_name
from orchestrator.engine.run import Action, JobTracker, Run
from orchestrator.errors import (
    ArtifactCorruptError,
    BbrxError,
    CheckError,
    PreRestoreLockError,
    RestoreScriptError,
)
from orchestrator.operations import steps
from orchestrator.state import recovery
from orchestrator.transport.instance import Instance, instance_name

log = logging.getLogger(__name__)

COPIES_AT_ONCE = 4


@dataclass(frozen=True)
class Copy:
    """One tar of the backup bound for one job on one instance."""

    tracker: JobTracker
    source: artifact.InstanceArtifacts | None  # None: a custom artifact
    job: artifact.JobArtifact
    name: str  # the job's directory on the VM: the job's, or the custom artifact's name


def restore_actions(artifact_path: Path) -> dict[str, Action]:
    def validate(run: Run) -> steps.Step:
        log.info("Reading the metadata of %s", artifact_path)
        manifest = artifact.read_manifest(artifact_path)
        _refuse_the_other_mode(run, manifest)
        artifact.check_files(manifest)
        run.data["manifest"] = manifest
        detail: dict[str, object] = {
            "artifact": str(artifact_path),
            "jobs": [job.name for _, job in manifest.jobs()],
        }
        if run.fleet.kind == DEPLOYMENT:
            detail["instances"] = manifest.instance_names()
            detail["custom_artifacts"] = [custom.name for custom in manifest.custom]
        return "validated", detail

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


def _refuse_the_other_mode(run: Run, manifest: artifact.Manifest) -> None:
    """A director backup is not for a deployment, nor the reverse: said before anything."""
    where = manifest.path.parent
    # A deployment may have a `bosh/0` instance (a director deployed by another): its
    # backups look like a director's, so a deployment run judges by its structure check.
    if run.fleet.kind != DEPLOYMENT and not manifest.is_director_backup:
        held = ", ".join(manifest.instance_names()[:5]) or "custom artifacts only"
        raise CheckError(
            f"{where} is a deployment backup (it holds {held}), not a director backup",
            hint="Restore it with `bbrx deployment --target DIRECTOR --deployment NAME restore "
            f"--artifact-path {where}`. Nothing was touched.",
        )


def check_restorable(run: Run) -> steps.Step:
    recovery.refuse_if_unfinished(run.audit, run.target, run.operation, run.run_id)
    manifest: artifact.Manifest = run.data["manifest"]
    deployment = run.fleet.kind == DEPLOYMENT
    if deployment:
        _check_structure(run, manifest)
    copies = _plan_copies(run, manifest)
    run.data["copies"] = copies
    levels = steps.plan_levels(run)
    plan = steps.lock_plan(run, levels)
    targets = {instance_name(c.tracker.instance) for c in copies}
    steps.claim_work_dir(run, [i for i in run.instances if instance_name(i) in targets])
    return "checks_passed", {"lock_plan": plan, "copies": [c.tracker.label for c in copies]}


def _check_structure(run: Run, manifest: artifact.Manifest) -> None:
    """bbr's checks, in its order: some job restores, and every instance the backup holds
    is there, by group and index (ids, releases and extra instances do not matter)."""
    name = run.fleet.deployment
    if not steps.jobs_with(run, "restore"):
        raise CheckError(
            f"Deployment '{name}' has no restore scripts",
            hint="Check that its releases' jobs ship bin/bbr/restore scripts, and that no "
            "metadata sets skip_bbr_scripts. Nothing was touched.",
        )
    live = {instance_name(i) for i in run.instances}
    missing = [held for held in manifest.instance_names() if held not in live]
    if missing:
        director = manifest.is_director_backup
        raise CheckError(
            f"Deployment '{name}' does not match the structure of the provided backup: the "
            f"backup holds {', '.join(missing)}, which the deployment does not have (it has "
            f"{', '.join(sorted(live))})"
            + (": it is a director backup (its only instance is bosh/0)" if director else ""),
            hint=(
                "Restore it with `bbrx director --host DIRECTOR restore --artifact-path "
                f"{manifest.path.parent}`. Nothing was touched."
                if director
                else "Deploy (or scale) it to the instance groups and counts it had when it "
                "was backed up, then restore again. Nothing was touched."
            ),
        )


def _plan_copies(run: Run, manifest: artifact.Manifest) -> list[Copy]:
    """Which tar goes to which job: every job the backup holds, on its own instance; a
    `backup_one_restore_all` job's custom artifact to every instance that has the job."""
    deployment = run.fleet.kind == DEPLOYMENT
    where_held = {(i.name, i.index, a.name): (i, a) for i, a in manifest.jobs()}
    custom = {c.name: c for c in manifest.custom}
    copies: list[Copy] = []
    restorable = {t.label: t for t in steps.jobs_with(run, "restore")}
    if deployment:
        for tracker in restorable.values():
            instance = tracker.instance
            if run.fleet.backs_up_once(instance, tracker.name):
                name = custom_artifact_name(tracker.name, tracker.release)
                if name not in custom:
                    raise _nothing_for(run, tracker, f"no custom artifact {name}")
                copies.append(Copy(tracker, None, custom[name], name))
                continue
            held = where_held.get((instance.group, instance.index, tracker.name))
            if held is None:
                raise _nothing_for(run, tracker, "nothing")
            copies.append(Copy(tracker, held[0], held[1], tracker.name))
        for group, index, held_job in where_held:
            # Every tar must have its job to restore it; a backup_one_restore_all job's
            # ordinary tars (non-bootstrap copies) are not restored (bbr's way), but that job
            # restores from the custom artifact, so it is in `restorable` too.
            label = run.fleet.label(_instance(run, group, index), held_job)
            if label not in restorable:
                raise _no_restore_script(run, f"{group}/{index}", held_job)
        return copies
    for instance_artifacts, job in manifest.jobs():
        found = run.jobs.get(job.name)
        if found is None or not found.job.has("restore"):
            raise _no_restore_script(run, None, job.name)
        copies.append(Copy(found, instance_artifacts, job, job.name))
    return copies


def _instance(run: Run, group: str, index: str) -> Instance:
    return next(i for i in run.instances if (i.group, i.index) == (group, index))


def _nothing_for(run: Run, tracker: JobTracker, what: str) -> CheckError:
    return CheckError(
        f"{tracker.label} has a restore script, but the backup holds {what} for it "
        f"(the deployment has changed since the backup: a new job, or more instances)",
        hint=f"Restore onto deployment {run.fleet.deployment} as it was when backed up, or "
        "use a backup taken since the change. Nothing was touched.",
    )


def _no_restore_script(run: Run, instance: str | None, job: str) -> CheckError:
    if instance is None:
        return CheckError(
            f"the backup holds job {job}, but {run.instance.address} has no "
            f"{job} job with a restore script",
            hint="Restore onto a director deployed with the same jobs as the one backed up. "
            "Nothing on the target was touched.",
        )
    return CheckError(
        f"the backup holds job {job} of {instance}, but {instance} of deployment "
        f"{run.fleet.deployment} has no {job} job with a restore script",
        hint="Restore onto the deployment as it was when backed up (same releases and jobs). "
        "Nothing was touched.",
    )


def copy(run: Run) -> steps.Step:
    manifest: artifact.Manifest = run.data["manifest"]
    directory = manifest.path.parent
    copies: list[Copy] = run.data["copies"]

    def copy_one(item: Copy) -> BbrxError | None:
        if run.interrupted_by:
            return None
        tracker, instance = item.tracker, item.tracker.instance
        tracker.trigger("copy")
        reader = artifact.TarReader(directory, item.source, item.job)
        try:
            received = instance.stream_in(item.name, reader.chunks(run.check_interrupt))
            files = reader.verify()
            if received != reader.digest:
                raise ArtifactCorruptError(
                    f"the copy of {reader.name} to {tracker.where} is corrupted: "
                    f"the VM's tar read a stream with SHA-256 {received}, bbrx checked and "
                    f"sent {reader.digest}",
                    hint="The tar itself is intact (every checksum matched the metadata). "
                    "Nothing was locked or restored, and the copy is removed from the VM's "
                    "work dir. Check the network and the VM's disk, then restore again.",
                )
        except BbrxError as error:
            tracker.trigger("copy_error", outcome="error", error=error)
            return error
        detail = {"files": len(files), "sha256": received, "artifact": reader.name}
        tracker.trigger("copy_ok", detail=detail)
        log.info(
            "Copied %s to %s (%d bytes, SHA-256 %s on both ends; every checksum matched)",
            reader.name,
            tracker.where,
            reader.sent_bytes,
            received,
        )
        return None

    # A director's jobs one after another, as before; a deployment's in parallel, as bbr.
    limit = COPIES_AT_ONCE if run.fleet.kind == DEPLOYMENT else 1
    errors = [error for error in run.parallel(copies, copy_one, limit=limit) if error]
    for error in errors:
        run.fail(error)
    if errors or run.interrupted_by:
        return "copy_failed"
    return "copied"


def run_restore_scripts(run: Run) -> steps.Step:
    copies: list[Copy] = run.data["copies"]
    for item in copies:
        if run.interrupted_by:
            return "restore_failed"
        tracker = item.tracker
        directory = tracker.instance.artifact_directory(item.name)
        env = {"BBR_ARTIFACT_DIRECTORY": directory, "ARTIFACT_DIRECTORY": directory}
        log.info("Running the restore script of %s", tracker.label)
        error = run.run_job_script(tracker, "restore", "restore", RestoreScriptError, env)
        if error:
            # bbr runs every restore script of an instance and stops at the first instance
            # that failed; bbrx stops at the first script on purpose: the target is
            # half-restored either way, and the later scripts would restore on top of a
            # broken one. Unlock, and let the operator act.
            run.fail(error)
            return "restore_failed"
    return "restored"
