"""What a compliance reviewer does, end to end: filter the runs, export them, make the
report and the evidence pack, verify (against signed checkpoints too), and find every
read in the trail. Real logs of real simulator runs (tests/reviewlog.py), the real
`bbrx` command line in-process, real `sqlite3`, `sha256sum`, `ssh-keygen` and Datasette.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from audit import AuditLog, verify_log
from audit.errors import AuditError
from audit.query import RunFilter
from tests import reviewlog
from tests.conftest import Bbrx
from tests.reviewlog import ReviewLog

REPO_ROOT = Path(__file__).resolve().parent.parent
SQLITE3 = shutil.which("sqlite3")
_review_log_master = reviewlog._review_log_master
review_log = reviewlog.review_log
needs_sqlite3 = pytest.mark.skipif(SQLITE3 is None, reason="sqlite3 not installed")


@pytest.fixture
def reviewer(review_log: ReviewLog) -> Bbrx:
    """`bbrx` as the reviewer dana, on the real log."""
    bbrx = Bbrx(review_log.home)
    bbrx.env["BBRX_OPERATOR"] = "dana@audit"
    return bbrx


def run_ids(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines()[1:] if line[:8].isdigit()]


def reads(db: Path) -> list[dict]:
    with AuditLog(db, readonly=True) as log:
        return [r for r in log.rows() if r["mode"] == "review"]


# --- filters ------------------------------------------------------------------------------


def test_filters_select_runs_as_asked(reviewer: Bbrx, review_log: ReviewLog) -> None:
    backup, cleanup, failed, _, redis, restore = review_log.run_ids

    def listed(*args: str) -> list[str]:
        # In-process (the same typer app): a dozen listings need no dozen interpreters.
        result = reviewer.read_only("audit", "runs", *args)
        assert result.code == 0, result
        return run_ids(result.stdout)

    assert listed() == list(review_log.run_ids)
    assert listed("--operator", "alice") == [backup, cleanup, restore]
    assert listed("--outcome", "failed") == [failed]
    assert listed("--operation", "backup", "--operation", "restore") == [
        backup,
        failed,
        redis,
        restore,
    ]
    # A director's target covers its deployments; a deployment's only itself.
    assert redis in listed("--target", "sim://demo")
    assert listed("--target", "sim://demo/redis") == [redis]
    assert listed("--mode", "live") == []
    assert len(listed("--mode", "sim")) == 6
    today = datetime.now(UTC).date()
    assert len(listed("--since", str(today), "--until", str(today))) == 6
    assert listed("--since", "1d", "--operator", "bob", "--outcome", "failed") == [failed]
    assert listed("--until", "2020-01-01") == []
    assert (
        "1 run(s) match --outcome failed"
        in reviewer.read_only("audit", "runs", "--outcome", "failed").stdout
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "last tuesday"], "--since 'last tuesday' is not a time"),
        (["--outcome", "great"], "--outcome 'great' is not one of succeeded"),
        (["--mode", "prod"], "--mode 'prod' is not one of sim, live, review"),
        (["--since", "2026-12-02", "--until", "2026-12-01"], "is not before --until"),
    ],
)
def test_a_bad_filter_is_named(reviewer: Bbrx, args: list[str], message: str) -> None:
    result = reviewer("audit", "runs", *args)
    assert result.code == 1
    assert message in result.stderr


def test_until_a_date_includes_that_whole_day_and_a_time_that_moment() -> None:
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    flt = RunFilter.parse(since="2026-11-30", until="2026-11-30", now=now)
    assert (flt.since, flt.until) == ("2026-11-30T00:00:00.000000Z", "2026-12-01T00:00:00.000000Z")
    at = RunFilter.parse(until="2026-11-30T23:00+09:00", now=now)
    assert at.until == "2026-11-30T14:00:00.000001Z"
    assert RunFilter.parse(since="7d", now=now).since == "2026-11-24T12:00:00.000000Z"
    with pytest.raises(AuditError, match="cannot be followed"):
        RunFilter.parse(outcomes=["failed"]).first_row_matches({})


# --- export -------------------------------------------------------------------------------


def test_export_jsonl_and_csv_then_verify_the_copy(
    reviewer: Bbrx, review_log: ReviewLog, tmp_path: Path
) -> None:
    out = tmp_path / "backups.jsonl"
    result = reviewer(
        "audit", "export", "--target", "sim://demo", "--operation", "backup", "--output", str(out)
    )
    assert result.code == 0, result
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    wanted = {review_log.run_ids[i] for i in (0, 2, 4)}
    assert {r["run_id"] for r in rows} == wanted
    assert "exported" in result.stderr and "recorded in the audit log" in result.stderr

    csv_out = tmp_path / "all.csv"
    assert reviewer("audit", "export", "--format", "csv", "-o", str(csv_out)).code == 0
    header = csv_out.read_text().splitlines()[0]
    assert header.startswith("seq,ts,run_id,operation,target,mode,operator,origin_host")

    checked = reviewer("audit", "verify", "--export", str(out))
    assert checked.code == 0, checked
    # A SIEM copy with one field changed is caught, naming the line.
    lines = out.read_text().splitlines()
    edited = json.loads(lines[3])
    edited["operator"] = "mallory"
    lines[3] = json.dumps(edited)
    out.write_text("\n".join(lines) + "\n")
    broken = reviewer("audit", "verify", "--export", str(out))
    assert broken.code == 1
    assert "line 4" in broken.stderr


def test_export_to_stdout_is_the_events_only(reviewer: Bbrx, review_log: ReviewLog) -> None:
    result = reviewer("audit", "export", "--outcome", "failed")
    assert result.code == 0, result
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["run_id"] for r in rows} == {review_log.run_ids[2]}
    assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)


@pytest.mark.slow
def test_follow_streams_new_runs_until_interrupted(reviewer: Bbrx, tmp_path: Path) -> None:
    import signal

    from tests.conftest import wait_for

    out = tmp_path / "follow.jsonl"
    follower = reviewer.start("audit", "export", "--follow", "--mode", "sim", "--output", str(out))
    try:
        wait_for(lambda: out.exists() and out.stat().st_size > 0, what="the first rows")
        before = len(out.read_text().splitlines())
        assert reviewer("director", "--host", "sim://demo", "pre-backup-check").code == 0
        wait_for(
            lambda: "pre-backup-check" in out.read_text() and out.read_text().endswith("\n"),
            what="the new run's rows",
        )
        follower.send_signal(signal.SIGINT)
        _, stderr = follower.communicate(timeout=20)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate()
    assert follower.returncode == 0, stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) > before
    assert {r["mode"] for r in rows} == {"sim"}  # the follower's own read is mode review
    assert reviewer("audit", "verify", "--export", str(out)).code == 0


# --- reads are audited --------------------------------------------------------------------


def test_every_read_appends_its_own_row(
    reviewer: Bbrx, review_log: ReviewLog, tmp_path: Path
) -> None:
    assert (
        reviewer(
            "audit", "export", "--operator", "bob", "--reason", "SOX-7", "-o", str(tmp_path / "e")
        ).code
        == 0
    )
    assert reviewer("audit", "verify").code == 0
    assert reviewer("audit", "report", "-o", str(tmp_path / "r.html")).code == 0
    assert reviewer("audit", "evidence", "-o", str(tmp_path / "e.tar.gz")).code == 0
    rows = reads(review_log.path)
    assert [r["operation"] for r in rows] == [
        "audit-export",
        "audit-verify",
        "audit-report",
        "audit-evidence",
    ]
    assert {r["operator"] for r in rows} == {"dana@audit"}
    assert rows[0]["reason"] == "SOX-7"
    assert json.loads(rows[0]["detail"])["filters"] == {"operator": ["bob"]}
    assert json.loads(rows[1]["detail"])["result"] == "intact"
    assert {r["target"] for r in rows} == {str(review_log.path.resolve())}
    assert verify_log(review_log.path).ok
    # The reads are runs of their own, and `--mode review` finds them.
    listed = reviewer("audit", "runs", "--mode", "review")
    assert len(run_ids(listed.stdout)) == 4


def test_a_read_of_a_log_that_cannot_be_written_still_reads_and_says_so(
    reviewer: Bbrx, review_log: ReviewLog
) -> None:
    # Another process holds the log's write lock for longer than the busy timeout.
    holder = sqlite3.connect(review_log.path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        reviewer.env["BBRX_AUDIT_BUSY_TIMEOUT"] = "0.2"
        before = verify_log(review_log.path).count
        result = reviewer("audit", "verify")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.code == 0, result
    assert "intact" in result.stdout
    assert "this read could NOT be recorded in the audit log" in result.stdout
    assert verify_log(review_log.path).count == before


def test_a_read_never_migrates_a_version_1_log(reviewer: Bbrx, tmp_path: Path) -> None:
    v1 = tmp_path / "v1.db"
    with sqlite3.connect(v1) as conn:
        conn.executescript((REPO_ROOT / "tests/data/audit-v1.sql").read_text())
    conn.close()
    before = v1.read_bytes()
    result = reviewer("audit", "verify", "--audit-db", str(v1))
    assert result.code == 0, result
    assert "could NOT be recorded" in result.stdout and "schema version 1" in result.stdout
    assert v1.read_bytes() == before


# --- views and other tools ----------------------------------------------------------------


@needs_sqlite3
def test_the_views_answer_the_common_questions_in_plain_sqlite3(
    reviewer: Bbrx, review_log: ReviewLog, tmp_path: Path
) -> None:
    assert reviewer("audit", "export", "-o", str(tmp_path / "x")).code == 0  # one read

    def query(sql: str) -> list[list[str]]:
        done = subprocess.run(
            [SQLITE3, "-readonly", "-separator", "|", str(review_log.path), sql],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        return [line.split("|") for line in done.stdout.splitlines()]

    runs = query(
        "SELECT run_id, operation, operator, outcome FROM runs"
        " WHERE mode = 'sim' ORDER BY first_seq"
    )
    assert [r[0] for r in runs] == list(review_log.run_ids)
    assert runs[2][1:] == ["backup", "bob", "failed"]
    failures = query("SELECT run_id, job, script FROM failures WHERE script = 'backup'")
    assert [review_log.run_ids[2], "blobstore", "backup"] in failures
    who = query(
        "SELECT operator, operation, runs, succeeded, failed FROM who_ran_what"
        " WHERE operation = 'backup' ORDER BY operator"
    )
    assert who == [
        ["alice", "backup", "1", "1", "0"],
        ["bob", "backup", "1", "0", "1"],
        ["carol", "backup", "1", "1", "0"],
    ]
    assert query("SELECT operation, operator FROM reads") == [["audit-export", "dana@audit"]]


def test_sqlite_utils_and_datasette_read_the_views(review_log: ReviewLog) -> None:
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "sqlite-utils"),
            "query",
            str(review_log.path),
            "SELECT outcome, COUNT(*) AS n FROM runs GROUP BY outcome ORDER BY outcome",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [
        {"outcome": "failed", "n": 1},
        {"outcome": "succeeded", "n": 5},
    ]

    datasette = pytest.importorskip("datasette.app")

    async def ask() -> list[dict]:
        ds = datasette.Datasette([str(review_log.path)])
        response = await ds.client.get("/audit/runs.json?_shape=array&outcome=failed")
        assert response.status_code == 200, response.text
        return response.json()

    before = review_log.path.read_bytes()
    [failed] = asyncio.run(ask())
    assert failed["run_id"] == review_log.run_ids[2]
    assert failed["operator"] == "bob"
    assert review_log.path.read_bytes() == before  # Datasette opened it read-only


def test_verify_reports_an_altered_view(review_log: ReviewLog) -> None:
    with sqlite3.connect(review_log.path) as conn:
        conn.execute("DROP VIEW failures")
        conn.execute("CREATE VIEW failures AS SELECT * FROM events WHERE 0")
    conn.close()
    report = verify_log(review_log.path)
    assert not report.ok
    assert "views altered (they may hide rows): failures" in (report.problem or "")


def test_a_rechained_row_without_its_operator_fails_the_required_fields(
    review_log: ReviewLog,
) -> None:
    from audit.schema import TRIGGERS, row_hash

    with sqlite3.connect(review_log.path) as conn:
        for name in TRIGGERS:
            conn.execute(f"DROP TRIGGER IF EXISTS {name}")
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute("SELECT * FROM events WHERE seq >= 5 ORDER BY seq")]
        prev = conn.execute("SELECT hash FROM events WHERE seq = 4").fetchone()[0]
        rows[0]["operator"] = " "
        for row in rows:
            row["prev_hash"] = prev
            row["hash"] = prev = row_hash(row)
            conn.execute(
                "UPDATE events SET operator = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                [row["operator"], row["prev_hash"], row["hash"], row["seq"]],
            )
    conn.close()
    report = verify_log(review_log.path)
    assert report.first_bad_seq == 5
    assert "does not give the user identification" in (report.problem or "")


def manifest_runs(folder: Path) -> list[dict]:
    """The first row of each run in the pack's JSONL export."""
    first: dict[str, dict] = {}
    for line in (folder / "events.jsonl").read_text().splitlines():
        row = json.loads(line)
        first.setdefault(row["run_id"], row)
    return list(first.values())


