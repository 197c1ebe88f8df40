"""Which runs a reviewer asks about: the filters every reviewer command takes.

A filter selects runs, and a run's events come with it: a run is in when its first event
is in the time window and its target, operator, operation, outcome and mode are among
those asked for (any of the values given for one key; every key given must match).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from audit.errors import AuditError

if TYPE_CHECKING:  # annotations only: the command line imports this without the log
    from audit.log import RunSummary

# What --outcome accepts: a run's final state, or `unfinished` for one that has none yet
# (in progress, or its process died and no cleanup has recovered it).
UNFINISHED = "unfinished"
OUTCOME_CHOICES: tuple[str, ...] = ("succeeded", "failed", "interrupted", "recovered", UNFINISHED)
MODE_CHOICES: tuple[str, ...] = ("sim", "live", "review")

_AGE = re.compile(r"(\d+)([dhm])")
_AGE_UNITS = {"d": "days", "h": "hours", "m": "minutes"}
WHEN_FORMS = (
    "a date (2026-11-30), an ISO time (2026-11-30T14:00:00Z, 2026-11-30T23:00+09:00; "
    "UTC when it names no zone) or an age (7d, 12h, 30m: that long before now)"
)


def stamp(moment: datetime) -> str:
    """A UTC time spelled as the audit log's ``ts`` is, so the two compare as text."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_when(text: str, option: str, *, until: bool, now: datetime | None = None) -> str:
    """The ``ts`` bound for ``--since`` (inclusive) or ``--until`` (exclusive: a date
    means the whole of that day, a time that moment included)."""
    spelled = text.strip()
    now = now or datetime.now(UTC)
    age = _AGE.fullmatch(spelled)
    if age:
        moment = now - timedelta(**{_AGE_UNITS[age[2]]: int(age[1])})
        return stamp(moment + (timedelta(microseconds=1) if until else timedelta()))
    try:
        day = date.fromisoformat(spelled)
    except ValueError:
        pass
    else:
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        return stamp(start + timedelta(days=1) if until else start)
    try:
        moment = datetime.fromisoformat(spelled)
    except ValueError:
        raise AuditError(f"{option} {text!r} is not a time", hint=f"Give {WHEN_FORMS}.") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return stamp(moment + timedelta(microseconds=1) if until else moment)


def _choices(option: str, values: Iterable[str], allowed: tuple[str, ...]) -> tuple[str, ...]:
    chosen = tuple(values)
    unknown = [v for v in chosen if v not in allowed]
    if unknown:
        raise AuditError(
            f"{option} {unknown[0]!r} is not one of {', '.join(allowed)}",
            hint=f"Give {option} once for each value wanted.",
        )
    return chosen


@dataclass(frozen=True)
class RunFilter:
    """A reviewer's question. ``since``/``until`` are ``ts`` bounds (see parse_when)."""

    since: str | None = None
    until: str | None = None
    targets: tuple[str, ...] = ()
    operators: tuple[str, ...] = ()
    operations: tuple[str, ...] = ()
    outcomes: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()
    # What the reviewer typed for since/until, kept to say what was asked.
    since_text: str | None = None
    until_text: str | None = None

    @classmethod
    def parse(
        cls,
        *,
        since: str | None = None,
        until: str | None = None,
        targets: Iterable[str] = (),
        operators: Iterable[str] = (),
        operations: Iterable[str] = (),
        outcomes: Iterable[str] = (),
        modes: Iterable[str] = (),
        now: datetime | None = None,
    ) -> RunFilter:
        """From the options as typed; AuditError naming the option at fault."""
        low = parse_when(since, "--since", until=False, now=now) if since else None
        high = parse_when(until, "--until", until=True, now=now) if until else None
        if low is not None and high is not None and low >= high:
            raise AuditError(
                f"--since {since} is not before --until {until}: no run can match",
                hint="Swap them, or widen the window.",
            )
        return cls(
            since=low,
            until=high,
            targets=tuple(t.rstrip("/") or t for t in targets),
            operators=tuple(operators),
            operations=tuple(operations),
            outcomes=_choices("--outcome", outcomes, OUTCOME_CHOICES),
            modes=_choices("--mode", modes, MODE_CHOICES),
            since_text=since,
            until_text=until,
        )

    @property
    def empty(self) -> bool:
        return not self.as_dict()

    def as_dict(self) -> dict[str, Any]:
        """The filters given, as the reviewer gave them (for audit rows and reports)."""
        given: dict[str, Any] = {
            "since": self.since_text,
            "until": self.until_text,
            "target": list(self.targets),
            "operator": list(self.operators),
            "operation": list(self.operations),
            "outcome": list(self.outcomes),
            "mode": list(self.modes),
        }
        return {key: value for key, value in given.items() if value}

    def describe(self) -> str:
        """One line: ``all runs``, or each filter as its option."""
        given = self.as_dict()
        if not given:
            return "all runs"
        parts = []
        for key, value in given.items():
            values = value if isinstance(value, list) else [value]
            parts.append(f"--{key} " + " | ".join(values))
        return "; ".join(parts)

    def _target_matches(self, target: str) -> bool:
        # A director's target names its deployments too: sim://demo covers sim://demo/redis.
        return not self.targets or any(
            target == t or target.startswith(t + "/") for t in self.targets
        )

    def _start_matches(self, start: str) -> bool:
        return (self.since is None or start >= self.since) and (
            self.until is None or start < self.until
        )

    def matches(self, run: RunSummary) -> bool:
        outcome = run.outcome if run.finished else UNFINISHED
        return (
            self._start_matches(run.start)
            and self._target_matches(run.target)
            and (not self.operators or run.operator in self.operators)
            and (not self.operations or run.operation in self.operations)
            and (not self.outcomes or outcome in self.outcomes)
            and (not self.modes or run.mode in self.modes)
        )

    def first_row_matches(self, row: Mapping[str, Any]) -> bool:
        """Whether the run a row opens matches, judged from that row alone: for following
        a log, where a run's outcome is not yet known (so ``outcomes`` must be empty)."""
        if self.outcomes:
            raise AuditError(
                "--outcome cannot be followed: a run's outcome is known only at its end",
                hint="Drop --outcome, and filter on the outcome in the SIEM.",
            )
        return (
            self._start_matches(str(row["ts"]))
            and self._target_matches(str(row["target"]))
            and (not self.operators or row["operator"] in self.operators)
            and (not self.operations or row["operation"] in self.operations)
            and (not self.modes or row["mode"] in self.modes)
        )

    def select(self, runs: Iterable[RunSummary]) -> list[RunSummary]:
        return [run for run in runs if self.matches(run)]
