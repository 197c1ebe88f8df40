"""Per-phase script timeouts: bbr waits forever on a hung script, with the director locked."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

ALL_JOBS = {"bbr-credhubdb", "blobstore", "director", "uaa"}


@pytest.mark.parametrize(
    "script, option, code, unlocked_with",
    [
        ("pre-backup-lock", "--lock-timeout", 4, "false"),
        ("backup", "--backup-timeout", 1, "false"),
        ("post-backup-unlock", "--unlock-timeout", 8, "true"),
    ],
)
def test_a_hung_script_is_killed_and_the_run_unlocks(
    target, tmp_path, script, option, code, unlocked_with
):
    target.vm.set_fault("director", script, "hang")
    started = time.monotonic()
    result = target.director(option, "1", "backup", "--artifact-path", str(tmp_path))
    elapsed = time.monotonic() - started

    assert result.code == code, result
    assert f"{script} script for job director on {target.address} failed: it was killed " in (
        result.stderr
    )
    assert "(timed out after 1 s)" in result.stderr
    assert elapsed < 60  # it did not wait for the hung script
    assert target.unlock_env() == {job: unlocked_with for job in ALL_JOBS}
    assert not target.work_dir().exists()
    row = next(r for r in target.bbrx.audit_rows() if r["outcome"] == "error" and r["job"])
    assert (row["job"], row["script"]) == ("director", script)
    assert row["detail"]["killed_by"] == "timed out after 1 s"
    assert row["exit_code"] is None
    # The hung script itself is gone from the VM, not just our side of it.
    pids = [
        c.pid
        for c in target.vm.calls()
        if (c.job, c.script, c.event) == ("director", script, "start")
    ]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)


def test_a_hung_restore_is_killed(target, tmp_path):
    out = tmp_path / "backups"
    out.mkdir()
    assert target.director("backup", "--artifact-path", str(out)).code == 0
    [artifact] = list(out.iterdir())
    target.vm.set_fault("blobstore", "restore", "hang")
    result = target.director("--restore-timeout", "1", "restore", "--artifact-path", str(artifact))
    assert result.code == 1, result
    assert "(timed out after 1 s)" in result.stderr
    assert set(target.scripts_run("post-restore-unlock")) == ALL_JOBS
    assert target.vm.locked_jobs() == []


def test_zero_means_no_limit(target, tmp_path):
    target.vm.set_fault("director", "backup", "sleep 2")
    result = target.director("--backup-timeout", "0", "backup", "--artifact-path", str(tmp_path))
    assert result.code == 0, result


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped by init does not count)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split()[2] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False
