"""audit.export: JSONL/CSV export of a real audit log, verification of an exported copy,
and following a log that other processes append to. Real SQLite files, no mocks."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from audit import AuditError, AuditLog
from audit.export import (
    FORMATS,
    follow,
    verify_export,
    write_rows,
)
from audit.schema import COLUMN_NAMES, GENESIS_HASH, row_hash
from tests import reviewlog
from tests.reviewlog import ReviewLog

# The real six-run log (tests/reviewlog.py), as fixtures of this module.
_review_log_master = reviewlog._review_log_master
review_log = reviewlog.review_log

REPO_ROOT = Path(__file__).resolve().parent.parent
HOSTILE = '=HYPERLINK("http://x")'


def stored(db: Path) -> list[dict[str, Any]]:
    with AuditLog(db, readonly=True) as log:
        return list(log.rows())


def export(
    db: Path, out: Path, fmt: str, keep: Callable[[Mapping[str, Any]], bool] = lambda r: True
) -> int:
    with AuditLog(db, readonly=True) as log, out.open("w", encoding="utf-8", newline="") as f:
        return write_rows((r for r in log.rows() if keep(r)), f, fmt)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_jsonl(path: Path, objs: list[dict[str, Any]]) -> None:
    path.write_text(
        "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs), encoding="utf-8"
    )


def same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def event(**more: Any) -> dict[str, Any]:
    columns: dict[str, Any] = {
        "run_id": "r-follow",
        "operation": "backup",
        "target": "sim://demo",
        "mode": "sim",
        "operator": "dave",
        "origin_host": "jump",
        "reason": "CHG-9",
        "from_state": None,
        "to_state": "starting",
        "trigger": "start",
        "tool_version": "test",
    }
    columns.update(more)
    return columns


def wait_for(what: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n")


# -- export ---------------------------------------------------------------------------------


def test_jsonl_export_is_every_row_as_stored(review_log: ReviewLog, tmp_path: Path) -> None:
    rows = stored(review_log.path)
    out = tmp_path / "audit.jsonl"
    assert export(review_log.path, out, "jsonl") == len(rows) > 100
    raw = out.read_bytes()
    assert b"\r" not in raw and raw.endswith(b"\n")
    lines = raw.decode("utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == len(rows) + 1
    with AuditLog(review_log.path, readonly=True) as log:
        for line, row in zip(lines, rows, strict=False):
            pairs = json.loads(line, object_pairs_hook=list)
            assert [k for k, _ in pairs] == list(COLUMN_NAMES)
            obj = dict(pairs)
            assert all(same(obj[k], row[k]) for k in COLUMN_NAMES), row["seq"]
            # The hash is recomputable from the line alone: detail is the stored text.
            assert row_hash(obj) == obj["hash"]
            decoded = log.event(obj["seq"])
            assert decoded is not None
            if obj["detail"] is not None:
                assert isinstance(obj["detail"], str)
                assert json.loads(obj["detail"]) == decoded["detail"]
    durations = [r["duration"] for r in read_jsonl(out) if r["duration"] is not None]
    assert durations and all(type(d) is float for d in durations)
    assert durations == [r["duration"] for r in rows if r["duration"] is not None]
    assert any(r["instance_id"] is not None for r in rows)  # v2 columns exported too


def test_csv_export_parses_into_the_same_values(review_log: ReviewLog, tmp_path: Path) -> None:
    rows = stored(review_log.path)
    out = tmp_path / "audit.csv"
    assert export(review_log.path, out, "csv") == len(rows)
    with out.open(encoding="utf-8", newline="") as f:
        table = list(csv.reader(f))
    assert tuple(table[0]) == COLUMN_NAMES
    assert len(table) == len(rows) + 1
    for cells, row in zip(table[1:], rows, strict=True):
        for name, cell in zip(COLUMN_NAMES, cells, strict=True):
            value = row[name]
            assert cell == ("" if value is None else str(value)), (row["seq"], name)
            if isinstance(value, float):
                assert float(cell) == value
        assert json.loads(cells[COLUMN_NAMES.index("detail")] or "null") == (
            json.loads(row["detail"]) if row["detail"] is not None else None
        )


def test_write_rows_counts_formats_and_header(tmp_path: Path, review_log: ReviewLog) -> None:
    rows = stored(review_log.path)[:3]
    out = tmp_path / "x.csv"
    with out.open("w", encoding="utf-8", newline="") as f:
        assert write_rows(rows, f, "csv", header=False) == 3
    assert not out.read_text(encoding="utf-8").startswith("seq,")
    assert FORMATS == ("jsonl", "csv")
    with out.open("w", encoding="utf-8") as f, pytest.raises(AuditError, match="xml"):
        write_rows(rows, f, "xml")


# -- verify_export --------------------------------------------------------------------------


def test_full_export_verifies_against_the_log(review_log: ReviewLog, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    n = export(review_log.path, out, "jsonl")
    alone = verify_export(out)
    assert alone.ok and alone.rows == n and alone.links == n - 1 and alone.gaps == 0
    assert not alone.compared_with_log and "not compared" in "\n".join(alone.lines())
    check = verify_export(out, review_log.path)
    assert check.ok, check.problem
    assert (check.rows, check.links, check.gaps, check.matched_in_log) == (n, n - 1, 0, n)
    assert check.compared_with_log and check.problem is None and check.first_bad_line is None
    assert check.last_seq == n and check.last_hash == stored(review_log.path)[-1]["hash"]
    text = "\n".join(check.lines())
    assert f"{n} event(s) intact" in text and "same hash" in text
    assert verify_export(out, review_log.path, complete=True).ok


def test_filtered_export_verifies_with_gaps(review_log: ReviewLog, tmp_path: Path) -> None:
    wanted = {review_log.run_ids[1], review_log.run_ids[4]}
    out = tmp_path / "two-runs.jsonl"
    n = export(review_log.path, out, "jsonl", keep=lambda r: r["run_id"] in wanted)
    objs = read_jsonl(out)
    assert {o["run_id"] for o in objs} == wanted
    check = verify_export(out, review_log.path)
    assert check.ok, check.problem
    assert check.rows == check.matched_in_log == n
    # Each run's rows are contiguous: one jump into each run (the first has no line before).
    assert check.gaps == 1 and check.links == n - 2
    first_of_second = next(i for i, o in enumerate(objs) if o["run_id"] == review_log.run_ids[4])
    line = first_of_second + 1
    assert check.gap_list == ((line, objs[line - 2]["seq"], objs[line - 1]["seq"]),)
    assert "1 gap(s)" in "\n".join(check.lines())
    assert not verify_export(out, complete=True).ok


def test_edited_field_is_named_by_line_and_seq(review_log: ReviewLog, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    export(review_log.path, out, "jsonl")
    objs = read_jsonl(out)
    objs[40]["operator"] = "mallory"
    write_jsonl(out, objs)
    seq = objs[40]["seq"]
    for check in (verify_export(out), verify_export(out, review_log.path)):
        assert not check.ok
        assert check.problem == f"line 41 (seq {seq}): hash does not match its content (edited)"
        assert (check.first_bad_line, check.first_bad_seq, check.rows) == (41, seq, 40)
        assert "BROKEN" in check.lines()[0]


def test_deleted_line_is_a_named_gap(review_log: ReviewLog, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    n = export(review_log.path, out, "jsonl")
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    del lines[59]  # seq 60
    out.write_text("".join(lines), encoding="utf-8")
    # Alone, the file cannot tell a removed line from a filter: the gap is named.
    check = verify_export(out, review_log.path)
    assert check.ok and check.gaps == 1 and check.links == n - 3
    assert check.gap_list == ((60, 59, 61),)
    assert "line 60 (seq 59 -> 61)" in "\n".join(check.lines())
    # Said to be complete, the broken link is the problem.
    full = verify_export(out, complete=True)
    assert not full.ok and (full.first_bad_line, full.first_bad_seq) == (60, 61)
    assert full.problem == (
        "line 60 (seq 61): prev_hash links to no line: seq 60 missing from an export "
        "said to be complete (line removed)"
    )


def test_broken_link_and_order_are_named(review_log: ReviewLog, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    export(review_log.path, out, "jsonl")
    objs = read_jsonl(out)
    # A row re-hashed after its prev_hash was changed: content fine, link broken.
    bad = dict(objs[9], prev_hash="f" * 64)
    bad["hash"] = row_hash(bad)
    write_jsonl(out, [*objs[:9], bad, *objs[10:]])
    check = verify_export(out)
    assert check.problem == "line 10 (seq 10): prev_hash does not match the hash of seq 9 on line 9"
    first = dict(objs[0], prev_hash="1" * 64)
    first["hash"] = row_hash(first)
    write_jsonl(out, [first])
    assert verify_export(out).problem == (
        "line 1 (seq 1): prev_hash does not match the genesis value"
    )
    write_jsonl(out, [objs[0], objs[2], objs[1]])
    assert verify_export(out).problem == (
        "line 3 (seq 2): out of order after seq 3 (moved or repeated)"
    )
    assert objs[0]["prev_hash"] == GENESIS_HASH


def test_rechained_export_is_caught_by_the_log(review_log: ReviewLog, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    export(review_log.path, out, "jsonl")
    objs = read_jsonl(out)
    original = objs[99]["hash"]
    objs[99]["operator"] = "mallory"
    prev = objs[98]["hash"]
    for obj in objs[99:]:  # re-chain the copy from the edit on, consistently
        obj["prev_hash"] = prev
        obj["hash"] = prev = row_hash(obj)
    write_jsonl(out, objs)
    assert verify_export(out).ok  # consistent on its own...
    check = verify_export(out, review_log.path)  # ...but not the log's rows
    assert not check.ok and (check.first_bad_line, check.first_bad_seq) == (100, 100)
    assert check.matched_in_log == 99
    assert check.problem == (
        f"line 100 (seq 100): the log's seq 100 has hash {original}, "
        f"the export's {objs[99]['hash']}"
    )


def test_row_the_log_lacks_is_named(review_log: ReviewLog, tmp_path: Path) -> None:
    longer = tmp_path / "longer.db"
    shutil.copy(review_log.path, longer)
    with AuditLog(longer) as log:
        seq = log.append(**event()).seq
    out = tmp_path / "audit.jsonl"
    export(longer, out, "jsonl")
    assert verify_export(out, longer).ok
    check = verify_export(out, review_log.path)
    assert check.problem == f"line {seq} (seq {seq}): the log has no seq {seq}"


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda ls: [*ls[:2], "not json\n", *ls[2:]], "line 3 is not a JSON object"),
        (lambda ls: [*ls[:2], "[1, 2]\n", *ls[2:]], "line 3 is not a JSON object but a list"),
        (lambda ls: [*ls[:2], "\n", *ls[2:]], "line 3 is blank"),
        (lambda ls: [ls[0], _drop(ls[1], "job")], "line 2 (seq 2) lacks the column(s) job"),
        (lambda ls: [ls[0], _add(ls[1], "who", 1)], "line 2 (seq 2) has unknown key(s) who"),
        (lambda ls: [ls[0], _add(ls[1], "seq", "2")], "line 2: seq is '2', not a positive"),
        (lambda ls: [ls[0], ls[1][:-2] + ', "job": null}\n'], "line 2 is not a JSON object"),
    ],
)
def test_malformed_lines_are_named(
    review_log: ReviewLog, tmp_path: Path, mutate: Callable[[list[str]], list[str]], problem: str
) -> None:
    out = tmp_path / "audit.jsonl"
    export(review_log.path, out, "jsonl")
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)[:5]
    out.write_text("".join(mutate(lines)), encoding="utf-8")
    check = verify_export(out)
    assert not check.ok and check.problem is not None
    assert check.problem.startswith(problem), check.problem


def _drop(line: str, key: str) -> str:
    obj = json.loads(line)
    del obj[key]
    return json.dumps(obj) + "\n"


def _add(line: str, key: str, value: Any) -> str:
    return json.dumps({**json.loads(line), key: value}) + "\n"


def test_trailing_blank_lines_and_empty_export(review_log: ReviewLog, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    n = export(review_log.path, out, "jsonl")
    with out.open("a", encoding="utf-8") as f:
        f.write("\n\n")
    assert verify_export(out).rows == n
    with out.open("ab") as f:
        f.write(b"\xff\n")
    assert verify_export(out).problem == (f"line {n + 1} is blank (a line removed?)")
    out.write_bytes(out.read_bytes().replace(b"\n\n\n", b"\n"))
    bad = verify_export(out).problem
    assert bad is not None and bad.startswith(f"line {n + 1} is not UTF-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    check = verify_export(empty, review_log.path)
    assert check.ok and check.rows == 0 and "no events" in check.lines()[0]
    with pytest.raises(AuditError, match="no export file"):
        verify_export(tmp_path / "missing.jsonl")


def test_csv_is_refused_for_verification(review_log: ReviewLog, tmp_path: Path) -> None:
    out = tmp_path / "audit.csv"
    export(review_log.path, out, "csv")
    disguised = tmp_path / "audit.jsonl"
    shutil.copy(out, disguised)
    for path in (out, disguised):
        with pytest.raises(AuditError, match="CSV export") as refused:
            verify_export(path)
        assert "verify" in str(refused.value) and "JSONL" in str(refused.value)


# -- hostile and tampered values -------------------------------------------------------------


def test_hostile_text_is_neutralised_in_csv_only(review_log: ReviewLog, tmp_path: Path) -> None:
    with AuditLog(review_log.path) as log:
        seq = log.append(
            **event(
                operator=HOSTILE,
                origin_host="@evil",
                reason="\tcmd",
                job="+job",
                script="a\r\nb",
                instance_group="\rgroup",
                instance_index="-1",
                exit_code=-1,
                duration=-0.25,
                detail={"k": "=1"},
            )
        ).seq
    csv_out, jsonl_out = tmp_path / "a.csv", tmp_path / "a.jsonl"
    export(review_log.path, csv_out, "csv")
    export(review_log.path, jsonl_out, "jsonl")
    with csv_out.open(encoding="utf-8", newline="") as f:
        last = dict(zip(COLUMN_NAMES, list(csv.reader(f))[-1], strict=True))
    assert last["seq"] == str(seq)
    assert last["operator"] == "'" + HOSTILE
    assert last["origin_host"] == "'@evil" and last["reason"] == "'\tcmd"
    assert last["job"] == "'+job" and last["instance_group"] == "'\rgroup"
    assert last["instance_index"] == "'-1"  # text, though it looks like a number
    assert last["script"] == "a\r\nb"  # embedded line ends survive, quoted
    assert last["exit_code"] == "-1" and last["duration"] == "-0.25"  # numbers untouched
    assert last["detail"] == '{"k":"=1"}'
    obj = read_jsonl(jsonl_out)[-1]
    assert obj["operator"] == HOSTILE and obj["reason"] == "\tcmd" and obj["exit_code"] == -1
    assert obj["instance_index"] == "-1" and obj["duration"] == -0.25
    check = verify_export(jsonl_out, review_log.path)
    assert check.ok and check.rows == seq


def test_blob_in_a_tampered_row_is_exported_and_flagged(
    review_log: ReviewLog, tmp_path: Path
) -> None:
    conn = sqlite3.connect(review_log.path)
    with conn:
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
            conn.execute(f"DROP TRIGGER {name}")
        conn.execute("UPDATE events SET detail = x'0a1b' WHERE seq = 3")
        conn.execute("UPDATE events SET duration = 9e999 WHERE seq = 7")
    conn.close()
    csv_out, jsonl_out = tmp_path / "a.csv", tmp_path / "a.jsonl"
    n = export(review_log.path, jsonl_out, "jsonl")
    assert export(review_log.path, csv_out, "csv") == n
    objs = read_jsonl(jsonl_out)
    assert objs[2]["detail"] == "x'0a1b'" and objs[6]["duration"] == "Inf"
    with csv_out.open(encoding="utf-8", newline="") as f:
        assert list(csv.reader(f))[3][COLUMN_NAMES.index("detail")] == "x'0a1b'"
    for check in (verify_export(jsonl_out), verify_export(jsonl_out, review_log.path)):
        assert check.problem == "line 3 (seq 3): hash does not match its content (edited)"
    # Even a line re-hashed to match its x'..' text is caught against the log.
    objs[2]["hash"] = row_hash(objs[2])
    prev = objs[2]["hash"]
    for obj in objs[3:]:
        obj["prev_hash"] = prev
        obj["hash"] = prev = row_hash(obj)
    write_jsonl(jsonl_out, objs[:5])
    assert verify_export(jsonl_out).ok
    assert verify_export(jsonl_out, review_log.path).first_bad_seq == 3


# -- follow -----------------------------------------------------------------------------------


class Follower:
    """follow() in a thread, writing to a file, with its result or error kept."""

    def __init__(
        self,
        db: Path,
        out: Path,
        after_seq: int,
        keep: Callable[[Mapping[str, Any]], bool] = lambda r: True,
        fmt: str = "jsonl",
    ) -> None:
        self.stop = threading.Event()
        self.result: int | None = None
        self.error: BaseException | None = None
        self.file = out.open("a", encoding="utf-8", newline="")
        self.thread = threading.Thread(
            target=self._run, args=(db, fmt, keep, after_seq), daemon=True
        )
        self.thread.start()

    def _run(self, db: Path, fmt: str, keep: Any, after_seq: int) -> None:
        try:
            self.result = follow(
                db, self.file, fmt, keep=keep, after_seq=after_seq, stop=self.stop, poll=0.05
            )
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=15)
        self.file.close()
        assert not self.thread.is_alive()

    def ended(self) -> BaseException | None:
        """Wait for follow to end by itself (an error); the error."""
        self.thread.join(timeout=15)
        self.finish()
        return self.error


@pytest.fixture
def followers() -> Iterator[list[Follower]]:
    started: list[Follower] = []
    yield started
    for f in started:
        f.finish()


SUBPROCESS_WRITER = (
    "import sys\n"
    "from audit import AuditLog\n"
    "with AuditLog(sys.argv[1]) as log:\n"
    "    log.append(run_id='r-follow', operation='backup', target='sim://demo', mode='sim',\n"
    "               operator='erin', origin_host='other', reason=None, from_state='starting',\n"
    "               to_state='locking', trigger='lock', tool_version='test', duration=0.1)\n"
)


def test_follow_streams_rows_other_writers_append(
    review_log: ReviewLog, tmp_path: Path, followers: list[Follower]
) -> None:
    db = review_log.path
    out, daves = tmp_path / "all.jsonl", tmp_path / "dave.jsonl"
    n = export(db, out, "jsonl")
    daves.write_text("", encoding="utf-8")
    followers.append(everything := Follower(db, out, after_seq=n))
    followers.append(dave := Follower(db, daves, n, keep=lambda r: r["operator"] == "dave"))
    with AuditLog(db) as writer:
        writer.append(**event())
        writer.append(**event(operator="carol", from_state="starting", to_state="x"))
        wait_for(lambda: line_count(out) == n + 2)
        subprocess.run(
            [sys.executable, "-c", SUBPROCESS_WRITER, str(db)],
            cwd=REPO_ROOT,
            check=True,
            timeout=60,
        )
        wait_for(lambda: line_count(out) == n + 3)
        writer.append(**event(detail={"x": [1, 2]}))
        wait_for(lambda: line_count(out) == n + 4 and line_count(daves) == 2)
    everything.finish()
    dave.finish()
    assert everything.error is None and dave.error is None
    assert (everything.result, dave.result) == (4, 2)
    objs = read_jsonl(out)
    assert [o["operator"] for o in objs[n:]] == ["dave", "carol", "erin", "dave"]
    check = verify_export(out, db, complete=True)
    assert check.ok and check.rows == n + 4 and check.links == n + 3, check.problem
    assert verify_export(daves, db).ok


def test_follow_csv_writes_no_header(
    review_log: ReviewLog, tmp_path: Path, followers: list[Follower]
) -> None:
    db = review_log.path
    out = tmp_path / "all.csv"
    n = export(db, out, "csv")
    followers.append(f := Follower(db, out, after_seq=n, fmt="csv"))
    with AuditLog(db) as writer:
        writer.append(**event(operator=HOSTILE))
    wait_for(lambda: line_count(out) == n + 2)
    f.finish()
    with out.open(encoding="utf-8", newline="") as file:
        table = list(csv.reader(file))
    assert len(table) == n + 2 and table[-1][COLUMN_NAMES.index("operator")] == "'" + HOSTILE


def test_follow_survives_a_locked_log(
    review_log: ReviewLog,
    tmp_path: Path,
    followers: list[Follower],
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = review_log.path
    # In rollback-journal mode (a log on a file system without WAL support) a writer's
    # exclusive lock keeps readers out: the follower must wait it out, not give up.
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0] == "delete"
    conn.close()
    out = tmp_path / "all.jsonl"
    n = export(db, out, "jsonl")
    head = stored(db)[-1]
    caplog.set_level(logging.INFO, logger="audit.export")
    followers.append(f := Follower(db, out, after_seq=n))
    locker = sqlite3.connect(db, isolation_level=None, timeout=10)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        wait_for(lambda: any("retrying" in r.getMessage() for r in caplog.records))
        assert f.thread.is_alive() and f.error is None
        # The lock holder appends a row (a valid one: the triggers allow the next seq).
        row = {"seq": n + 1, "ts": "2026-12-01T15:00:00.000000Z", **event(operator="locker")}
        row.update(prev_hash=head["hash"], detail=None, job=None, script=None, outcome="ok")
        row.update(exit_code=None, duration=None)
        row["hash"] = row_hash(row)
        names = ", ".join(row)
        marks = ", ".join("?" * len(row))
        locker.execute(f"INSERT INTO events ({names}) VALUES ({marks})", list(row.values()))
        locker.execute("COMMIT")
    finally:
        locker.close()
    wait_for(lambda: line_count(out) == n + 1)
    with AuditLog(db) as writer:
        writer.append(**event(operator="after-lock"))
    wait_for(lambda: line_count(out) == n + 2)
    f.finish()
    assert f.error is None and f.result == 2
    assert [o["operator"] for o in read_jsonl(out)[n:]] == ["locker", "after-lock"]
    assert any("reading again" in r.getMessage() for r in caplog.records)
    assert verify_export(out, db, complete=True).ok


def test_follow_ends_when_the_log_disappears(
    review_log: ReviewLog, tmp_path: Path, followers: list[Follower]
) -> None:
    db = review_log.path
    out = tmp_path / "all.jsonl"
    n = export(db, out, "jsonl")
    followers.append(f := Follower(db, out, after_seq=n))
    with AuditLog(db) as writer:
        writer.append(**event())
    wait_for(lambda: line_count(out) == n + 1)  # following, with the log open
    os.remove(db)
    error = f.ended()
    assert isinstance(error, AuditError) and "disappeared" in str(error)
    assert len(read_jsonl(out)) == n + 1


@pytest.mark.parametrize("stale_wal", [True, False])
def test_follow_ends_when_the_log_is_replaced_by_another_file(
    review_log: ReviewLog, tmp_path: Path, followers: list[Follower], stale_wal: bool
) -> None:
    db = review_log.path
    out = tmp_path / "all.jsonl"
    n = export(db, out, "jsonl")
    followers.append(f := Follower(db, out, after_seq=n))
    with AuditLog(db) as writer:
        writer.append(**event())
    wait_for(lambda: line_count(out) == n + 1)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE foo (x)")
    conn.close()
    if not stale_wal:
        for name in ("audit.db-wal", "audit.db-shm"):
            (db.parent / name).unlink(missing_ok=True)
    os.replace(other, db)
    error = f.ended()
    assert isinstance(error, AuditError) and str(db) in str(error)
    if not stale_wal:
        assert "not a bbrx audit log" in str(error)


def test_follow_refuses_a_log_not_continuing_the_chain(
    review_log: ReviewLog, tmp_path: Path, followers: list[Follower]
) -> None:
    # A log with fewer rows than the export has reached: truncated or another log.
    followers.append(f := Follower(review_log.path, tmp_path / "o.jsonl", after_seq=10_000))
    error = f.ended()
    assert isinstance(error, AuditError) and "has no seq 10000" in str(error)


def test_import_needs_nothing_of_orchestrator() -> None:
    code = (
        "import sys, audit.export\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('orchestrator', 'simulator'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
