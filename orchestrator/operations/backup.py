"""The backup operation and pre-backup-check (bbr contract section 5).

discover -> check -> (create the local artifact) -> lock by levels -> backup scripts
-> unlock in reverse -> drain each job's tar (written and synced, read back, its SHA-256
compared with the VM's) -> publish -> remove the remote work dir.
"""

from __future__ import annotations

import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path

from orchestrator import __version__
from orchestrator.bbr.artifact import (
    WRITING_IN_KEY,
    ArtifactWriter,
    LocalTar,
    PendingCopy,
    check_free_space,
    custom_tar_name,
    tar_name,
)
from orchestrator.engine.fleet import custom_artifact_name
from orchestrator.engine.run import Action, JobTracker, Run
from orchestrator.errors import (
    BackupScriptError,
    BbrxError,
    CopyCorruptError,
    LockError,
    ScriptError,
    TransportError,
)
from orchestrator.operations import steps
from orchestrator.transport.instance import SentDigest, instance_name

log = logging.getLogger(__name__)

# Copies at once: each is a disk-bound stream into the jump box, and more of them only
# share the same disk and link.
DRAINS_AT_ONCE = 4


def check_actions(artifact_path: Path) -> dict[str, Action]:
    def check(run: Run) -> steps.Step:
        trigger, detail = steps.check_backupable(run)
        return trigger, {**detail, **space_estimate(run, artifact_path)}

    return {"discovering": steps.discover, "checking": check}


def space_estimate(run: Run, artifact_path: Path) -> dict[str, object]:
    """Pre-flight (bbr has none): will a backup fit at the artifact path? Warn if not."""
    instances = steps.instances_with(run, "backup")
    needed = sum(run.parallel(instances, lambda instance: instance.store_size()))
    try:
        free = shutil.disk_usage(artifact_path).free if artifact_path.is_dir() else 0
    except OSError as exc:  # a pre-flight estimate: say why it has none, check the rest
        log.warning("Cannot tell the free space at %s: %s", artifact_path, exc)
        free = 0
    if needed > free:
        log.warning(
            "A backup may not fit: the VMs' stores hold %d MiB, %s has %d MiB free",
            needed >> 20,
            artifact_path,
            free >> 20,
        )
    else:
        log.info("Space: the stores hold %d MiB, %s has %d MiB free", needed >> 20,
                 artifact_path, free >> 20)  # fmt: skip
    return {"store_bytes": needed, "free_bytes": free, "artifact_path": str(artifact_path)}


def backup_actions(
    artifact_path: Path, name: str, *, with_manifest: bool = False, unsafe_lock_free: bool = False
) -> dict[str, Action]:
    def check(run: Run) -> steps.Step:
        step = steps.check_backupable(run, claiming=True)
        writer = ArtifactWriter(artifact_path, name, run.started, run.run_id)
        run.data["writer"] = writer  # so that finish() removes what create() made
        writer.create()
        if with_manifest and run.fleet.manifest is not None:
            # Saved before anything is locked, as bbr does: a failure here locks nothing.
            writer.write_manifest(run.fleet.manifest.text)
        steps.claim_work_dir(run, steps.instances_with(run, "backup"))
        trigger, detail = step
        # Where this run writes: what a run killed from here on leaves on the jump box.
        return trigger, {**detail, WRITING_IN_KEY: str(writer.partial)}

    return {
        "discovering": steps.discover,
        "checking": check,
        "locking": skip_locks if unsafe_lock_free else lambda run: steps.lock(run, LockError),
        "backing_up": run_backup_scripts,
        "unlocking": skip_unlocks if unsafe_lock_free else steps.unlock,
        "draining": drain,
        "cleaning": steps.remove_work_dir,
    }


def skip_locks(run: Run) -> steps.Step:
    """--unsafe-lock-free: back up live data, without lock scripts (bbr's flag). Loudly."""
    skipped = [t.label for t in steps.jobs_with(run, "lock")]
    log.warning(
        "--unsafe-lock-free: NOT locking %s: the backup copies data while it may change, and "
        "may not restore consistently",
        ", ".join(skipped) or "anything (no job has a lock script)",
    )
    return "locked", {"unsafe_lock_free": True, "locks_skipped": skipped}


def skip_unlocks(run: Run) -> steps.Step:
    skipped = [t.label for t in steps.jobs_with(run, "unlock")]
    log.warning("--unsafe-lock-free: no unlock scripts run (nothing was locked)")
    return "unlocked", {"unsafe_lock_free": True, "unlocks_skipped": skipped}


def artifact_name(run: Run, tracker: JobTracker) -> str:
    """The job's directory under the work dir and its artifact's name: the job's, or on the
    bootstrap instance of a `backup_one_restore_all` job, bbr's custom artifact name."""
    if run.fleet.backs_up_once(tracker.instance, tracker.name) and run.fleet.is_bootstrap(
        tracker.instance
    ):
        return custom_artifact_name(tracker.name, tracker.release)
    return tracker.name


