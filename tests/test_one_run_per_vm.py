"""One run per director VM, whatever the jump box or audit log: a run claims the VM's work
dir before its first lock, a second run refuses, and a run removes only what it created."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from orchestrator.bbr import artifact
from tests.conftest import Target, wait_for


@pytest.fixture
def out(tmp_path: Path) -> Path:
    path = tmp_path / "generated-backup"
    path.mkdir()
    return path


def _backup_holding_the_vm(target: Target, out: Path) -> subprocess.Popen[str]:
    """A backup that stays locked for a while (its last lock script sleeps)."""
    target.vm.set_fault("blobstore", "pre-backup-lock", "sleep 4")
    before = target.scripts_run("pre-backup-lock").count("blobstore")
    first = target.start("backup", "--artifact-path", str(out))
    wait_for(
        lambda: target.scripts_run("pre-backup-lock").count("blobstore") > before,
        what="the first run's last lock",
    )
    return first


def test_a_second_run_from_another_audit_log_refuses_and_removes_nothing(
    target: Target, out: Path, tmp_path: Path
):
    first = _backup_holding_the_vm(target, out)
    [partial] = [p for p in out.iterdir() if p.name.endswith(".incomplete")]
    locks_before = len(target.scripts_run("pre-backup-lock"))

    # Another jump box, as far as bbrx can tell: its own audit log, so no shared lease.
    other_db = tmp_path / "elsewhere" / "audit.db"
    second = target.director("--audit-db", str(other_db), "backup", "--artifact-path", str(out))
    assert second.code == 1, second
    assert "Directory /var/vcap/store/bbr-backup already exists on instance bosh/0" in (
        second.stderr
    )
    first_run = target.bbrx.audit_runs()[-1].run_id
    assert f"it was created by bbrx run {first_run} (backup) by trainee@test" in second.stderr
    assert f"--host {target.address} backup-cleanup" in second.stderr
    # It started no script that locks, and left the first run's files alone.
    assert len(target.scripts_run("pre-backup-lock")) == locks_before
    assert target.work_dir().is_dir()
    assert partial.is_dir()

    _stdout, stderr = first.communicate(timeout=60)
    assert first.returncode == 0, stderr
    published = [p for p in out.iterdir() if not p.name.endswith(".incomplete")]
    assert len(published) == 1
    artifact.validate(published[0])
    assert not target.work_dir().exists()  # removed by the run that created it


def test_a_restore_refuses_while_a_backup_holds_the_vm(target: Target, out: Path, tmp_path: Path):
    made = target.director("backup", "--artifact-path", str(out))
    assert made.code == 0, made
    [good] = list(out.iterdir())
    first = _backup_holding_the_vm(target, out)

    restore = target.director(
        "--audit-db", str(tmp_path / "other.db"), "restore", "--artifact-path", str(good)
    )
    assert restore.code == 1, restore
    assert "already exists" in restore.stderr and "restore-cleanup" in restore.stderr
    assert target.scripts_run("pre-restore-lock") == []
    assert target.scripts_run("restore") == []
    first.communicate(timeout=60)
    assert first.returncode == 0


def test_a_leftover_work_dir_without_an_owner_is_named_as_such(target: Target, out: Path):
    target.work_dir().mkdir(parents=True)
    result = target.director("backup", "--artifact-path", str(out))
    assert result.code == 1, result
    assert "another run (bbr or bbrx) is in progress, or an earlier run did not finish" in (
        result.stderr
    )
    assert target.work_dir().is_dir()  # not ours: left for the cleanup
    assert list(out.iterdir()) == []  # and our own partial backup is gone


def test_the_owner_file_is_outside_every_artifact(target: Target, out: Path):
    target.vm.set_fault("director", "backup", "sleep 1")
    run = target.start("backup", "--artifact-path", str(out))
    wait_for(lambda: (target.work_dir() / ".bbrx-owner").exists(), what="the owner file")
    owner = (target.work_dir() / ".bbrx-owner").read_text()
    assert owner.startswith("run ") and "(backup) by trainee@test" in owner
    run.communicate(timeout=60)
    assert run.returncode == 0
    [published] = list(out.iterdir())
    manifest = artifact.validate(published)
    for _, job in manifest.jobs():
        assert not any("bbrx-owner" in name for name in job.checksums)


STARTED = datetime(2026, 11, 24, 0, 26, 41, tzinfo=UTC)


def test_two_backups_in_the_same_second_never_collide(tmp_path: Path):
    first = artifact.ArtifactWriter(tmp_path, "demo", STARTED, "run-a")
    second = artifact.ArtifactWriter(tmp_path, "demo", STARTED, "run-b")
    first.create()
    second.create()
    assert first.partial.name == "demo_20261124T002641Z.incomplete"
    assert second.partial.name == "demo_20261124T002641Z-2.incomplete"
    assert second.final.name == "demo_20261124T002641Z-2"

    # A run that gives up removes its own partial backup, never the other's.
    second.discard()
    assert first.partial.is_dir() and not second.partial.exists()

    # A name already published is skipped too.
    first.final.mkdir()
    third = artifact.ArtifactWriter(tmp_path, "demo", STARTED, "run-c")
    third.create()
    assert third.partial.name == "demo_20261124T002641Z-2.incomplete"


def test_a_writer_that_created_nothing_removes_nothing(tmp_path: Path):
    other = tmp_path / "demo_20261124T002641Z.incomplete"
    other.mkdir()
    writer = artifact.ArtifactWriter(tmp_path, "demo", STARTED, "run-b")
    writer.discard()  # never created: e.g. the run failed before its checks
    assert other.is_dir()


def test_an_artifact_path_that_is_a_file_is_named_as_such(tmp_path: Path):
    path = tmp_path / "backups"
    path.write_text("")
    with pytest.raises(artifact.ArtifactError, match="is not a directory"):
        artifact.ArtifactWriter(path, "demo", STARTED, "run-a")


def test_a_cleanup_refuses_to_unlock_under_a_run_this_log_does_not_know(
    target: Target, out: Path, tmp_path: Path
):
    first = _backup_holding_the_vm(target, out)
    unlocks_before = len(target.scripts_run("post-backup-unlock"))
    other_db = tmp_path / "elsewhere" / "audit.db"
    cleanup = target.director("--audit-db", str(other_db), "backup-cleanup")
    assert cleanup.code == 1, cleanup
    assert "which this audit log" in cleanup.stderr and "does not know" in cleanup.stderr
    assert "run this cleanup again with --force" in cleanup.stderr
    assert len(target.scripts_run("post-backup-unlock")) == unlocks_before  # nothing unlocked
    assert target.work_dir().is_dir()
    first.communicate(timeout=60)
    assert first.returncode == 0  # the first run was not disturbed


def test_force_cleans_up_after_a_run_from_elsewhere_that_is_over(target: Target):
    target.work_dir().mkdir(parents=True)
    (target.work_dir() / ".bbrx-owner").write_text(
        "run 20261130T000000Z-abcdef (backup) by someone from jumpbox-2, pid 1, since ...\n"
    )
    refused = target.director("backup-cleanup")
    assert refused.code == 1, refused
    assert "bbrx run 20261130T000000Z-abcdef (backup) by someone from jumpbox-2" in refused.stderr
    forced = target.director("backup-cleanup", "--force")
    assert forced.code == 0, forced
    assert not target.work_dir().exists()
