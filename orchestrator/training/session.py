"""A trainee's session: the world a scenario starts from, its faults and events, hints,
and the audit rows that tie everything done in it to the session.

The session lives in `$BBRX_HOME/train/session.json` while it runs. Its director is a
simulated director made for it (marked with `.training` in its root, so that `train start`
and `train reset` never touch a director the trainee made). Session actions (start, hint,
reset, the scenario's events, the trainee's `sim` commands on the director) are one-row
runs in the audit log, mode sim, `detail.training_session` the session id; the trainee's
runs on the director carry the same key on their first row.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from audit import AuditError, AuditLog
from orchestrator import __version__
from orchestrator.engine.run import new_run_id
from orchestrator.errors import UsageError
from orchestrator.training.scenario import Scenario, find, plan
from simulator.director import SimDirector, sim_root
from simulator.vm import WORK_DIR

log = logging.getLogger(__name__)

SESSION_KEY = "training_session"
MARKER = ".training"
MODE = "sim"


@dataclass
class Session:
    id: str
    scenario: str  # the reference it was started with: a shipped id or a file's path
    seed: int
    director: str
    started: str
    audit_db: str
    operator: str
    hints_used: int = 0
    fired: tuple[int, ...] = ()

    @property
    def target(self) -> str:
        return f"sim://{self.director}"

    def elapsed(self, now: datetime | None = None) -> float:
        now = now or datetime.now(UTC)
        return (now - datetime.fromisoformat(self.started)).total_seconds()


def _session_file(home: Path) -> Path:
    return home / "train" / "session.json"


def current(home: Path) -> Session | None:
    """The running session, or None. A damaged session file is an error naming it."""
    path = _session_file(home)
    try:
        data = json.loads(path.read_text())
        data["fired"] = tuple(data.get("fired", ()))
        return Session(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as error:
        raise UsageError(
            f"the training session file {path} is damaged ({error})",
            hint="End the session with: bbrx train reset",
        ) from error


def _save(home: Path, session: Session) -> None:
    path = _session_file(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(session.__dict__, fired=list(session.fired))
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def _record(session: Session, operation: str, detail: dict[str, Any], *, ok: bool = True) -> None:
    """One row for a session action, in the session's audit log."""
    with AuditLog(Path(session.audit_db)) as audit:
        audit.append(
            run_id=new_run_id(),
            operation=operation,
            target=session.target,
            mode=MODE,
            operator=session.operator,
            origin_host=socket.gethostname(),
            reason=f"training: {session.scenario}",
            from_state=None,
            to_state="succeeded" if ok else "failed",
            trigger=operation.replace("-", "_"),
            outcome="ok" if ok else "error",
            detail={SESSION_KEY: session.id, **detail},
            tool_version=f"bbrx {__version__}",
        )


# --- the trainee's commands ------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    session: Session
    scenario: Scenario
    faults: list[dict[str, str]]
    backups: Path | None  # where the world's backups are, if it has any


def start(home: Path, audit_db: Path, reference: str, seed: int | None, operator: str) -> Started:
    """Set up a scenario's world and arm its faults; the session that runs on it."""
    running = current(home)
    if running is not None:
        raise UsageError(
            f"training session {running.id} ({running.scenario}) is still running",
            hint="See it with: bbrx train status. End it with: bbrx train reset",
        )
    scenario = find(reference)
    if not scenario.source.startswith("scenarios/"):  # a file: found again from anywhere
        reference = str(Path(reference).expanduser().resolve())
    seed = seed if seed is not None else secrets.randbelow(1_000_000)
    drawn = plan(scenario, seed)
    director = SimDirector(sim_root(home, scenario.world.director))
    if director.exists():
        if not (director.root / MARKER).exists():
            raise UsageError(
                f"sim://{scenario.world.director} exists and was not made for training",
                hint=f"The scenario needs that name: remove it (bbrx sim destroy "
                f"{scenario.world.director}) or keep it and train later.",
            )
        director.destroy()
    director.create()
    (director.root / MARKER).write_text(f"{scenario.id}\n")
    if scenario.world.leftover_work_dir:
        # What a killed bbr run leaves: its work directory, with part of an artifact in it.
        leftover = director.root / WORK_DIR / "blobstore"
        leftover.mkdir(parents=True)
        (leftover / "partial.tar").write_bytes(b"left by a run that was killed\n")
    backups = _make_backups(home, audit_db, scenario, operator)
    if scenario.world.lost:
        director.wipe()
    for fault in drawn.faults:
        director.set_fault(fault.job, fault.script, fault.spec)
    session = Session(
        id=new_run_id(),
        scenario=reference,
        seed=seed,
        director=scenario.world.director,
        started=datetime.now(UTC).isoformat(),
        audit_db=str(audit_db.resolve()),
        operator=operator,
    )
    try:
        _record(
            session,
            "train-start",
            {
                "scenario": scenario.id,
                # a scenario file's path, for the debrief to read it again
                "scenario_source": None
                if reference == scenario.id
                else str(Path(reference).resolve()),
                "seed": seed,
                "plan": drawn.as_dict()["faults"],
                "backups": backups,
            },
        )
    except AuditError:
        director.destroy()
        raise
    _save(home, session)
    return Started(
        session, scenario, drawn.as_dict()["faults"], backups_folder(home) if backups else None
    )


