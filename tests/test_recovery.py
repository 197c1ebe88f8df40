"""A run killed outright (SIGKILL): the audit log is the record, and the next run reads it."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sqlite3
import subprocess
import time

import pytest

from simulator.director import SimDirector, sim_root
from tests.conftest import BBRX, process_running, wait_for

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


# -- an audit log that cannot be written: the run refuses before discovery ------------------

NEEDS_ROOT = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root for a private mount namespace (unshare --mount)"
)


@pytest.fixture
def sim(bbrx, tmp_path):
    """A simulated director, and an audit log in a directory of its own (to mount over)."""
    SimDirector(sim_root(bbrx.home, "demo")).create()
    logs = tmp_path / "logs"
    logs.mkdir()
    bbrx.env["BBRX_AUDIT_DB"] = str(logs / "audit.db")
    bbrx.env["BBRX_AUDIT_BUSY_TIMEOUT"] = "0.3"
    return bbrx


def calls(bbrx) -> list:
    return SimDirector(sim_root(bbrx.home, "demo")).calls()


def backup_in_private_mount(bbrx, setup: str, out) -> subprocess.CompletedProcess[str]:
    """`setup` (mounts) then `bbrx director --host sim://demo backup`, in a mount namespace
    of its own: the mounts vanish with it and the host's are never touched."""
    bbrx_cmd = " ".join(shlex.quote(a) for a in BBRX)
    command = (
        f"{setup} && exec {bbrx_cmd} director --host sim://demo backup "
        f"--artifact-path {shlex.quote(str(out))}"
    )
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", command],
        capture_output=True,
        text=True,
        env=bbrx.environ(),
        cwd=bbrx.home,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def assert_refused_before_discovery(bbrx, result, before: int, *expected: str) -> None:
    assert result.returncode == 1, result
    for text in expected:
        assert text in result.stderr, result.stderr
    assert "internal error" not in result.stderr and "sqlite3." not in result.stderr
    assert len(calls(bbrx)) == before, "a script ran although the log could not be written"


@NEEDS_ROOT
def test_a_read_only_log_refuses_the_run(sim, tmp_path):
    assert sim("director", "--host", "sim://demo", "pre-backup-check").code == 0
    before = len(calls(sim))
    logs = tmp_path / "logs"
    result = backup_in_private_mount(sim, f"mount --bind -o ro {logs} {logs}", tmp_path)
    assert_refused_before_discovery(
        sim,
        result,
        before,
        f"Error: cannot open the audit log {logs}/audit.db: the file system holding {logs} is "
        "mounted read-only",
        "Make it writable (a remount, a chmod), or point --audit-db (BBRX_AUDIT_DB) at a "
        "writable file.",
    )


@NEEDS_ROOT
def test_a_full_disk_refuses_the_run(sim, tmp_path):
    logs = tmp_path / "logs"
    bbrx_cmd = " ".join(shlex.quote(a) for a in BBRX)
    setup = (
        f"mount -t tmpfs -o size=2m tmpfs {logs} && "
        f"{bbrx_cmd} director --host sim://demo pre-backup-check >/dev/null 2>&1 && "
        f"(dd if=/dev/zero of={logs}/fill bs=64k 2>/dev/null; true)"
    )
    result = backup_in_private_mount(sim, setup, tmp_path)
    locks = [c for c in calls(sim) if c.script == "pre-backup-lock"]
    assert result.returncode == 1, result
    assert f"the audit log {logs}/audit.db: the disk holding it is full" in result.stderr
    assert f"Free space on the file system of {logs}" in result.stderr
    assert "internal error" not in result.stderr
    assert locks == []
    # Discovery of the backup never started: only pre-backup-check's metadata scripts ran.
    assert len([c for c in calls(sim) if c.script == "metadata" and c.event == "start"]) == 4


def test_a_directory_or_a_non_database_refuses_the_run(sim, tmp_path):
    sim.env["BBRX_AUDIT_DB"] = str(tmp_path)
    result = sim("director", "--host", "sim://demo", "backup", "--artifact-path", str(tmp_path))
    directory = f"Error: cannot open the audit log {tmp_path}: it is a directory"
    assert_refused_before_discovery(sim, _completed(result), 0, directory)
    garbage = tmp_path / "logs" / "audit.db"
    garbage.write_bytes(b"these are my notes, not a database " * 200)
    sim.env["BBRX_AUDIT_DB"] = str(garbage)
    result = sim("director", "--host", "sim://demo", "backup", "--artifact-path", str(tmp_path))
    assert_refused_before_discovery(
        sim,
        _completed(result),
        0,
        f"Error: cannot open the audit log {garbage}: it is not a SQLite database",
        "move the file away so a new log can be created",
    )
    status = sim("status", "--host", "sim://demo")
    assert status.code == 1 and "it is not a SQLite database" in status.stderr, status


