"""Tests of the standalone audit package, against real SQLite files."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

# Submodules, not the package: the editable install may map `audit` as a namespace
# package (it was installed before audit/__init__.py existed), and submodule imports
# work either way. test_public_api_is_reexported checks the package-level names.
from audit.errors import AuditError
from audit.log import AppendedEvent, AuditLog, RunSummary
from audit.render import format_runs, format_timeline
from audit.schema import EVENT_COLUMNS, HASHED_COLUMNS, TERMINAL_STATES, TRIGGERS, row_hash
from audit.verify import verify_log

REPO_ROOT = Path(__file__).resolve().parent.parent
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

BASE: dict[str, Any] = {
    "operation": "backup",
    "target": "director-1",
    "mode": "sim",
    "operator": "alice",
    "origin_host": "laptop",
    "reason": "nightly",
    "tool_version": "0.1.0",
}


def add(log: AuditLog, run_id: str = "run-aaaa", **overrides: Any) -> AppendedEvent:
    fields: dict[str, Any] = {
        **BASE,
        "run_id": run_id,
        "from_state": "idle",
        "to_state": "running",
        "trigger": "start",
        **overrides,
    }
    return log.append(**fields)


def filled(path: Path, n: int) -> Path:
    with AuditLog(path) as log:
        for i in range(n):
            add(log, run_id=f"run-{i // 3}", detail={"i": i})
    return path


def raw(path: Path) -> sqlite3.Connection:
    # What a tamperer has: a plain connection with no help from the audit package.
    return sqlite3.connect(path, isolation_level=None)


def tamper(path: Path, *statements: str) -> None:
    conn = raw(path)
    try:
        for sql in statements:
            conn.execute(sql)
    finally:
        conn.close()


def drop_all_triggers(path: Path) -> None:
    tamper(path, *(f"DROP TRIGGER {name}" for name in TRIGGERS))


def rows(path: Path) -> list[tuple[Any, ...]]:
    conn = raw(path)
    try:
        return conn.execute("SELECT * FROM events ORDER BY seq").fetchall()
    finally:
        conn.close()


# -- schema --------------------------------------------------------------------------------


def test_event_columns_are_the_documented_schema_in_order(tmp_path: Path) -> None:
    names = [c[0] for c in EVENT_COLUMNS]
    assert names == [
        "seq", "ts", "run_id", "operation", "target", "mode", "operator", "origin_host",
        "reason", "from_state", "to_state", "trigger", "job", "script", "outcome",
        "exit_code", "duration", "detail", "tool_version", "prev_hash", "hash",
        "instance_group", "instance_index", "instance_id",
    ]  # fmt: skip
    assert all(len(c) == 3 and c[2] for c in EVENT_COLUMNS)
    AuditLog(tmp_path / "a.db").close()
    conn = raw(tmp_path / "a.db")
    info = conn.execute("PRAGMA table_info(events)").fetchall()
    assert [(r[1], r[2]) for r in info] == [(c[0], c[1]) for c in EVENT_COLUMNS]
    assert [r[1] for r in info if r[5]] == ["seq"]
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("2",)
    assert frozenset({"succeeded", "failed", "interrupted", "recovered"}) == TERMINAL_STATES


def test_row_hash_is_sha256_of_canonical_json() -> None:
    row: dict[str, Any] = {name: None for name in HASHED_COLUMNS}
    row.update(
        seq=12345678901234,
        ts="2026-11-23T23:01:02.123456Z",
        reason='héllo "quoted" \\ \n\t\x01 \u2028 日本 😀',
        duration=0.1 + 0.2,
        exit_code=-3,
        detail='{"a":[1,2]}',
        prev_hash="0" * 64,
        hash="ignored",
    )
    expected_text = json.dumps(
        {k: row[k] for k in HASHED_COLUMNS},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    assert row_hash(row) == hashlib.sha256(expected_text.encode()).hexdigest()
    assert row_hash({**row, "hash": "other"}) == row_hash(row)
    assert row_hash({**row, "seq": 1}) != row_hash(row)


def test_public_api_is_reexported() -> None:
    # A fresh interpreter in the repo root imports the real package, whatever the
    # editable install's mapping says.
    code = (
        "import audit, audit.log, audit.verify, audit.schema, audit.errors\n"
        "from audit import (AuditLog, AuditError, AppendedEvent, RunSummary, VerifyReport,\n"
        "    verify_log, EVENT_COLUMNS, TERMINAL_STATES)\n"
        "assert AuditLog is audit.log.AuditLog and verify_log is audit.verify.verify_log\n"
        "assert AuditError is audit.errors.AuditError and issubclass(AuditError, Exception)\n"
        "assert VerifyReport is audit.verify.VerifyReport\n"
        "assert EVENT_COLUMNS is audit.schema.EVENT_COLUMNS\n"
        "assert sorted(audit.__all__) == sorted(n for n in audit.__all__ if hasattr(audit, n))\n"
        "print('ok', len(audit.__all__))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok ")


# -- round trip ----------------------------------------------------------------------------


def test_append_head_event_runs_timeline_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "audit.db"
    with AuditLog(path) as log:
        assert log.head() is None
        assert log.runs() == []
        first = add(log, from_state=None, to_state="running")
        job = add(
            log,
            from_state="pending",
            to_state="backed-up",
            trigger="run_script",
            job="bbr-director",
            script="backup",
            outcome="error",
            exit_code=1,
            duration=2,
            detail={"stderr_tail": "disk full", "n": [1, 2]},
        )
        last = add(log, from_state="running", to_state="failed", trigger="fail")
        other = add(log, run_id="run-bbbb", operation="restore", to_state="running")

        assert (first.seq, job.seq, last.seq, other.seq) == (1, 2, 3, 4)
        assert TS_RE.match(first.ts)
        assert re.fullmatch(r"[0-9a-f]{64}", first.hash)
        assert log.head() == other

        ev = log.event(2)
        assert ev is not None
        assert ev["detail"] == {"stderr_tail": "disk full", "n": [1, 2]}
        assert ev["prev_hash"] == first.hash
        assert ev["hash"] == job.hash
        assert ev["duration"] == 2.0 and isinstance(ev["duration"], float)
        assert (ev["job"], ev["script"], ev["outcome"], ev["exit_code"]) == (
            "bbr-director",
            "backup",
            "error",
            1,
        )
        assert log.event(99) is None

        runs = log.runs()
        assert runs == [
            RunSummary(
                run_id="run-aaaa",
                operation="backup",
                target="director-1",
                mode="sim",
                operator="alice",
                reason="nightly",
                start=first.ts,
                end=last.ts,
                events=3,
                outcome="failed",
                finished=True,
            ),
            RunSummary(
                run_id="run-bbbb",
                operation="restore",
                target="director-1",
                mode="sim",
                operator="alice",
                reason="nightly",
                start=other.ts,
                end=other.ts,
                events=1,
                outcome="running",
                finished=False,
            ),
        ]
        timeline = log.timeline("run-aaaa")
        assert [r["seq"] for r in timeline] == [1, 2, 3]
        assert [r["to_state"] for r in timeline] == ["running", "backed-up", "failed"]
        assert set(timeline[0]) == {c[0] for c in EVENT_COLUMNS}
    assert verify_log(path).ok


def test_run_outcome_ignores_job_level_rows(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.db") as log:
        add(log, to_state="succeeded")
        add(log, to_state="failed", job="late-job")
        (run,) = log.runs()
    assert (run.outcome, run.finished, run.events) == ("succeeded", True, 2)


def test_appends_survive_reopen_and_chain_continues(tmp_path: Path) -> None:
    path = filled(tmp_path / "a.db", 3)
    with AuditLog(path) as log:
        ev = add(log)
        assert ev.seq == 4
        previous, current = log.event(3), log.event(4)
        assert previous is not None and current is not None
        assert current["prev_hash"] == previous["hash"]
    report = verify_log(path)
    assert (report.ok, report.count, report.head_seq, report.head_hash) == (True, 4, 4, ev.hash)


def test_invalid_append_is_refused_and_appends_nothing(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.db") as log:
        with pytest.raises(AuditError, match="mode must be one of live, review, sim"):
            add(log, mode="production")
        with pytest.raises(AuditError, match="outcome must be one of"):
            add(log, outcome="maybe")
        with pytest.raises(AuditError, match="run_id must not be empty"):
            add(log, run_id="")
        with pytest.raises(AuditError, match="not JSON-serialisable"):
            add(log, detail={"x": object()})
        with pytest.raises(AuditError, match="duration must be finite"):
            add(log, duration=float("nan"))
        assert log.head() is None


# -- run prefixes --------------------------------------------------------------------------


def test_timeline_accepts_unique_prefix_and_exact_id(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.db") as log:
        add(log, run_id="abc")
        add(log, run_id="abcdef")
        add(log, run_id="xyz-123")
        assert [r["run_id"] for r in log.timeline("xy")] == ["xyz-123"]
        assert [r["seq"] for r in log.timeline("abcd")] == [2]
        # An exact id wins even though it is also a prefix of another run.
        assert [r["seq"] for r in log.timeline("abc")] == [1]


def test_timeline_prefix_errors_name_the_prefix_and_candidates(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    with AuditLog(path) as log:
        add(log, run_id="run-1111")
        add(log, run_id="run-2222")
        with pytest.raises(AuditError) as none:
            log.timeline("nope")
        assert "'nope'" in str(none.value) and str(path) in str(none.value)
        with pytest.raises(AuditError) as several:
            log.timeline("run-")
        message = str(several.value)
        assert "'run-'" in message and "run-1111" in message and "run-2222" in message
        with pytest.raises(AuditError):
            log.timeline("")


# -- concurrency ---------------------------------------------------------------------------


def test_threads_share_one_log_safely(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    errors: list[BaseException] = []
    with AuditLog(path) as log:

        def worker(n: int) -> None:
            try:
                for i in range(50):
                    add(log, run_id=f"thread-{n}", detail={"i": i})
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert sorted(r.events for r in log.runs()) == [50, 50, 50, 50]
    assert [r[0] for r in rows(path)] == list(range(1, 201))
    report = verify_log(path)
    assert (report.ok, report.count) == (True, 200)


def test_two_logs_on_one_file_interleave_into_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    with AuditLog(path) as one, AuditLog(path) as two:
        for i in range(10):
            assert add(one, run_id="one").seq == 2 * i + 1
            assert add(two, run_id="two").seq == 2 * i + 2
        assert one.head() == two.head()
    report = verify_log(path)
    assert (report.ok, report.count) == (True, 20)


def test_processes_appending_concurrently_keep_a_valid_chain(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    AuditLog(path).close()
    script = (
        "import sys\n"
        "from audit import AuditLog\n"
        "with AuditLog(sys.argv[1]) as log:\n"
        "    for i in range(40):\n"
        "        log.append(run_id=sys.argv[2], operation='backup', target='d', mode='live',\n"
        "                   operator='o', origin_host='h', reason='r', from_state='a',\n"
        "                   to_state='b', trigger='t', tool_version='1')\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(path), f"p{n}"], cwd=REPO_ROOT)
        for n in range(3)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    report = verify_log(path)
    assert (report.ok, report.count) == (True, 120)


# -- append-only triggers ------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE events SET reason = 'changed' WHERE seq = 2",
        "DELETE FROM events WHERE seq = 2",
        "INSERT OR REPLACE INTO events SELECT * FROM events WHERE seq = 2",
        "INSERT INTO events (seq, ts, run_id, operation, target, mode, operator, origin_host,"
        " to_state, trigger, outcome, tool_version, prev_hash, hash)"
        " VALUES (5, 't', 'r', 'o', 't', 'sim', 'o', 'h', 's', 't', 'ok', 'v', 'p', 'h')",
        "INSERT INTO events (ts, run_id, operation, target, mode, operator, origin_host,"
        " to_state, trigger, outcome, tool_version, prev_hash, hash)"
        " VALUES ('t', 'r', 'o', 't', 'sim', 'o', 'h', 's', 't', 'ok', 'v', 'p', 'h')",
        "UPDATE meta SET value = '0' WHERE key = 'schema_version'",
        "DELETE FROM meta",
        "INSERT OR REPLACE INTO meta VALUES ('schema_version', '0')",
    ],
    ids=[
        "update",
        "delete",
        "insert-or-replace",
        "insert-gap",
        "insert-null-seq",
        "meta-update",
        "meta-delete",
        "meta-replace",
    ],
)
def test_plain_sqlite3_cannot_change_the_log(tmp_path: Path, sql: str) -> None:
    path = filled(tmp_path / "a.db", 3)
    before = rows(path)
    conn = raw(path)
    with pytest.raises(sqlite3.IntegrityError, match="audit log is append-only"):
        conn.execute(sql)
    meta = conn.execute("SELECT * FROM meta").fetchall()
    conn.close()
    assert rows(path) == before
    assert meta == [("schema_version", "2")]
    assert verify_log(path).ok


def test_update_message_is_the_documented_one(tmp_path: Path) -> None:
    conn = raw(filled(tmp_path / "a.db", 1))
    with pytest.raises(sqlite3.IntegrityError) as exc:
        conn.execute("UPDATE events SET reason = 'x'")
    conn.close()
    assert str(exc.value) == "audit log is append-only: UPDATE refused"


# -- verify --------------------------------------------------------------------------------


def test_verify_empty_log_is_ok(tmp_path: Path) -> None:
    AuditLog(tmp_path / "a.db").close()
    report = verify_log(tmp_path / "a.db")
    assert report.ok and report.count == 0
    assert (report.head_seq, report.head_hash, report.first_bad_seq, report.problem) == (
        None,
        None,
        None,
        None,
    )


def test_verify_catches_an_edited_row(tmp_path: Path) -> None:
    path = filled(tmp_path / "a.db", 10)
    drop_all_triggers(path)
    tamper(path, "UPDATE events SET reason = 'nothing to see' WHERE seq = 7")
    report = verify_log(path)
    assert not report.ok
    assert report.first_bad_seq == 7
    assert report.problem == "seq 7: hash does not match its content (row edited)"
    assert (report.count, report.head_seq) == (10, 10)


def test_verify_catches_an_edit_with_recomputed_hash_at_the_next_row(tmp_path: Path) -> None:
    path = filled(tmp_path / "a.db", 10)
    drop_all_triggers(path)
    conn = raw(path)
    conn.row_factory = sqlite3.Row
    row = dict(conn.execute("SELECT * FROM events WHERE seq = 7").fetchone())
    row["reason"] = "forged"
    conn.execute(
        "UPDATE events SET reason = ?, hash = ? WHERE seq = 7", (row["reason"], row_hash(row))
    )
    conn.close()
    report = verify_log(path)
    assert report.first_bad_seq == 8
    assert report.problem is not None and "prev_hash does not match the hash of seq 7" in (
        report.problem
    )


def test_verify_catches_a_deleted_row(tmp_path: Path) -> None:
    path = filled(tmp_path / "a.db", 10)
    drop_all_triggers(path)
    tamper(path, "DELETE FROM events WHERE seq = 5")
    report = verify_log(path)
    assert not report.ok
    assert report.first_bad_seq == 5
    assert report.problem == "seq 5: expected seq 5, found 6 (row 5 deleted)"
    assert report.count == 9


def test_verify_catches_deleted_and_renumbered_rows(tmp_path: Path) -> None:
    path = filled(tmp_path / "a.db", 10)
    drop_all_triggers(path)
    conn = raw(path)
    conn.execute("DELETE FROM events WHERE seq = 5")
    conn.execute("UPDATE events SET seq = seq - 1 WHERE seq > 5")
    conn.close()
    report = verify_log(path)
    assert report.first_bad_seq == 5
    assert report.problem is not None and report.problem.startswith(
        "seq 5: prev_hash does not match the hash of seq 4"
    )


def test_verify_catches_two_swapped_rows(tmp_path: Path) -> None:
    path = filled(tmp_path / "a.db", 10)
    drop_all_triggers(path)
    conn = raw(path)
    conn.execute("UPDATE events SET seq = -3 WHERE seq = 3")
    conn.execute("UPDATE events SET seq = 3 WHERE seq = 4")
    conn.execute("UPDATE events SET seq = 4 WHERE seq = -3")
    conn.close()
    assert [r[0] for r in rows(path)] == list(range(1, 11))
    report = verify_log(path)
    assert not report.ok
    assert report.first_bad_seq == 3
    assert report.problem == (
        "seq 3: prev_hash does not match the hash of seq 2 (rows reordered or removed)"
    )


def test_verify_reports_dropped_triggers_on_an_intact_chain(tmp_path: Path) -> None:
    path = filled(tmp_path / "a.db", 4)
    tamper(path, "DROP TRIGGER events_no_update")
    report = verify_log(path)
    assert not report.ok
    assert report.first_bad_seq is None
    assert report.problem == "append-only triggers missing: events_no_update"
    assert (report.count, report.head_seq) == (4, 4)


def test_verify_reports_a_trigger_replaced_by_a_no_op(tmp_path: Path) -> None:
    path = filled(tmp_path / "a.db", 2)
    conn = raw(path)
    conn.execute("DROP TRIGGER events_no_delete")
    conn.execute(
        "CREATE TRIGGER events_no_delete BEFORE DELETE ON events WHEN 0 BEGIN SELECT 1; END"
    )
    conn.close()
    report = verify_log(path)
    assert report.problem == "append-only triggers altered: events_no_delete"


def test_writer_open_does_not_recreate_dropped_triggers(tmp_path: Path) -> None:
    path = filled(tmp_path / "a.db", 2)
    tamper(path, "DROP TRIGGER events_no_update")
    with AuditLog(path) as log:
        add(log)
    assert verify_log(path).problem == "append-only triggers missing: events_no_update"


def test_verify_is_streaming_fast_enough(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    with AuditLog(path) as log:
        for i in range(2000):
            add(log, run_id=f"r{i // 10}", detail={"i": i})
    report = verify_log(path)
    assert (report.ok, report.count, report.head_seq) == (True, 2000, 2000)


# -- opening -------------------------------------------------------------------------------


def test_readonly_open_of_missing_file_errors_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "audit.db"
    with pytest.raises(AuditError, match=re.escape(f"no audit log at {path}")):
        AuditLog(path, readonly=True)
    with pytest.raises(AuditError, match="no audit log at"):
        verify_log(path)
    assert list(tmp_path.iterdir()) == []


def test_readonly_log_reads_but_refuses_appends(tmp_path: Path) -> None:
    path = filled(tmp_path / "a.db", 3)
    with AuditLog(path, readonly=True) as log:
        assert log.head() is not None and log.head().seq == 3  # type: ignore[union-attr]
        assert len(log.runs()) == 1
        with pytest.raises(AuditError, match="read-only"):
            add(log)
    assert len(rows(path)) == 3


def test_writer_connection_uses_wal_and_full_sync(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.db") as log:
        conn = log._db.conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 10000


def test_close_is_idempotent_and_closed_log_refuses_use(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db")
    log.close()
    log.close()
    with pytest.raises(AuditError, match="closed"):
        log.head()
    with pytest.raises(AuditError, match="closed"):
        add(log)


def test_other_sqlite_database_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = raw(path)
    conn.execute("CREATE TABLE notes (x)")
    conn.close()
    with pytest.raises(AuditError, match="not a bbrx audit log"):
        AuditLog(path)
    conn = raw(path)
    tables = conn.execute("SELECT name FROM sqlite_master").fetchall()
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    assert (tables, mode) == ([("notes",)], "delete")


def test_garbage_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(AuditError, match=re.escape(str(path))):
        AuditLog(path)
    with pytest.raises(AuditError, match=re.escape(str(path))):
        verify_log(path)


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = filled(tmp_path / "a.db", 1)
    conn = raw(path)
    conn.execute("DROP TRIGGER events_meta_no_update")
    conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    conn.close()
    for readonly in (False, True):
        with pytest.raises(AuditError, match=r"schema version 3.*upgrade bbrx"):
            AuditLog(path, readonly=readonly)


# -- rendering and the reviewer CLI -------------------------------------------------------


def test_format_runs_and_timeline(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.db") as log:
        add(log, from_state=None, to_state="running")
        add(
            log,
            from_state="pending",
            to_state="done",
            trigger="run_script",
            job="bbr-director",
            script="backup",
            outcome="error",
            exit_code=3,
            duration=1.25,
            detail={"stderr_tail": "line one\nline two", "other": 1},
        )
        runs_text = format_runs(log.runs())
        timeline_text = format_timeline(log.timeline("run"))
    run_lines = runs_text.splitlines()
    assert len(run_lines) == 2 and "run-aaaa" in run_lines[1] and "unfinished" in run_lines[1]
    lines = timeline_text.splitlines()
    assert len(lines) == 3
    assert "pending -> done" in lines[2]
    assert "bbr-director" in lines[2] and "1.25s" in lines[2]
    assert "stderr_tail: line one line two" in lines[2]
    # Aligned columns: the TRIGGER heading sits where each row's trigger starts.
    column = lines[0].index("TRIGGER")
    assert lines[1][column:].startswith("start") and lines[2][column:].startswith("run_script")
    assert format_runs([]) == "no runs" and format_timeline([]) == "no events"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "audit", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_verify_exit_codes(tmp_path: Path) -> None:
    path = filled(tmp_path / "a.db", 4)
    head = verify_log(path)
    ok = run_cli("verify", str(path))
    assert ok.returncode == 0, ok.stderr
    first, recorded = ok.stdout.strip().splitlines()
    assert first == f"audit log {path} intact: 4 events, head seq 4 hash {head.head_hash}"
    assert recorded.startswith("this read is recorded in the audit log: run ")

    drop_all_triggers(path)
    tamper(path, "UPDATE events SET target = 'elsewhere' WHERE seq = 2")
    broken = run_cli("verify", str(path))
    assert broken.returncode == 1
    assert broken.stderr.splitlines()[0] == (
        f"audit log {path} is BROKEN: seq 2: hash does not match its content (row edited)"
    )
    assert broken.stdout == ""

    missing = run_cli("verify", str(tmp_path / "nope.db"))
    assert missing.returncode == 2
    assert "no audit log at" in missing.stderr


def test_cli_runs_and_show(tmp_path: Path) -> None:
    path = filled(tmp_path / "a.db", 4)
    runs = run_cli("runs", str(path))
    assert runs.returncode == 0, runs.stderr
    assert "run-0" in runs.stdout and "run-1" in runs.stdout
    show = run_cli("show", str(path), "run-1")
    assert show.returncode == 0, show.stderr
    assert len(show.stdout.strip().splitlines()) == 2  # header + seq 4
    ambiguous = run_cli("show", str(path), "run-")
    assert ambiguous.returncode == 2 and "matches 2 runs" in ambiguous.stderr


def _open_and_append(path: str, start: Any, failures: Any) -> None:
    start.wait()
    try:
        with AuditLog(path) as log:
            for _ in range(10):
                add(log)
    except Exception as exc:  # reported to the parent, which asserts on it
        failures.put(repr(exc))


def test_processes_opening_a_new_log_at_once_all_get_in(tmp_path: Path) -> None:
    """Two bbrx processes started together both open (and one creates) the log: SQLite
    refuses a switch to WAL at once, without a busy wait, while another is writing."""
    context = multiprocessing.get_context("fork")
    failures = context.Queue()
    for round_ in range(8):
        path = str(tmp_path / f"audit-{round_}.db")
        start = context.Event()
        workers = [
            context.Process(target=_open_and_append, args=(path, start, failures)) for _ in range(6)
        ]
        for worker in workers:
            worker.start()
        start.set()
        for worker in workers:
            worker.join(timeout=60)
            assert worker.exitcode == 0
        report = verify_log(path)
        assert report.ok and report.count == 60, report
    assert failures.empty(), failures.get()


# -- an audit log that cannot be used: clear errors, never raw sqlite3 -----------------------

NEEDS_ROOT = pytest.mark.skipif(
    sys.platform != "linux" or __import__("os").geteuid() != 0,
    reason="needs root for a private mount namespace (unshare --mount)",
)


def in_private_mount(setup: str, *python: str) -> subprocess.CompletedProcess[str]:
    """Run `setup` (mount commands) then a Python snippet, in a mount namespace of its own:
    the mounts vanish with the process, and the test never changes the host's."""
    command = f'{setup} && exec {sys.executable} -c "$0"'
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", command, *python],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_locked_log_names_the_holder_and_the_timeout(tmp_path: Path) -> None:
    path = filled(tmp_path / "a.db", 2)
    holder = raw(path)
    holder.isolation_level = None
    holder.execute("BEGIN IMMEDIATE")
    try:
        with AuditLog(path, busy_timeout=0.2) as log:
            with pytest.raises(AuditError) as caught:
                add(log)
            assert log.count() == 2  # readers still read (WAL)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    message = str(caught.value)
    assert f"cannot write to the audit log {path}: another process has held its write lock" in (
        message
    )
    assert "more than 0.2 s (the busy timeout)" in message
    assert f"fuser {path}" in message and "BBRX_AUDIT_BUSY_TIMEOUT" in message
    assert "sqlite3" not in message and "OperationalError" not in message


