"""The HTML audit report (audit/report.py): built from a real log of six real simulator
runs, opened in a real headless Chromium, and checked for what a reviewer sees."""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from audit.log import AuditLog, RunSummary
from audit.report import (
    AXIS_HEIGHT,
    BOTTOM_MARGIN,
    CSP,
    LANE_HEIGHT,
    SVG_WIDTH,
    Verification,
    hash_chain_verification,
    render_report,
    summarize,
)
from audit.verify import verify_log
from tests import reviewlog
from tests.browser import NOT_INSTALLED, Browser, chromium_path
from tests.reviewlog import ReviewLog

# The real six-run log's fixtures, used here under their own names.
review_log = reviewlog.review_log
_review_log_master = reviewlog._review_log_master

SCREENSHOT = Path("/tmp/bbrx-report-screenshot.png")
GENERATED_AT = "2026-12-01T15:00:00.000000Z"

HOSTILE_OPERATOR = "<script>alert(1)</script>"
HOSTILE_REASON = '"><img src=x onerror=alert(2)> \u202etxt.exe'
HOSTILE_JOB = "</text></svg><script>alert(3)</script>"
HOSTILE_DETAIL = {"message": "<iframe src=https://evil.example/></iframe>\x1b[2J"}


def _read(path: Path) -> tuple[list[RunSummary], dict[str, list[dict[str, Any]]]]:
    with AuditLog(path, readonly=True) as log:
        runs = log.runs()
        return runs, {run.run_id: log.timeline(run.run_id) for run in runs}


def _report(
    path: Path,
    runs: Sequence[RunSummary],
    timelines: Mapping[str, Sequence[Mapping[str, Any]]],
    verifications: Sequence[Verification] | None = None,
    *,
    filters: str = "",
    generated_by: str = "reviewer@jump",
) -> str:
    if verifications is None:
        verifications = [hash_chain_verification(verify_log(path))]
    return render_report(
        log_path=str(path),
        runs=runs,
        timelines=timelines,
        verifications=verifications,
        filters=filters,
        generated_at=GENERATED_AT,
        generated_by=generated_by,
    )


def _hostile(rl: ReviewLog) -> tuple[list[RunSummary], dict[str, list[dict[str, Any]]]]:
    """The failed run, its operator, reason, a job's name and a detail made hostile."""
    runs, timelines = _read(rl.path)
    failed = runs[2]
    rows = []
    for row in timelines[failed.run_id]:
        row = {**row, "operator": HOSTILE_OPERATOR, "reason": HOSTILE_REASON}
        if row["job"] == "blobstore":
            row["job"] = HOSTILE_JOB
            if row["trigger"] == "backup_error":
                row["detail"] = HOSTILE_DETAIL
        rows.append(row)
    run = replace(failed, operator=HOSTILE_OPERATOR, reason=HOSTILE_REASON)
    return [run], {run.run_id: rows}


def _section(page: str, run_id: str) -> str:
    """The HTML of one run's section."""
    for part in page.split("<section ")[1:]:
        if f'data-run="{run_id}"' in part:
            return part.split("</section>")[0]
    raise AssertionError(f"no section for {run_id}")


# --- without a browser ------------------------------------------------------------------


def test_summary_counts_the_real_runs(review_log: ReviewLog) -> None:
    runs, timelines = _read(review_log.path)
    summary = summarize(runs, timelines)
    assert summary.runs == 6
    assert summary.events == sum(len(rows) for rows in timelines.values())
    assert summary.by_outcome == Counter({"succeeded": 5, "failed": 1})
    assert summary.simulated_by_outcome == summary.by_outcome  # all six are sim runs
    assert summary.by_target_operation == {
        ("sim://demo", "backup"): Counter({"succeeded": 1, "failed": 1}),
        ("sim://demo", "backup-cleanup"): Counter({"succeeded": 2}),
        ("sim://demo", "restore"): Counter({"succeeded": 1}),
        ("sim://demo/redis", "backup"): Counter({"succeeded": 1}),
    }
    assert {name: who.runs for name, who in summary.by_operator.items()} == {
        "alice": 3,
        "bob": 2,
        "carol": 1,
    }
    assert summary.by_operator["alice"].last_run == review_log.run_ids[5]
    assert summary.by_operator["bob"].last_run == review_log.run_ids[3]
    assert summary.by_operator["alice"].operations == ("backup", "backup-cleanup", "restore")


