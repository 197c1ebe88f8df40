"""One self-contained HTML page for a compliance reviewer: who ran what, why, how it went,
whether the log is intact, and a timeline picture of every run.

``render_report`` takes what the caller read from the log (the runs, their rows, the
verification results) and returns the page as text. The page needs nothing else: no
network, no external assets, no JavaScript; its Content-Security-Policy forbids them
anyway. Every value taken from the log (operators, reasons, job names, details...) came
from outside: it goes through ``printable`` (control and bidi characters shown escaped)
and ``html.escape``, so no row can add markup, reorder text or hide itself.

The same input gives the same page, byte for byte: no random ids, no current time
(``generated_at`` is the caller's), dicts iterated in insertion or sorted order.
"""

from __future__ import annotations

import html
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeGuard

from audit.log import RunSummary
from audit.render import printable, short_detail, short_time
from audit.schema import TERMINAL_STATES
from audit.verify import VerifyReport

logger = logging.getLogger(__name__)

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

# The timeline picture: a fixed width, one fixed-height lane per job (per instance).
SVG_WIDTH = 960
LABEL_WIDTH = 230
RIGHT_MARGIN = 24
PLOT_WIDTH = SVG_WIDTH - LABEL_WIDTH - RIGHT_MARGIN
AXIS_HEIGHT = 30
LANE_HEIGHT = 22
BAR_HEIGHT = 14
BOTTOM_MARGIN = 8
MIN_BAR_WIDTH = 2.0
LABEL_CHARS = 31  # what fits left of the plot at 11px monospace
MAX_TICKS = 7
TICK_CHAR_WIDTH = 6.1  # px per character of the 10px monospace tick labels
BAR_CHAR_WIDTH = 6.7  # px per character of the 11px monospace bar labels
DETAIL_CHARS = 90
CELL_CHARS = 48

# Kinds of bar, their colour and what the legend calls them. Failures are always red,
# whatever their kind, so no kind uses red.
KINDS: dict[str, tuple[str, str]] = {
    "prepare": ("#9aa3ad", "validate / discover / check"),
    "lock": ("#0072b2", "lock (pre-*-lock)"),
    "backup": ("#009e73", "backup"),
    "restore": ("#56b4e9", "restore"),
    "unlock": ("#cc79a7", "unlock (post-*-unlock)"),
    "drain": ("#e6c229", "drain artifact (copy from VM)"),
    "copy": ("#e69f00", "copy artifact (to VM)"),
    "metadata": ("#8c7ae6", "metadata"),
    "clean": ("#c9bfae", "cleaning"),
    "other": ("#7f7f7f", "other step"),
}
FAIL_COLOUR = "#c00000"
INTERRUPT_COLOUR = "#f5a300"
OK_END_COLOUR = "#009e73"

# Run-level states (what the run lane shows) by the kind of bar they are drawn as.
_STATE_KINDS: dict[str, str] = {
    "ready": "prepare",
    "validating": "prepare",
    "discovering": "prepare",
    "checking": "prepare",
    "locking": "lock",
    "backing_up": "backup",
    "restoring": "restore",
    "unlocking": "unlock",
    "draining": "drain",
    "copying": "copy",
    "cleaning": "clean",
}
_JOB_KINDS = frozenset({"lock", "backup", "restore", "unlock", "drain", "copy", "metadata"})
_OUTCOME_SUFFIXES = ("_ok", "_error")
_NO_REASON = "no reason given"


@dataclass(frozen=True)
class Verification:
    """One verifier's verdict on the log, as the report shows it."""

    title: str  # e.g. "Hash chain" or "Signed checkpoints"
    ok: bool
    lines: tuple[str, ...]  # the verifier's own text


def hash_chain_verification(report: VerifyReport) -> Verification:
    """``verify_log``'s result as a Verification, in the words ``bbrx audit verify`` uses."""
    if report.ok:
        first = (
            f"audit log intact: {report.count} events, "
            f"head seq {report.head_seq} hash {report.head_hash}"
        )
    else:
        first = f"audit log BROKEN: {report.problem}"
    return Verification("Hash chain", report.ok, (first, *report.journal_lines()))


# --- the summary ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OperatorSummary:
    runs: int
    simulated: int
    last_start: str
    last_run: str
    operations: tuple[str, ...]


@dataclass(frozen=True)
class Summary:
    """The counts the report's summary shows, for the runs selected."""

    runs: int
    events: int
    by_outcome: Counter[str]
    simulated_by_outcome: Counter[str]
    # (target, operation) -> outcome -> runs
    by_target_operation: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)
    by_operator: dict[str, OperatorSummary] = field(default_factory=dict)


def outcome_of(run: RunSummary) -> str:
    """The run's outcome as the report names it: its last run-level state, or
    ``unknown`` when it has no run-level row; ``(unfinished)`` when not terminal."""
    outcome = run.outcome if run.outcome else "unknown"
    return outcome if run.finished else f"{outcome} (unfinished)"


def is_simulated(run: RunSummary, rows: Sequence[Mapping[str, Any]] = ()) -> bool:
    """A run is simulated if its summary or ANY of its rows says mode sim: a run must
    never look live because one row claims so."""
    return run.mode == "sim" or any(row.get("mode") == "sim" for row in rows)