def test_a_locked_log_refuses_the_run_after_the_busy_timeout(sim, tmp_path):
    assert sim("director", "--host", "sim://demo", "pre-backup-check").code == 0
    before = len(calls(sim))
    db = tmp_path / "logs" / "audit.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        began = time.monotonic()
        result = sim("director", "--host", "sim://demo", "backup", "--artifact-path", str(tmp_path))
        took = time.monotonic() - began
        status = sim("status", "--host", "sim://demo")  # readers still read
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert_refused_before_discovery(
        sim,
        _completed(result),
        before,
        f"Error: cannot take the run's lease in the audit log {db}: another process has held "
        "its write lock for more than 0.3 s (the busy timeout)",
        f"`fuser {db}`",
        "BBRX_AUDIT_BUSY_TIMEOUT",
    )
    assert took < 20
    assert status.stdout.startswith("sim://demo: idle"), status


def test_a_live_run_is_in_progress_with_a_hash_in_the_log_path(sim, tmp_path):
    odd = tmp_path / "ops#1?x=y"
    odd.mkdir()
    sim.env["BBRX_AUDIT_DB"] = str(odd / "audit.db")
    SimDirector(sim_root(sim.home, "demo")).set_fault("director", "pre-backup-lock", "sleep 3")
    proc = sim.start("director", "--host", "sim://demo", "backup", "--artifact-path", str(tmp_path))
    wait_for(
        lambda: any(c.job == "director" and c.script == "pre-backup-lock" for c in calls(sim)),
        timeout=60,
        what="the director's lock",
    )
    status = sim("status", "--host", "sim://demo")
    _out, err = proc.communicate(timeout=120)
    assert status.code == 0, status
    assert "sim://demo: in progress: run " in status.stdout, status.stdout
    assert f"pid {proc.pid} on " in status.stdout
    assert proc.returncode == 0, err
    assert "lease" not in err.lower()  # given back, not left behind
    assert sim("status", "--host", "sim://demo").stdout.startswith("sim://demo: idle")


def _completed(result) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(result.args, result.code, result.stdout, result.stderr)


def test_a_killed_run_whose_rows_went_to_the_journal_is_still_recovered(target, tmp_path):
    """The log fails after every backup script started; the run unlocks into the journal
    and is killed while the director's unlock hangs. Status and the cleanup read the
    journal: the jobs not yet unlocked are named, and the hung unlock is ended by its pid."""
    from audit import read_journal
    from tests.test_fault_matrix import write_lock_held

    target.bbrx.env["BBRX_AUDIT_BUSY_TIMEOUT"] = "0.3"
    target.vm.set_fault("director", "backup", "sleep 1")
    target.vm.set_fault("director", "post-backup-unlock", "hang")
    proc = target.start("backup", "--artifact-path", str(tmp_path))
    wait_for(
        lambda: {"bbr-credhubdb", "blobstore", "director"} <= set(target.scripts_run("backup")),
        timeout=60,
        what="the backup scripts",
    )
    db = target.bbrx.audit_db

    def unlock_pid_journaled() -> bool:
        return any(
            (r["trigger"], r["job"]) == ("script_started", "director")
            and r["script"] == "post-backup-unlock"
            for r in read_journal(db).rows
        )

    with write_lock_held(db):
        wait_for(unlock_pid_journaled, timeout=60, what="the unlock's pid in the journal")
        time.sleep(0.5)  # the hung script prints its first line to a live bbrx (SIGPIPE)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    [hung] = [
        c
        for c in target.vm.calls()
        if (c.job, c.script, c.event) == ("director", "post-backup-unlock", "start")
    ]
    try:
        status = target.bbrx("status", "--host", target.host).stdout
        assert f"{target.address}: interrupted: run " in status, status
        assert "phase unlocking" in status
        assert "jobs that may still be locked: bbr-credhubdb, director, uaa" in status
        target.vm.clear_faults()
        target.stop_orphaned_ssh_master()
        cleanup = target.director("backup-cleanup")
        assert cleanup.code == 0, cleanup
        assert (
            f"Ended the post-backup-unlock script of job director (pid {hung.pid}) that run "
            in cleanup.stderr
        )
        assert target.vm.locked_jobs() == []
        assert target.bbrx("status", "--host", target.host).stdout.startswith(
            f"{target.address}: idle"
        )
        verify = target.bbrx("audit", "verify")
        assert verify.code == 0 and "OUTSIDE the hash chain" in verify.stdout, verify
        # The timeline a reviewer reads has the journaled rows too, marked as such.
        killed = target.bbrx.audit_runs()[0].run_id
        shown = target.bbrx("audit", "show", killed)
        assert shown.code == 0, shown
        journaled = [line for line in shown.stdout.splitlines() if line.startswith("journal ")]
        assert any("post-backup-unlock" in line for line in journaled), shown.stdout
        assert "in the fallback journal" in shown.stdout
        runs = target.bbrx("audit", "runs")
        assert runs.code == 0, runs
        assert "1 run(s) have events in the fallback journal" in runs.stdout
        assert killed in runs.stdout.splitlines()[-1]
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(hung.pid, signal.SIGKILL)


