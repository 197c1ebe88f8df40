"""The backup operation and pre-backup-check (bbr contract section 5).

discover -> check -> (create the local artifact) -> lock by levels -> backup scripts
-> unlock in reverse -> drain each job's tar (checksums while streaming) -> publish
-> remove the remote work dir.
"""

from __future__ import annotations

import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path

from orchestrator import __version__
from orchestrator.bbr.artifact import ArtifactWriter, check_free_space, tar_name
from orchestrator.engine.run import Action, JobTracker, Run
from orchestrator.errors import BackupScriptError, BbrxError, LockError, ScriptError
from orchestrator.operations import steps

log = logging.getLogger(__name__)


def check_actions(artifact_path: Path) -> dict[str, Action]:
    def check(run: Run) -> steps.Step:
        trigger, detail = steps.check_backupable(run)
        return trigger, {**detail, **space_estimate(run, artifact_path)}

    return {"discovering": steps.discover, "checking": check}


def space_estimate(run: Run, artifact_path: Path) -> dict[str, object]:
    """Pre-flight (bbr has none): will a backup fit at the artifact path? Warn if not."""
    needed = run.instance.store_size()
    try:
        free = shutil.disk_usage(artifact_path).free if artifact_path.is_dir() else 0
    except OSError as exc:  # a pre-flight estimate: say why it has none, check the rest
        log.warning("Cannot tell the free space at %s: %s", artifact_path, exc)
        free = 0
    if needed > free:
        log.warning(
            "A backup may not fit: the director's stores hold %d MiB, %s has %d MiB free",
            needed >> 20,
            artifact_path,
            free >> 20,
        )
    else:
        log.info("Space: the stores hold %d MiB, %s has %d MiB free", needed >> 20,
                 artifact_path, free >> 20)  # fmt: skip
    return {"store_bytes": needed, "free_bytes": free, "artifact_path": str(artifact_path)}


def backup_actions(artifact_path: Path, name: str) -> dict[str, Action]:
    def check(run: Run) -> steps.Step:
        step = steps.check_backupable(run, claiming=True)
        writer = ArtifactWriter(artifact_path, name, run.started, run.run_id)
        run.data["writer"] = writer  # so that finish() removes what create() made
        writer.create()
        steps.claim_work_dir(run)
        return step

    return {
        "discovering": steps.discover,
        "checking": check,
        "locking": lambda run: steps.lock(run, LockError),
        "backing_up": run_backup_scripts,
        "unlocking": steps.unlock,
        "draining": drain,
        "cleaning": steps.remove_work_dir,
    }


def run_backup_scripts(run: Run) -> steps.Step:
    trackers = steps.jobs_with(run, "backup")
    log.info("Running backup scripts: %s", ", ".join(t.name for t in trackers))

    def backup_one(tracker: JobTracker) -> ScriptError | None:
        if run.interrupted_by:
            return None
        run.instance.make_artifact_directory(tracker.name)
        directory = run.instance.artifact_directory(tracker.name)
        env = {"BBR_ARTIFACT_DIRECTORY": directory, "ARTIFACT_DIRECTORY": directory}
        return run.run_job_script(tracker, "backup", "backup", BackupScriptError, env)

    errors = [error for error in run.parallel(trackers, backup_one) if error]
    for error in errors:
        run.fail(error)
    run.data["backup_succeeded"] = not errors and not run.interrupted_by
    return "backed_up" if run.data["backup_succeeded"] else "backup_failed"


def drain(run: Run) -> steps.Step:
    """Copy each job's tar to the jump box, hashing while it streams, then publish."""
    writer: ArtifactWriter = run.data["writer"]
    trackers = steps.jobs_with(run, "backup")

    sizes = {t.name: run.instance.artifact_size(t.name) for t in trackers}
    check_free_space(writer.partial, sum(sizes.values()))
    progress = run.progress

    def drain_one(tracker: JobTracker) -> BbrxError | None:
        tracker.trigger("drain")
        label = tar_name(run.instance.group, run.instance.index, tracker.name)
        try:
            # One pass over the data: the checksums come from the stream as it lands. The
            # copy is whole when the VM's tar exited 0, the stream parsed to its
            # end-of-archive marker, and the file is on disk; SSH's MAC guards the bytes.
            advance = progress.start(label, sizes[tracker.name])
            with run.instance.stream_out(tracker.name) as stream:
                checksums = writer.write_job(
                    run.instance.group,
                    run.instance.index,
                    tracker.name,
                    stream,
                    run.check_interrupt,
                    advance,
                )
            progress.done(label)
        except BbrxError as error:
            tracker.trigger("drain_error", outcome="error", error=error)
            return error
        tracker.trigger("drain_ok", detail={"files": len(checksums), "bytes": sizes[tracker.name]})
        return None

    errors = [error for error in run.parallel(trackers, drain_one, limit=4) if error]
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


def finish(run: Run) -> None:
    """Whatever happened, leave no partial backup that looks like one."""
    writer: ArtifactWriter | None = run.data.get("writer")
    if writer is not None and run.artifact is None:
        writer.discard()
