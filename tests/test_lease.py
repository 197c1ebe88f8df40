"""One run per target: a second process refuses at once; a dead owner's lease is taken over."""

from __future__ import annotations

import sqlite3
import subprocess

import pytest

from tests.conftest import wait_for


def test_two_runs_at_once_exactly_one_runs(target, tmp_path):
    target.vm.set_fault("director", "pre-backup-lock", "sleep 3")
    first = target.start("backup", "--artifact-path", str(tmp_path))
    wait_for(lambda: "director" in target.scripts_run("pre-backup-lock"), what="the first run")
    second = target.director("backup", "--artifact-path", str(tmp_path))
    _out, first_err = first.communicate(timeout=120)

    assert first.returncode == 0, first_err
    assert second.code == 1, second
    assert f"Error: {target.address} is busy: run " in second.stderr
    assert f"pid {first.pid}" in second.stderr
    # The second run touched nothing: every lock script ran once, for the first run.
    locks = target.scripts_run("pre-backup-lock")
    assert sorted(locks) == sorted(set(locks))
    assert len(list(tmp_path.glob(f"{target.name}_*"))) == 1
    assert target.bbrx("audit", "verify").code == 0


def test_a_dead_owners_lease_is_taken_over(target, tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert target.director("pre-backup-check").code == 0  # creates the audit log
    with sqlite3.connect(target.bbrx.audit_db) as db:
        db.execute(
            "INSERT INTO leases VALUES (?, 'old-run', 'backup', 'someone', ?, "
            "(SELECT host FROM (SELECT ? AS host)), '2026-01-01T00:00:00.000000Z', "
            "strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
            (target.address, gone.pid, _hostname()),
        )
    result = target.director("backup", "--artifact-path", str(tmp_path))
    assert result.code == 0, result
    assert "Taking over the stale lease" in result.stderr
    with sqlite3.connect(target.bbrx.audit_db) as db:
        assert db.execute("SELECT count(*) FROM leases").fetchone() == (0,)


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _now_iso() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_holder_alive_reads_proc_stat_after_the_process_name(tmp_path):
    """A name with spaces and parentheses must not shift the state field (a zombie
    named 'x (y) z' would otherwise read as state '(y)', alive)."""
    import shutil
    import socket

    from orchestrator.state.lease import holder_alive

    odd = tmp_path / "x (y) z"
    shutil.copy("/bin/sleep", odd)
    odd.chmod(0o755)
    running = subprocess.Popen([str(odd), "30"])
    ended = subprocess.Popen([str(odd), "0"])
    try:
        wait_for(lambda: "Z" in _stat_state(ended.pid), what="a zombie")
        beat, host = _now_iso(), socket.gethostname()
        assert holder_alive(running.pid, host, beat)
        assert not holder_alive(ended.pid, host, beat)
    finally:
        running.kill()
        running.wait()
        ended.wait()


def _stat_state(pid: int) -> str:
    from pathlib import Path

    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_lease_that_cannot_be_given_back_only_warns(tmp_path, caplog):
    from orchestrator.state import lease

    db = tmp_path / "audit.db"
    with lease.hold(db, "sim://demo", "run-1", "backup", "alice", busy_timeout=0.2):
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # the log stopped being writable mid-run
    other.execute("ROLLBACK")
    other.close()
    assert "Could not remove the lease of sim://demo" in caplog.text
    assert "the next run takes it over" in caplog.text
    assert lease.read(db, "sim://demo")["run_id"] == "run-1"


def test_a_locked_database_refuses_the_lease_with_the_cause(tmp_path):
    from audit import AuditError
    from orchestrator.state import lease

    db = tmp_path / "audit.db"
    with lease.hold(db, "sim://demo", "run-0", "backup", "alice"):
        pass  # creates the table
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with (
            pytest.raises(AuditError) as caught,
            lease.hold(db, "sim://demo", "run-1", "backup", "alice", busy_timeout=0.2),
        ):
            pass
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert f"cannot take the run's lease in the audit log {db}: another process" in str(
        caught.value
    )


def test_a_lease_is_found_with_a_hash_or_question_mark_in_the_path(tmp_path):
    from orchestrator.state import lease

    db = tmp_path / "ops#2?mode=rw" / "audit.db"
    with lease.hold(db, "sim://demo", "run-7", "backup", "alice"):
        assert lease.read(db, "sim://demo")["run_id"] == "run-7"
    assert lease.read(db, "sim://demo") is None


def test_a_live_holder_whose_heartbeats_stalled_still_holds_and_a_reused_pid_does_not():
    """Heartbeats stall while another writer holds the database; on this jump box the
    process itself says whether the lease's owner still runs."""
    from orchestrator.state.lease import holder_alive

    holder = subprocess.Popen(["sleep", "30"])
    try:
        stalled = "2020-01-01T00:00:00.000000Z"
        assert holder_alive(holder.pid, _hostname(), stalled, _now_iso())
        # A lease acquired long before this process started was some earlier process's.
        assert not holder_alive(holder.pid, _hostname(), stalled, stalled)
        # Another jump box: only the heartbeat can tell.
        assert not holder_alive(holder.pid, "another-jumpbox", stalled, _now_iso())
        assert holder_alive(holder.pid, "another-jumpbox", _now_iso(), _now_iso())
    finally:
        holder.kill()
        holder.wait()