def backups_folder(home: Path) -> Path:
    """Where a session's world keeps the backups it starts with."""
    return home / "train" / "backups"


def _make_backups(
    home: Path, audit_db: Path, scenario: Scenario, operator: str
) -> list[dict[str, Any]]:
    """The backups the world starts with, each made by a real backup run of its director
    (another director is made for it, and removed after). Those runs are in the audit log
    as what they are, before the session: no trainee ran them."""
    from orchestrator.engine.run import Identity
    from orchestrator.operations.procedures import Request, run_director
    from orchestrator.transport.targets import parse_host

    folder = backups_folder(home)
    if scenario.world.backups:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    made = []
    for backup in scenario.world.backups:
        other = SimDirector(sim_root(home, backup.of))
        if backup.of != scenario.world.director:
            if other.exists() and not (other.root / MARKER).exists():
                raise UsageError(
                    f"sim://{backup.of} exists and was not made for training",
                    hint=f"The scenario needs that name: remove it (bbrx sim destroy {backup.of}).",
                )
            if not other.exists():
                other.create()
                (other.root / MARKER).write_text(f"{scenario.id}\n")
        staging = folder / f".making-{backup.name}"
        staging.mkdir()
        outcome = run_director(
            Request(
                operation="backup",
                target=parse_host(f"sim://{backup.of}"),
                identity=Identity(operator, reason=f"training world of {scenario.id}"),
                audit_db=audit_db,
                home=home,
                artifact_path=staging,
            )
        )
        assert outcome.artifact is not None
        path = folder / backup.name
        outcome.artifact.rename(path)
        staging.rmdir()
        if backup.corrupt:
            _corrupt(path)
        if backup.of != scenario.world.director:
            other.destroy()
        made.append({"path": str(path), "of": f"sim://{backup.of}", "corrupt": backup.corrupt})
    return made


def _corrupt(backup: Path) -> None:
    """A byte of file data in the backup's largest tar, changed: its checksum no longer
    matches `metadata`, so a restore refuses it before it locks anything."""
    tar = max(backup.glob("*.tar"), key=lambda p: p.stat().st_size)
    offset = min(600_000, tar.stat().st_size // 2)
    with tar.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


def _require(home: Path) -> tuple[Session, Scenario]:
    session = current(home)
    if session is None:
        raise UsageError(
            "no training session is running",
            hint="Start one with: bbrx train start SCENARIO (see: bbrx train list)",
        )
    return session, find(session.scenario)


def hint(home: Path) -> tuple[int, int, str, int]:
    """The next hint: (its number, how many there are, its text, what it costs)."""
    session, scenario = _require(home)
    if session.hints_used >= len(scenario.hints):
        raise UsageError(
            f"no more hints: all {len(scenario.hints)} of this scenario are used",
            hint="bbrx train status says where you are; the debrief shows the solution.",
        )
    number = session.hints_used + 1
    given = scenario.hints[number - 1]
    _record(session, "train-hint", {"hint": number, "cost": given.cost})
    session.hints_used = number
    _save(home, session)
    return number, len(scenario.hints), given.text, given.cost


def reset(home: Path) -> Session:
    """End the session: its director is removed; its rows stay in the audit log."""
    session, _ = _require(home)
    director = SimDirector(sim_root(home, session.director))
    if director.exists() and (director.root / MARKER).exists():
        director.destroy()
    _record(session, "train-reset", {})
    _session_file(home).unlink()
    return session


# --- hooks the runs and the sim commands call ------------------------------------------


def tie(home: Path, target: str) -> str | None:
    """The running session's id when `target` is its director, else None."""
    try:
        session = current(home)
    except UsageError:
        return None
    return session.id if session is not None and session.target == target else None


def record_sim(home: Path, name: str, action: str, detail: dict[str, Any]) -> None:
    """A trainee's `bbrx sim ACTION` on the session's director, as a row of the session."""
    session = current(home)
    if session is None or session.director != name:
        return
    _record(session, f"sim-{action}", detail)


def after_run(home: Path, target: str, operation: str, succeeded: bool) -> list[str]:
    """The scenario's events that a run just set off (the director's loss once the first
    backup is done, say): each done now, recorded, and its message returned."""
    session = current(home)
    if session is None or session.target != target or not succeeded:
        return []
    scenario = find(session.scenario)
    messages = []
    for number, event in enumerate(scenario.events):
        if number in session.fired or event.after != operation:
            continue
        if event.action == "wipe":
            SimDirector(sim_root(home, session.director)).wipe()
        session.fired = (*session.fired, number)
        _save(home, session)
        _record(session, f"sim-{event.action}", {"by": "scenario", "event": number})
        messages.append(event.message)
    return messages
