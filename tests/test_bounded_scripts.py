"""Bounded whatever the script does: daemons it leaves, output it floods, signals mid-start.

Real job scripts as real processes on both transports; what a user sees is asserted: the
exit code, the error text, the audit rows, the scripts' own call log, and whether a process
a script started is still running afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from orchestrator.transport.instance import ScriptCall
from simulator.director import SimDirector
from simulator.instance import SimInstance
from tests.conftest import interrupt, process_running, wait_for

ALL_JOBS = {"bbr-credhubdb", "blobstore", "director", "uaa"}

# The simulated jobs' own prelude: the call log's start and exit lines, and faults.
PRELUDE = """#!/usr/bin/env bash
set -uo pipefail
ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../../../../../.." && pwd)"
# shellcheck source=/dev/null
source "${ROOT%/}/var/vcap/packages/bbr-sim/lib.sh"
sim_begin
RUN="${ROOT%/}/var/vcap/sys/run"
mkdir -p "$RUN"
"""


def write_script(vm_root: Path, job: str, script: str, body: str, prelude: str = PRELUDE) -> None:
    path = vm_root / "var/vcap/jobs" / job / "bin/bbr" / script
    path.write_text(prelude + body)
    path.chmod(0o755)


def pid_in(target, name: str) -> int:
    path = target.vm.root / "var/vcap/sys/run" / name
    wait_for(path.exists, timeout=10, what=str(path))
    return int(path.read_text())


def kill_if_running(pid: int) -> None:
    if process_running(pid):
        os.kill(pid, signal.SIGKILL)


def test_a_lock_that_leaves_a_daemon_and_hangs_is_ended_with_its_daemon(target, tmp_path):
    write_script(
        target.vm.root,
        "uaa",
        "pre-backup-lock",
        # A daemon in a session of its own, holding the script's stdout and stderr.
        'sim_lock\nsetsid sleep 1000 &\necho $! > "$RUN/daemon.pid"\nwhile :; do sleep 1; done\n',
    )
    started = time.monotonic()
    result = target.director("--lock-timeout", "2", "backup", "--artifact-path", str(tmp_path))
    elapsed = time.monotonic() - started
    daemon = pid_in(target, "daemon.pid")
    try:
        assert result.code == 4, result
        assert "pre-backup-lock script for job uaa" in result.stderr
        assert "(timed out after 2 s)" in result.stderr
        assert elapsed < 30, result
        assert not process_running(daemon), "the daemon outlived the lock's timeout"
        assert target.vm.locked_jobs() == []
        assert set(target.scripts_run("post-backup-unlock")) == ALL_JOBS
        row = next(r for r in target.bbrx.audit_rows() if r["trigger"] == "lock_error")
        assert row["job"] == "uaa"
        assert row["detail"]["killed_by"] == "timed out after 2 s"
    finally:
        kill_if_running(daemon)


def test_a_script_that_exits_0_leaving_a_child_on_its_stdout_is_reported_by_its_exit(
    target, tmp_path
):
    write_script(
        target.vm.root,
        "uaa",
        "pre-backup-lock",
        'sim_lock\nsleep 1000 &\necho $! > "$RUN/child.pid"\nexit 0\n',
    )
    started = time.monotonic()
    result = target.director("--lock-timeout", "60", "backup", "--artifact-path", str(tmp_path))
    elapsed = time.monotonic() - started
    child = pid_in(target, "child.pid")
    try:
        assert result.code == 0, result
        assert elapsed < 40, result
        assert (
            "uaa/pre-backup-lock on "
            f"{target.address} exited 0, but a process it started still holds its output: "
            "bbrx stopped reading it and ended it"
        ) in result.stderr
        # A lock script's leftover would run on with the director locked, and past the
        # unlock: it is ended.
        assert not process_running(child)
        row = next(
            r for r in target.bbrx.audit_rows() if (r["trigger"], r["job"]) == ("lock_ok", "uaa")
        )
        assert row["exit_code"] == 0
        assert row["duration"] < 10
        assert target.vm.locked_jobs() == []
    finally:
        kill_if_running(child)


def test_an_unlock_scripts_background_service_is_left_running(target, tmp_path):
    write_script(
        target.vm.root,
        "uaa",
        "post-backup-unlock",
        'sim_unlock\nsetsid sleep 1000 &\necho $! > "$RUN/service.pid"\n',
    )
    result = target.director("backup", "--artifact-path", str(tmp_path))
    service = pid_in(target, "service.pid")
    try:
        assert result.code == 0, result
        assert "still holds its output: bbrx stopped reading it (left running)" in result.stderr
        assert process_running(service)  # an unlock may rightly start a service
    finally:
        kill_if_running(service)


def test_an_8_mb_stderr_line_is_capped_in_the_error_and_the_audit_row(target, tmp_path):
    write_script(
        target.vm.root,
        "uaa",
        "pre-backup-lock",
        "head -c 8000000 /dev/zero | tr '\\0' x >&2\necho ' the end' >&2\nexit 3\n",
    )
    result = target.director("backup", "--artifact-path", str(tmp_path))
    assert result.code == 4, result
    assert "pre-backup-lock script for job uaa" in result.stderr
    assert "failed: it exited 3\n  stderr: [" in result.stderr
    assert " bytes cut] xxx" in result.stderr
    assert "x the end" in result.stderr
    assert len(result.stderr) < 16_000, len(result.stderr)
    row = next(r for r in target.bbrx.audit_rows() if r["trigger"] == "lock_error")
    assert row["job"] == "uaa"
    assert len(row["detail"]["stderr_tail"]) < 4200
    assert row["detail"]["stderr_tail"].endswith("x the end")
    assert target.bbrx.audit_db.stat().st_size < 2 << 20
    assert target.vm.locked_jobs() == []


def test_metadata_that_prints_more_than_1_mib_is_refused(target, tmp_path):
    write_script(target.vm.root, "uaa", "metadata", "head -c 2000000 /dev/zero | tr '\\0' '#'\n")
    result = target.director("backup", "--artifact-path", str(tmp_path))
    assert result.code == 1, result
    assert f"metadata script for job uaa on {target.address} printed more than 1 MiB" in (
        result.stderr
    )
    assert target.scripts_run("pre-backup-lock") == []


def make_jobs(vm_root: Path, count: int) -> list[str]:
    """`count` more jobs like uaa (locked before director, so all in one level with it)."""
    jobs = vm_root / "var/vcap/jobs"
    names = [f"extra{number:02d}" for number in range(1, count + 1)]
    for name in names:
        shutil.copytree(jobs / "uaa", jobs / name, symlinks=True)
    return names


def test_no_lock_script_starts_once_the_run_is_interrupted(target, tmp_path):
    extra = make_jobs(target.vm.root, 12)
    level = sorted({"bbr-credhubdb", "blobstore", "uaa", *extra})
    for job in level:
        target.vm.set_fault(job, "pre-backup-lock", "sleep 4")
    proc = target.start("backup", "--artifact-path", str(tmp_path))
    # The pool has 8 workers: 8 locks run, each for 4 s, when the signal comes.
    wait_for(lambda: len(target.scripts_run("pre-backup-lock")) >= 8, what="8 locks")
    code, _, stderr = interrupt(proc, signal.SIGINT)
    assert code == 1, stderr
    assert "SIGINT received: stopping" in stderr
    locked = target.scripts_run("pre-backup-lock")
    assert len(locked) == 8, locked  # none of the other 7 of the level, nor director's
    assert "director" not in locked
    assert target.vm.locked_jobs() == []
    # Every job that may have been locked is unlocked, the ones never locked too (bbr does).
    assert set(locked) <= set(target.scripts_run("post-backup-unlock"))
    rows = target.bbrx.audit_rows()
    intents = [r["job"] for r in rows if r["trigger"] == "lock"]
    assert sorted(intents) == sorted(locked)
    assert rows[-1]["to_state"] == "interrupted"


def test_no_restore_lock_starts_once_a_restore_is_interrupted(target, tmp_path):
    backups = tmp_path / "backups"
    backups.mkdir()
    backup = target.director("backup", "--artifact-path", str(backups))
    assert backup.code == 0, backup
    [artifact] = list(backups.iterdir())
    before = len(target.scripts_run("pre-restore-lock"))
    for job in ("bbr-credhubdb", "blobstore", "uaa"):
        target.vm.set_fault(job, "pre-restore-lock", "sleep 4")
    proc = target.start("restore", "--artifact-path", str(artifact))
    wait_for(
        lambda: len(target.scripts_run("pre-restore-lock")) > before, what="the first restore lock"
    )
    code, _, stderr = interrupt(proc, signal.SIGINT)
    assert code == 1, stderr
    # Serial, as bbr locks for a restore: the one under way, none after it.
    assert len(target.scripts_run("pre-restore-lock")) == before + 1
    assert target.vm.locked_jobs() == []


@pytest.mark.parametrize("target", ["sim", "ssh"], indirect=True)
def test_a_script_without_a_shebang_runs_with_sh(target, tmp_path):
    write_script(
        target.vm.root,
        "uaa",
        "pre-backup-lock",
        'root=$(cd "$(dirname "$0")/../../../../../.." && pwd)\n'
        'mkdir -p "${root%/}/var/vcap/sys/run"\n'
        'echo "$0" > "${root%/}/var/vcap/sys/run/no-shebang"\n',
        prelude="",
    )
    result = target.director("backup", "--artifact-path", str(tmp_path))
    assert result.code == 0, result
    ran = target.vm.root / "var/vcap/sys/run/no-shebang"
    assert ran.read_text().strip().endswith("jobs/uaa/bin/bbr/pre-backup-lock")


@pytest.mark.parametrize("target", ["sim"], indirect=True)
def test_a_script_that_cannot_start_says_why(target, tmp_path):
    write_script(target.vm.root, "uaa", "pre-backup-lock", "", prelude="#!/no/such/shell\n")
    result = target.director("backup", "--artifact-path", str(tmp_path))
    assert result.code == 4, result
    assert "pre-backup-lock script for job uaa on sim://demo could not be started: " in (
        result.stderr
    )
    assert "No such file or directory" in result.stderr
    assert "exited None" not in result.stderr


def test_a_script_asked_not_to_start_at_the_last_moment_does_not(tmp_path):
    vm = SimDirector(tmp_path / "vm")
    vm.create()
    instance = SimInstance(vm)
    result = instance.run_script(ScriptCall("uaa", "pre-backup-lock", may_start=lambda: False))
    assert result.exit_code is None
    assert result.killed_by == "not started (run interrupted)"
    assert vm.calls() == []
    assert vm.locked_jobs() == []


def test_a_cleanup_after_a_killed_run_ends_the_daemons_its_scripts_started(target, tmp_path):
    """bbrx is SIGKILLed while a lock script hangs, having started a daemon in a session of
    its own. The cleanup finds both by what the audit log holds (the script's pid and its
    BBRX_SCRIPT_ID) and ends them before it unlocks."""
    write_script(
        target.vm.root,
        "uaa",
        "pre-backup-lock",
        'sim_lock\nsetsid sleep 1000 >/dev/null 2>&1 &\necho $! > "$RUN/daemon.pid"\n'
        "while :; do sleep 1; done\n",
    )
    proc = target.start("backup", "--artifact-path", str(tmp_path))
    daemon = pid_in(target, "daemon.pid")
    hung: list[int] = []
    try:
        wait_for(lambda: target.pid_recorded("uaa", "pre-backup-lock"), what="the lock's pid row")
        row = next(r for r in target.bbrx.audit_rows() if r["trigger"] == "script_started")
        assert len(row["detail"]["marker"]) == 32  # recorded with the pid
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        hung = [c.pid for c in target.vm.calls() if (c.job, c.script) == ("uaa", "pre-backup-lock")]
        assert process_running(daemon)
        target.stop_orphaned_ssh_master()

        cleanup = target.director("backup-cleanup")
        assert cleanup.code == 0, cleanup
        assert "Ended the pre-backup-lock script of job uaa" in cleanup.stderr
        assert not process_running(daemon), "the daemon outlived the cleanup"
        assert target.vm.locked_jobs() == []
    finally:
        kill_if_running(daemon)
        for pid in hung:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