def test_the_page_names_every_run_reason_and_count(review_log: ReviewLog) -> None:
    runs, timelines = _read(review_log.path)
    page = _report(review_log.path, runs, timelines)
    for run_id in review_log.run_ids:
        assert f'data-run="{run_id}"' in page
    for reason in ("CHG-1 weekly", "CHG-2", "CHG-3 redis", "DR drill"):
        assert reason in page
    # The two cleanups were given no reason, and the page says so where a reason would be.
    assert page.count("no reason given") >= 4  # the why table and both sections
    assert "<dt>runs</dt><dd>6</dd>" in page
    assert "<dt>runs selected by</dt><dd>all runs</dd>" in page
    assert "Hash chain: intact" in page
    assert f'content="{CSP}"' in page
    assert "<script" not in page.lower()


def test_hostile_text_is_escaped_not_markup(review_log: ReviewLog) -> None:
    runs, timelines = _hostile(review_log)
    page = _report(
        review_log.path,
        runs,
        timelines,
        filters="--operator '<b>x</b>'",
        generated_by="<svg onload=alert(4)>",
    )
    lowered = page.lower()
    for tag in ("<script", "<img", "<iframe", "<b>", "<svg onload"):
        assert tag not in lowered, tag
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in page
    # The bidi override and the terminal escape are shown as escapes, never as themselves.
    assert "\u202e" not in page and "\x1b" not in page
    assert "\\u202etxt.exe" in page and "\\x1b[2J" in page
    # The hostile job still gets its lane and its failure mark, by its (escaped) name.
    assert 'data-lane="&lt;/text&gt;&lt;/svg&gt;&lt;script&gt;alert(3)&lt;/script&gt;"' in page


def test_the_same_input_gives_the_same_page(review_log: ReviewLog) -> None:
    runs, timelines = _read(review_log.path)
    verification = [hash_chain_verification(verify_log(review_log.path))]
    first = _report(review_log.path, runs, timelines, verification)
    again = _report(review_log.path, *_read(review_log.path), verification)
    assert first == again


def test_a_log_not_verified_says_so(review_log: ReviewLog) -> None:
    page = _report(review_log.path, *_read(review_log.path), verifications=[])
    assert "NOT VERIFIED" in page
    assert "intact" not in page


def test_a_broken_log_is_reported_broken(review_log: ReviewLog) -> None:
    # Tamper with a real row the way an insider would: drop the guard, edit the reason.
    with sqlite3.connect(review_log.path) as conn:
        conn.execute("DROP TRIGGER events_no_update")
        conn.execute("UPDATE events SET reason = 'routine' WHERE seq = 64")
    conn.close()
    report = verify_log(review_log.path)
    assert not report.ok
    verifications = [
        hash_chain_verification(report),
        Verification("Signed checkpoints", True, ("2 checkpoints, last at seq 200",)),
    ]
    page = _report(review_log.path, *_read(review_log.path), verifications)
    assert 'class="verification broken"' in page
    assert "Hash chain: BROKEN" in page
    assert "seq 64: hash does not match its content (row edited)" in page
    assert "Signed checkpoints: intact" in page


def _live(run: RunSummary, rows: Sequence[Mapping[str, Any]]) -> tuple[RunSummary, list[dict]]:
    return replace(run, mode="live"), [{**row, "mode": "live"} for row in rows]


