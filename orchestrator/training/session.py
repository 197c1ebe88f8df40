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

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from audit import AuditLog
from orchestrator import __version__
from orchestrator.engine.run import new_run_id
from orchestrator.errors import UsageError
from orchestrator.state import lease
from orchestrator.training.scenario import (
    KilledBackup,
    Plan,
    Rules,
    Scenario,
    find,
    plan,
    shipped,
)
from orchestrator.training.watch import SEEN_KEY, folder_of, seen
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
    # Scripts the world's killed run left running on the simulated VMs (their pids), for
    # `train reset` to end if the trainee's cleanup did not.
    left_running: tuple[int, ...] = ()
    # The folders of backups the session watches (watch.py): the world's, and each folder
    # a run of the session used.
    folders: tuple[str, ...] = ()

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
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        data["fired"] = tuple(data.get("fired", ()))
        data["left_running"] = tuple(data.get("left_running", ()))
        data["folders"] = tuple(data.get("folders", ()))
        session = Session(**data)
        if not all(isinstance(v, str) for v in session.folders):
            raise ValueError("a folder is not text")
        texts = (session.id, session.scenario, session.director, session.audit_db)
        if not all(isinstance(v, str) for v in (*texts, session.operator, session.started)):
            raise ValueError("a text field is not text")
        numbers = (session.seed, session.hints_used, *session.fired, *session.left_running)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in numbers):
            raise ValueError("a number field is not a whole number")
        datetime.fromisoformat(session.started)
        return session
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as error:
        raise UsageError(
            f"the training session file {path} is damaged ({error})",
            hint="End the session with: bbrx train reset (it removes the file)",
        ) from error


