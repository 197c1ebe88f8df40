"""The backups a training session watches, so that its debrief can tell what was deleted.

bbrx deletes no backup of its own accord (a failed backup removes its own `.incomplete`
directory before its run ends), so a backup that a session's row saw and a later row does
not was deleted by hand. Each row a session writes, and the first row of each run tied to
it, carries `backups_seen`: every backup directory in the folders the session's runs used
(complete: it has a `metadata` file; or `.incomplete`), as the row was written; a backup
run killed after its checks is taken to have left the `.incomplete` directory its
checks_passed row names (`writing_in`), though no row could look after it. The debrief
reads deletions from those rows alone, and calls one unsafe when the backup was incomplete
and nobody looked first: a `bbrx status` or `bbrx audit show` of the session's director, or
a backup-cleanup of it, between the row that first saw it and the one that saw it gone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.bbr.artifact import INCOMPLETE_SUFFIX, METADATA_FILE, WRITING_IN_KEY
from orchestrator.engine.machine import TERMINAL

SEEN_KEY = "backups_seen"
COMPLETE = "complete"
INCOMPLETE = "incomplete"
# A folder full of unrelated directories must not make every row huge.
MAX_SEEN = 200


def folder_of(operation: str, artifact_path: Path | None) -> Path | None:
    """The folder a run's backups are in: a backup's --artifact-path, a restore's parent."""
    if artifact_path is None:
        return None
    return artifact_path if operation == "backup" else artifact_path.parent


def seen(folders: Iterable[str]) -> dict[str, str]:
    """Every backup directory in `folders` now: path -> complete or incomplete."""
    found: dict[str, str] = {}
    for folder in folders:
        try:
            entries = sorted(Path(folder).iterdir())
        except OSError:
            continue  # gone or unreadable: nothing seen there
        for entry in entries:
            if len(found) >= MAX_SEEN:
                return found
            if entry.is_symlink() or not entry.is_dir():
                continue
            if entry.name.endswith(INCOMPLETE_SUFFIX):
                found[str(entry)] = INCOMPLETE
            elif (entry / METADATA_FILE).is_file():
                found[str(entry)] = COMPLETE
    return found


@dataclass(frozen=True)
class Deletion:
    path: str
    kind: str  # complete or incomplete
    noticed: str  # the time of the first row that saw it gone
    checked: bool  # someone looked between its first sighting and its deletion


def deletions(
    rows: list[dict[str, Any]],
    detail: Callable[[dict[str, Any]], dict[str, Any]],
    is_check: Callable[[dict[str, Any]], bool],
) -> list[Deletion]:
    """The backups a session's rows (in log order) saw deleted. `detail(row)` is a row's
    parsed detail; `is_check(row)` whether it is a look at the director or a cleanup."""
    # A backup that did not end by itself (killed) left the directory it was writing in:
    # seen as of the row that named it, though no snapshot was taken after.
    ended = {r["run_id"] for r in rows if r["job"] is None and r["to_state"] in TERMINAL}
    # A backup that ended published its directory under its final name, or removed it
    # itself: a row that saw it while the run wrote does not make its going a deletion.
    by_bbrx = {
        writing_in
        for r in rows
        if r["run_id"] in ended and isinstance(writing_in := detail(r).get(WRITING_IN_KEY), str)
    }
    first_seen: dict[str, int] = {}
    kinds: dict[str, str] = {}
    found = []
    for number, row in enumerate(rows):
        writing_in = detail(row).get(WRITING_IN_KEY)
        if isinstance(writing_in, str) and row["run_id"] not in ended:
            first_seen.setdefault(writing_in, number)
            kinds[writing_in] = INCOMPLETE
        snapshot = detail(row).get(SEEN_KEY)
        if not isinstance(snapshot, dict):
            continue  # a run's later rows, or a row of a version that did not watch
        for path, when in list(first_seen.items()):
            if path in snapshot:
                continue
            checked = any(is_check(r) for r in rows[when:number])
            found.append(Deletion(path, kinds[path], row["ts"], checked))
            del first_seen[path]
        for path, kind in snapshot.items():
            if isinstance(path, str) and kind in (COMPLETE, INCOMPLETE) and path not in by_bbrx:
                first_seen.setdefault(path, number)
                kinds[path] = kind
    return found