def test_a_live_run_is_plain_and_a_sim_row_makes_a_run_simulated(review_log: ReviewLog) -> None:
    runs, timelines = _read(review_log.path)
    live, live_rows = _live(runs[0], timelines[runs[0].run_id])
    # A run whose summary says live but one of whose rows says sim: simulated.
    mixed, mixed_rows = _live(runs[2], timelines[runs[2].run_id])
    mixed_rows[5] = {**mixed_rows[5], "mode": "sim"}
    page = _report(
        review_log.path,
        [live, mixed],
        {live.run_id: live_rows, mixed.run_id: mixed_rows},
        verifications=[],
    )
    plain = _section(page, live.run_id)
    assert 'class="run"' in plain and "SIMULATED" not in plain and "not a real system" not in plain
    marked = _section(page, mixed.run_id)
    assert 'class="run sim"' in marked and "SIMULATED" in marked
    assert "simulated director — not a real system" in marked
    assert "1 of 2 run(s) ran against the built-in simulator" in page


def test_interrupted_and_unfinished_steps_are_marked(review_log: ReviewLog) -> None:
    runs, timelines = _read(review_log.path)
    run = runs[0]
    rows = timelines[run.run_id]
    # Cut the real run where the backup scripts have all started, then have blobstore's
    # killed by an interrupt and the run end interrupted; a second copy just stops there.
    started = [
        r["seq"] for r in rows if r["trigger"] == "script_started" and r["script"] == "backup"
    ]
    assert len(started) == 3
    cut = [r for r in rows if r["seq"] <= max(started)]
    last = next(r for r in cut if r["job"] == "blobstore" and r["seq"] in started)
    killed = {
        **last,
        "seq": cut[-1]["seq"] + 1,
        "trigger": "backup_error",
        "to_state": "backup_failed",
        "outcome": "error",
        "exit_code": 143,
        "detail": {"killed_by": "SIGTERM (run interrupted)"},
    }
    run_level = {k: None for k in ("job", "script", "instance_group", "instance_index")}
    ended = {**last, **run_level, "seq": killed["seq"] + 1, "trigger": "interrupt"}
    ended["to_state"] = "interrupted"
    interrupted = replace(run, run_id="killed", outcome="interrupted")
    unfinished = replace(run, run_id="cut", outcome="backing_up", finished=False)
    page = _report(
        review_log.path,
        [interrupted, unfinished],
        {
            "killed": [{**r, "run_id": "killed"} for r in (*cut, killed, ended)],
            "cut": [{**r, "run_id": "cut"} for r in cut],
        },
        verifications=[],
    )
    killed_html = _section(page, "killed")
    assert 'class="mark interrupt-mark" data-lane="blobstore"' in killed_html
    assert 'class="mark interrupt-mark" data-lane="run"' in killed_html
    assert re.search(
        r'class="bar kind-backup failed interrupted" data-lane="blobstore"', killed_html
    )
    cut_html = _section(page, "cut")
    assert "backing_up (unfinished)" in cut_html
    # The three backups under way when the rows stop have no outcome row, and the run's
    # backing_up state no next state: four unfinished backup bars, one on the run lane.
    assert cut_html.count('data-kind="backup" data-unfinished="1"') == 4
    assert 'data-lane="run" data-kind="backup" data-unfinished="1"' in cut_html
    assert "interrupt-mark" not in cut_html


