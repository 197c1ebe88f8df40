"""The debrief of a training session, computed from the audit log alone.

The session's rows are its one-row actions (`train-*`, `sim-*`) and the runs whose first
row carries `detail.training_session`. From them: a timeline, the steps taken out of the
scenario's order or against the runbook's rules, what was unsafe, the time to recover,
the hints used, whether the goal was reached, and a score with how it was computed.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from audit import AuditLog
from audit.schema import TERMINAL_STATES
from orchestrator.errors import UsageError
from orchestrator.state.recovery import maybe_locked
from orchestrator.training.scenario import RUN_STEPS, Rules
from orchestrator.training.session import SESSION_KEY
from orchestrator.training.watch import INCOMPLETE, deletions

ORDER_PENALTY = 10
SAFETY_PENALTY = 25
GOAL_PENALTY = 40
OVERTIME_STEP = 30  # seconds over the budget per point taken off
OVERTIME_MAX = 20


@dataclass
class Action:
    """One thing done in the session, in the order the log has it."""

    at: str
    by: str  # trainee or scenario
    step: str  # a run's operation, a sim action (`vms`, `wipe`...), `hint`, `start`, `reset`,
    # a look (`status`, `audit`), or `deleted` (a backup the session saw gone)
    outcome: str  # a run's final state (or `unfinished`), else ok
    run_id: str
    note: str = ""
    target: str = ""


def _rules(start: dict[str, Any]) -> Rules:
    """The rules the session's train-start row recorded."""
    try:
        return Rules.parse(_detail(start)["rules"])
    except (KeyError, TypeError, ValueError) as error:
        raise UsageError(
            f"the train-start row (seq {start['seq']}) records its scenario badly: {error!r}"
        ) from error