def test_busy_timeout_comes_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BBRX_AUDIT_BUSY_TIMEOUT", "2.5")
    with AuditLog(tmp_path / "a.db") as log:
        assert log._db.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 2500
    monkeypatch.setenv("BBRX_AUDIT_BUSY_TIMEOUT", "soon")
    with pytest.raises(AuditError, match="BBRX_AUDIT_BUSY_TIMEOUT must be a number of seconds"):
        AuditLog(tmp_path / "a.db")


@pytest.mark.parametrize("readonly", [False, True])
def test_a_directory_or_a_non_database_is_named_plainly(tmp_path: Path, readonly: bool) -> None:
    with pytest.raises(AuditError, match=re.escape(f"{tmp_path}: it is a directory")):
        AuditLog(tmp_path, readonly=readonly)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not sqlite " * 500)
    with pytest.raises(AuditError) as caught:
        AuditLog(garbage, readonly=readonly)
    assert f"the audit log {garbage}: it is not a SQLite database" in str(caught.value)
    assert "move the file away" in str(caught.value)


def test_cli_runs_on_unusable_files_exits_2_with_the_cause(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not sqlite " * 500)
    for path, cause in ((garbage, "it is not a SQLite database"), (tmp_path, "it is a directory")):
        result = run_cli("runs", str(path))
        assert result.returncode == 2, result
        assert f"error: cannot read the audit log {path}: {cause}" in result.stderr
        assert "Traceback" not in result.stderr


@NEEDS_ROOT
def test_a_read_only_mount_refuses_writes_and_still_reads(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = filled(directory / "a.db", 4)  # closed cleanly: no -wal/-shm left beside it
    snippet = (
        "import sys\n"
        "from audit.log import AuditLog\n"
        "from audit.errors import AuditError\n"
        f"with AuditLog({str(path)!r}, readonly=True) as log:\n"
        "    print('read', log.count())\n"
        "try:\n"
        f"    AuditLog({str(path)!r})\n"
        "except AuditError as e:\n"
        "    print('refused', e)\n"
    )
    result = in_private_mount(f"mount --bind -o ro {directory} {directory}", snippet)
    assert result.returncode == 0, result.stderr
    assert "read 4" in result.stdout
    assert (
        f"refused cannot open the audit log {path}: the file system holding {directory} is "
        "mounted read-only" in result.stdout
    ), result.stdout
    assert "Make it writable" in result.stdout


@NEEDS_ROOT
def test_a_full_disk_is_named(tmp_path: Path) -> None:
    directory = tmp_path / "small"
    directory.mkdir()
    snippet = (
        "import os\n"
        "from audit.journal import Journal\n"
        "from audit.errors import AuditError\n"
        f"d = {str(directory)!r}\n"
        "with open(os.path.join(d, 'fill'), 'wb') as f:\n"
        "    try:\n"
        "        while True: f.write(b'x' * 65536); f.flush()\n"
        "    except OSError: pass\n"
        "try:\n"
        "    Journal(os.path.join(d, 'audit.db')).reserve()\n"
        "except AuditError as e:\n"
        "    print('refused', e)\n"
    )
    result = in_private_mount(f"mount -t tmpfs -o size=512k tmpfs {directory}", snippet)
    assert result.returncode == 0, result.stderr
    assert (
        f"refused cannot reserve journal space beside the audit log {directory}/audit.db: the "
        "disk holding it is full" in result.stdout
    ), result.stdout


# -- the fallback journal ----------------------------------------------------------------------


def test_journal_lines_are_rows_outside_the_chain_and_survive_a_torn_line(tmp_path: Path) -> None:
    from audit.journal import Journal, journal_path, read_journal

    db = filled(tmp_path / "a.db", 2)
    journal = Journal(db)
    journal.reserve(4096)
    reserves = list(tmp_path.glob("a.db.journal.jsonl.reserve-*"))
    assert len(reserves) == 1 and reserves[0].stat().st_size == 4096
    fields = {**BASE, "run_id": "run-0", "from_state": "locking", "to_state": "failed"}
    assert journal.write({**fields, "trigger": "lock_failed", "detail": {"jobs": ["a"]}})
    with journal_path(db).open("a") as torn:  # a crash in the middle of a line
        torn.write('{"run_id": "run-0", "ts": "2026')
    journal.release()
    assert list(tmp_path.glob("*.reserve-*")) == []

    contents = read_journal(db)
    assert contents.bad_lines == [2]
    [row] = contents.rows
    assert tuple(row) == tuple(name for name, _, _ in EVENT_COLUMNS)
    assert (row["seq"], row["prev_hash"], row["hash"]) == (None, None, None)
    assert row["detail"] == {"jobs": ["a"]} and TS_RE.match(row["ts"])
    assert contents.run_ids() == ["run-0"]

    report = verify_log(db)
    assert report.ok and report.count == 2 and report.journal_events == 1
    cli = run_cli("verify", str(db))
    assert cli.returncode == 0, cli.stderr
    assert (
        f"journal {journal_path(db)}: 1 events of 1 run(s) (run-0) written when the audit log "
        "could not be, OUTSIDE the hash chain" in cli.stdout
    )
    assert "journal lines 2 are not events" in cli.stdout
    assert "what to do: keep the journal with the log" in cli.stdout


def test_an_unwritable_journal_logs_the_event_instead(tmp_path: Path, caplog) -> None:
    from audit.journal import Journal, journal_path

    db = tmp_path / "a.db"
    journal_path(db).mkdir()  # nothing can be appended to a directory, even by root
    fields = {**BASE, "run_id": "run-9", "to_state": "failed", "trigger": "cleaned"}
    assert Journal(db).write(fields) is False
    [record] = [r for r in caplog.records if "NOT RECORDED" in r.getMessage()]
    assert record.levelname == "ERROR"
    assert '"run_id": "run-9"' in record.getMessage()


def test_merged_timeline_puts_journal_rows_after_own_rows_and_recovered_last() -> None:
    from audit.journal import merged_timeline, summarise

    def row(trigger: str, to: str, ts: str, job: str | None = None) -> dict[str, Any]:
        return {**BASE, "run_id": "r", "trigger": trigger, "to_state": to, "job": job, "ts": ts}

    chained = [row("start", "discovering", "1"), row("recovered", "recovered", "9")]
    journaled = [row("lock", "locking", "2", job="director"), row("lock_failed", "unlocking", "3")]
    merged = merged_timeline(chained, journaled)
    assert [r["trigger"] for r in merged] == ["start", "lock", "lock_failed", "recovered"]
    summary = summarise("r", merged)
    assert (summary.outcome, summary.finished, summary.events) == ("recovered", True, 4)
    assert summarise("r", merged[:3]).outcome == "unlocking"


def test_journal_lines_a_reader_could_trip_on_are_not_events(tmp_path: Path) -> None:
    import json

    from audit import read_journal
    from audit.journal import journal_path

    db = tmp_path / "audit.db"
    good = {
        "run_id": "r1", "operation": "backup", "target": "sim://demo", "mode": "sim",
        "operator": "op", "origin_host": "h", "reason": None, "from_state": "locking",
        "to_state": "unlocking", "trigger": "lock_failed", "job": None, "script": None,
        "outcome": "error", "exit_code": None, "duration": None, "detail": {"x": 1},
        "ts": "2026-12-01T00:00:00.000000Z", "tool_version": "bbrx 0.1.0",
    }  # fmt: skip
    lines = [
        good,
        {**good, "trigger": None},  # would break `.endswith` in the cleanups
        {**good, "trigger": "script_started", "detail": {}},  # a pid row without a pid
        {**good, "duration": "slow"},  # would break the timeline's rendering
        {**good, "detail": "not a mapping"},
    ]
    journal_path(db).write_text("".join(json.dumps(line) + "\n" for line in lines))
    contents = read_journal(db)
    assert [row["trigger"] for row in contents.rows] == ["lock_failed"]
    assert contents.bad_lines == [2, 3, 4, 5]