def test_status_shows_what_the_log_holds_escaped():
    from audit import RunSummary
    from orchestrator.state.recovery import INTERRUPTED, TargetState

    run = RunSummary(
        run_id="r1", operation="backup", target="sim://demo", mode="sim",
        operator="eve\nsim://demo: idle\x1b[2J", reason=None, start="2026-12-01T00:00:00Z",
        end="2026-12-01T00:00:01Z", events=3, outcome="locking", finished=False,
    )  # fmt: skip
    text = TargetState(
        "sim://demo", INTERRUPTED, run, "locking", None, ["dir\x1b]0;x\x07"]
    ).describe()
    assert "eve\\nsim://demo: idle\\x1b[2J" in text
    assert "dir\\x1b]0;x\\x07" in text
    assert "\x1b" not in text and text.count("\n") == 2  # only the lines describe itself makes


def test_a_kill_bbrx_fault_kills_the_run_at_that_phase_and_cleanup_recovers(bbrx, tmp_path):
    """The simulator's `kill-bbrx` fault: the bbrx running the script is SIGKILLed as the
    script exits (here the director's pre-backup-lock: the lock is taken, nothing more runs),
    and the audit log and a backup-cleanup make the director whole again."""
    vm = SimDirector(sim_root(bbrx.home, "demo"))
    vm.create()
    vm.set_fault("director", "pre-backup-lock", "call 1 kill-bbrx")
    killed = bbrx("director", "--host", "sim://demo", "backup", "--artifact-path", str(tmp_path))
    assert killed.code == -signal.SIGKILL, killed
    calls = [(c.job, c.script, c.event) for c in vm.calls()]
    assert calls[-1] == ("director", "pre-backup-lock", "exit")  # and nothing after it
    assert [c.rc for c in vm.calls()][-1] == 0
    assert set(vm.locked_jobs()) == {"bbr-credhubdb", "uaa", "director"}
    status = bbrx("status", "--host", "sim://demo")
    assert "sim://demo: interrupted: run " in status.stdout and "phase locking" in status.stdout
    assert bbrx("director", "--host", "sim://demo", "backup-cleanup").code == 0
    assert vm.locked_jobs() == []
    again = bbrx("director", "--host", "sim://demo", "backup", "--artifact-path", str(tmp_path))
    assert again.code == 0, again  # a `call 1` fault: the second call runs clean


def test_a_kill_bbrx_fault_signals_only_the_simulators_own_runner(tmp_path):
    """Run by anything but the simulator (here with a runner pid that is not its parent),
    the script refuses the fault and kills nothing."""
    vm = SimDirector(tmp_path / "vm")
    vm.create()
    vm.set_fault("uaa", "pre-backup-lock", "kill-bbrx")
    script = vm.root / "var/vcap/jobs/uaa/bin/bbr/pre-backup-lock"
    ran = subprocess.run(
        [str(script)],
        env={"PATH": os.environ["PATH"], "BBR_SIM_RUNNER_PID": "1"},
        capture_output=True,
        text=True,
    )
    assert ran.returncode == 70
    assert "kill-bbrx acts on the simulator's own runs only" in ran.stderr
    assert vm.locked_jobs() == []