def _save(home: Path, session: Session) -> None:
    path = _session_file(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(
        session.__dict__,
        fired=list(session.fired),
        left_running=list(session.left_running),
        folders=list(session.folders),
    )
    # A temporary file of this process's own, renamed over: a reader never sees half.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def _record(
    session: Session,
    operation: str,
    detail: dict[str, Any],
    *,
    ok: bool = True,
    target: str | None = None,
) -> None:
    """One row for a session action, in the session's audit log: on the session's director
    unless `target` names one of its deployments."""
    with AuditLog(Path(session.audit_db)) as audit:
        audit.append(
            run_id=new_run_id(),
            operation=operation,
            target=target or session.target,
            mode=MODE,
            operator=session.operator,
            origin_host=socket.gethostname(),
            reason=f"training: {session.scenario}",
            from_state=None,
            to_state="succeeded" if ok else "failed",
            trigger=operation.replace("-", "_"),
            outcome="ok" if ok else "error",
            detail={SESSION_KEY: session.id, **detail, SEEN_KEY: seen(session.folders)},
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
    """Set up a scenario's world and arm its faults; the session that runs on it. A setup
    that fails half-way takes down what it made (directors, scripts left running)."""
    home = home.resolve()  # every path the session records is absolute and canonical
    running = current(home)
    if running is not None:
        raise UsageError(
            f"training session {running.id} ({running.scenario}) is still running",
            hint="See it with: bbrx train status. End it with: bbrx train reset",
        )
    scenario = find(reference)
    if not any(s.id == reference for s in shipped()):  # a file: found again from anywhere
        reference = str(Path(reference).expanduser().resolve())
    seed = seed if seed is not None else secrets.randbelow(1_000_000)
    drawn = plan(scenario, seed)
    director = SimDirector(sim_root(home, scenario.world.director))
    _make_training_director(director, scenario, audit_db)
    made = [director]
    left_running: list[int] = []
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
        # The director is new: what the log says ran on one of that name is over (the
        # world's own runs, next, are its first).
        _record(session, "sim-create", {"by": "scenario", "event": "world"})
        _check_faults(director, scenario, drawn)  # before any run: a typo costs nothing
        if scenario.world.leftover_work_dir:
            # What a killed bbr run leaves: its work directory, part of an artifact in it.
            leftover = director.root / WORK_DIR / "blobstore"
            leftover.mkdir(parents=True)
            (leftover / "partial.tar").write_bytes(b"left by a run that was killed\n")
        backups = _make_backups(home, audit_db, scenario, operator, made)
        if scenario.world.lost:
            director.wipe()
        if scenario.world.killed_backup is not None and drawn.killed_instance is not None:
            left_running = _kill_a_backup(
                home, audit_db, director, scenario.world.killed_backup, drawn.killed_instance
            )
        for fault in drawn.faults:
            _vm(director, fault.deployment, fault.instance).set_fault(
                fault.job, fault.script, fault.spec
            )
        session = replace(
            session,
            started=datetime.now(UTC).isoformat(),  # the trainee's clock starts now
            left_running=tuple(left_running),
            folders=(str(backups_folder(home)),) if backups else (),
        )
        _record(
            session,
            "train-start",
            {
                "scenario": scenario.id,
                # a scenario file's path, for reference: the debrief reads `rules`
                "scenario_source": None if reference == scenario.id else reference,
                "rules": Rules.of(scenario).as_dict(),
                "seed": seed,
                "plan": drawn.as_dict()["faults"],
                "killed_instance": drawn.killed_instance,
                "backups": backups,
            },
        )
        if scenario.world.lost:  # the disaster the session starts from, on its clock
            _record(session, "sim-wipe", {"by": "scenario", "event": "world"})
    except BaseException:
        for pid in left_running:
            _end_script(pid, director.root)
        for each in made:
            if each.exists() and (each.root / MARKER).exists():
                each.destroy()
        raise
    _save(home, session)
    folder = backups_folder(home) if backups else None
    return Started(session, scenario, drawn.as_dict()["faults"], folder)


def _make_training_director(director: SimDirector, scenario: Scenario, audit_db: Path) -> None:
    """A fresh simulated director for the session, marked as training's; one the trainee
    made under that name is left alone."""
    name = director.root.name
    if director.exists():
        lease.refuse_if_running(audit_db, f"sim://{name}", "set up a session on")
        if not (director.root / MARKER).exists():
            raise UsageError(
                f"sim://{name} exists and was not made for training",
                hint=f"The scenario needs that name: remove it (bbrx sim destroy {name}) or "
                "keep it and train later.",
            )
        director.destroy()
    director.create()
    (director.root / MARKER).write_text(f"{scenario.id}\n")


def _vm(director: SimDirector, deployment: str | None, instance: str | None) -> Any:
    """The director itself, or a deployment's VM."""
    if deployment is None or instance is None:
        return director
    from simulator.deploy import find_vm

    return find_vm(director, deployment, instance)


def _check_faults(director: SimDirector, scenario: Scenario, drawn: Plan) -> None:
    """Every job a fault or the killed run names exists where it is to act."""
    wanted = [(f.job, f.deployment, f.instance) for f in drawn.faults]
    killed = scenario.world.killed_backup
    if killed is not None:
        wanted.append((killed.job, killed.deployment, drawn.killed_instance))
    for job, deployment, instance in wanted:
        vm = _vm(director, deployment, instance)
        if job not in vm.jobs():
            raise UsageError(
                f"scenario {scenario.source}: no job {job!r} on {vm.address}",
                hint=f"Jobs there: {', '.join(vm.jobs())}",
            )


def backups_folder(home: Path) -> Path:
    """Where a session's world keeps the backups it starts with."""
    return home / "train" / "backups"


def _make_backups(
    home: Path, audit_db: Path, scenario: Scenario, operator: str, made: list[SimDirector]
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
    kept = []
    for backup in scenario.world.backups:
        other = SimDirector(sim_root(home, backup.of))
        if backup.of != scenario.world.director and not other.exists():
            _make_training_director(other, scenario, audit_db)
            made.append(other)
        elif backup.of != scenario.world.director and other not in made:
            _make_training_director(other, scenario, audit_db)  # refuses the trainee's own
            made.append(other)
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
        kept.append({"path": str(path), "of": f"sim://{backup.of}", "corrupt": backup.corrupt})
    return kept


def _kill_a_backup(
    home: Path, audit_db: Path, director: SimDirector, killed: KilledBackup, instance: str
) -> list[int]:
    """Start a real bbrx backup of the deployment, with `instance`'s backup script of the job
    hanging, and SIGKILL it once that script runs: what an operator's killed run leaves.
    Returns the pids of the scripts it left running."""
    from simulator.deploy import find_vm

    vm = find_vm(director, killed.deployment, instance)
    vm.set_fault(killed.job, "backup", "hang")
    staging = home / "train" / "killed-run"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    command = [
        sys.executable, "-m", "orchestrator", "deployment", "--target", f"sim://{director.root.name}",
        "--deployment", killed.deployment, "backup", "--artifact-path", str(staging),
    ]  # fmt: skip
    env = dict(os.environ, BBRX_HOME=str(home), BBRX_AUDIT_DB=str(audit_db))
    proc = subprocess.Popen(
        command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _hanging(vm, killed.job):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise UsageError(
                    f"could not set up the scenario: the backup of {killed.deployment} ended "
                    "before its hanging script ran",
                    hint="Run bbrx train reset, then start the scenario again.",
                )
            time.sleep(0.05)
        time.sleep(0.5)  # its "hanging" line is out: a dead bbrx's pipe must not end it
    finally:
        proc.kill()  # the process we started, by its pid
        proc.wait()
    vm.clear_faults(killed.job, "backup")
    return [
        c.pid for c in vm.calls() if (c.job, c.script, c.event) == (killed.job, "backup", "start")
    ]


def _hanging(vm: Any, job: str) -> bool:
    return any((c.job, c.script, c.event) == (job, "backup", "start") for c in vm.calls())


def _end_script(pid: int, root: Path) -> None:
    """End a script the world's killed run left, if it still runs and is still that script
    (its command line names the session's director): a pid may have been reused."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        leads = os.getpgid(pid) == pid  # each script leads a process group of its own
    except OSError:
        return
    under = f"{root}/".encode()
    if leads and any(arg.startswith(under) and b"/bin/bbr/" in arg for arg in argv):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


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
    """End the session: its director is removed; its rows stay in the audit log. A damaged
    session file is removed, and said so: there is nothing else to end by it."""
    try:
        session, _ = _require(home)
    except UsageError as error:
        if "is damaged" not in error.message:
            raise
        _session_file(home).unlink(missing_ok=True)
        raise UsageError(
            f"{error.message}: removed it",
            hint="Remove the session's simulated director with bbrx sim destroy NAME if it is "
            "still there (bbrx sim list), then start again.",
        ) from error
    director = SimDirector(sim_root(home, session.director))
    lease.refuse_if_running(Path(session.audit_db), session.target, "reset the session on")
    for pid in session.left_running:
        _end_script(pid, director.root)
    if director.exists() and (director.root / MARKER).exists():
        director.destroy()
    _record(session, "train-reset", {})
    _session_file(home).unlink()
    return session


# --- hooks the runs and the sim commands call ------------------------------------------


def _ours(session: Session | None, target: str) -> bool:
    """Whether `target` is the session's director or one of its deployments."""
    return session is not None and (
        target == session.target or target.startswith(f"{session.target}/")
    )


def tie(
    home: Path, target: str, operation: str = "", artifact_path: Path | None = None
) -> dict[str, Any] | None:
    """What a run's first row records when `target` is the running session's director (or
    a deployment of it): the session's id, and the backups it sees (the run's folder now
    watched too). None for any other run."""
    session = _current_or_none(home)
    if session is None or not _ours(session, target):
        return None
    folder = folder_of(operation, artifact_path)
    if folder is not None and str(folder) not in session.folders:
        session.folders = (*session.folders, str(folder))
        _save(home, session)
    return {SESSION_KEY: session.id, SEEN_KEY: seen(session.folders)}


def record_look(home: Path, target: str, what: str, detail: dict[str, Any]) -> None:
    """A trainee's look at the session's director (`bbrx status`, `bbrx audit show` of one
    of its runs), as a row of the session: the debrief counts it as checking first."""
    session = _current_or_none(home)
    if session is not None and _ours(session, target):
        _record(session, f"look-{what}", detail, target=target)


def _current_or_none(home: Path) -> Session | None:
    """The running session for a hook: a damaged file must not fail a run or a sim command."""
    try:
        return current(home)
    except UsageError as error:
        log.warning("%s; this is not recorded as part of a training session", error.message)
        return None


def record_sim(
    home: Path, name: str, action: str, detail: dict[str, Any], *, deployment: str | None = None
) -> None:
    """A trainee's `bbrx sim ACTION` on the session's director (or, with `deployment`, on
    that deployment of it), as a row of the session."""
    session = _current_or_none(home)
    if session is None or session.director != name:
        return
    where = {"deployment": deployment} if deployment else {}
    target = f"{session.target}/{deployment}" if deployment else None
    _record(session, f"sim-{action}", {**detail, **where}, target=target)


def after_run(home: Path, target: str, operation: str, succeeded: bool) -> list[str]:
    """The scenario's events that a run just set off (the director's loss once the first
    backup is done, say): each done now, recorded, and its message returned."""
    session = _current_or_none(home)
    if session is None or not _ours(session, target) or not succeeded:
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
