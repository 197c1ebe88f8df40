"""The fields PCI DSS asks of every audit event (requirement 10.2.2, formerly 10.3), and
which columns of a bbrx row hold each: verify checks every row has them.

The mapping is documented column by column in the README, and a test holds the two
together.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from audit.schema import MODES, OUTCOMES

_UTC_TS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


# (the requirement's field, the columns holding it, the column checked, the check)
REQUIRED_FIELDS: tuple[tuple[str, str, str, Callable[[Any], bool]], ...] = (
    ("user identification", "operator", "operator", _text),
    (
        "type of event",
        "operation, trigger, from_state, to_state, script",
        "trigger",
        _text,
    ),
    (
        "date and time",
        "ts (UTC, with Z)",
        "ts",
        lambda v: isinstance(v, str) and bool(_UTC_TS.fullmatch(v)),
    ),
    ("success or failure indication", "outcome, exit_code", "outcome", lambda v: v in OUTCOMES),
    ("origination of event", "origin_host, mode", "origin_host", _text),
    (
        "identity of the affected data, component or resource",
        "target, job, instance_group, instance_index, instance_id",
        "target",
        _text,
    ),
)

# mode is what keeps a simulated run from passing as a live one: it must be one we know.
_ALSO_CHECKED: tuple[tuple[str, Callable[[Any], bool]], ...] = (
    ("operation", _text),
    ("to_state", _text),
    ("mode", lambda v: v in MODES),
)


def field_problem(row: Mapping[str, Any]) -> str | None:
    """What the row lacks of the required fields, as a phrase; None when complete."""
    for requirement, _, column, check in REQUIRED_FIELDS:
        if not check(row.get(column)):
            return f"{column} {row.get(column)!r} does not give the {requirement}"
    for column, check in _ALSO_CHECKED:
        if not check(row.get(column)):
            return f"{column} {row.get(column)!r} is not valid"
    return None