@dataclass
class Debrief:
    session: str
    scenario: str
    title: str
    seed: int
    operator: str
    started: str
    elapsed: float
    time_budget: int
    timeline: list[Action]
    order: list[str]
    safety: list[str]
    hints: int
    hint_cost: int
    time_to_recover: float | None
    goal_reached: bool
    goal: list[str]
    score: int
    scoring: list[str]
    solution: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parsed(text: str | None) -> dict[str, Any]:
    """A row's detail as stored (canonical JSON text), as a mapping."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _detail(row: dict[str, Any]) -> dict[str, Any]:
    return row["detail"] or {}


def _read(audit_db: Path) -> list[dict[str, Any]]:
    with AuditLog(audit_db, readonly=True) as audit:
        return [dict(row, detail=_parsed(row["detail"])) for row in audit.rows()]


def _seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def latest_session(audit_db: Path) -> str | None:
    """The id of the last session started in the log."""
    found = None
    for row in _read(audit_db):
        if row["operation"] == "train-start":
            found = _detail(row).get(SESSION_KEY)
    return found


def debrief(audit_db: Path, session_id: str | None = None) -> Debrief:
    """The debrief of `session_id` (the last session in the log when None)."""
    if not audit_db.exists():
        raise UsageError(f"there is no audit log at {audit_db}", hint="Start a session first.")
    rows = _read(audit_db)
    if session_id is None:
        starts = [r for r in rows if r["operation"] == "train-start"]
        if not starts:
            raise UsageError(
                f"the audit log {audit_db} holds no training session",
                hint="Start one with: bbrx train start SCENARIO",
            )
        session_id = str(_detail(starts[-1]).get(SESSION_KEY))
    start = next(
        (
            r
            for r in rows
            if r["operation"] == "train-start" and _detail(r).get(SESSION_KEY) == session_id
        ),
        None,
    )
    if start is None:
        live = [r for r in rows if r["run_id"] == session_id and r["mode"] == "live"]
        if live:
            raise UsageError(
                f"{session_id} is a live run on {live[0]['target']}, not a training session: "
                "a debrief scores training only",
                hint=f"Review a live run with: bbrx audit show {session_id}",
            )
        raise UsageError(
            f"no training session {session_id} in {audit_db}",
            hint="The sessions are the train-start rows: bbrx audit runs --operation train-start",
        )
    rules = _rules(start)
    mine = _session_rows(rows, session_id)
    if any(r["mode"] != "sim" for r in mine):
        raise UsageError(
            f"session {session_id} has rows that are not sim: it is not a training run"
        )
    return _score(rules, start, mine, session_id)


def _session_rows(rows: list[dict[str, Any]], session_id: str) -> list[dict[str, Any]]:
    runs = {
        r["run_id"]
        for r in rows
        if r["job"] is None
        and r["trigger"] == "start"
        and _detail(r).get(SESSION_KEY) == session_id
    }
    return [r for r in rows if r["run_id"] in runs or _detail(r).get(SESSION_KEY) == session_id]


def _timeline(rows: list[dict[str, Any]]) -> tuple[list[Action], dict[str, list[dict[str, Any]]]]:
    by_run: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_run.setdefault(row["run_id"], []).append(row)
    actions = []
    for run_id, run_rows in by_run.items():
        first = run_rows[0]
        operation = first["operation"]
        if operation.startswith(("train-", "sim-", "look-")):
            detail = _detail(first)
            if operation == "sim-create" and detail.get("event") == "world":
                continue  # the setup's, before the session began: not part of its story
            step = operation.split("-", 1)[1]
            by = "scenario" if detail.get("by") == "scenario" else "trainee"
            note = ""
            if step == "hint":
                note = f"hint {detail.get('hint')} (costs {detail.get('cost')})"
            elif step == "fault":
                note = str(detail.get("spec") or "mended")
            elif step == "audit":
                note = f"audit show {detail.get('run')}"
            elif detail.get("deployment"):
                note = f"deployment {detail['deployment']}"
            actions.append(Action(first["ts"], by, step, "ok", run_id, note, first["target"]))
            continue
        final = next((r for r in reversed(run_rows) if r["job"] is None), first)
        outcome = final["to_state"] if final["to_state"] in TERMINAL_STATES else "unfinished"
        errors = [
            _detail(r).get("message")
            for r in run_rows
            if r["outcome"] in ("error", "refused") and _detail(r).get("message")
        ]
        note = str(errors[0])[:200] if errors else ""
        actions.append(
            Action(first["ts"], "trainee", operation, outcome, run_id, note, first["target"])
        )
    actions.sort(key=lambda a: a.at)
    return actions, by_run


def _score(
    scenario: Rules, start: dict[str, Any], rows: list[dict[str, Any]], session_id: str
) -> Debrief:
    actions, by_run = _timeline(rows)
    order: list[str] = []
    safety: list[str] = []
    for gone in deletions(rows, _detail, _is_check):
        deleted = Action(gone.noticed, "trainee", "deleted", "by hand", "", gone.path)
        actions.append(deleted)
        if gone.kind == INCOMPLETE and not gone.checked:
            safety.append(
                f"{_clock(deleted)} the incomplete backup {gone.path} was deleted by hand before "
                "anyone looked at the run that left it (bbrx status, bbrx audit show, or a "
                "backup-cleanup first)"
            )
    actions.sort(key=lambda a: a.at)
    every_run = [a for a in actions if a.step in RUN_STEPS]
    for action in every_run:
        if action.target != scenario.focus:
            order.append(
                f"{_clock(action)} {action.step} (run {action.run_id}) on {action.target}: "
                f"this scenario is about {scenario.focus}"
            )
    runs = [a for a in every_run if a.target == scenario.focus]

    # The runbook's rules, whatever the scenario.
    checked = False
    for action in runs:
        if action.step == "pre-backup-check" and action.outcome == "succeeded":
            checked = True
        elif action.step == "backup":
            if not checked:
                order.append(
                    f"{_clock(action)} backup (run {action.run_id}) without a successful "
                    "pre-backup-check first"
                )
            checked = False
    for index, action in enumerate(runs):
        if action.step != "restore":
            continue
        if action.outcome != "succeeded" and not any(
            r["to_state"] == "locking" for r in by_run[action.run_id]
        ):
            continue  # refused before it locked anything: there is nothing to clean up
        later = runs[index + 1 :]
        following = next(
            (a for a in later if a.step in ("restore", "restore-cleanup", "backup")), None
        )
        if following is None or following.step != "restore-cleanup":
            order.append(
                f"{_clock(action)} restore (run {action.run_id}) without a restore-cleanup after it"
            )
    # The world's killed run, if there is one, is the run the first cleanup is for.
    last = None
    if _detail(start).get("killed_instance"):
        last = Action(start["ts"], "scenario", "backup", "interrupted", "(the killed run)")
    for action in runs:
        if action.step.endswith("-cleanup") and last is not None and last.outcome != "succeeded":
            wanted = f"{last.step}-cleanup" if last.step in ("backup", "restore") else None
            if wanted and action.step != wanted:
                order.append(
                    f"{_clock(action)} {action.step} after the {last.outcome} {last.step} "
                    f"(run {last.run_id}): the cleanup for a {last.step} is {wanted}"
                )
        if not action.step.endswith("-cleanup") and action.step != "pre-backup-check":
            last = action
        elif action.step.endswith("-cleanup") and action.outcome == "succeeded":
            last = None

    # The scenario's own procedure, as a sequence the trainee's steps should follow.
    # (A step a runbook rule above already named is not counted twice.)
    named = {
        step for step in ("pre-backup-check", "restore-cleanup") if any(step in o for o in order)
    }
    steps = [a for a in actions if a.by == "trainee" and (a in runs or a.step == "vms")]
    unsafe_runs: set[str] = set()
    cursor = 0
    for number, wanted in enumerate(scenario.procedure):
        found = next((i for i in range(cursor, len(steps)) if steps[i].step == wanted), None)
        if found is not None:
            cursor = found + 1
            continue
        if wanted in named:
            continue
        before = scenario.procedure[number - 1] if number else None
        order.append(
            f"procedure step {number + 1} ({wanted}) was not done"
            + (f" after step {number} ({before})" if before else "")
        )

    # Safety: nothing left locked, nothing restored that this session did not back up.
    for index, action in enumerate(runs):
        locked = maybe_locked(by_run[action.run_id])
        if locked:
            unlocked = any(
                a.step.endswith("-cleanup") and a.outcome == "succeeded" for a in runs[index + 1 :]
            )
            if not unlocked:
                safety.append(
                    f"{_clock(action)} {action.step} (run {action.run_id}) left "
                    f"{', '.join(locked)} locked, and no cleanup unlocked them"
                )
    # The backups this session knows: the world's (of which director) and the trainee's.
    made = {b.get("path"): b.get("of") for b in _detail(start).get("backups") or []}
    for action in runs:
        first = by_run[action.run_id][0]
        for row in by_run[action.run_id]:
            if action.step == "backup" and row["trigger"] == "drained":
                made[_detail(row).get("artifact")] = first["target"]
        if action.step == "restore" and action.outcome == "succeeded":
            path = _detail(first).get("artifact_path")
            if path not in made:
                unsafe_runs.add(action.run_id)
                safety.append(
                    f"{_clock(action)} restore (run {action.run_id}) of {path}, a backup this "
                    "session did not make and check"
                )
            elif made[path] != first["target"]:
                unsafe_runs.add(action.run_id)
                safety.append(
                    f"{_clock(action)} restore (run {action.run_id}) of {path}, a backup of "
                    f"{made[path]}, onto {first['target']}"
                )
    if _detail(start).get("killed_instance") and not any(
        a.step == "backup-cleanup" and a.outcome == "succeeded" for a in runs
    ):
        safety.append(
            f"the killed run's jobs on {scenario.focus} were left as it left them: no "
            "backup-cleanup of it succeeded"
        )

    # Recovery, hints, goal.
    # A loss that undoes the goal: the director's (its deployments vanish with its
    # database), or the wipe of the very deployment the scenario is about.
    disasters = [
        a for a in actions if a.step == "wipe" and a.target in (start["target"], scenario.focus)
    ]
    recovered = None
    if disasters:
        after = [
            a
            for a in runs
            if a.at > disasters[0].at and a.step == "restore" and a.outcome == "succeeded"
        ]
        if after:
            end = by_run[after[0].run_id][-1]["ts"]
            recovered = _seconds(disasters[0].at, end)
    hints = [a for a in actions if a.step == "hint"]
    hint_cost = sum(_detail(by_run[a.run_id][0]).get("cost", 0) for a in hints)
    since = disasters[-1].at if disasters else start["ts"]
    pending = list(scenario.goal)
    for action in steps:
        done = action.step == "vms" or action.outcome == "succeeded"
        done = done and action.run_id not in unsafe_runs  # an unsafe restore is no recovery
        if pending and action.at >= since and action.step == pending[0] and done:
            pending.pop(0)
    goal_reached = not pending
    # The clock stops at the end of the trainee's last run or sim action: a hint, a look
    # at the status or the reset taken later does not count.
    worked = [
        a
        for a in actions
        if a.by == "trainee"
        and a.step not in ("start", "hint", "reset", "status", "audit", "deleted")
    ]
    ends = [by_run[a.run_id][-1]["ts"] for a in worked]
    elapsed = _seconds(start["ts"], max(ends)) if ends else 0.0

    score = 100
    scoring = ["start at 100"]
    for what, items, penalty in (
        ("order", order, ORDER_PENALTY),
        ("safety", safety, SAFETY_PENALTY),
    ):
        if items:
            score -= penalty * len(items)
            scoring.append(
                f"-{penalty * len(items)}: {len(items)} {what} violation(s), {penalty} each"
            )
    if hint_cost:
        score -= hint_cost
        scoring.append(f"-{hint_cost}: {len(hints)} hint(s)")
    over = elapsed - scenario.time_budget
    if over > 0:
        points = min(OVERTIME_MAX, math.ceil(over / OVERTIME_STEP))
        score -= points
        scoring.append(f"-{points}: {over:.0f} s over the {scenario.time_budget} s budget")
    if not goal_reached:
        score -= GOAL_PENALTY
        scoring.append(f"-{GOAL_PENALTY}: goal not reached (still to do: {', '.join(pending)})")
    score = max(0, score)
    scoring.append(f"= {score}")
    detail = _detail(start)
    return Debrief(
        session=session_id,
        scenario=scenario.id,
        title=scenario.title,
        seed=int(detail.get("seed", 0)),
        operator=start["operator"],
        started=start["ts"],
        elapsed=elapsed,
        time_budget=scenario.time_budget,
        timeline=actions,
        order=order,
        safety=safety,
        hints=len(hints),
        hint_cost=hint_cost,
        time_to_recover=recovered,
        goal_reached=goal_reached,
        goal=list(scenario.goal),
        score=score,
        scoring=scoring,
        solution=list(scenario.solution),
    )


def _clock(action: Action) -> str:
    return action.at[11:19]


def _is_check(row: dict[str, Any]) -> bool:
    """A look at what a run left (its status, its timeline), or a cleanup that succeeded."""
    if row["operation"].startswith("look-"):
        return True
    return (row["operation"], row["job"], row["to_state"]) == (
        "backup-cleanup",
        None,
        "succeeded",
    )


# --- rendering -------------------------------------------------------------------------


def render_text(report: Debrief) -> str:
    lines = [
        f"Debrief of training session {report.session}: {report.title} ({report.scenario}, "
        f"seed {report.seed})",
        f"Trainee: {report.operator}; started {report.started}; took {report.elapsed:.0f} s "
        f"of a {report.time_budget} s budget",
        "",
        "What you did:",
    ]
    for action in report.timeline:
        who = "" if action.by == "trainee" else " [scenario]"
        note = f" - {action.note}" if action.note else ""
        lines.append(f"  {action.at[11:19]}  {action.step:<17} {action.outcome:<11}{who}{note}")
    lines.append("")
    lines.append(
        f"Goal ({' -> '.join(report.goal)}): {'reached' if report.goal_reached else 'NOT reached'}"
    )
    if report.time_to_recover is not None:
        lines.append(
            "Time to recover (the director's loss to a restored director): "
            f"{report.time_to_recover:.0f} s"
        )
    lines.append(f"Hints used: {report.hints} (cost {report.hint_cost})")
    lines.append("")
    lines.append("Out of order:" if report.order else "Out of order: nothing")
    lines.extend(f"  - {item}" for item in report.order)
    lines.append("Unsafe:" if report.safety else "Unsafe: nothing")
    lines.extend(f"  - {item}" for item in report.safety)
    lines.append("")
    lines.append(f"Score: {report.score}/100 ({'; '.join(report.scoring)})")
    lines.append("")
    lines.append("Reference solution:")
    lines.extend(f"  {number}. {step}" for number, step in enumerate(report.solution, 1))
    return "\n".join(lines)


def render_html(report: Debrief) -> str:
    """A page of its own: no scripts, no fetches; every value escaped."""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(a.at[11:19])}</td><td>{e(a.step)}</td><td>{e(a.outcome)}</td>"
        f"<td>{e(a.by)}</td><td>{e(a.note)}</td></tr>"
        for a in report.timeline
    )

    solution = "".join(f"<li><code>{e(step)}</code></li>" for step in report.solution)

    def listing(items: list[str]) -> str:
        return (
            "<ul>" + "".join(f"<li>{e(i)}</li>" for i in items) + "</ul>"
            if items
            else "<p>nothing</p>"
        )

    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' "
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>Debrief {e(report.session)}</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "td,th{padding:.2em .6em;text-align:left}</style></head><body>"
        f"<h1>{e(report.title)}</h1>"
        f"<p>Session {e(report.session)} ({e(report.scenario)}, seed {report.seed}), trainee "
        f"{e(report.operator)}, {report.elapsed:.0f} s of {report.time_budget} s.</p>"
        f"<h2>Score: <span id='score'>{report.score}</span>/100</h2>"
        f"<p>{e('; '.join(report.scoring))}</p>"
        f"<p>Goal: {'reached' if report.goal_reached else 'NOT reached'}; "
        f"hints used: {report.hints}</p>"
        "<h2>Timeline</h2><table><tr><th>time</th><th>step</th><th>outcome</th><th>by</th>"
        f"<th>note</th></tr>{rows}</table>"
        f"<h2>Out of order</h2><div id='order'>{listing(report.order)}</div>"
        f"<h2>Unsafe</h2><div id='safety'>{listing(report.safety)}</div>"
        f"<h2>Reference solution</h2><ol>{solution}</ol>"
        "</body></html>\n"
    )
