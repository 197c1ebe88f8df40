"""Ctrl-C and SIGTERM: bbr leaves the director locked; bbrx unlocks every job first."""

from __future__ import annotations

import os
import signal

import pytest

from tests.conftest import interrupt, wait_for

ALL_JOBS = {"bbr-credhubdb", "blobstore", "director", "uaa"}


def started(target, job: str, script: str) -> bool:
    return any((c.job, c.script, c.event) == (job, script, "start") for c in target.vm.calls())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize(
    "job, script",
    [("director", "backup"), ("director", "pre-backup-lock")],
    ids=["during-backup", "during-lock"],
)
def test_interrupted_backup_releases_every_lock(target, tmp_path, sig, job, script):
    target.vm.set_fault(job, script, "hang")
    proc = target.start("backup", "--artifact-path", str(tmp_path))
    wait_for(lambda: started(target, job, script), what=f"{job} {script} to start")
    assert target.vm.locked_jobs()  # the director really is locked at this point

    code, _stdout, stderr = interrupt(proc, sig)

    assert code == 1, stderr
    assert f"Error: backup was interrupted by {sig.name}" in stderr
    assert "every job that was locked has been unlocked" in stderr
    assert target.vm.locked_jobs() == []
    locked = {c.job for c in target.vm.calls() if c.script == "pre-backup-lock"}
    unlocked = set(target.scripts_run("post-backup-unlock"))
    assert locked <= unlocked == ALL_JOBS
    assert set(target.unlock_env().values()) == {"false"}
    # The hung script was killed, not waited for.
    hung = [
        c.pid for c in target.vm.calls() if (c.job, c.script, c.event) == (job, script, "start")
    ]
    assert hung and not any(_alive(pid) for pid in hung)
    assert not target.work_dir().exists()
    assert list(tmp_path.glob(f"{target.name}_*")) == []  # no partial backup left behind either

    rows = target.bbrx.audit_rows()
    interrupt_row = next(r for r in rows if r["trigger"] == "interrupt")
    assert interrupt_row["detail"]["signal"] == sig.name
    assert interrupt_row["to_state"] == "unlocking"
    assert rows[-1]["to_state"] == "interrupted"
    assert target.bbrx("audit", "verify").code == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_interrupted_restore_unlocks_and_cleans(target, tmp_path):
    out = tmp_path / "backups"
    out.mkdir()
    assert target.director("backup", "--artifact-path", str(out)).code == 0
    [artifact] = list(out.iterdir())
    target.vm.clear_calls()
    target.vm.set_fault("blobstore", "restore", "hang")
    proc = target.start("restore", "--artifact-path", str(artifact))
    wait_for(lambda: started(target, "blobstore", "restore"), what="blobstore restore")

    code, _stdout, stderr = interrupt(proc, signal.SIGINT)

    assert code == 1, stderr
    assert "restore was interrupted by SIGINT" in stderr
    assert set(target.scripts_run("post-restore-unlock")) == ALL_JOBS
    assert target.vm.locked_jobs() == []
    assert not target.work_dir().exists()
    assert target.bbrx.audit_rows()[-1]["to_state"] == "interrupted"