def _synthetic_run(jobs: int, rounds: int) -> tuple[RunSummary, list[dict[str, Any]]]:
    """A run of ``jobs`` jobs on one instance each, each locking, backing up and unlocking
    ``rounds`` times: ``jobs * rounds * 9`` job rows plus the run's own."""
    rows: list[dict[str, Any]] = []
    clock = [0]

    def row(**columns: Any) -> None:
        clock[0] += 1000
        seconds, micros = divmod(clock[0], 1_000_000)
        base = {
            "seq": len(rows) + 1,
            "ts": f"2026-12-01T10:{seconds // 60:02d}:{seconds % 60:02d}.{micros:06d}Z",
            "run_id": "big",
            "mode": "live",
            "operator": "dave",
            "origin_host": "jump",
            "job": None,
            "script": None,
            "outcome": "ok",
            "exit_code": None,
            "duration": None,
            "detail": None,
            "instance_group": None,
            "instance_index": None,
            "from_state": None,
        }
        rows.append({**base, **columns})

    row(to_state="discovering", trigger="start")
    for _ in range(rounds):
        for phase, script in (("lock", "pre-backup-lock"), ("backup", "backup")):
            for n in range(jobs):
                where = {"job": "svc", "instance_group": "svc", "instance_index": str(n)}
                row(to_state=phase, trigger=phase, script=script, **where)
                row(to_state=phase, trigger="script_started", script=script, **where)
                row(to_state="done", trigger=f"{phase}_ok", script=script, exit_code=0, **where)
        for n in range(jobs):
            where = {"job": "svc", "instance_group": "svc", "instance_index": str(n)}
            row(to_state="unlocking", trigger="unlock", script="post-backup-unlock", **where)
            row(to_state="unlocked", trigger="unlock_ok", script="post-backup-unlock", **where)
            row(to_state="unlocked", trigger="unlock_ok", script="post-backup-unlock", **where)
    row(to_state="succeeded", trigger="cleaned")
    run = RunSummary(
        run_id="big",
        operation="backup",
        target="live://prod/svc",
        mode="live",
        operator="dave",
        reason="CHG-9",
        start=rows[0]["ts"],
        end=rows[-1]["ts"],
        events=len(rows),
        outcome="succeeded",
        finished=True,
    )
    return run, rows


def test_a_run_of_hundreds_of_rows_renders_at_a_sensible_size(tmp_path: Path) -> None:
    run, rows = _synthetic_run(jobs=20, rounds=4)
    assert len(rows) > 700
    started = time.monotonic()
    page = _report(tmp_path / "none.db", [run], {run.run_id: rows}, verifications=[])
    assert time.monotonic() - started < 5
    lanes = 1 + 20  # the run lane and one per instance
    height = AXIS_HEIGHT + LANE_HEIGHT * lanes + BOTTOM_MARGIN
    assert f'width="{SVG_WIDTH}" height="{height}"' in page
    assert page.count('class="bar kind-') >= 20 * 4 * 3
    assert "SIMULATED" not in page
    events = page.split('<table class="events">')[1].split("</table>")[0]
    assert events.count("<tr") == len(rows) + 1  # every row, and the header


# --- in the browser ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if chromium_path() is None:
        pytest.skip(NOT_INSTALLED)
    with Browser() as chromium:
        yield chromium


def _open(browser: Browser, tmp_path: Path, page: str, name: str = "report.html") -> Path:
    out = tmp_path / name
    out.write_text(page, encoding="utf-8")
    browser.send("Network.enable")
    browser.take_events("Network.requestWillBeSent")
    browser.open(out.as_uri())
    return out


