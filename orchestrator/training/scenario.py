"""Training scenarios: YAML files, their schema, and the plan a seed draws from one.

A scenario says what the trainee is told (`brief`), the world a session starts from
(`world`), the faults armed in it (`faults`) and the events the scenario itself makes
happen (`events`, e.g. the director's loss once a backup is done), the procedure it expects
(`procedure`), the goal (`goal`), the `hints`, a time budget and a reference `solution`.
Every error names the file and the key at fault. Choices (`job: [a, b]`, `call: [1, 2]`)
are drawn by `plan` from a seed: the same scenario and seed give the same plan.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import TargetError, UsageError
from orchestrator.transport.instance import SCRIPT_NAMES
from simulator.faults import (
    CORRUPT_LOCAL,
    DISK_FULL,
    TRANSFER,
    validate_fault,
    validate_transfer_fault,
)

#: The operations a procedure, a goal or an event may name; `vms` is `bbrx sim vms`.
STEPS = ("backup-cleanup", "pre-backup-check", "backup", "restore", "restore-cleanup", "vms")
RUN_STEPS = STEPS[:-1]
#: What a scenario's event may do once its trigger has happened.
EVENT_ACTIONS = ("wipe",)
SCRIPTS = (*SCRIPT_NAMES, TRANSFER)
#: A run's phases (OPERATION/STATE, the engine's own state names) that a fault may name
#: instead of a script: it arms the script that phase runs, or the copy. A cleanup's unlock
#: runs the same unlock script, so its calls count too; and both copy phases arm the job's
#: one copy fault, whose `call N` counts a backup's copies and a restore's alike.
PHASES = {
    "backup/locking": "pre-backup-lock",
    "backup/backing_up": "backup",
    "backup/unlocking": "post-backup-unlock",
    "backup/draining": TRANSFER,
    "restore/copying": TRANSFER,
    "restore/locking": "pre-restore-lock",
    "restore/restoring": "restore",
    "restore/unlocking": "post-restore-unlock",
}
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_INSTANCE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}/\d{1,6}$")
KEYS = (
    "id",
    "title",
    "brief",
    "time_budget",
    "world",
    "faults",
    "events",
    "procedure",
    "goal",
    "hints",
    "solution",
)
REQUIRED = ("id", "title", "brief", "time_budget", "world", "procedure", "goal", "solution")
MAX_BYTES = 256 * 1024


@dataclass(frozen=True)
class Fault:
    """A fault to arm: `jobs`, `calls`, `phases`, `delays` and `instances` are the choices
    a seed picks one of."""

    jobs: tuple[str, ...]
    script: str  # "" when the fault names its phases instead
    spec: str
    calls: tuple[int, ...] = ()
    # On one VM of a deployment (GROUP/INDEX, one of `instances`), not on the director.
    deployment: str | None = None
    instances: tuple[str, ...] = ()
    phases: tuple[str, ...] = ()  # keys of PHASES
    delays: tuple[int, ...] = ()  # seconds after the session starts before it may fire


@dataclass(frozen=True)
class Event:
    """What the scenario does once the trainee's first successful `after` run is over."""

    after: str
    action: str
    message: str


@dataclass(frozen=True)
class Hint:
    text: str
    cost: int


@dataclass(frozen=True)
class WorldBackup:
    """A backup the world starts with: made by a real run when the session starts."""

    of: str  # the simulated director it is a backup of
    name: str  # its directory's name under the session's backups folder
    corrupt: bool = False  # a byte of one of its tars changed after it was published


@dataclass(frozen=True)
class KilledBackup:
    """A bbrx backup of a deployment, killed (SIGKILL) while one instance's backup script
    ran: the world starts with its locks held, its work dirs left, its run unfinished."""

    deployment: str
    job: str
    instances: tuple[str, ...]  # GROUP/INDEX: the seed picks the one whose script hangs


@dataclass(frozen=True)
class World:
    director: str
    leftover_work_dir: bool = False
    lost: bool = False  # the director starts wiped: its disaster has happened
    backups: tuple[WorldBackup, ...] = ()
    killed_backup: KilledBackup | None = None


@dataclass(frozen=True)
class Scenario:
    id: str
    title: str
    brief: str
    time_budget: int
    world: World
    procedure: tuple[str, ...]
    goal: tuple[str, ...]
    solution: tuple[str, ...]
    faults: tuple[Fault, ...] = ()
    events: tuple[Event, ...] = ()
    hints: tuple[Hint, ...] = ()
    source: str = ""

    @property
    def target(self) -> str:
        return f"sim://{self.world.director}"

    @property
    def focus(self) -> str:
        """The target the goal is about: the director, or the deployment a killed run left."""
        killed = self.world.killed_backup
        return f"{self.target}/{killed.deployment}" if killed else self.target


