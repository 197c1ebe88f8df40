"""A run killed outright (SIGKILL): the audit log is the record, and the next run reads it."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

from tests.conftest import process_running, wait_for

ALL_JOBS = {"bbr-credhubdb", "blobstore", "director", "uaa"}


@pytest.fixture
def killed_backup(target, tmp_path):
    """A backup SIGKILLed while its backup script hangs: director and the rest stay locked."""
    target.vm.set_fault("director", "backup", "hang")
    proc = target.start("backup", "--artifact-path", str(tmp_path))
    wait_for(lambda: target.pid_recorded("director", "backup"), what="the backup scripts")
    # Let the script print its "hanging" line first: printing to the pipe of a dead bbrx
    # would end it (SIGPIPE), and this test is about one that lives on.
    time.sleep(0.5)
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

    [hung] = [
        c
        for c in target.vm.calls()
        if (c.job, c.script, c.event) == ("director", "backup", "start")
    ]
    assert process_running(hung.pid)
    cleanup = target.director("backup-cleanup")
    assert cleanup.code == 0, cleanup
    # The script the killed run left hanging was ended before the unlocks, by its pid.
    assert f"Ended the backup script of job director (pid {hung.pid}) that run " in cleanup.stderr
    wait_for(lambda: not process_running(hung.pid), what="the hung script to be gone")
    discovered = next(r for r in target.bbrx.audit_rows() if r["trigger"] == "discovered")
    assert discovered["detail"]["ended_scripts"] == [f"director/backup (pid {hung.pid})"]
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


def test_only_the_matching_cleanup_recovers_a_run(killed_backup):
    target = killed_backup
    wrong = target.director("restore-cleanup")
    assert wrong.code == 0, wrong
    assert "was a backup: this restore-cleanup does not recover it; run backup-cleanup" in (
        wrong.stderr
    )
    assert target.bbrx("status", "--host", target.host).stdout.startswith(
        f"{target.address}: interrupted: run "
    )
    assert target.director("backup-cleanup").code == 0
    assert target.bbrx("status", "--host", target.host).stdout.startswith(f"{target.address}: idle")


def test_a_job_without_an_unlock_script_is_warned_about_not_counted(target, tmp_path):
    """bbr accepts a lock script without an unlock script; no cleanup could unlock it."""
    (target.vm.root / "var/vcap/jobs/blobstore/bin/bbr/post-backup-unlock").unlink()
    result = target.director("backup", "--artifact-path", str(tmp_path))
    assert result.code == 0, result
    assert "Job blobstore has a pre-backup-lock script but no post-backup-unlock" in result.stderr
    assert "may still be locked" not in result.stderr
    assert target.bbrx("status", "--host", target.host).stdout.startswith(f"{target.address}: idle")