def summarize(
    runs: Sequence[RunSummary],
    timelines: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> Summary:
    """Counts by outcome, by target x operation and by operator."""
    timelines = timelines or {}
    by_outcome: Counter[str] = Counter()
    simulated: Counter[str] = Counter()
    matrix: dict[tuple[str, str], Counter[str]] = {}
    people: dict[str, list[RunSummary]] = {}
    for run in runs:
        outcome = outcome_of(run)
        by_outcome[outcome] += 1
        if is_simulated(run, timelines.get(run.run_id, ())):
            simulated[outcome] += 1
        matrix.setdefault((run.target, run.operation), Counter())[outcome] += 1
        people.setdefault(run.operator, []).append(run)
    operators = {}
    for name, theirs in people.items():
        last = max(theirs, key=lambda r: (r.start or "", r.run_id))
        operators[name] = OperatorSummary(
            runs=len(theirs),
            simulated=sum(is_simulated(r, timelines.get(r.run_id, ())) for r in theirs),
            last_start=last.start,
            last_run=last.run_id,
            operations=tuple(sorted({r.operation for r in theirs})),
        )
    return Summary(
        runs=len(runs),
        events=sum(r.events for r in runs),
        by_outcome=by_outcome,
        simulated_by_outcome=simulated,
        by_target_operation=dict(sorted(matrix.items())),
        by_operator=dict(sorted(operators.items())),
    )


# --- escaping ------------------------------------------------------------------------------


def esc(value: Any) -> str:
    """Text from the log, safe in HTML/SVG text and in quoted attributes."""
    return html.escape(printable("" if value is None else str(value)), quote=True)


def _dash(value: Any) -> str:
    return "-" if value is None or value == "" else esc(value)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# --- the timeline picture ------------------------------------------------------------------


def _parse_ts(value: Any) -> int | None:
    """Microseconds since the epoch for an ISO 8601 UTC timestamp, None if unreadable."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = when - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


@dataclass
class _Bar:
    kind: str
    start: int
    end: int | None = None
    started: int | None = None  # the script_started row's time
    failed: bool = False
    interrupted: bool = False
    finished: bool = True  # False: no outcome row closed it
    label: str = ""  # what the tooltip says
    state: str = ""  # run lane: the run's state during the bar
    seqs: list[str] = field(default_factory=list)


@dataclass
class _Mark:
    kind: str  # "fail", "interrupt", "end-ok", "end-other"
    at: int
    label: str


@dataclass
class _Lane:
    key: tuple[str, ...]
    label: str
    run_level: bool = False
    bars: list[_Bar] = field(default_factory=list)
    marks: list[_Mark] = field(default_factory=list)


def _instance(row: Mapping[str, Any]) -> tuple[str, str] | None:
    group, index = row.get("instance_group"), row.get("instance_index")
    if group is None and index is None:
        return None
    return (str(group) if group is not None else "-", str(index) if index is not None else "-")


def _index_key(index: str) -> tuple[int, int, str]:
    return (0, int(index), "") if index.isdigit() else (1, 0, index)


def _failed(row: Mapping[str, Any]) -> bool:
    exit_code = row.get("exit_code")
    return (
        row.get("outcome") in ("error", "refused")
        or (exit_code is not None and exit_code != 0)
        or str(row.get("trigger") or "").endswith("_error")
    )


def _interrupted(row: Mapping[str, Any]) -> bool:
    detail = row.get("detail")
    killed = isinstance(detail, Mapping) and bool(detail.get("killed_by"))
    return killed or row.get("to_state") == "interrupted" or row.get("trigger") == "interrupt"


def _row_words(row: Mapping[str, Any]) -> str:
    bits = [
        f"seq {row.get('seq') if row.get('seq') is not None else 'journal'}",
        short_time(row.get("ts")),
        f"{row.get('from_state') or '-'} -> {row.get('to_state') or '-'}",
        f"trigger {row.get('trigger')}",
    ]
    if row.get("script"):
        bits.append(f"script {row.get('script')}")
    bits.append(f"outcome {row.get('outcome')}")
    if row.get("exit_code") is not None:
        bits.append(f"exit {row.get('exit_code')}")
    if row.get("duration") is not None:
        bits.append(f"{row['duration']:.3f}s" if _number(row["duration"]) else "duration ?")
    detail = short_detail(row.get("detail"), DETAIL_CHARS)
    if detail:
        bits.append(detail)
    return "; ".join(str(b) for b in bits)


def _number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _kind_of_trigger(trigger: str) -> str:
    for suffix in _OUTCOME_SUFFIXES:
        if trigger.endswith(suffix):
            trigger = trigger[: -len(suffix)]
    return trigger if trigger in _JOB_KINDS else "other"


@dataclass
class _Picture:
    lanes: list[_Lane]
    t0: int
    t1: int
    undrawn: int  # rows without a readable time


def _lanes(rows: Sequence[Mapping[str, Any]]) -> _Picture:
    """The run lane and one lane per job (per job and instance when several instances)."""
    timed = [(t, row) for row in rows if (t := _parse_ts(row.get("ts"))) is not None]
    undrawn = len(rows) - len(timed)
    if not timed:
        return _Picture([], 0, 0, undrawn)
    t0 = min(t for t, _ in timed)
    t1 = max(t for t, _ in timed)
    job_rows = [(t, r) for t, r in timed if r.get("job") is not None]
    instances = {i for _, r in job_rows if (i := _instance(r)) is not None}
    several = len(instances) > 1

    run_lane = _Lane(("",), "run", run_level=True)
    _run_bars(run_lane, [(t, r) for t, r in timed if r.get("job") is None], t1)

    group_order: dict[str, int] = {}
    job_order: dict[str, int] = {}
    lanes: dict[tuple[str, ...], _Lane] = {}
    for _, row in job_rows:
        job = str(row.get("job"))
        instance = _instance(row)
        job_order.setdefault(job, len(job_order))
        if several and instance is not None:
            group_order.setdefault(instance[0], len(group_order))
            key: tuple[str, ...] = (job, *instance)
            label = f"{job} on {instance[0]}/{instance[1]}"
        else:
            key = (job,)
            label = job
        if key not in lanes:
            lanes[key] = _Lane(key, label)

    def order(lane: _Lane) -> tuple[Any, ...]:
        if len(lane.key) == 3:
            job, group, index = lane.key
            return (group_order[group], _index_key(index), job_order[job])
        return (-1, (0, 0, ""), job_order[lane.key[0]])

    open_bars: dict[tuple[str, ...], _Bar] = {}
    for t, row in job_rows:
        job = str(row.get("job"))
        instance = _instance(row)
        key = (job, *instance) if several and instance is not None else (job,)
        lane = lanes[key]
        trigger = str(row.get("trigger") or "")
        seq = str(row.get("seq") if row.get("seq") is not None else "journal")
        bar = open_bars.get(key)
        if trigger == "script_started":
            if bar is not None:
                bar.started = t
                bar.seqs.append(seq)
            continue
        if trigger.endswith(_OUTCOME_SUFFIXES):
            if bar is None:
                # No intent row: the outcome row and its duration say when it started.
                duration = row.get("duration")
                seconds = float(duration) if _number(duration) else 0.0
                start = t - int(seconds * 1e6) if math.isfinite(seconds) else t
                bar = _Bar(_kind_of_trigger(trigger), max(start, t0))
                lane.bars.append(bar)
            open_bars.pop(key, None)
            bar.end = t
            bar.seqs.append(seq)
            bar.failed = bar.failed or _failed(row)
            bar.interrupted = bar.interrupted or _interrupted(row)
            bar.label = _row_words(row)
            continue
        # An intent row: a new step begins (a step still open never got its outcome).
        if bar is not None:
            bar.end, bar.finished = t, False
        bar = _Bar(_kind_of_trigger(trigger), t, label=_row_words(row), seqs=[seq])
        lane.bars.append(bar)
        open_bars[key] = bar
        if _failed(row) or _interrupted(row):
            # Refused or failed on the spot: a step that never ran.
            bar.end, bar.failed, bar.interrupted = t, _failed(row), _interrupted(row)
            open_bars.pop(key)
    for bar in open_bars.values():
        bar.end, bar.finished = t1, False
    for lane in lanes.values():
        for bar in lane.bars:
            if bar.failed:
                lane.marks.append(_Mark("fail", bar.end or bar.start, bar.label))
            if bar.interrupted:
                lane.marks.append(_Mark("interrupt", bar.end or bar.start, bar.label))
    return _Picture([run_lane, *sorted(lanes.values(), key=order)], t0, t1, undrawn)


def _run_bars(lane: _Lane, rows: list[tuple[int, Mapping[str, Any]]], t1: int) -> None:
    for i, (t, row) in enumerate(rows):
        state = str(row.get("to_state") or "")
        words = _row_words(row)
        if _failed(row):
            lane.marks.append(_Mark("fail", t, words))
        if _interrupted(row):
            lane.marks.append(_Mark("interrupt", t, words))
        if state in TERMINAL_STATES:
            end_kind = "end-ok" if state == "succeeded" else "end-other"
            if state == "failed":
                end_kind = "fail"
            elif state == "interrupted":
                end_kind = "interrupt"
            lane.marks.append(_Mark(end_kind, t, words))
            continue
        last = i + 1 == len(rows)
        end = t1 if last else rows[i + 1][0]
        kind = _STATE_KINDS.get(state, "other")
        lane.bars.append(
            _Bar(kind, t, end, finished=not last, label=f"state {state}: {words}", state=state)
        )


_STEPS_US: tuple[int, ...] = tuple(
    int(s * 1_000_000)
    for s in (
        0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
        1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800,
        3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800,
    )
)  # fmt: skip


def _ticks(t0: int, t1: int) -> tuple[list[int], int]:
    span = max(t1 - t0, 1)
    step = next((s for s in _STEPS_US if span / s <= MAX_TICKS), _STEPS_US[-1])
    while span / step > MAX_TICKS:
        step *= 2
    first = -(-t0 // step) * step
    return list(range(first, t1 + 1, step)), step


def _tick_label(t: int, step: int) -> str:
    when = datetime.fromtimestamp(t / 1_000_000, UTC)
    if step < 1_000_000:
        return when.strftime("%H:%M:%S.") + f"{(t // 1000) % 1000:03d}"
    if step < 3_600_000_000:
        return when.strftime("%H:%M:%S")
    return when.strftime("%m-%d %H:%M")


def _f(value: float) -> str:
    return f"{value:.1f}"


def _svg(picture: _Picture, title: str) -> str:
    lanes = picture.lanes
    height = AXIS_HEIGHT + LANE_HEIGHT * max(len(lanes), 1) + BOTTOM_MARGIN
    span = max(picture.t1 - picture.t0, 1)

    def x(t: int) -> float:
        return LABEL_WIDTH + (t - picture.t0) * PLOT_WIDTH / span

    out = [
        f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{SVG_WIDTH}" '
        f'height="{height}" viewBox="0 0 {SVG_WIDTH} {height}" role="img" '
        f'aria-label="{esc(title)}">',
        f"<title>{esc(title)}</title>",
    ]
    if not lanes:
        out.append(
            f'<text x="{LABEL_WIDTH}" y="{AXIS_HEIGHT}" class="empty">'
            "no rows with a readable time: nothing to draw</text></svg>"
        )
        return "".join(out)
    bottom = AXIS_HEIGHT + LANE_HEIGHT * len(lanes)
    # Lane stripes and labels.
    for n, lane in enumerate(lanes):
        top = AXIS_HEIGHT + n * LANE_HEIGHT
        stripe = "lane run-lane" if lane.run_level else f"lane lane-{n % 2}"
        out.append(
            f'<rect class="{stripe}" x="0" y="{top}" width="{SVG_WIDTH}" height="{LANE_HEIGHT}"/>'
        )
        shown = esc(_cut(printable(lane.label), LABEL_CHARS))
        out.append(
            f'<text class="lane-label" x="{LABEL_WIDTH - 8}" y="{top + LANE_HEIGHT / 2 + 4:.0f}" '
            f'text-anchor="end" data-lane="{esc(lane.label)}">'
            f"<title>{esc(lane.label)}</title>{shown}</text>"
        )
    # The time axis: ticks and their UTC labels, gridlines down through the lanes.
    ticks, step = _ticks(picture.t0, picture.t1)
    start_day = datetime.fromtimestamp(picture.t0 / 1_000_000, UTC).strftime("%Y-%m-%d")
    out.append(
        f'<text class="axis-caption" x="{LABEL_WIDTH - 50}" y="{AXIS_HEIGHT - 10}" '
        f'text-anchor="end">UTC {start_day}</text>'
    )
    out.append(
        f'<line class="axis" x1="{LABEL_WIDTH}" y1="{AXIS_HEIGHT}" '
        f'x2="{LABEL_WIDTH + PLOT_WIDTH}" y2="{AXIS_HEIGHT}"/>'
    )
    for t in ticks:
        tx = _f(x(t))
        out.append(f'<line class="grid" x1="{tx}" y1="{AXIS_HEIGHT}" x2="{tx}" y2="{bottom}"/>')
        out.append(
            f'<line class="tick" x1="{tx}" y1="{AXIS_HEIGHT - 4}" x2="{tx}" y2="{AXIS_HEIGHT}"/>'
        )
        label = _tick_label(t, step)
        half = len(label) * TICK_CHAR_WIDTH / 2
        # A label that would run off the right edge ends at it instead.
        if x(t) + half > SVG_WIDTH - 2:
            at, anchor = _f(SVG_WIDTH - 2), "end"
        else:
            at, anchor = tx, "middle"
        out.append(
            f'<text class="tick-label" x="{at}" y="{AXIS_HEIGHT - 10}" text-anchor="{anchor}">'
            f"{label}</text>"
        )
    # Bars, then marks on top of them.
    for n, lane in enumerate(lanes):
        bar_top = AXIS_HEIGHT + n * LANE_HEIGHT + (LANE_HEIGHT - BAR_HEIGHT) / 2
        for bar in lane.bars:
            out.append(_bar(bar, lane, x, bar_top))
        for mark in lane.marks:
            out.append(_mark(mark, lane, x(mark.at), bar_top + BAR_HEIGHT / 2))
    out.append("</svg>")
    return "".join(out)


def _bar(bar: _Bar, lane: _Lane, x: Any, top: float) -> str:
    x0 = x(bar.start)
    x1 = x(bar.end if bar.end is not None else bar.start)
    width = max(x1 - x0, MIN_BAR_WIDTH)
    x0 = min(x0, LABEL_WIDTH + PLOT_WIDTH - width)
    colour = FAIL_COLOUR if bar.failed else KINDS.get(bar.kind, KINDS["other"])[0]
    classes = ["bar", f"kind-{bar.kind}"]
    attrs = [
        f'data-lane="{esc(lane.label)}"',
        f'data-kind="{esc(bar.kind)}"',
    ]
    if bar.failed:
        classes.append("failed")
        attrs.append('data-failed="1"')
    if bar.interrupted:
        classes.append("interrupted")
        attrs.append('data-interrupted="1"')
    if not bar.finished:
        classes.append("unfinished")
        attrs.append('data-unfinished="1"')
    if bar.seqs:
        attrs.append(f'data-seq="{esc(" ".join(bar.seqs))}"')
    state = "" if bar.finished else " (no outcome row: unfinished)"
    tip = f"{lane.label}: {bar.kind}{' FAILED' if bar.failed else ''}{state} — {bar.label}"
    parts = [
        f'<rect class="{" ".join(classes)}" {" ".join(attrs)} x="{_f(x0)}" y="{_f(top)}" '
        f'width="{_f(width)}" height="{BAR_HEIGHT}" fill="{colour}">'
        f"<title>{esc(tip)}</title></rect>"
    ]
    if bar.started is not None and bar.end is not None and bar.start < bar.started < bar.end:
        sx = _f(x(bar.started))
        parts.append(
            f'<line class="started" x1="{sx}" y1="{_f(top)}" x2="{sx}" '
            f'y2="{_f(top + BAR_HEIGHT)}"/>'
        )
    words = _bar_words(bar, lane)
    if words and len(words) * BAR_CHAR_WIDTH + 6 <= width:
        ink = "#fff" if bar.failed or bar.kind in _DARK_KINDS else "#000"
        parts.append(
            f'<text class="bar-label" x="{_f(x0 + 3)}" y="{_f(top + BAR_HEIGHT - 3)}" '
            f'fill="{ink}">{esc(words)}</text>'
        )
    return "".join(parts)


_DARK_KINDS = frozenset({"lock", "backup", "unlock", "metadata", "other"})


def _bar_words(bar: _Bar, lane: _Lane) -> str:
    """What a bar says inside itself when it is wide enough: the run's state, or the
    step (and FAILED)."""
    if lane.run_level:
        return bar.state
    return f"{bar.kind} FAILED" if bar.failed else bar.kind


def _mark(mark: _Mark, lane: _Lane, cx: float, cy: float) -> str:
    tip = f"<title>{esc(lane.label)}: {esc(mark.label)}</title>"
    data = f'data-lane="{esc(lane.label)}"'
    c, y = _f(cx), _f(cy)
    if mark.kind == "fail":
        r = 6
        return (
            f'<g class="mark fail-mark" {data}>{tip}'
            f'<circle cx="{c}" cy="{y}" r="{r}" fill="{FAIL_COLOUR}" stroke="#fff"/>'
            f'<path d="M{_f(cx - 3)} {_f(cy - 3)}L{_f(cx + 3)} {_f(cy + 3)}'
            f'M{_f(cx + 3)} {_f(cy - 3)}L{_f(cx - 3)} {_f(cy + 3)}" stroke="#fff" '
            'stroke-width="2"/></g>'
        )
    if mark.kind == "interrupt":
        return (
            f'<g class="mark interrupt-mark" {data}>{tip}'
            f'<polygon points="{c},{_f(cy - 7)} {_f(cx + 7)},{_f(cy + 6)} {_f(cx - 7)},'
            f'{_f(cy + 6)}" fill="{INTERRUPT_COLOUR}" stroke="#000"/>'
            f'<line x1="{c}" y1="{_f(cy - 3)}" x2="{c}" y2="{_f(cy + 2)}" stroke="#000" '
            'stroke-width="1.5"/></g>'
        )
    colour = OK_END_COLOUR if mark.kind == "end-ok" else "#555"
    return (
        f'<g class="mark end-mark" {data}>{tip}'
        f'<rect x="{_f(cx - 5)}" y="{_f(cy - 5)}" width="10" height="10" fill="{colour}" '
        f'stroke="#fff" transform="rotate(45 {c} {y})"/></g>'
    )


def _legend() -> str:
    items = [
        f'<span class="key"><span class="swatch" style="background:{colour}"></span>'
        f"{html.escape(words)}</span>"
        for colour, words in KINDS.values()
    ]
    items += [
        '<span class="key"><span class="swatch failed-swatch">×</span>failed step '
        "(error, refused or nonzero exit): red, with a mark at its end</span>",
        '<span class="key"><span class="swatch interrupt-swatch">!</span>interrupted '
        "(run interrupted, or the script killed)</span>",
        '<span class="key"><span class="swatch end-swatch"></span>run finished</span>',
        '<span class="key"><span class="swatch unfinished-swatch"></span>no outcome row '
        "(cut short or still running)</span>",
        '<span class="key"><span class="swatch started-swatch"></span>script started '
        "(its process began; before it the step was queued)</span>",
    ]
    return f'<div class="legend">{"".join(items)}</div>'


# --- the page ------------------------------------------------------------------------------

_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
  color: #1a1a1a; background: #fff; margin: 0 auto; padding: 16px 24px; max-width: 1100px; }
h1 { font-size: 22px; margin: 0 0 8px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 2px solid #333; padding-bottom: 2px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
code, .mono, td.mono { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace;
  font-size: 12px; }
table { border-collapse: collapse; margin: 4px 0 12px; }
th, td { border: 1px solid #bbb; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #eee; }
td.num { text-align: right; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 6px 0; }
dl.meta dt { font-weight: 600; }
dl.meta dd { margin: 0; overflow-wrap: anywhere; }
.badge { display: inline-block; font-weight: 700; font-size: 11px; letter-spacing: .06em;
  padding: 1px 6px; border-radius: 3px; vertical-align: middle; }
.badge.sim { background: #ffd400; color: #000; border: 2px solid #000; }
.badge.unknown-mode { background: #000; color: #ffd400; }
.badge.live { background: #e8eef8; color: #123; border: 1px solid #789; }
.outcome-failed, .outcome-interrupted, td.failed { color: #a00000; font-weight: 700; }
.outcome-succeeded { color: #006a4e; font-weight: 600; }
.noreason { color: #a00000; font-style: italic; }
.verification { border: 3px solid; border-radius: 4px; padding: 8px 12px; margin: 8px 0; }
.verification.ok { border-color: #007a3d; background: #e6f6ec; }
.verification.broken { border-color: #c00000; background: #fde8e8; }
.verification.none { border-color: #b36b00; background: #fff4e0; }
.verification .verdict { font-weight: 800; font-size: 16px; }
.verification.ok .verdict { color: #007a3d; }
.verification.broken .verdict { color: #c00000; }
.verification pre { margin: 4px 0 0; white-space: pre-wrap; overflow-wrap: anywhere; }
section.run { border: 1px solid #999; border-radius: 4px; padding: 8px 14px 12px; margin: 22px 0; }
section.run.sim { border: 4px dashed #000; background: repeating-linear-gradient(
  135deg, #fff8cc 0, #fff8cc 14px, #ffffff 14px, #ffffff 28px); }
section.run h2 { margin-top: 4px; }
.sim-banner { background: #ffd400; color: #000; font-weight: 800; padding: 4px 10px;
  border: 2px solid #000; display: inline-block; margin: 2px 0 6px; }
.picture { background: #fff; border: 1px solid #ccc; padding: 4px 0; overflow-x: auto; }
svg.timeline { display: block; width: 100%; max-width: 960px; height: auto;
  font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace;
  font-size: 11px; }
svg.timeline .lane-0 { fill: #ffffff; }
svg.timeline .lane-1 { fill: #f3f5f7; }
svg.timeline .run-lane { fill: #e4e9ef; }
svg.timeline .lane-label { fill: #1a1a1a; }
svg.timeline .axis { stroke: #333; }
svg.timeline .tick { stroke: #333; }
svg.timeline .grid { stroke: #d0d4d8; stroke-dasharray: 2 3; }
svg.timeline .tick-label, svg.timeline .axis-caption { fill: #333; font-size: 10px; }
svg.timeline .bar { stroke: rgba(0,0,0,.35); stroke-width: .5; }
svg.timeline .bar.unfinished { fill-opacity: .45; stroke: #000; stroke-dasharray: 3 2;
  stroke-width: 1; }
svg.timeline .bar.failed { stroke: #600; stroke-width: 1; }
svg.timeline .started { stroke: #fff; stroke-width: 1.5; }
svg.timeline .bar-label { font-size: 10px; pointer-events: none; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 14px; margin: 6px 0 10px; font-size: 12px; }
.legend .key { display: inline-flex; align-items: center; gap: 4px; }
.swatch { display: inline-block; width: 18px; height: 11px; border: 1px solid rgba(0,0,0,.35);
  text-align: center; font-size: 10px; line-height: 10px; font-weight: 700; }
.failed-swatch { background: #c00000; color: #fff; border-radius: 6px; width: 13px; height: 13px; }
.interrupt-swatch { background: #f5a300; color: #000; border-color: #000; }
.end-swatch { background: #009e73; width: 10px; height: 10px; transform: rotate(45deg); }
.unfinished-swatch { background: rgba(0,114,178,.45); border: 1px dashed #000; }
.started-swatch { background: #009e73; border-left: 5px solid #009e73;
  box-shadow: inset 2px 0 0 #fff; }
.scroll { overflow-x: auto; }
table.events { font-size: 11px; width: 100%; background: #fff; }
table.events td { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace;
  overflow-wrap: break-word; }
table.events td.t { white-space: nowrap; }
table.events td.detail { overflow-wrap: anywhere; min-width: 16em; }
section.run.sim dl.meta, section.run.sim table, section.run.sim .legend { background: #fff; }
section.run.sim .legend, section.run.sim dl.meta { padding: 4px 6px; border: 1px solid #ccc; }
table.runs td.mono { white-space: nowrap; }
.errors { white-space: pre-wrap; color: #a00000; }
table.events tr.failed td { background: #fde8e8; }
table.events tr.interrupted td { background: #fff1d6; }
table.events tr.journal td { background: #eef; }
.note { color: #555; font-size: 12px; }
a { color: #0b4f9c; }
@media print {
  body { max-width: none; padding: 0; }
  section.run { break-inside: auto; }
  .picture { break-inside: avoid; overflow: visible; }
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  a { color: inherit; text-decoration: none; }
}
"""


def _mode_badge(run: RunSummary, simulated: bool) -> str:
    if simulated:
        return '<span class="badge sim" title="simulated director">SIMULATED</span>'
    if run.mode == "live":
        return '<span class="badge live">live</span>'
    return f'<span class="badge unknown-mode">MODE {esc(run.mode).upper() or "UNKNOWN"}</span>'


def _outcome_html(text: str) -> str:
    first = text.split(" ", 1)[0]
    cls = f"outcome-{first}" if first.isidentifier() else ""
    return f'<span class="{cls}">{esc(text)}</span>'


def _reason_html(reason: str | None) -> str:
    if reason is None or not reason.strip():
        return f'<span class="noreason">{_NO_REASON}</span>'
    return esc(reason)


def _verifications(verifications: Sequence[Verification]) -> str:
    if not verifications:
        return (
            '<div class="verification none"><span class="verdict">NOT VERIFIED</span>'
            "<pre>The log was not verified when this report was generated: nothing here "
            "says whether its rows were altered since they were written. "
            "Run `bbrx audit verify` on it.</pre></div>"
        )
    out = []
    for v in verifications:
        cls, verdict = ("ok", "intact") if v.ok else ("broken", "BROKEN")
        lines = "\n".join(esc(line) for line in v.lines)
        out.append(
            f'<div class="verification {cls}" data-ok="{int(v.ok)}">'
            f'<span class="verdict">{esc(v.title)}: {verdict}</span>'
            f"<pre>{lines}</pre></div>"
        )
    return "".join(out)


def _summary_html(
    runs: Sequence[RunSummary],
    summary: Summary,
    anchors: Mapping[str, str],
    simulated: Mapping[str, bool],
) -> str:
    out = ["<h2>Summary</h2>"]
    sims = sum(summary.simulated_by_outcome.values())
    if sims:
        out.append(
            f'<p><span class="badge sim">SIMULATED</span> {sims} of {summary.runs} run(s) '
            "ran against the built-in simulator, not a real system.</p>"
        )
    # Target x operation.
    operations = sorted({op for _, op in summary.by_target_operation})
    targets = sorted({t for t, _ in summary.by_target_operation})
    out.append("<h3>Runs by target and operation</h3>")
    if targets:
        head = "".join(f"<th>{esc(op)}</th>" for op in operations)
        out.append(f'<table class="matrix"><tr><th>target</th>{head}<th>total</th></tr>')
        for target in targets:
            cells = []
            total = 0
            for op in operations:
                counts = summary.by_target_operation.get((target, op), Counter())
                total += sum(counts.values())
                words = ", ".join(
                    f"{n} {_outcome_html(outcome)}" for outcome, n in sorted(counts.items())
                )
                cells.append(f"<td>{words or '–'}</td>")
            out.append(
                f"<tr><td class='mono'>{esc(target)}</td>{''.join(cells)}"
                f'<td class="num">{total}</td></tr>'
            )
        out.append("</table>")
    else:
        out.append("<p>No runs were selected.</p>")
    # Outcomes.
    out.append("<h3>Runs by outcome</h3>")
    out.append(
        '<table class="outcomes"><tr><th>outcome</th><th>runs</th><th>simulated</th>'
        "<th>not simulated</th></tr>"
    )
    for outcome, n in sorted(summary.by_outcome.items()):
        sim = summary.simulated_by_outcome.get(outcome, 0)
        out.append(
            f'<tr><td>{_outcome_html(outcome)}</td><td class="num">{n}</td>'
            f'<td class="num">{sim}</td><td class="num">{n - sim}</td></tr>'
        )
    out.append("</table>")
    # Who.
    out.append("<h3>Who ran them</h3>")
    out.append(
        '<table class="operators"><tr><th>operator</th><th>runs</th><th>simulated</th>'
        "<th>operations</th><th>last run</th></tr>"
    )
    for name, who in summary.by_operator.items():
        ops = ", ".join(esc(op) for op in who.operations)
        out.append(
            f'<tr><td class="operator">{esc(name)}</td><td class="num">{who.runs}</td>'
            f'<td class="num">{who.simulated}</td><td>{ops}</td>'
            f'<td class="mono">{esc(short_time(who.last_start))} '
            f'<a href="#{anchors[who.last_run]}">{esc(who.last_run)}</a></td></tr>'
        )
    out.append("</table>")
    # Why (and the list of runs).
    out.append("<h3>Why: every run and its reason</h3>")
    out.append(
        '<table class="runs"><tr><th>run</th><th>start (UTC)</th><th>operator</th>'
        "<th>operation</th><th>target</th><th>mode</th><th>outcome</th><th>reason</th></tr>"
    )
    for run in runs:
        out.append(
            f'<tr><td class="mono"><a href="#{anchors[run.run_id]}">{esc(run.run_id)}</a></td>'
            f'<td class="mono">{esc(short_time(run.start))}</td><td>{esc(run.operator)}</td>'
            f"<td>{esc(run.operation)}</td><td class='mono'>{esc(run.target)}</td>"
            f"<td>{_mode_badge(run, simulated[run.run_id])}</td>"
            f"<td>{_outcome_html(outcome_of(run))}</td><td>{_reason_html(run.reason)}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def _distinct(rows: Iterable[Mapping[str, Any]], column: str) -> list[str]:
    return list(dict.fromkeys(str(r[column]) for r in rows if r.get(column) is not None))


def _cell(value: Any, width: int = CELL_CHARS) -> str:
    """A table cell's text: escaped, cut to ``width`` (the whole text in its title)."""
    if value is None or value == "":
        return "<td>-</td>"
    text = printable(str(value))
    if len(text) <= width:
        return f"<td>{html.escape(text)}</td>"
    return f'<td title="{html.escape(text)}">{html.escape(_cut(text, width))}</td>'


def _events_table(rows: Sequence[Mapping[str, Any]]) -> str:
    days = {str(r.get("ts"))[:10] for r in rows}
    day = days.pop() if len(days) == 1 else None
    one_day = day is not None and all(len(str(r.get("ts"))) > 11 for r in rows)
    when = f"time (UTC {esc(day)})" if one_day else "time (UTC)"
    out = [
        '<div class="scroll"><table class="events"><tr><th>seq</th>'
        f"<th>{when}</th><th>transition</th><th>trigger</th><th>job</th><th>instance</th>"
        "<th>script</th><th>outcome</th><th>exit</th><th>duration</th><th>detail</th></tr>"
    ]
    for row in rows:
        classes = []
        if _failed(row):
            classes.append("failed")
        if _interrupted(row):
            classes.append("interrupted")
        seq = row.get("seq")
        if seq is None:
            classes.append("journal")
        instance = _instance(row)
        duration = row.get("duration")
        ts = short_time(row.get("ts"))
        cls = f' class="{" ".join(classes)}"' if classes else ""
        detail = short_detail(row.get("detail"), DETAIL_CHARS)
        out.append(
            f"<tr{cls}><td class='t'>{'journal' if seq is None else esc(seq)}</td>"
            f"<td class='t' title='{esc(ts)}'>{esc(ts[11:] if one_day else ts)}</td>"
            f"<td>{_dash(row.get('from_state'))} → {_dash(row.get('to_state'))}</td>"
            f"{_cell(row.get('trigger'))}{_cell(row.get('job'))}"
            f"{_cell(None if instance is None else '/'.join(instance))}"
            f"{_cell(row.get('script'))}{_cell(row.get('outcome'))}"
            f"<td class='t'>{_dash(row.get('exit_code'))}</td>"
            f"<td class='t'>{f'{duration:.3f}s' if _number(duration) else _dash(duration)}</td>"
            f"<td class='detail'>{esc(detail) or '-'}</td></tr>"
        )
    out.append("</table></div>")
    return "".join(out)


def _errors_field(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """The errors the run's last run-level row lists, if any."""
    last = next((r for r in reversed(rows) if r.get("job") is None), None)
    detail = last.get("detail") if last is not None else None
    errors = detail.get("errors") if isinstance(detail, Mapping) else None
    if not errors or not isinstance(errors, list):
        return []
    text = "\n".join(html.escape(printable(str(e), keep_newlines=True)) for e in errors)
    return [("errors", f'<div class="errors">{text}</div>')]


def _run_section(
    n: int, run: RunSummary, rows: Sequence[Mapping[str, Any]], anchor: str, simulated: bool
) -> str:
    cls = "run sim" if simulated else "run"
    out = [
        f'<section class="{cls}" id="{anchor}" data-run="{esc(run.run_id)}" '
        f'data-mode="{"sim" if simulated else esc(run.mode)}">'
        f"<h2>Run {n}: <span class='mono'>{esc(run.run_id)}</span> "
        f"{_mode_badge(run, simulated)}</h2>"
    ]
    if simulated:
        out.append(
            '<div class="sim-banner">SIMULATED — simulated director — not a real system</div>'
        )
    hosts = _distinct(rows, "origin_host")
    versions = _distinct(rows, "tool_version")
    modes = _distinct(rows, "mode")
    fields = [
        ("run", f"<span class='mono'>{esc(run.run_id)}</span>"),
        ("operation", esc(run.operation)),
        ("target", f"<span class='mono'>{esc(run.target)}</span>"),
        ("mode", esc(", ".join(modes) if modes else run.mode)),
        ("operator", esc(run.operator)),
        ("origin host", esc(", ".join(hosts)) if hosts else "-"),
        ("reason", _reason_html(run.reason)),
        ("start", f"<span class='mono'>{esc(short_time(run.start))}</span>"),
        ("end", f"<span class='mono'>{esc(short_time(run.end))}</span>"),
        ("outcome", _outcome_html(outcome_of(run))),
        *_errors_field(rows),
        ("events", str(len(rows))),
        ("tool version", esc(", ".join(versions)) if versions else "-"),
    ]
    out.append('<dl class="meta">')
    out += [f"<dt>{name}</dt><dd>{value}</dd>" for name, value in fields]
    out.append("</dl>")
    if not rows:
        out.append("<p>No events for this run were given to the report.</p></section>")
        return "".join(out)
    picture = _lanes(rows)
    out.append("<h3>Timeline</h3>")
    out.append('<div class="picture">')
    out.append(_svg(picture, f"Timeline of run {run.run_id}"))
    out.append("</div>")
    if picture.undrawn:
        out.append(
            f'<p class="note">{picture.undrawn} row(s) have no readable time and are not '
            "drawn; they are in the table below.</p>"
        )
    out.append(_legend())
    out.append(f"<h3>Events ({len(rows)})</h3>")
    out.append(_events_table(rows))
    out.append("</section>")
    return "".join(out)


def render_report(
    *,
    log_path: str,
    runs: Sequence[RunSummary],
    timelines: Mapping[str, Sequence[Mapping[str, Any]]],
    verifications: Sequence[Verification],
    filters: str,
    generated_at: str,
    generated_by: str,
) -> str:
    """The whole report as one HTML document (see the module docstring)."""
    anchors = {run.run_id: f"run-{n}" for n, run in enumerate(runs, 1)}
    simulated = {run.run_id: is_simulated(run, timelines.get(run.run_id, ())) for run in runs}
    summary = summarize(runs, timelines)
    title = "bbrx audit report"
    header = [
        ("audit log", f"<span class='mono'>{esc(log_path)}</span>"),
        ("generated at", f"<span class='mono'>{esc(generated_at)}</span>"),
        ("generated by", esc(generated_by)),
        ("runs selected by", esc(filters) if filters.strip() else "all runs"),
        ("runs", str(summary.runs)),
        ("events", str(summary.events)),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{title}: {esc(log_path)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<header><h1>{title}</h1>",
        '<dl class="meta">',
        *(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in header),
        "</dl></header>",
        "<h2>Verification</h2>",
        _verifications(verifications),
        _summary_html(runs, summary, anchors, simulated),
        "<h2>Runs</h2>" if runs else "",
    ]
    for n, run in enumerate(runs, 1):
        rows = timelines.get(run.run_id, ())
        parts.append(_run_section(n, run, rows, anchors[run.run_id], simulated[run.run_id]))
    parts.append("</body></html>\n")
    logger.debug("audit report of %s: %d runs, %d events", log_path, summary.runs, summary.events)
    return "\n".join(parts)