@dataclass(frozen=True)
class ArmedFault:
    """A fault as a session arms it: one job, one script, the spec with its call."""

    job: str
    script: str
    spec: str
    deployment: str | None = None
    instance: str | None = None
    phase: str | None = None  # the phase drawn, when the fault named phases

    def as_dict(self) -> dict[str, str | None]:
        where = (
            {"deployment": self.deployment, "instance": self.instance} if self.deployment else {}
        )
        phase = {"phase": self.phase} if self.phase else {}
        return {"job": self.job, "script": self.script, "spec": self.spec, **where, **phase}


@dataclass(frozen=True)
class Plan:
    """What a seed drew from a scenario."""

    seed: int
    faults: tuple[ArmedFault, ...] = field(default_factory=tuple)
    killed_instance: str | None = None  # whose backup script hangs when the run is killed

    def as_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "faults": [f.as_dict() for f in self.faults],
            "killed_instance": self.killed_instance,
        }


def plan(scenario: Scenario, seed: int) -> Plan:
    """The faults a session of `scenario` arms with `seed`: the same for the same seed."""
    chooser = random.Random(f"{scenario.id}:{seed}")
    armed = []
    for fault in scenario.faults:
        # Drawn in this order, and only what the fault gives a choice of, so that a key
        # added to one fault changes no other fault's draw.
        job = chooser.choice(fault.jobs)
        spec = fault.spec
        if fault.calls:
            spec = f"call {chooser.choice(fault.calls)} {spec}"
        instance = chooser.choice(fault.instances) if fault.instances else None
        phase = chooser.choice(fault.phases) if fault.phases else None
        if fault.delays:
            spec = f"after {chooser.choice(fault.delays)} {spec}"
        script = PHASES[phase] if phase else fault.script
        armed.append(ArmedFault(job, script, spec, fault.deployment, instance, phase))
    killed = scenario.world.killed_backup
    return Plan(seed, tuple(armed), chooser.choice(killed.instances) if killed else None)


@dataclass(frozen=True)
class Rules:
    """What a debrief scores against: recorded in the session's train-start row, so an
    edited or removed scenario file changes no old debrief."""

    id: str
    title: str
    time_budget: int
    procedure: tuple[str, ...]
    goal: tuple[str, ...]
    solution: tuple[str, ...]
    focus: str  # the target the goal is about: the director, or one of its deployments

    @classmethod
    def of(cls, scenario: Scenario) -> Rules:
        return cls(
            scenario.id,
            scenario.title,
            scenario.time_budget,
            scenario.procedure,
            scenario.goal,
            scenario.solution,
            scenario.focus,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, recorded: dict[str, Any]) -> Rules:
        """Rules as `as_dict` wrote them; KeyError, TypeError or ValueError if they are not."""
        return cls(
            id=str(recorded["id"]),
            title=str(recorded["title"]),
            time_budget=int(recorded["time_budget"]),
            procedure=tuple(map(str, recorded["procedure"])),
            goal=tuple(map(str, recorded["goal"])),
            solution=tuple(map(str, recorded["solution"])),
            focus=str(recorded["focus"]),
        )


# --- loading ---------------------------------------------------------------------------


def shipped() -> list[Scenario]:
    """The scenarios that come with bbrx, by id."""
    folder = resources.files(__package__) / "scenarios"
    found = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith((".yml", ".yaml")):
            found.append(parse(entry.read_text(encoding="utf-8"), f"scenarios/{entry.name}"))
    return sorted(found, key=lambda s: s.id)


def find(reference: str) -> Scenario:
    """A shipped scenario by id, or a scenario file by path."""
    for scenario in shipped():
        if scenario.id == reference:
            return scenario
    path = Path(reference).expanduser()
    if path.suffix in (".yml", ".yaml") or path.exists():
        return load(path)
    ids = ", ".join(s.id for s in shipped())
    raise UsageError(
        f"no training scenario {reference!r}",
        hint=f"Shipped scenarios: {ids} (see: bbrx train list), or give a scenario file's path.",
    )


