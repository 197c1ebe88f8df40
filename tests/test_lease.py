"""One run per target: a second process refuses at once; a dead owner's lease is taken over."""

from __future__ import annotations

import sqlite3
import subprocess

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