# --- report and evidence ------------------------------------------------------------------


def test_the_evidence_pack_checks_out_with_sha256sum(
    reviewer: Bbrx, review_log: ReviewLog, tmp_path: Path
) -> None:
    pack = tmp_path / "evidence.tar.gz"
    # The README's question: every backup of sim://demo this week, who, why, and proof.
    result = reviewer(
        "audit",
        "evidence",
        *("--target", "sim://demo", "--operation", "backup", "--since", "7d"),
        *("-o", str(pack)),
    )
    assert result.code == 0, result
    assert "sha256 " in result.stdout
    with tarfile.open(pack) as tar:
        names = sorted(Path(m.name).name for m in tar.getmembers())
        tar.extractall(tmp_path / "x", filter="data")
    assert names == sorted(
        [
            "events.jsonl",
            "events.csv",
            "report.html",
            "verification.txt",
            "README.txt",
            "MANIFEST.json",
            "SHA256SUMS",
        ]
    )
    [folder] = (tmp_path / "x").iterdir()
    summed = subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=folder, capture_output=True, text=True, timeout=30
    )
    assert summed.returncode == 0, summed.stdout + summed.stderr
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert set(manifest["runs"]) == {review_log.run_ids[i] for i in (0, 2, 4)}
    assert manifest["verified"] == "intact"
    assert manifest["filters"] == {
        "since": "7d",
        "target": ["sim://demo"],
        "operation": ["backup"],
    }
    assert {r["operator"] for r in manifest_runs(folder)} == {"alice", "bob", "carol"}
    assert "intact" in (folder / "verification.txt").read_text()
    assert reviewer("audit", "verify", "--export", str(folder / "events.jsonl")).code == 0
    # Evidence is never overwritten.
    again = reviewer("audit", "evidence", "-o", str(pack))
    assert again.code == 1 and "already exists" in again.stderr


