"""The audit log schema, its append-only triggers, and the canonical row hashing.

``EVENT_COLUMNS`` is the single source of truth: the ``events`` table is created from it,
the hash covers exactly its columns (minus ``hash``), and the README table is checked
against it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from json.encoder import encode_basestring
from typing import Any

import sqlite_utils

SCHEMA_VERSION = 1

# The prev_hash of seq 1: there is no previous row, and a fixed value makes the
# genesis row verifiable like any other.
GENESIS_HASH = "0" * 64

TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "interrupted", "recovered"})
MODES: frozenset[str] = frozenset({"sim", "live"})
OUTCOMES: frozenset[str] = frozenset({"ok", "error", "refused"})

EVENT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("seq", "INTEGER", "Primary key: 1, 2, 3... with no gaps, in append order"),
    ("ts", "TEXT", "UTC time of the append, ISO 8601 with microseconds and Z"),
    ("run_id", "TEXT", "Identifier of the backup/restore run the event belongs to"),
    ("operation", "TEXT", "What the run does, e.g. backup or restore"),
    ("target", "TEXT", "The director or deployment the run acts on"),
    ("mode", "TEXT", "sim (built-in simulator) or live (a real director)"),
    ("operator", "TEXT", "Who started the run"),
    ("origin_host", "TEXT", "Host the run was started from"),
    ("reason", "TEXT", "Why the operator started the run"),
    ("from_state", "TEXT", "State before the transition"),
    ("to_state", "TEXT", "State after the transition"),
    ("trigger", "TEXT", "The trigger that caused the transition"),
    ("job", "TEXT", "Job name for job-level events; NULL for run-level events"),
    ("script", "TEXT", "The bbr script run by the job, if any"),
    ("outcome", "TEXT", "ok, error or refused"),
    ("exit_code", "INTEGER", "Exit code of the script, if one ran"),
    ("duration", "REAL", "Seconds the step took, if measured"),
    ("detail", "TEXT", "Extra data as canonical JSON (sorted keys, no spaces), or NULL"),
    ("tool_version", "TEXT", "Version of the tool that wrote the event"),
    ("prev_hash", "TEXT", "hash of the previous event; 64 zeros for seq 1"),
    ("hash", "TEXT", "sha256 hex of the canonical JSON of all other columns"),
)

COLUMN_NAMES: tuple[str, ...] = tuple(name for name, _, _ in EVENT_COLUMNS)
HASHED_COLUMNS: tuple[str, ...] = tuple(name for name in COLUMN_NAMES if name != "hash")

# Nullable columns are the ones that genuinely may be absent for some transitions.
NULLABLE_COLUMNS: frozenset[str] = frozenset(
    {"reason", "from_state", "job", "script", "exit_code", "duration", "detail"}
)
NOT_NULL_COLUMNS: tuple[str, ...] = tuple(n for n in COLUMN_NAMES if n not in NULLABLE_COLUMNS)

_PY_TYPES: dict[str, type] = {"INTEGER": int, "TEXT": str, "REAL": float}


def _guard(name: str, event: str, table: str, refused: str, when: str = "") -> str:
    when_clause = f" WHEN {when}" if when else ""
    return (
        f"CREATE TRIGGER {name} BEFORE {event} ON {table}{when_clause} BEGIN"
        f" SELECT RAISE(ABORT, 'audit log is append-only: {refused} refused'); END"
    )


# Exact SQL text matters: verify compares it with sqlite_master, so a trigger replaced by
# a same-named no-op is reported as altered, not just a dropped one as missing.
TRIGGERS: dict[str, str] = {
    "events_no_update": _guard("events_no_update", "UPDATE", "events", "UPDATE"),
    "events_no_delete": _guard("events_no_delete", "DELETE", "events", "DELETE"),
    # INSERT OR REPLACE deletes the old row without firing DELETE triggers when
    # recursive_triggers is off (the sqlite3 default), so it needs its own guard.
    "events_no_overwrite": _guard(
        "events_no_overwrite",
        "INSERT",
        "events",
        "overwriting an existing seq",
        when="EXISTS (SELECT 1 FROM events WHERE seq = NEW.seq)",
    ),
    "events_append_at_end": _guard(
        "events_append_at_end",
        "INSERT",
        "events",
        "INSERT other than the next seq",
        when="NEW.seq IS NULL OR NEW.seq != (SELECT COALESCE(MAX(seq), 0) + 1 FROM events)",
    ),
    "events_meta_no_update": _guard("events_meta_no_update", "UPDATE", "meta", "UPDATE on meta"),
    "events_meta_no_delete": _guard("events_meta_no_delete", "DELETE", "meta", "DELETE on meta"),
    "events_meta_no_overwrite": _guard(
        "events_meta_no_overwrite",
        "INSERT",
        "meta",
        "overwriting a meta key",
        when="EXISTS (SELECT 1 FROM meta WHERE key = NEW.key)",
    ),
}


def canonical_json(value: Any) -> str:
    """The one JSON spelling used for hashing and for the stored ``detail`` text."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


# Keys in the order sort_keys=True would emit them, with the JSON text of each key baked
# into a template: verify hashes every row, and this is several times faster than
# json.dumps on a dict while producing the identical string (a test holds it to that).
HASH_ORDER: tuple[str, ...] = tuple(sorted(HASHED_COLUMNS))
_ROW_TEMPLATE = "{" + ",".join(f"{json.dumps(k)}:%s" for k in HASH_ORDER) + "}"


def _json_scalar(value: Any) -> str:
    if value is None:
        return "null"
    kind = type(value)
    if kind is str:
        return encode_basestring(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return int.__repr__(value)
    if kind is float:
        if not math.isfinite(value):
            raise ValueError(f"non-finite float {value!r} has no canonical JSON")
        return float.__repr__(value)
    raise TypeError(f"{kind.__name__} value has no canonical JSON")


def hash_values(values: Sequence[Any]) -> str:
    """row_hash for the hashed column values given in HASH_ORDER."""
    text = _ROW_TEMPLATE % tuple(map(_json_scalar, values))
    return hashlib.sha256(text.encode()).hexdigest()


def row_hash(row: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of every column except ``hash``.

    Equal to ``sha256(canonical_json({c: row[c] for c in HASHED_COLUMNS}).encode())``.
    ``row`` must hold the values as stored (``detail`` as its JSON text), which is what
    both ``append`` (before inserting) and ``verify`` (after reading) have in hand.
    Raises TypeError/ValueError for values SQLite can hold but JSON cannot (BLOBs).
    """
    return hash_values([row[name] for name in HASH_ORDER])


def create_schema(db: sqlite_utils.Database) -> None:
    """Create tables, index, triggers and the schema version. Caller holds the transaction."""
    db.table("events").create(
        {name: _PY_TYPES[sql_type] for name, sql_type, _ in EVENT_COLUMNS},
        pk="seq",
        not_null=NOT_NULL_COLUMNS,
        column_order=list(COLUMN_NAMES),
    )
    db.table("events").create_index(["run_id"], index_name="events_run_id")
    db.table("meta").create({"key": str, "value": str}, pk="key", not_null=["value"])
    db.table("meta").insert({"key": "schema_version", "value": str(SCHEMA_VERSION)})
    for sql in TRIGGERS.values():
        db.conn.execute(sql)