def load(path: Path) -> Scenario:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as error:
        raise UsageError(f"cannot read scenario file {path}: {error.strerror}") from error
    if len(data) > MAX_BYTES:
        raise UsageError(f"scenario file {path} is over {MAX_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"scenario file {path} is not UTF-8 text") from error
    return parse(text, str(path))


def parse(text: str, source: str) -> Scenario:
    """A scenario from YAML text; UsageError naming `source` and the key at fault."""
    try:
        document = yaml.safe_load(text)
    except RecursionError as error:
        raise UsageError(f"scenario {source} is nested too deeply to be a scenario") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"scenario {source} is not valid YAML{where}") from error
    return _Reader(source).scenario(document)


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> UsageError:
        return UsageError(
            f"scenario {self.source}: {key}: {problem}",
            hint="See the README's 'Training' section for the scenario schema.",
        )

    def mapping(self, value: Any, key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, "must be a mapping")
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            raise self.fail(
                key, f"unknown key(s) {', '.join(unknown)} (allowed: {', '.join(allowed)})"
            )
        return value

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, "must be a non-empty string")
        return value.strip()

    def name(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not _NAME.match(value):
            raise self.fail(key, "must be a name of lowercase letters, digits and dashes")
        return value

    def number(self, value: Any, key: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(key, f"must be a whole number from {low} to {high}")
        return value

    def items(self, value: Any, key: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(key, "must be a list")
        return value

    def step(self, value: Any, key: str, allowed: tuple[str, ...] = STEPS) -> str:
        if value not in allowed:
            raise self.fail(key, f"must be one of {', '.join(allowed)}")
        return str(value)

    def scenario(self, document: Any) -> Scenario:
        top = self.mapping(document, "(top level)", KEYS)
        for key in REQUIRED:
            if key not in top:
                raise self.fail(key, "is required")
        world = self.mapping(
            top["world"],
            "world",
            ("director", "leftover_work_dir", "lost", "backups", "killed_backup"),
        )
        if "director" not in world:
            raise self.fail("world.director", "is required")
        leftover = self.flag(world.get("leftover_work_dir", False), "world.leftover_work_dir")
        lost = self.flag(world.get("lost", False), "world.lost")
        backups = tuple(
            self.backup(v, f"world.backups[{i}]")
            for i, v in enumerate(self.items(world.get("backups"), "world.backups"))
        )
        if len({b.name for b in backups}) != len(backups):
            raise self.fail("world.backups", "two backups have the same name")
        procedure = self.items(top["procedure"], "procedure")
        goal = self.items(top["goal"], "goal")
        solution = self.items(top["solution"], "solution")
        for key, value in (("procedure", procedure), ("goal", goal), ("solution", solution)):
            if not value:
                raise self.fail(key, "must list at least one step")
        return Scenario(
            id=self.name(top["id"], "id"),
            title=self.text(top["title"], "title"),
            brief=self.text(top["brief"], "brief"),
            time_budget=self.number(top["time_budget"], "time_budget", 60, 24 * 3600),
            world=World(
                self.name(world["director"], "world.director"),
                leftover,
                lost,
                backups,
                self.killed(world["killed_backup"]) if "killed_backup" in world else None,
            ),
            procedure=tuple(self.step(v, f"procedure[{i}]") for i, v in enumerate(procedure)),
            goal=tuple(self.step(v, f"goal[{i}]") for i, v in enumerate(goal)),
            solution=tuple(self.text(v, f"solution[{i}]") for i, v in enumerate(solution)),
            faults=tuple(
                self.fault(v, f"faults[{i}]")
                for i, v in enumerate(self.items(top.get("faults"), "faults"))
            ),
            events=tuple(
                self.event(v, f"events[{i}]")
                for i, v in enumerate(self.items(top.get("events"), "events"))
            ),
            hints=tuple(
                self.hint(v, f"hints[{i}]")
                for i, v in enumerate(self.items(top.get("hints"), "hints"))
            ),
            source=self.source,
        )

    def flag(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, "must be true or false")
        return value

    def backup(self, value: Any, key: str) -> WorldBackup:
        backup = self.mapping(value, key, ("of", "name", "corrupt"))
        for required in ("of", "name"):
            if required not in backup:
                raise self.fail(f"{key}.{required}", "is required")
        name = backup["name"]
        if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$", name):
            raise self.fail(f"{key}.name", "must be a plain directory name")
        return WorldBackup(
            self.name(backup["of"], f"{key}.of"),
            name,
            self.flag(backup.get("corrupt", False), f"{key}.corrupt"),
        )

    def killed(self, value: Any) -> KilledBackup:
        key = "world.killed_backup"
        killed = self.mapping(value, key, ("deployment", "job", "instance"))
        for required in ("deployment", "job", "instance"):
            if required not in killed:
                raise self.fail(f"{key}.{required}", "is required")
        return KilledBackup(
            self.name(killed["deployment"], f"{key}.deployment"),
            self.name(killed["job"], f"{key}.job"),
            self.instances(killed["instance"], f"{key}.instance"),
        )

    def fault(self, value: Any, key: str) -> Fault:
        fault = self.mapping(
            value,
            key,
            ("job", "script", "phase", "spec", "call", "after", "deployment", "instance"),
        )
        for required in ("job", "spec"):
            if required not in fault:
                raise self.fail(f"{key}.{required}", "is required")
        if ("script" in fault) == ("phase" in fault):
            raise self.fail(key, "give either script (a bbr script or transfer) or phase")
        jobs = fault["job"] if isinstance(fault["job"], list) else [fault["job"]]
        if not jobs:
            raise self.fail(f"{key}.job", "must name a job, or list the jobs to choose from")
        names = tuple(self.name(job, f"{key}.job") for job in jobs)
        phases: tuple[str, ...] = ()
        if "phase" in fault:
            given = fault["phase"] if isinstance(fault["phase"], list) else [fault["phase"]]
            if not given:
                raise self.fail(f"{key}.phase", "must name a phase, or list the phases")
            phases = tuple(self.step(p, f"{key}.phase", tuple(PHASES)) for p in given)
            scripts = tuple(PHASES[phase] for phase in phases)
            script = ""
        else:
            script = self.step(fault["script"], f"{key}.script", SCRIPTS)
            scripts = (script,)
        text = self.text(fault["spec"], f"{key}.spec")
        for each in dict.fromkeys(scripts):  # the spec must suit every phase's script
            try:
                spec = validate_transfer_fault(text) if each == TRANSFER else validate_fault(text)
            except TargetError as error:  # the fault grammar's own words
                raise self.fail(f"{key}.spec", error.message) from error
        if "restore/copying" in phases and spec in (CORRUPT_LOCAL, DISK_FULL):
            raise self.fail(f"{key}.spec", f"{spec} acts on a backup's copy, never a restore's")
        if spec.startswith(("call ", "after ")):
            raise self.fail(
                f"{key}.spec", "give the call as `call:` and the delay as `after:`, not in the spec"
            )
        numbers = self.choices(fault.get("call", []), f"{key}.call", 1, 100)
        delays = self.choices(fault.get("after", []), f"{key}.after", 0, 86400)
        if ("deployment" in fault) != ("instance" in fault):
            raise self.fail(key, "deployment and instance go together (a deployment's VM)")
        if "deployment" not in fault:
            return Fault(names, script, spec, numbers, phases=phases, delays=delays)
        deployment = self.name(fault["deployment"], f"{key}.deployment")
        instances = self.instances(fault["instance"], f"{key}.instance")
        return Fault(names, script, spec, numbers, deployment, instances, phases, delays)

    def choices(self, value: Any, key: str, low: int, high: int) -> tuple[int, ...]:
        """A whole number, or a list of them (the seed picks one)."""
        given = value if isinstance(value, list) else [value]
        return tuple(self.number(each, key, low, high) for each in given)

    def instances(self, value: Any, key: str) -> tuple[str, ...]:
        """GROUP/INDEX, or a list of them (the seed picks one)."""
        given = value if isinstance(value, list) else [value]
        for instance in given:
            if not isinstance(instance, str) or not _INSTANCE.match(instance):
                raise self.fail(key, "must be GROUP/INDEX (or a list of them)")
        if not given:
            raise self.fail(key, "must name an instance")
        return tuple(given)

    def event(self, value: Any, key: str) -> Event:
        event = self.mapping(value, key, ("after", "action", "message"))
        for required in ("after", "action", "message"):
            if required not in event:
                raise self.fail(f"{key}.{required}", "is required")
        return Event(
            after=self.step(event["after"], f"{key}.after", RUN_STEPS),
            action=self.step(event["action"], f"{key}.action", EVENT_ACTIONS),
            message=self.text(event["message"], f"{key}.message"),
        )

    def hint(self, value: Any, key: str) -> Hint:
        if isinstance(value, str):
            return Hint(self.text(value, key), 5)
        hint = self.mapping(value, key, ("text", "cost"))
        if "text" not in hint:
            raise self.fail(f"{key}.text", "is required")
        return Hint(
            self.text(hint["text"], f"{key}.text"),
            self.number(hint.get("cost", 5), f"{key}.cost", 0, 100),
        )
