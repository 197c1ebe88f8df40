"""Audit schema version 2 (instance columns) and the migration of version 1 logs.

Against real SQLite files: ``tests/data/audit-v1.sql`` is a log written by bbrx before
version 2 (see tests/data/README.md), loaded into a temporary file for each test.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from audit.errors import AuditError
from audit.journal import (
    AuditRecord,
    Journal,
    journal_path,
    merged_timeline,
    read_journal,
    summarise,
)
from audit.log import AuditLog
from audit.render import format_timeline
from audit.schema import (
    COLUMN_NAMES,
    EVENT_COLUMNS,
    HASH_ORDER,
    INSTANCE_COLUMNS,
    SCHEMA_VERSION,
    TRIGGERS,
    V1_COLUMN_NAMES,
    canonical_json,
    hash_values,
    hashed_fields,
    row_hash,
)
from audit.verify import verify_log

REPO_ROOT = Path(__file__).resolve().parent.parent
V1_SQL = Path(__file__).resolve().parent / "data" / "audit-v1.sql"
V1_EVENTS = 186
V1_RUNS = 7
V1_HEAD = "1e3705398f23f80ef767830b0ceaa324e2599bf81db0b0da71d7805fb95e69b8"
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

BASE: dict[str, Any] = {
    "operation": "backup",
    "target": "redis",
    "mode": "sim",
    "operator": "alice",
    "origin_host": "laptop",
    "reason": "CHG-7",
    "tool_version": "bbrx test",
}


def v1_log(path: Path) -> Path:
    """The version 1 fixture as a file, in WAL mode as bbrx leaves its logs."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.executescript(V1_SQL.read_text(encoding="utf-8"))
        assert conn.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    finally:
        conn.close()
    return path


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = raw(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def columns(path: Path) -> tuple[str, ...]:
    return tuple(r[1] for r in query(path, "PRAGMA table_info(events)"))


def meta(path: Path) -> dict[str, str]:
    return dict(query(path, "SELECT key, value FROM meta"))  # type: ignore[arg-type]


def drop_all_triggers(path: Path) -> None:
    conn = raw(path)
    try:
        for name in TRIGGERS:
            conn.execute(f"DROP TRIGGER {name}")
    finally:
        conn.close()


def tamper(path: Path, sql: str) -> None:
    conn = raw(path)
    try:
        conn.execute(sql)
    finally:
        conn.close()


def add(log: AuditLog, run_id: str = "dep-1", **overrides: Any) -> Any:
    fields: dict[str, Any] = {
        **BASE,
        "run_id": run_id,
        "from_state": "idle",
        "to_state": "locking",
        "trigger": "lock",
        **overrides,
    }
    return log.append(**fields)


def redis(log: AuditLog, index: int, **overrides: Any) -> Any:
    return add(
        log,
        job="redis-server",
        script="pre-backup-lock",
        instance_group="redis",
        instance_index=str(index),
        instance_id=f"6f1c{index}e60-e273-4d22-bba5-6d6fa7f1309{index}",
        **overrides,
    )


# -- the schema ------------------------------------------------------------------------------


def test_the_instance_columns_are_appended_after_hash_and_nullable() -> None:
    assert SCHEMA_VERSION == 2
    assert COLUMN_NAMES[-4:] == ("hash", *INSTANCE_COLUMNS)
    assert INSTANCE_COLUMNS == ("instance_group", "instance_index", "instance_id")
    assert COLUMN_NAMES[:-3] == V1_COLUMN_NAMES
    assert [t for n, t, _ in EVENT_COLUMNS if n in INSTANCE_COLUMNS] == ["TEXT"] * 3


def test_a_fresh_log_is_created_at_version_2(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    AuditLog(path).close()
    assert meta(path) == {"schema_version": "2"}
    info = query(path, "PRAGMA table_info(events)")
    assert [(r[1], r[2]) for r in info] == [(n, t) for n, t, _ in EVENT_COLUMNS]
    assert [r[1] for r in info if r[3] == 0 and r[1] in INSTANCE_COLUMNS] == list(INSTANCE_COLUMNS)
    assert verify_log(path).ok


@pytest.mark.parametrize("present", list(itertools.product((False, True), repeat=3)))
def test_the_fast_hash_is_the_canonical_json_of_the_non_null_instance_columns(
    present: tuple[bool, ...],
) -> None:
    row: dict[str, Any] = {name: None for name in COLUMN_NAMES}
    row.update(
        seq=42,
        ts="2026-12-01T12:18:20.522424Z",
        reason='héllo "quoted" \\ \n\t\x01 \u2028 日本 😀',
        duration=0.1 + 0.2,
        exit_code=-3,
        detail='{"a":[1,2]}',
        prev_hash="0" * 64,
        hash="ignored",
    )
    values = ("redis", "1", "6f1c\u202e-\x1b[2J")
    for name, value, keep in zip(INSTANCE_COLUMNS, values, present, strict=True):
        row[name] = value if keep else None
    expected_fields = {
        k: row[k] for k in COLUMN_NAMES if k != "hash" and (k not in INSTANCE_COLUMNS or row[k])
    }
    expected = hashlib.sha256(canonical_json(expected_fields).encode()).hexdigest()
    assert hashed_fields(row) == expected_fields
    assert row_hash(row) == expected
    assert hash_values([row[name] for name in HASH_ORDER]) == expected
    if not any(present):
        # A row without an instance hashes as version 1 did, keys absent or NULL.
        v1_row = {k: v for k, v in row.items() if k not in INSTANCE_COLUMNS}
        assert row_hash(v1_row) == expected
    else:
        assert row_hash({**row, **dict.fromkeys(INSTANCE_COLUMNS)}) != expected


def test_append_validates_the_instance_fields(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.db") as log:
        for name in INSTANCE_COLUMNS:
            with pytest.raises(AuditError, match=f"{name} must be a string, got int"):
                add(log, **{name: 1})
        assert log.count() == 0
        stored = log.event(redis(log, 1).seq)
        run_level = log.event(add(log, job=None).seq)
    assert stored is not None and run_level is not None
    assert [stored[n] for n in INSTANCE_COLUMNS] == [
        "redis",
        "1",
        "6f1c1e60-e273-4d22-bba5-6d6fa7f13091",
    ]
    assert [run_level[n] for n in INSTANCE_COLUMNS] == [None] * 3


# -- a version 1 log, read-only ----------------------------------------------------------------


def test_the_v1_fixture_is_what_an_older_bbrx_wrote(tmp_path: Path) -> None:
    path = v1_log(tmp_path / "audit.db")
    assert meta(path) == {"schema_version": "1"}
    assert columns(path) == V1_COLUMN_NAMES
    assert query(path, "SELECT COUNT(*), MAX(seq) FROM events") == [(V1_EVENTS, V1_EVENTS)]
    triggers = dict(query(path, "SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"))
    assert triggers == TRIGGERS


def test_a_v1_log_verifies_read_only_and_stays_v1_on_disk(tmp_path: Path) -> None:
    path = v1_log(tmp_path / "audit.db")
    before = path.read_bytes()
    schema_before = query(path, "SELECT type, name, sql FROM sqlite_master ORDER BY name")

    report = verify_log(path)
    assert (report.ok, report.count, report.head_seq, report.head_hash) == (
        True,
        V1_EVENTS,
        V1_EVENTS,
        V1_HEAD,
    )
    with AuditLog(path, readonly=True) as log:
        first = log.event(1)
        assert first is not None and tuple(first) == COLUMN_NAMES
        assert [first[n] for n in INSTANCE_COLUMNS] == [None] * 3
        runs = log.runs()
        assert len(runs) == V1_RUNS
        assert [r.outcome for r in runs].count("failed") == 1
        failed = next(r for r in runs if r.outcome == "failed")
        timeline = log.timeline(failed.run_id[:20])
        assert all(tuple(row) == COLUMN_NAMES for row in timeline)
        assert any(row["trigger"] == "backup_error" for row in timeline)
        chain = list(log.iter_chain())
        assert len(chain) == V1_EVENTS and all(len(r) == 3 + len(HASH_ORDER) for r in chain)
        # A reader cannot migrate it, and does not try.
        with pytest.raises(AuditError, match="read-only"):
            add(log)
        record = AuditRecord(log)
        assert len(record.runs()) == V1_RUNS

    assert path.read_bytes() == before
    wal = path.with_name(path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    assert meta(path) == {"schema_version": "1"}
    assert columns(path) == V1_COLUMN_NAMES
    assert query(path, "SELECT type, name, sql FROM sqlite_master ORDER BY name") == schema_before


def test_python_m_audit_reads_a_v1_log_without_changing_it(tmp_path: Path) -> None:
    path = v1_log(tmp_path / "audit.db")
    before = path.read_bytes()
    for args in (["verify"], ["runs"]):
        result = run_cli(*args, str(path))
        assert result.returncode == 0, result.stderr
    assert f"intact: {V1_EVENTS} events, head seq {V1_EVENTS} hash {V1_HEAD}" in (
        run_cli("verify", str(path)).stdout
    )
    assert path.read_bytes() == before and meta(path) == {"schema_version": "1"}


# -- the migration -------------------------------------------------------------------------------


def test_opening_a_v1_log_for_writing_migrates_it_and_changes_no_row(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = v1_log(tmp_path / "audit.db")
    old_rows = query(path, "SELECT * FROM events ORDER BY seq")
    triggers_before = query(path, "SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")

    with caplog.at_level(logging.INFO, logger="audit.log"):
        AuditLog(path).close()
        AuditLog(path).close()  # already migrated: nothing more to do
    migrations = [r for r in caplog.records if "migrated audit log" in r.getMessage()]
    assert len(migrations) == 1 and str(path) in migrations[0].getMessage()

    found = meta(path)
    assert set(found) == {"schema_version", "migrated_to_2"}
    assert found["schema_version"] == "1" and TS_RE.match(found["migrated_to_2"])
    assert columns(path) == COLUMN_NAMES
    assert query(path, "SELECT name, sql FROM sqlite_master WHERE type = 'trigger'") == (
        triggers_before
    )
    new_rows = query(path, "SELECT * FROM events ORDER BY seq")
    assert [r[: len(V1_COLUMN_NAMES)] for r in new_rows] == old_rows
    assert {r[len(V1_COLUMN_NAMES) :] for r in new_rows} == {(None, None, None)}
    report = verify_log(path)
    assert (report.ok, report.count, report.head_hash) == (True, V1_EVENTS, V1_HEAD)
    with AuditLog(path, readonly=True) as log:
        assert log.missing_triggers() == [] and log.altered_triggers() == []


def test_a_migrated_log_takes_rows_with_an_instance_and_verifies(tmp_path: Path) -> None:
    path = v1_log(tmp_path / "audit.db")
    with AuditLog(path) as log:
        add(log, from_state=None, to_state="discovering", trigger="start")
        appended = [redis(log, i) for i in range(3)]
        add(log, job="redis-server", instance_group="redis", instance_index="3")  # id unknown
        add(log, from_state="cleaning", to_state="succeeded", trigger="cleaned")
        stored = log.event(appended[1].seq)
    assert stored is not None
    assert (stored["instance_group"], stored["instance_index"]) == ("redis", "1")
    assert row_hash(stored) == stored["hash"] == appended[1].hash
    report = verify_log(path)
    assert (report.ok, report.count) == (True, V1_EVENTS + 6), report.problem
    result = run_cli("verify", str(path))
    assert result.returncode == 0, result.stderr


def test_python_m_audit_verify_passes_on_the_migrated_fixture(tmp_path: Path) -> None:
    path = v1_log(tmp_path / "audit.db")
    AuditLog(path).close()
    result = run_cli("verify", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (
        f"audit log {path} intact: {V1_EVENTS} events, head seq {V1_EVENTS} hash {V1_HEAD}"
    )


@pytest.mark.parametrize(
    "change",
    [
        "instance_index = '2'",
        "instance_group = 'sentinel'",
        "instance_id = NULL",
        "instance_group = NULL, instance_index = NULL, instance_id = NULL",
        "instance_id = 'someone-else'",
    ],
)
def test_editing_an_instance_column_is_caught_at_that_seq(tmp_path: Path, change: str) -> None:
    path = v1_log(tmp_path / "audit.db")
    with AuditLog(path) as log:
        for i in range(3):
            redis(log, i)
    target = V1_EVENTS + 2
    drop_all_triggers(path)
    tamper(path, f"UPDATE events SET {change} WHERE seq = {target}")
    report = verify_log(path)
    assert not report.ok
    assert report.first_bad_seq == target
    assert report.problem == f"seq {target}: hash does not match its content (row edited)"


@pytest.mark.parametrize("seq", [1, 50, V1_EVENTS])
@pytest.mark.parametrize("name", INSTANCE_COLUMNS)
def test_setting_an_instance_on_an_old_v1_row_is_caught(tmp_path: Path, seq: int, name: str):
    path = v1_log(tmp_path / "audit.db")
    AuditLog(path).close()
    drop_all_triggers(path)
    tamper(path, f"UPDATE events SET {name} = '0' WHERE seq = {seq}")
    report = verify_log(path)
    assert report.first_bad_seq == seq
    assert report.problem == f"seq {seq}: hash does not match its content (row edited)"


def test_an_empty_string_instance_is_not_null_for_the_hash(tmp_path: Path) -> None:
    path = v1_log(tmp_path / "audit.db")
    AuditLog(path).close()
    drop_all_triggers(path)
    tamper(path, "UPDATE events SET instance_id = '' WHERE seq = 3")
    assert verify_log(path).first_bad_seq == 3


def _open_and_append(path: str, start: Any, failures: Any, n: int) -> None:
    start.wait()
    try:
        with AuditLog(path) as log:
            for i in range(5):
                redis(log, n, detail={"i": i})
    except Exception as exc:  # reported to the parent, which asserts on it
        failures.put(repr(exc))


def test_processes_opening_a_v1_log_at_once_all_get_in_and_it_is_migrated_once(
    tmp_path: Path,
) -> None:
    context = multiprocessing.get_context("fork")
    failures = context.Queue()
    workers_per_round = 4
    for round_ in range(5):
        path = v1_log(tmp_path / f"audit-{round_}.db")
        start = context.Event()
        workers = [
            context.Process(target=_open_and_append, args=(str(path), start, failures, n))
            for n in range(workers_per_round)
        ]
        for worker in workers:
            worker.start()
        start.set()
        for worker in workers:
            worker.join(timeout=60)
            assert worker.exitcode == 0
        assert failures.empty(), failures.get()
        assert query(path, "SELECT key FROM meta ORDER BY key") == [
            ("migrated_to_2",),
            ("schema_version",),
        ]
        assert columns(path) == COLUMN_NAMES
        report = verify_log(path)
        assert report.ok and report.count == V1_EVENTS + 5 * workers_per_round, report


def test_a_reader_open_across_the_migration_sees_the_new_columns(tmp_path: Path) -> None:
    path = v1_log(tmp_path / "audit.db")
    with AuditLog(path, readonly=True) as reader:
        assert len(list(reader.iter_chain())) == V1_EVENTS
        with AuditLog(path) as writer:
            redis(writer, 2)
        rows = list(reader.iter_chain())
        assert len(rows) == V1_EVENTS + 1
        seq, _, stored, *values = rows[-1]
        assert hash_values(values) == stored
        assert "redis" in values
        latest = reader.event(seq)
        assert latest is not None and latest["instance_index"] == "2"


def test_a_writer_keeps_appending_rows_without_an_instance_as_v1_did(tmp_path: Path) -> None:
    path = v1_log(tmp_path / "audit.db")
    with AuditLog(path) as log:
        appended = add(log, job=None)
        row = log.event(appended.seq)
    assert row is not None
    v1_row = {k: row[k] for k in V1_COLUMN_NAMES}
    v1_row["detail"] = None
    assert row_hash(v1_row) == appended.hash


# -- versions this bbrx does not know ----------------------------------------------------------


@pytest.mark.parametrize("fresh", [False, True], ids=["v1-log", "v2-log"])
def test_a_log_claiming_migrated_to_3_is_refused(tmp_path: Path, fresh: bool) -> None:
    path = tmp_path / "audit.db"
    if fresh:
        AuditLog(path).close()
    else:
        v1_log(path)
    # meta takes new keys (it refuses only changes): this is what a newer bbrx would write.
    tamper(path, "INSERT INTO meta VALUES ('migrated_to_3', '2027-01-01T00:00:00.000000Z')")
    before = meta(path)
    for readonly in (True, False):
        with pytest.raises(AuditError, match=r"schema version 3\b.*only up to 2.*upgrade bbrx"):
            AuditLog(path, readonly=readonly)
    assert meta(path) == before
    assert columns(path) == (COLUMN_NAMES if fresh else V1_COLUMN_NAMES)
    result = run_cli("verify", str(path))
    assert result.returncode == 2 and "schema version 3" in result.stderr


def test_a_meta_key_that_names_no_version_is_refused(tmp_path: Path) -> None:
    path = v1_log(tmp_path / "audit.db")
    tamper(path, "INSERT INTO meta VALUES ('migrated_to_x', 'now')")
    for readonly in (True, False):
        with pytest.raises(AuditError, match="'migrated_to_x' names no schema version"):
            AuditLog(path, readonly=readonly)
    assert columns(path) == V1_COLUMN_NAMES


def test_a_v1_log_with_foreign_columns_is_not_migrated(tmp_path: Path) -> None:
    path = v1_log(tmp_path / "audit.db")
    tamper(path, "ALTER TABLE events ADD COLUMN instance_group TEXT")
    with pytest.raises(AuditError, match=r"not a bbrx audit log.*at schema version 1"):
        AuditLog(path)
    assert "migrated_to_2" not in meta(path)


# -- the fallback journal ----------------------------------------------------------------------


def test_instance_fields_round_trip_through_the_journal(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    with AuditLog(db) as log:
        add(log, from_state=None, to_state="discovering", trigger="start")
        redis(log, 0)
    fields = {
        **BASE,
        "run_id": "dep-1",
        "from_state": "locking",
        "to_state": "unlocking",
        "trigger": "unlock",
        "job": "redis-server",
        "script": "post-backup-unlock",
        "outcome": "ok",
        "instance_group": "redis",
        "instance_index": "1",
        "instance_id": "ef8c3e25-1e4f-4129-9e8a-7b7b532481b0",
    }
    assert Journal(db).write(fields)
    # A line an older bbrx wrote: no instance keys at all.
    old = {k: v for k, v in fields.items() if k not in INSTANCE_COLUMNS}
    old |= {"ts": "2026-12-01T00:00:00.000000Z", "trigger": "unlock_ok", "to_state": "unlocked"}
    with journal_path(db).open("a") as journal:
        journal.write(json.dumps(old) + "\n")
        # Not text: a reader could trip on it, so it is not an event.
        journal.write(json.dumps({**old, "instance_index": 1}) + "\n")

    contents = read_journal(db)
    assert contents.bad_lines == [3]
    new_row, old_row = contents.rows
    assert tuple(new_row) == COLUMN_NAMES == tuple(old_row)
    assert [new_row[n] for n in INSTANCE_COLUMNS] == [
        "redis",
        "1",
        "ef8c3e25-1e4f-4129-9e8a-7b7b532481b0",
    ]
    assert [old_row[n] for n in INSTANCE_COLUMNS] == [None] * 3

    with AuditLog(db, readonly=True) as log:
        record = AuditRecord(log)
        timeline = record.timeline("dep-1")
        [summary] = record.runs()
    assert [(r["trigger"], r["instance_index"]) for r in timeline] == [
        ("start", None),
        ("lock", "0"),
        ("unlock", "1"),
        ("unlock_ok", None),
    ]
    assert summary.events == 4 and summary.outcome == "discovering"
    merged = merged_timeline(timeline[:2], contents.rows)
    assert [r["instance_index"] for r in merged] == [None, "0", "1", None]
    assert summarise("dep-1", merged).events == 4


# -- rendering ---------------------------------------------------------------------------------

IDS = {
    ("redis", "0"): "6f7fbe60-e273-4d22-bba5-6d6fa7f13098",
    ("redis", "1"): "ef8c3e25-1e4f-4129-9e8a-7b7b532481b0\x1b[2J",
    ("sentinel", "0"): None,
}


def deployment_log(path: Path) -> list[int]:
    """A deployment run: 3 instances of 2 groups, their rows interleaved with run rows."""
    seqs: list[int] = []
    with AuditLog(path) as log:
        seqs.append(add(log, from_state=None, to_state="discovering", trigger="start").seq)
        for script in ("pre-backup-lock", "backup"):
            # Second appearance order differs from the first: sections follow the first.
            order = list(IDS) if script == "pre-backup-lock" else list(reversed(IDS))
            for group, index in order:
                seqs.append(
                    add(
                        log,
                        job=f"{group}-job",
                        script=script,
                        instance_group=group,
                        instance_index=index,
                        instance_id=IDS[(group, index)],
                    ).seq
                )
            seqs.append(add(log, to_state="backing_up", trigger=f"{script}_done").seq)
        seqs.append(add(log, from_state="cleaning", to_state="succeeded", trigger="done").seq)
    return seqs


def test_a_deployment_run_is_shown_by_instance(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    deployment_log(path)
    with AuditLog(path, readonly=True) as log:
        text = format_timeline(log.timeline("dep-1"))
    assert "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["SEQ", "TIME", "TRANSITION", "TRIGGER"]
    headings = [line for line in lines if line.startswith("instance ")]
    assert headings == [
        "instance redis/0 (id 6f7fbe60-e273-4d22-bba5-6d6fa7f13098)",
        "instance redis/1 (id ef8c3e25-1e4f-4129-9e8a-7b7b532481b0\\x1b[2J)",
        "instance sentinel/0",
    ]

    def seqs_of(block: list[str]) -> list[int]:
        return [int(line.split()[0]) for line in block if line and line[0].isdigit()]

    starts = [lines.index(h) for h in headings]
    assert all(lines[s - 1] == "" for s in starts)
    run_level = seqs_of(lines[1 : starts[0]])
    assert run_level == [1, 5, 9, 10]
    sections = [seqs_of(lines[a:b]) for a, b in zip(starts, [*starts[1:], len(lines)], strict=True)]
    assert sections == [[2, 8], [3, 7], [4, 6]]
    # Every row once, columns aligned across the sections.
    assert sorted(run_level + [seq for section in sections for seq in section]) == list(
        range(1, 11)
    )
    column = lines[0].index("TRIGGER")
    for line in lines[1:]:
        if line and line[0].isdigit():
            assert line[column - 2 : column] == "  " and line[column] != " "
    assert "redis-job" in lines[starts[0] + 1] and "(redis/0)" not in text


def test_python_m_audit_show_groups_a_deployment_run(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    deployment_log(path)
    result = run_cli("show", str(path), "dep")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\ninstance ") == 3
    assert "\x1b" not in result.stdout


def test_a_director_run_stays_one_table_with_the_instance_beside_the_job(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with AuditLog(path) as log:
        add(log, run_id="dir-1", from_state=None, to_state="discovering", trigger="start")
        for job in ("director", "uaa"):
            add(
                log,
                run_id="dir-1",
                job=job,
                script="pre-backup-lock",
                instance_group="bosh",
                instance_index="0",
                instance_id="b1e2",
            )
        add(log, run_id="dir-1", to_state="succeeded", trigger="done")
        rows = log.timeline("dir-1")
    text = format_timeline(rows)
    lines = text.splitlines()
    assert len(lines) == len(rows) + 1
    assert "director (bosh/0)" in lines[2] and "uaa (bosh/0)" in lines[3]
    assert "instance " not in text and "b1e2" not in text


def test_a_v1_run_renders_as_before(tmp_path: Path) -> None:
    path = v1_log(tmp_path / "audit.db")
    with AuditLog(path, readonly=True) as log:
        run = log.runs()[2]
        rows = log.timeline(run.run_id)
    text = format_timeline(rows)
    assert len(text.splitlines()) == len(rows) + 1
    assert "(bosh/0)" not in text and "instance " not in text


def test_journal_rows_of_a_deployment_run_go_to_their_instance(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    deployment_log(path)
    fields = {
        **BASE,
        "run_id": "dep-1",
        "from_state": "locked",
        "to_state": "unlocking",
        "trigger": "unlock",
        "job": "sentinel-job",
        "outcome": "ok",
        "instance_group": "sentinel",
        "instance_index": "0",
    }
    assert Journal(path).write(fields)
    with AuditLog(path, readonly=True) as log:
        text = format_timeline(AuditRecord(log).timeline("dep-1"))
    lines = text.splitlines()
    assert lines[-1].startswith("journal ") and "sentinel-job" in lines[-1]
    assert lines[lines.index("instance sentinel/0") + 3] == lines[-1]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "audit", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
