"""Plain-text rendering of runs and timelines, shared by `python -m audit` and `bbrx audit`."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the command line imports this without the log
    from audit.log import RunSummary

DETAIL_WIDTH = 60
REASON_WIDTH = 40
# Keys worth showing first from a detail dict: they are what a reviewer looks for.
_DETAIL_KEYS = ("message", "error", "stderr_tail", "stdout_tail")


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """The text with control and bidirectional-override characters shown as escapes.

    Rows hold what operators and scripts wrote; rendering them raw would let an escape
    sequence recolour, hide or reorder what a reviewer reads, or retitle the terminal.
    Escaped: C0, DEL, C1 and every other category-C character (format characters such as
    U+202E among them), line and paragraph separators, and the bidi embeddings, overrides
    and isolates. The result is idempotent: printable(printable(t)) == printable(t).
    keep_newlines leaves "\n" as a line break, for multi-line messages whose lines the
    caller built; every other control character is still escaped.
    """
    if keep_newlines:
        return "\n".join(printable(line) for line in text.split("\n"))
    return "".join(ch if _shown_as_is(ch) else _escape(ch) for ch in text)


def _shown_as_is(ch: str) -> bool:
    return (
        ch.isprintable()
        and not unicodedata.category(ch).startswith("C")
        and unicodedata.bidirectional(ch) not in _BIDI_CONTROLS
    )


def _escape(ch: str) -> str:
    return ch.encode("unicode_escape").decode("ascii")


_BIDI_CONTROLS = frozenset({"LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI"})


def _short(text: str, width: int) -> str:
    flat = printable(" ".join(text.split()))
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = []
    for cells in (header, *rows):
        padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=True)]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def short_time(ts: str | None) -> str:
    """ISO timestamp cut to milliseconds, which is plenty for a human reader."""
    if not ts:
        return "-"
    # Escaped too: a row's time is text in the log like any other column.
    return printable(ts[:23] + "Z" if len(ts) > 23 and ts.endswith("Z") else ts)


def short_detail(detail: Any, width: int = DETAIL_WIDTH) -> str:
    """One line from a detail dict: the message/error/stderr tail if any, else compact JSON."""
    if detail is None or detail == {}:
        return ""
    if isinstance(detail, Mapping):
        for key in _DETAIL_KEYS:
            value = detail.get(key)
            if value:
                return _short(f"{key}: {value}", width)
        return _short(json.dumps(detail, sort_keys=True, ensure_ascii=False), width)
    return _short(str(detail), width)


def _dash(value: Any) -> str:
    return "-" if value is None or value == "" else printable(str(value))


def format_runs(runs: Sequence[RunSummary]) -> str:
    """One aligned line per run."""
    if not runs:
        return "no runs"
    header = ["RUN", "OPERATION", "TARGET", "MODE", "OPERATOR", "START", "END", "EVENTS"]
    header += ["OUTCOME", "REASON"]
    rows = [
        (
            _dash(r.run_id),
            _dash(r.operation),
            _dash(r.target),
            _dash(r.mode),
            _dash(r.operator),
            short_time(r.start),
            short_time(r.end),
            str(r.events),
            _dash(r.outcome) + ("" if r.finished else " (unfinished)"),
            _short(r.reason or "-", REASON_WIDTH),
        )
        for r in runs
    ]
    return _table(header, rows)


def _instance_of(row: Mapping[str, Any]) -> tuple[Any, Any, Any] | None:
    """The instance a row names (group, index, id), or None for a row naming none."""
    instance = (row.get("instance_group"), row.get("instance_index"), row.get("instance_id"))
    return None if instance == (None, None, None) else instance


def _instance_label(instance: tuple[Any, Any, Any]) -> str:
    group, index, _ = instance
    return _dash(group) if index is None else f"{_dash(group)}/{_dash(index)}"


def _instance_heading(instance: tuple[Any, Any, Any]) -> str:
    uuid = instance[2]
    return f"instance {_instance_label(instance)}" + (
        "" if uuid is None else f" (id {printable(str(uuid))})"
    )


def _timeline_cells(row: Mapping[str, Any], job: str) -> tuple[str, ...]:
    duration = row.get("duration")
    return (
        # A journal row (written when the log could not be) has no place in the chain.
        "journal" if row.get("seq") is None else str(row["seq"]),
        short_time(row.get("ts")),
        f"{_dash(row.get('from_state'))} -> {_dash(row.get('to_state'))}",
        _dash(row.get("trigger")),
        job,
        _dash(row.get("script")),
        _dash(row.get("outcome")),
        _dash(row.get("exit_code")),
        "-" if duration is None else f"{duration:.2f}s",
        short_detail(row.get("detail")) or "-",
    )


_TIMELINE_HEADER = ["SEQ", "TIME", "TRANSITION", "TRIGGER", "JOB", "SCRIPT", "OUTCOME", "EXIT"]
_TIMELINE_HEADER += ["DURATION", "DETAIL"]


def format_timeline(rows: Sequence[Mapping[str, Any]]) -> str:
    """One aligned line per event: seq, time, from -> to, trigger, job, script, outcome...

    Rows are shown in the order given (seq order, journal rows after the run's own). A
    run whose rows name at most one instance (a director's) is one table, a job row's
    instance beside its job (``director (bosh/0)``). A run whose rows name several (a
    deployment's) shows its rows that name no instance first (the run-level rows: the
    run's own timeline), then one section per instance, in order of first appearance,
    headed ``instance redis/1 (id <uuid>)`` and holding that instance's rows; the columns
    are aligned across all sections.
    """
    if not rows:
        return "no events"
    instances = list(dict.fromkeys(i for i in map(_instance_of, rows) if i is not None))
    if len(instances) <= 1:
        lines = []
        for row in rows:
            job = _dash(row.get("job"))
            instance = _instance_of(row)
            if instance is not None:
                job += f" ({_instance_label(instance)})"
            lines.append(_timeline_cells(row, job))
        return _table(_TIMELINE_HEADER, lines)
    groups: dict[tuple[Any, Any, Any] | None, list[tuple[str, ...]]] = {None: []}
    groups.update((instance, []) for instance in instances)
    for row in rows:
        groups[_instance_of(row)].append(_timeline_cells(row, _dash(row.get("job"))))
    # One table for the widths, cut into sections after the header.
    ordered = [cells for cells_of_group in groups.values() for cells in cells_of_group]
    table = _table(_TIMELINE_HEADER, ordered).split("\n")
    out, at = [table[0]], 1
    for instance, cells_of_group in groups.items():
        if instance is not None:
            out += ["", _instance_heading(instance)]
        out += table[at : at + len(cells_of_group)]
        at += len(cells_of_group)
    return "\n".join(out)