def test_reviewer_sees_runs_people_reasons_and_verdicts(
    browser: Browser, review_log: ReviewLog, tmp_path: Path
) -> None:
    runs, timelines = _read(review_log.path)
    _open(browser, tmp_path, _report(review_log.path, runs, timelines))
    text = browser.evaluate("document.body.innerText")
    for run_id in review_log.run_ids:
        assert run_id in text
    for word in ("alice", "bob", "carol", "CHG-1 weekly", "CHG-2", "CHG-3 redis", "DR drill"):
        assert word in text
    assert "no reason given" in text
    assert "SIMULATED" in text and "simulated director — not a real system" in text
    assert "Hash chain: intact" in text
    assert "all runs" in text
    failed = browser.evaluate(
        f"document.querySelector('section[data-run=\"{review_log.run_ids[2]}\"]').innerText"
    )
    assert re.search(r"outcome\s+failed", failed)
    assert "disk on fire" in failed
    # Every section is a sim run, visibly: the badge, the banner and the dashed frame.
    sections = browser.evaluate(
        """[...document.querySelectorAll('section.run')].map(s => ({
             run: s.dataset.run, sim: s.classList.contains('sim'),
             badge: s.querySelector('.badge.sim') !== null,
             border: getComputedStyle(s).borderTopStyle,
             banner: s.innerText.includes('simulated director — not a real system')}))"""
    )
    assert [s["run"] for s in sections] == list(review_log.run_ids)
    assert all(s["sim"] and s["badge"] and s["banner"] for s in sections)
    assert {s["border"] for s in sections} == {"dashed"}
    badges = browser.evaluate("document.querySelectorAll('table.runs .badge.sim').length")
    assert badges == 6


_PICTURES = """
[...document.querySelectorAll('section.run')].map(s => {
  const svgs = s.querySelectorAll('svg.timeline');
  const box = svgs[0].getBoundingClientRect();
  const rects = (sel) => [...s.querySelectorAll(sel)].map(e => {
    const b = e.getBoundingClientRect();
    return {x: b.x, y: b.y, w: b.width, h: b.height, r: b.right, b: b.bottom,
            lane: e.dataset.lane || '', kind: e.dataset.kind || ''};
  });
  return {run: s.dataset.run, svgs: svgs.length,
          svg: {x: box.x, y: box.y, r: box.right, b: box.bottom, w: box.width},
          bars: rects('svg.timeline rect.bar'),
          lanes: rects('svg.timeline text.lane-label').map(l => l.lane),
          labels: rects('svg.timeline text.lane-label, svg.timeline text.tick-label'),
          fails: rects('svg.timeline .fail-mark'),
          failedBars: rects('svg.timeline rect.bar[data-failed]')};
})
"""


def _overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    return a["x"] < b["r"] and b["x"] < a["r"] and a["y"] < b["b"] and b["y"] < a["b"]


def test_every_run_has_a_drawn_timeline(
    browser: Browser, review_log: ReviewLog, tmp_path: Path
) -> None:
    runs, timelines = _read(review_log.path)
    _open(browser, tmp_path, _report(review_log.path, runs, timelines))
    pictures = {p["run"]: p for p in browser.evaluate(_PICTURES)}
    assert list(pictures) == list(review_log.run_ids)
    for run_id, picture in pictures.items():
        assert picture["svgs"] == 1, run_id
        assert picture["bars"], run_id
        svg = picture["svg"]
        assert svg["w"] > 800
        for bar in picture["bars"]:
            assert bar["w"] > 0 and bar["h"] > 0, (run_id, bar)
            assert svg["x"] <= bar["x"] and bar["r"] <= svg["r"] + 0.5, (run_id, bar)
        labels = picture["labels"]
        for n, label in enumerate(labels):
            assert svg["x"] <= label["x"] and label["r"] <= svg["r"] + 0.5, (run_id, label)
            for other in labels[n + 1 :]:
                assert not _overlap(label, other), (run_id, label, other)
    director = pictures[review_log.run_ids[0]]["lanes"]
    assert director[0] == "run"
    assert set(director[1:]) == {"bbr-credhubdb", "uaa", "director", "blobstore"}
    redis = pictures[review_log.run_ids[4]]
    assert redis["lanes"] == [
        "run",
        "redis-server on redis/0",
        "redis-server on redis/1",
        "redis-server on redis/2",
    ]
    for lane in redis["lanes"][1:]:
        kinds = {bar["kind"] for bar in redis["bars"] if bar["lane"] == lane}
        assert kinds == {"lock", "backup", "unlock", "drain"}, lane
    restore = pictures[review_log.run_ids[5]]
    assert {bar["kind"] for bar in restore["bars"] if bar["lane"] == "blobstore"} == {
        "copy",
        "lock",
        "restore",
        "unlock",
    }
    failed = pictures[review_log.run_ids[2]]
    assert [(b["lane"], b["kind"]) for b in failed["failedBars"]] == [("blobstore", "backup")]
    assert "blobstore" in [m["lane"] for m in failed["fails"]]
    assert all(m["w"] > 0 for m in failed["fails"])
    for run_id in (*review_log.run_ids[:2], *review_log.run_ids[3:]):
        assert not pictures[run_id]["failedBars"], run_id