def test_report_of_one_run_or_of_filters(
    reviewer: Bbrx, review_log: ReviewLog, tmp_path: Path
) -> None:
    page = tmp_path / "one.html"
    failed = review_log.run_ids[2]
    result = reviewer("audit", "report", failed[:21], "-o", str(page))
    assert result.code == 0, result
    html = page.read_text()
    assert failed in html and review_log.run_ids[0] not in html
    both = reviewer("audit", "report", failed, "--operator", "bob", "-o", str(page))
    assert both.code == 1 and "not both" in both.stderr


# --- checkpoints through the command line ---------------------------------------------------


@pytest.fixture
def signing_key(tmp_path: Path) -> tuple[Path, Path]:
    key = tmp_path / "keys" / "reviewer"
    key.parent.mkdir()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dana", "-f", str(key)],
        check=True,
        timeout=30,
    )
    signers = tmp_path / "keys" / "allowed_signers"
    signers.write_text("dana@audit " + key.with_suffix(".pub").read_text())
    return key, signers


def test_a_run_signs_a_checkpoint_that_later_catches_a_truncation(
    reviewer: Bbrx, review_log: ReviewLog, signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    from audit.schema import TRIGGERS

    key, signers = signing_key
    checkpoints = tmp_path / "elsewhere" / "checkpoints.txt"
    checkpoints.parent.mkdir()
    config = review_log.home / "config.yml"
    config.write_text(f"audit:\n  checkpoint_key: {key}\n  checkpoint_file: {checkpoints}\n")
    backup = reviewer("director", "--host", "sim://demo", "pre-backup-check")
    assert backup.code == 0, backup
    assert "Checkpoint 1 signed into" in backup.stderr
    with AuditLog(review_log.path, readonly=True) as log:
        head = log.head()
    assert head is not None and f"seq={head.seq} " in checkpoints.read_text()
    held = reviewer(
        "audit", "verify", "--checkpoints", str(checkpoints), "--allowed-signers", str(signers)
    )
    assert held.code == 0, held

    # Truncate the tail (the verify row, and the run's last rows) with plain SQL.
    with sqlite3.connect(review_log.path) as conn:
        conn.execute("DROP TRIGGER events_no_delete")
        conn.execute("DELETE FROM events WHERE seq > ?", [head.seq - 3])
        conn.execute(TRIGGERS["events_no_delete"])  # and put it back as it was
    conn.close()
    assert verify_log(review_log.path).ok  # the chain alone cannot tell
    caught = reviewer(
        "audit", "verify", "--checkpoints", str(checkpoints), "--allowed-signers", str(signers)
    )
    assert caught.code == 1
    assert "checkpoint 1" in caught.stderr and f"seq {head.seq - 3}" in caught.stderr


def test_audit_checkpoint_needs_a_key_and_a_file(
    reviewer: Bbrx, signing_key, tmp_path: Path
) -> None:
    missing = reviewer("audit", "checkpoint")
    assert missing.code == 1
    assert "no --key and --output given" in missing.stderr
    key, _ = signing_key
    out = tmp_path / "cp.txt"
    signed = reviewer("audit", "checkpoint", "--key", str(key), "--output", str(out))
    assert signed.code == 0, signed
    assert "checkpoint 1 of" in signed.stdout
    lonely = reviewer("audit", "verify", "--checkpoints", str(out))
    assert lonely.code == 1 and "--allowed-signers" in lonely.stderr


# --- the reviewer's package alone -----------------------------------------------------------


def test_python_m_audit_does_it_all_without_bbrx(
    review_log: ReviewLog, signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    key, signers = signing_key
    env = {**os.environ, "BBRX_OPERATOR": "erin@audit"}
    code = (
        "import runpy, sys\n"
        "sys.argv = ['python -m audit', *sys.argv[1:]]\n"
        "try:\n"
        "    runpy.run_module('audit', run_name='__main__')\n"
        "finally:\n"
        "    ours = ('orchestrator', 'simulator')\n"
        "    leaked = sorted(m for m in sys.modules if m.split('.')[0] in ours)\n"
        "    assert not leaked, leaked\n"
    )

    def audit(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    db = str(review_log.path)
    cp = tmp_path / "cp.txt"
    for args in (
        ["checkpoint", db, "--key", str(key), "--output", str(cp)],
        ["verify", db, "--checkpoints", str(cp), "--allowed-signers", str(signers)],
        [
            "export",
            db,
            "--format",
            "csv",
            "--operator",
            "alice",
            "--output",
            str(tmp_path / "a.csv"),
        ],
        ["report", db, "--output", str(tmp_path / "r.html")],
        ["evidence", db, "--output", str(tmp_path / "e.tar.gz")],
        ["runs", db, "--mode", "review"],
    ):
        done = audit(*args)
        assert done.returncode == 0, (args, done.stderr)
    assert "erin@audit" in done.stdout
    assert [r["operation"] for r in reads(review_log.path)] == [
        "audit-checkpoint",
        "audit-verify",
        "audit-export",
        "audit-report",
        "audit-evidence",
    ]


# --- what a review found: each a user-visible promise -------------------------------------


def test_a_blank_operator_is_refused_before_it_reaches_the_log(
    reviewer: Bbrx, review_log: ReviewLog
) -> None:
    before = verify_log(review_log.path).count
    run = reviewer("--operator", "  ", "director", "--host", "sim://demo", "pre-backup-check")
    assert run.code == 1 and "--operator is blank" in run.stderr
    reviewer.env["BBRX_OPERATOR"] = " "
    read = reviewer("audit", "verify")
    assert read.code == 1 and "BBRX_OPERATOR is blank" in read.stderr
    assert verify_log(review_log.path).count == before
    with AuditLog(review_log.path) as log, pytest.raises(AuditError, match="empty or blank"):
        log.append(**{**_columns(log), "operator": "\t"})


def _columns(log: AuditLog) -> dict:
    row = log.event(1)
    assert row is not None
    keep = set(row) - {"seq", "ts", "prev_hash", "hash", "detail"}
    return {k: row[k] for k in keep}


def test_a_report_of_a_broken_log_is_written_and_exits_1(
    reviewer: Bbrx, review_log: ReviewLog, tmp_path: Path
) -> None:
    with sqlite3.connect(review_log.path) as conn:
        conn.execute("DROP TRIGGER events_no_update")
        conn.execute("UPDATE events SET reason = 'nothing to see' WHERE seq = 7")
    conn.close()
    page = tmp_path / "broken.html"
    result = reviewer("audit", "report", "-o", str(page))
    assert result.code == 1
    assert "seq 7: hash does not match its content" in result.stderr
    assert "BROKEN" in page.read_text()
    pack = reviewer("audit", "evidence", "-o", str(tmp_path / "e.tar.gz"))
    assert pack.code == 1 and (tmp_path / "e.tar.gz").exists()


def test_an_export_is_not_held_to_an_unrelated_log(
    reviewer: Bbrx, review_log: ReviewLog, tmp_path: Path
) -> None:
    out = tmp_path / "e.jsonl"
    assert reviewer("audit", "export", "--outcome", "failed", "-o", str(out)).code == 0
    # Another jump box, with a log of its own at the default place.
    other = Bbrx(tmp_path / "elsewhere")
    other.home.mkdir()
    assert other("director", "--host", "sim://demo", "pre-backup-check").code == 0
    before = verify_log(other.audit_db).count
    alone = other("audit", "verify", "--export", str(out))
    assert alone.code == 0, alone
    assert "is of another log: it was checked on its own" in alone.stdout
    assert verify_log(other.audit_db).count == before  # nothing recorded there
    named = other("audit", "verify", "--export", str(out), "--audit-db", str(other.audit_db))
    assert named.code == 1  # named, it is compared, and it is not that log's
    held = other("audit", "verify", "--export", str(out), "--audit-db", str(review_log.path))
    assert held.code == 0, held


def test_a_follow_that_cannot_start_leaves_no_file(reviewer: Bbrx, tmp_path: Path) -> None:
    out = tmp_path / "f.jsonl"
    result = reviewer("audit", "export", "--follow", "--outcome", "failed", "-o", str(out))
    assert result.code == 1 and "cannot be followed" in result.stderr
    assert not out.exists()