def run_backup_scripts(run: Run) -> steps.Step:
    trackers = steps.jobs_with(run, "backup")
    log.info("Running backup scripts: %s", ", ".join(t.label for t in trackers))

    def backup_one(tracker: JobTracker) -> ScriptError | None:
        if run.interrupted_by:
            return None
        name = artifact_name(run, tracker)
        tracker.instance.make_artifact_directory(name)
        directory = tracker.instance.artifact_directory(name)
        env = {"BBR_ARTIFACT_DIRECTORY": directory, "ARTIFACT_DIRECTORY": directory}
        return run.run_job_script(tracker, "backup", "backup", BackupScriptError, env)

    errors = [error for error in run.parallel(trackers, backup_one) if error]
    for error in errors:
        run.fail(error)
    run.data["backup_succeeded"] = not errors and not run.interrupted_by
    return "backed_up" if run.data["backup_succeeded"] else "backup_failed"


def drain(run: Run) -> steps.Step:
    """Copy each job's tar to the jump box and check it there, then publish."""
    writer: ArtifactWriter = run.data["writer"]
    trackers = steps.jobs_with(run, "backup")

    names = {t.label: artifact_name(run, t) for t in trackers}
    sized = run.parallel(trackers, lambda t: t.instance.artifact_size(names[t.label]))
    sizes = {t.label: size for t, size in zip(trackers, sized, strict=True)}
    check_free_space(writer.partial, sum(sizes.values()))
    progress = run.progress

    def drain_one(tracker: JobTracker) -> BbrxError | None:
        tracker.trigger("drain")
        instance, name = tracker.instance, names[tracker.label]
        custom = name != tracker.name
        label = custom_tar_name(name) if custom else tar_name(instance.group, instance.index, name)
        copy: PendingCopy | None = None
        try:
            advance = progress.start(label, sizes[tracker.label])
            with instance.stream_out(name) as stream:
                if custom:
                    copy = writer.write_custom(name, stream, run.check_interrupt, advance)
                else:
                    copy = writer.write_job(
                        instance.group, instance.index, name, stream, run.check_interrupt, advance
                    )
            progress.done(label)
            # The copy as it is on disk (read back from it as it was written, the rest
            # after its fsync), against what the VM says it sent (its digest of the
            # stream, computed beside the stream there).
            sent = sent_digest(tracker, label, stream.digest)
            local = writer.read_back(
                copy, tracker.name, run.check_interrupt, whole=sent.kind != "tar"
            )
            check_copy(tracker, label, sent, local)
            checksums = local.checksums()
            if custom:
                writer.add_custom(name, checksums)
            else:
                writer.add_job(instance.group, instance.index, name, checksums)
        except BbrxError as error:
            tracker.trigger("drain_error", outcome="error", error=error)
            return error
        finally:
            if copy is not None:
                copy.close()  # read to its end already, unless something failed
        detail = {
            "files": len(checksums),
            "bytes": sizes[tracker.label],
            "artifact": label,
            # "tar_digest" from a VM with python3, "sha256" (of the whole tar) without
            ("tar_digest" if sent.kind == "tar" else "sha256"): sent.hex,
        }
        tracker.trigger("drain_ok", detail=detail)
        log.info(
            "Copied %s from %s (%d bytes; %s %s on the VM and on the jump box's disk)",
            label,
            tracker.where,
            local.size,
            sent.label,
            sent.hex,
        )
        return None

    errors = [error for error in run.parallel(trackers, drain_one, limit=DRAINS_AT_ONCE) if error]
    for error in errors:
        run.fail(error)
    if errors or run.interrupted_by:
        writer.discard()
        return "drain_failed"
    head = run.last_event  # this run's own latest row, not another run's
    run.artifact = writer.publish(
        datetime.now(UTC),
        {
            "run_id": run.run_id,
            "audit_db": str(Path(run.audit.path).resolve()),
            "seq": head.seq if head else None,
            "hash": head.hash if head else None,
            "tool_version": f"bbrx {__version__}",
        },
    )
    return "drained", {"artifact": str(run.artifact)}


def sent_digest(tracker: JobTracker, label: str, sent: SentDigest | None) -> SentDigest:
    """The VM's digest of what it sent: the transport's contract says there is one."""
    if sent is None:
        raise TransportError(
            f"the copy of {label} ({_whose(tracker)}) cannot be checked: the VM reported no "
            "digest of what it sent",
            host=tracker.where,
        )
    return sent


def check_copy(tracker: JobTracker, label: str, sent: SentDigest, local: LocalTar) -> None:
    """The jump box's copy is what the VM sent, or the drain of this job fails."""
    mine = local.digest(sent.kind)
    if mine is None:  # read back without the kind the VM reported: a bug, refuse
        raise TransportError(
            f"the copy of {label} ({_whose(tracker)}) was not read back for a {sent.label}",
            host=tracker.where,
        )
    if sent.hex != mine:
        raise CopyCorruptError(
            f"the copy of {label} ({_whose(tracker)}) is corrupted: the VM sent a tar stream "
            f"with {sent.label} {sent.hex}, the jump box's copy on disk has {sent.label} {mine}",
            job=tracker.name,
            host=tracker.where,
            digest_kind=sent.kind,
            vm_sha256=sent.hex,
            local_sha256=mine,
            hint="Nothing was published: the partial backup is removed (the copy comes after "
            "the unlocks). The bytes changed between the VM's tar and the jump box's disk: "
            "check the network, and the jump box's disk and memory, then back up again.",
        )


def _whose(tracker: JobTracker) -> str:
    instance = tracker.instance
    return f"job {tracker.name} on {instance_name(instance)}, {instance.address}"


def finish(run: Run) -> None:
    """Whatever happened, leave no partial backup that looks like one."""
    writer: ArtifactWriter | None = run.data.get("writer")
    if writer is not None and run.artifact is None:
        writer.discard()