def test_the_page_is_self_contained(
    browser: Browser, review_log: ReviewLog, tmp_path: Path
) -> None:
    runs, timelines = _read(review_log.path)
    out = _open(browser, tmp_path, _report(review_log.path, runs, timelines))
    found = browser.evaluate(
        """({csp: document.querySelector('meta[http-equiv="Content-Security-Policy"]')?.content,
             external: [...document.querySelectorAll('[src],[href],[srcset],[data]')]
               .map(e => e.getAttribute('src') || e.getAttribute('href') ||
                         e.getAttribute('srcset') || e.getAttribute('data'))
               .filter(v => !v.startsWith('#')),
             scripts: document.querySelectorAll('script,img,iframe,object,embed,link').length,
             sheets: document.styleSheets.length})"""
    )
    assert found["csp"] == CSP
    assert found["external"] == []
    assert found["scripts"] == 0
    assert found["sheets"] == 1  # the inline one
    requested = [e["request"]["url"] for e in browser.take_events("Network.requestWillBeSent")]
    assert requested and all(url == out.as_uri() for url in requested), requested


def test_hostile_text_shows_as_text_in_the_browser(
    browser: Browser, review_log: ReviewLog, tmp_path: Path
) -> None:
    runs, timelines = _hostile(review_log)
    page = _report(
        review_log.path, runs, timelines, generated_by="<svg onload=alert(4)>", filters="<b>"
    )
    _open(browser, tmp_path, page, "hostile.html")
    found = browser.evaluate(
        """({live: document.querySelectorAll('script,img,iframe,b').length,
             svgs: document.querySelectorAll('svg').length,
             sections: document.querySelectorAll('section.run').length,
             text: document.body.innerText,
             lanes: [...document.querySelectorAll('text.lane-label')].map(t => t.dataset.lane),
             fails: [...document.querySelectorAll('.fail-mark')].map(g => g.dataset.lane),
             left: document.querySelector('svg.timeline').getBoundingClientRect().x,
             labels: [...document.querySelectorAll('text.lane-label')]
               .map(t => t.getBoundingClientRect().x)})"""
    )
    # Even the long hostile job name is cut to fit its label column.
    assert all(x >= found["left"] for x in found["labels"]), found["labels"]
    assert found["live"] == 0
    assert found["svgs"] == 1 and found["sections"] == 1
    text = found["text"]
    assert HOSTILE_OPERATOR in text
    assert '"><img src=x onerror=alert(2)> \\u202etxt.exe' in text
    assert "\u202e" not in text
    assert "<svg onload=alert(4)>" in text
    assert HOSTILE_JOB in found["lanes"] and HOSTILE_JOB in found["fails"]
    browser.screenshot(tmp_path / "hostile.png")


def test_full_page_screenshot(browser: Browser, review_log: ReviewLog, tmp_path: Path) -> None:
    runs, timelines = _read(review_log.path)
    _open(browser, tmp_path, _report(review_log.path, runs, timelines, filters=""))
    height = browser.evaluate("document.documentElement.scrollHeight")
    for out in (tmp_path / "report.png", SCREENSHOT):
        browser.screenshot(out)
        data = out.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        shot_height = int.from_bytes(data[20:24], "big")
        assert shot_height >= height - 1  # the whole page, not just the viewport
