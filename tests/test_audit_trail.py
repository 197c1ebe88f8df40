"""The audit trail of real runs, through `bbrx audit ...` and a plain sqlite3 connection."""

from __future__ import annotations

import shutil
import sqlite3

import pytest


@pytest.fixture
def audited(target, tmp_path):
    """A backup and a backup-cleanup, by a named operator with a reason."""
    out = tmp_path / "backups"
    out.mkdir()
    result = target.bbrx(
        "--operator",
        "alice",
        "--reason",
        "CHG-1234 quarterly drill",
        "director",
        "--host",
        target.host,
        *target.extra_args,
        "backup",
        "--artifact-path",
        str(out),
    )
    assert result.code == 0, result
    assert target.director("--reason", "after the drill", "backup-cleanup").code == 0
    return target


def test_runs_and_show(audited):
    bbrx = audited.bbrx
    runs = bbrx("audit", "runs")
    assert runs.code == 0, runs
    lines = runs.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["RUN", "OPERATION", "TARGET"]
    assert len(lines) == 3
    backup_line, cleanup_line = lines[1], lines[2]
    for word in ("backup", audited.address, "alice", "succeeded", "CHG-1234"):
        assert word in backup_line
    assert "backup-cleanup" in cleanup_line and "trainee@test" in cleanup_line

    run_id = backup_line.split()[0]
    shown = bbrx("audit", "show", run_id[:20])
    assert shown.code == 0, shown
    assert "pre-backup-lock" in shown.stdout and "succeeded" in shown.stdout
    rows = bbrx.audit_rows(run_id)
    assert {r["reason"] for r in rows} == {"CHG-1234 quarterly drill"}
    assert len(shown.stdout.strip().splitlines()) == len(rows) + 1

    unknown = bbrx("audit", "show", "nope")
    assert unknown.code == 1
    assert "nope" in unknown.stderr


def test_verify_passes_on_an_intact_log(audited):
    result = audited.bbrx("audit", "verify")
    assert result.code == 0, result
    count = len(audited.bbrx.audit_rows()) + len(
        audited.bbrx.audit_rows(audited.bbrx.audit_runs()[0].run_id)
    )
    assert f"intact: {count} events" in result.stdout
    # The verify itself is recorded right after what it verified.
    assert "this read is recorded in the audit log: run " in result.stdout
    assert result.stdout.rstrip().endswith(f"seq {count + 1}")


APPENDS_ONLY = [
    "UPDATE events SET outcome = 'ok' WHERE seq = 3",
    "DELETE FROM events WHERE seq = 3",
    "INSERT OR REPLACE INTO events SELECT * FROM events WHERE seq = 3",
    "DELETE FROM events",
]


def test_append_only_even_for_plain_sqlite3(audited):
    """Each statement is refused on the same log (one real run's rows serve them all)."""
    db = audited.bbrx.audit_db
    before = sqlite3.connect(db).execute("SELECT * FROM events ORDER BY seq").fetchall()
    for statement in APPENDS_ONLY:
        connection = sqlite3.connect(db)
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            connection.execute(statement)
            connection.commit()
        connection.close()
        after = sqlite3.connect(db).execute("SELECT * FROM events ORDER BY seq").fetchall()
        assert after == before, statement
    assert audited.bbrx("audit", "verify").code == 0


def tamper(db, *statements: str) -> None:
    connection = sqlite3.connect(db)
    names = [
        r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type='trigger'")
    ]
    for name in names:
        connection.execute(f"DROP TRIGGER {name}")
    for statement in statements:
        connection.execute(statement)
    connection.commit()
    # Put the guards back, so only the hash chain can tell.
    connection.close()


def restore_triggers(db) -> None:
    from audit.schema import TRIGGERS

    connection = sqlite3.connect(db)
    for sql in TRIGGERS.values():
        connection.execute(sql)
    connection.commit()
    connection.close()


TAMPERINGS = {
    "edited": (["UPDATE events SET operator = 'mallory' WHERE seq = 7"], 7, "edited"),
    "deleted": (["DELETE FROM events WHERE seq = 9"], 9, "deleted"),
    "reordered": (
        [
            "UPDATE events SET seq = -1 WHERE seq = 5",
            "UPDATE events SET seq = 5 WHERE seq = 6",
            "UPDATE events SET seq = 6 WHERE seq = -1",
        ],
        5,
        "prev_hash",
    ),
}


def test_verify_catches_tampering(audited, tmp_path):
    """Each tampering, on a fresh copy of one real run's log: verify names the row; and a
    log whose guards were dropped says so."""
    db = audited.bbrx.audit_db
    pristine = tmp_path / "pristine.db"
    shutil.copyfile(db, pristine)
    for name, (statements, bad_seq, words) in TAMPERINGS.items():
        shutil.copyfile(pristine, db)
        tamper(db, *statements)
        restore_triggers(db)
        result = audited.bbrx("audit", "verify")
        assert result.code == 1, (name, result)
        assert f"seq {bad_seq}" in result.stderr, name
        assert words in result.stderr, name
        assert "BROKEN" in result.stderr, name
    shutil.copyfile(pristine, db)
    tamper(db)  # the guards dropped, nothing else
    result = audited.bbrx("audit", "verify")
    assert result.code == 1, result
    assert "append-only triggers missing" in result.stderr


def test_verify_ties_a_backup_to_its_run(audited, tmp_path):
    [artifact] = list((tmp_path / "backups").iterdir())
    ok = audited.bbrx("audit", "verify", "--artifact", str(artifact))
    assert ok.code == 0, ok
    assert "is tied to run" in ok.stdout
    # The same backup checked against another (intact) audit log: no such event there.
    other_db = tmp_path / "other.db"
    made = audited.bbrx(
        "--audit-db",
        str(other_db),
        "director",
        "--host",
        audited.host,
        *audited.extra_args,
        "pre-backup-check",
    )
    assert made.code == 0, made
    other = audited.bbrx(
        "--audit-db", str(other_db), "audit", "verify", "--artifact", str(artifact)
    )
    assert other.code == 1, other
    assert "but " in other.stderr and "has no such event" in other.stderr


def test_audit_db_option_and_env(target, tmp_path):
    db = tmp_path / "elsewhere" / "trail.db"
    result = target.bbrx(
        "--audit-db",
        str(db),
        "director",
        "--host",
        target.host,
        *target.extra_args,
        "pre-backup-check",
    )
    assert result.code == 0, result
    assert db.exists()
    target.bbrx.env["BBRX_AUDIT_DB"] = str(db)
    runs = target.bbrx("audit", "runs")
    assert "pre-backup-check" in runs.stdout


def test_missing_audit_log_is_a_clear_error(bbrx):
    result = bbrx("audit", "runs")
    assert result.code == 1
    assert "no audit log at" in result.stderr
    assert not bbrx.audit_db.exists()
