"""The audit log schema, its append-only triggers, and the canonical row hashing.

``EVENT_COLUMNS`` is the single source of truth: the ``events`` table is created from it,
the hash covers its columns (minus ``hash``; the instance columns only when non-NULL),
and the README table is checked against it.

Schema versions: 1 had no instance columns; 2 appends ``instance_group``,
``instance_index`` and ``instance_id`` after ``hash``. A version 1 log is migrated in
place when a writer opens it (see ``AuditLog``); its rows hash exactly as before.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from json.encoder import encode_basestring
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: audit.log imports it when a log is opened
    import sqlite_utils

SCHEMA_VERSION = 2

# meta key recording an in-place migration to version N (meta is append-only, so the
# schema_version row of a migrated log keeps its old value): value = UTC time of it.
MIGRATED_TO_PREFIX = "migrated_to_"

# The prev_hash of seq 1: there is no previous row, and a fixed value makes the
# genesis row verifiable like any other.
GENESIS_HASH = "0" * 64

TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "interrupted", "recovered"})
# review: a reviewer's read of the log itself (export, report, verify, evidence, checkpoint).
MODES: frozenset[str] = frozenset({"sim", "live", "review"})
OUTCOMES: frozenset[str] = frozenset({"ok", "error", "refused"})

EVENT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("seq", "INTEGER", "Primary key: 1, 2, 3... with no gaps, in append order"),
    ("ts", "TEXT", "UTC time of the append, ISO 8601 with microseconds and Z"),
    ("run_id", "TEXT", "Identifier of the backup/restore run the event belongs to"),
    ("operation", "TEXT", "What the run does, e.g. backup or restore"),
    ("target", "TEXT", "The director or deployment the run acts on"),
    ("mode", "TEXT", "sim (built-in simulator), live (a real director) or review (a read)"),
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
    # Schema version 2: appended after hash, as ALTER TABLE ADD COLUMN puts them.
    ("instance_group", "TEXT", "Instance group of a job-level event (bosh for a director)"),
    ("instance_index", "TEXT", "Index of the instance in its group, as text, e.g. 1"),
    ("instance_id", "TEXT", "UUID of the instance, or NULL when unknown"),
)

COLUMN_NAMES: tuple[str, ...] = tuple(name for name, _, _ in EVENT_COLUMNS)
# The columns schema version 2 added; NULL on run-level rows and on every version 1 row.
INSTANCE_COLUMNS: tuple[str, ...] = ("instance_group", "instance_index", "instance_id")
_INSTANCE = frozenset(INSTANCE_COLUMNS)
# The columns of a version 1 log, which a read-only reader reads with the instance NULL.
V1_COLUMN_NAMES: tuple[str, ...] = tuple(n for n in COLUMN_NAMES if n not in INSTANCE_COLUMNS)
# The columns every row's hash covers. The instance columns are covered too, but only
# where non-NULL, so that version 1 rows (and rows with no instance) hash as they did.
HASHED_COLUMNS: tuple[str, ...] = tuple(name for name in V1_COLUMN_NAMES if name != "hash")

# Nullable columns are the ones that genuinely may be absent for some transitions.
NULLABLE_COLUMNS: frozenset[str] = frozenset(
    {"reason", "from_state", "job", "script", "exit_code", "duration", "detail"}
    | set(INSTANCE_COLUMNS)
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


# Views for the questions reviewers ask most, so each is one query in sqlite3, sqlite-utils
# or Datasette. They read events only and change nothing; a writer creates any that are
# missing, and verify reports one whose SQL is not this (a view can be made to lie).
_RUN_STATES = "('succeeded', 'failed', 'interrupted', 'recovered')"
VIEWS: dict[str, str] = {
    "runs": (
        "CREATE VIEW runs AS"
        " WITH spans AS (SELECT run_id, MIN(seq) AS first_seq, MAX(seq) AS last_seq,"
        " COUNT(*) AS events, SUM(outcome != 'ok') AS error_events FROM events GROUP BY run_id),"
        " run_level AS (SELECT run_id, MAX(seq) AS seq FROM events WHERE job IS NULL"
        " GROUP BY run_id)"
        " SELECT s.run_id, f.operation, f.target, f.mode, f.operator, f.origin_host, f.reason,"
        " f.ts AS started, l.ts AS ended, s.events, s.error_events,"
        " COALESCE(c.to_state, 'unfinished') AS state,"
        f" CASE WHEN c.to_state IN {_RUN_STATES} THEN c.to_state ELSE 'unfinished' END AS outcome,"
        " s.first_seq, s.last_seq"
        " FROM spans s JOIN events f ON f.seq = s.first_seq JOIN events l ON l.seq = s.last_seq"
        " LEFT JOIN run_level r ON r.run_id = s.run_id LEFT JOIN events c ON c.seq = r.seq"
    ),
    "failures": (
        "CREATE VIEW failures AS"
        " SELECT seq, ts, run_id, operation, target, mode, operator, origin_host, reason,"
        " job, instance_group, instance_index, instance_id, script, trigger, from_state,"
        " to_state, outcome, exit_code, detail FROM events WHERE outcome != 'ok'"
    ),
    "who_ran_what": (
        "CREATE VIEW who_ran_what AS"
        " SELECT operator, operation, target, mode, COUNT(*) AS runs,"
        " SUM(outcome = 'succeeded') AS succeeded, SUM(outcome = 'failed') AS failed,"
        " SUM(outcome NOT IN ('succeeded', 'failed')) AS other,"
        " MIN(started) AS first_started, MAX(started) AS last_started"
        " FROM runs GROUP BY operator, operation, target, mode"
    ),
    "reads": (
        "CREATE VIEW reads AS"
        " SELECT seq, ts, run_id, operation, operator, origin_host, reason, outcome, detail"
        " FROM events WHERE mode = 'review'"
    ),
}


def canonical_json(value: Any) -> str:
    """The one JSON spelling used for hashing and for the stored ``detail`` text."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def hashed_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """What a row's hash covers: every HASHED_COLUMNS value, and each instance column
    whose value is not NULL (a missing key counts as NULL, as in a version 1 row)."""
    fields = {name: row[name] for name in HASHED_COLUMNS}
    for name in INSTANCE_COLUMNS:
        if row.get(name) is not None:
            fields[name] = row[name]
    return fields


# Keys in the order sort_keys=True would emit them, with the JSON text of each key baked
# into a template: verify hashes every row, and this is several times faster than
# json.dumps on a dict while producing the identical string (a test holds it to that).
# HASH_ORDER includes the instance columns; since their names share the prefix
# "instance_", they are adjacent in it, and one template per combination of non-NULL
# instance values (eight) leaves the NULL ones out.
HASH_ORDER: tuple[str, ...] = tuple(sorted(HASHED_COLUMNS + INSTANCE_COLUMNS))
_INSTANCE_AT = HASH_ORDER.index(INSTANCE_COLUMNS[0])
_INSTANCE_END = _INSTANCE_AT + len(INSTANCE_COLUMNS)
if set(HASH_ORDER[_INSTANCE_AT:_INSTANCE_END]) != _INSTANCE:  # pragma: no cover
    raise RuntimeError("the instance columns must be adjacent in HASH_ORDER")


def _template(present: Sequence[bool]) -> str:
    keep = dict(zip(HASH_ORDER[_INSTANCE_AT:_INSTANCE_END], present, strict=True))
    keys = [k for k in HASH_ORDER if keep.get(k, True)]
    return "{" + ",".join(f"{json.dumps(k)}:%s" for k in keys) + "}"


_TEMPLATES: dict[tuple[bool, ...], str] = {
    present: _template(present)
    for present in itertools.product((False, True), repeat=len(INSTANCE_COLUMNS))
}


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
    """row_hash for the column values given in HASH_ORDER (NULL instance values omitted
    from the hash, as ``hashed_fields`` says)."""
    instance = values[_INSTANCE_AT:_INSTANCE_END]
    template = _TEMPLATES[tuple(value is not None for value in instance)]
    present = [value for value in instance if value is not None]
    scalars = (*values[:_INSTANCE_AT], *present, *values[_INSTANCE_END:])
    text = template % tuple(map(_json_scalar, scalars))
    return hashlib.sha256(text.encode()).hexdigest()


def row_hash(row: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of every column except ``hash``, the instance
    columns only where not NULL.

    Equal to ``sha256(canonical_json(hashed_fields(row)).encode())``. The instance keys
    may be absent from ``row`` (a version 1 row): absent counts as NULL.
    ``row`` must hold the values as stored (``detail`` as its JSON text), which is what
    both ``append`` (before inserting) and ``verify`` (after reading) have in hand.
    Raises TypeError/ValueError for values SQLite can hold but JSON cannot (BLOBs).
    """
    return hash_values([row.get(name) if name in _INSTANCE else row[name] for name in HASH_ORDER])


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
    create_views(db)


def create_views(db: sqlite_utils.Database) -> list[str]:
    """Create the reviewers' views that are missing; their names. Caller holds the
    transaction. One that exists is left alone, altered or not (verify reports it)."""
    present = set(db.view_names())
    created = [name for name in VIEWS if name not in present]
    for name in created:
        db.conn.execute(VIEWS[name])
    return created


def migrate_to_2(db: sqlite_utils.Database, when: str) -> None:
    """Turn a version 1 log into version 2. Caller holds the (IMMEDIATE) transaction.

    ALTER TABLE ADD COLUMN appends the instance columns without rewriting a row or
    firing a trigger, so every row and its hash stay as they were, and the triggers'
    SQL is untouched. meta is append-only, so the migration is a row of its own,
    ``migrated_to_2`` = ``when`` (UTC), rather than an update of ``schema_version``.
    """
    for name, sql_type, _ in EVENT_COLUMNS:
        if name in _INSTANCE:
            db.conn.execute(f'ALTER TABLE events ADD COLUMN "{name}" {sql_type}')
    db.conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", [f"{MIGRATED_TO_PREFIX}2", when])
