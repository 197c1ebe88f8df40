"""A run killed outright (SIGKILL): the audit log is the record, and the next run reads it."""

from __future__ import annotations

import contextlib
import os
import signal

import pytest

from tests.conftest import wait_for

ALL_JOBS = {"bbr-credhubdb", "blobstore", "director", "uaa"}


@pytest.fixture
def killed_backup(target, tmp_path):
    """A backup SIGKILLed while its backup script hangs: director and the rest stay locked."""
    target.vm.set_fault("director", "backup", "hang")
    proc = target.start("backup", "--artifact-path", str(tmp_path))
    wait_for(lambda: "director" in target.scripts_run("backup"), what="the backup scripts")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    hung = [c.pid for c in target.vm.calls() if (c.job, c.script) == ("director", "backup")]
    target.vm.clear_faults()
    yield target
    for pid in hung:  # the script we started that bbrx could not stop
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    target.stop_orphaned_ssh_master()


def test_status_then_refusal_then_recovery(killed_backup, tmp_path):
    target = killed_backup
    assert set(target.vm.locked_jobs()) == ALL_JOBS

    status = target.bbrx("status", "--host", target.host)
    assert status.code == 0, status
    assert f"{target.address}: interrupted: run " in status.stdout
    assert "phase backing_up" in status.stdout
    assert "jobs that may still be locked: bbr-credhubdb, blobstore, director, uaa" in status.stdout
    assert "backup-cleanup" in status.stdout

    refused = target.director("backup", "--artifact-path", str(tmp_path))
    assert refused.code == 1, refused
    assert "did not finish and its process is gone" in refused.stderr
    assert (
        "jobs that may still be locked: bbr-credhubdb, blobstore, director, uaa" in refused.stderr
    )
    assert f"bbrx director --host {target.address} backup-cleanup" in refused.stderr
    assert set(target.vm.locked_jobs()) == ALL_JOBS  # the refusal touched nothing

    cleanup = target.director("backup-cleanup")
    assert cleanup.code == 0, cleanup
    assert target.vm.locked_jobs() == []
    runs = target.bbrx.audit_runs()
    killed = next(r for r in runs if r.operation == "backup")
    assert (killed.outcome, killed.finished) == ("recovered", True)
    assert target.bbrx("status", "--host", target.host).stdout.startswith(f"{target.address}: idle")
    again = target.director("backup", "--artifact-path", str(tmp_path))
    assert again.code == 0, again
    assert target.bbrx("audit", "verify").code == 0


def test_status_of_a_fresh_target_is_idle(target):
    result = target.bbrx("status", "--host", target.host)
    assert result.code == 0
    assert result.stdout.startswith(f"{target.address}: idle")


def test_a_failed_unlock_needs_a_cleanup_before_the_next_backup(target, tmp_path):
    """The run finished, but its unlock did not: status and the next backup say so."""
    target.vm.set_fault("director", "post-backup-unlock", "fail 2 cannot restart workers")
    failed = target.director("backup", "--artifact-path", str(tmp_path))
    assert failed.code == 8, failed
    assert f"Error: jobs that may still be locked on {target.address}: director" in failed.stderr
    assert f"`bbrx director --host {target.address} backup-cleanup`" in failed.stderr
    assert target.vm.locked_jobs() == ["director"]

    status = target.bbrx("status", "--host", target.host).stdout
    assert f"{target.address}: needs cleanup: run " in status
    assert ", ended failed" in status
    assert "its unlock failed; jobs that may still be locked: director" in status

    refused = target.director("backup", "--artifact-path", str(tmp_path))
    assert refused.code == 1, refused
    assert "ended failed without unlocking every job; jobs that may still be locked: director" in (
        refused.stderr
    )
    assert target.scripts_run("pre-backup-lock").count("director") == 1  # nothing new locked

    target.vm.clear_faults()
    cleanup = target.director("backup-cleanup")
    assert cleanup.code == 0, cleanup
    assert target.vm.locked_jobs() == []
    assert target.bbrx("status", "--host", target.host).stdout.startswith(f"{target.address}: idle")
    assert target.bbrx("audit", "verify").code == 0
