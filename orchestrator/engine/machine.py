"""The state machines of bbrx, as data. This module does no I/O.

Each operation has one run-level machine whose states are the phases of bbr's workflow
(contract sections 5-7). Every phase's action (in the procedure modules) returns the
name of the trigger that says how it went; the tables below decide where that leads,
failure paths included: a failed lock leads to unlocking, never straight to the end.
Each job of a run also has a small machine of its own, so that the audit log knows,
job by job, what was locked and what was unlocked.

Conditions name predicates on the model (`run.Run`): `backup_succeeded`,
`has_errors`, `was_interrupted`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transitions import Machine

from orchestrator.errors import UsageError

TERMINAL = ("succeeded", "failed", "interrupted")

# Where a run may be interrupted and where that leads. Absent states ignore the signal
# (unlocking and cleaning run to their end: that is the point of them).
# `checking` ends by claiming the VM's work dir, so an interrupt there goes through
# `cleaning`, which removes it if this run created it.
_INTERRUPT_BACKUP = [
    {"trigger": "interrupt", "source": "discovering", "dest": "interrupted"},
    {"trigger": "interrupt", "source": "checking", "dest": "cleaning"},
    {"trigger": "interrupt", "source": ["locking", "backing_up"], "dest": "unlocking"},
    {"trigger": "interrupt", "source": "draining", "dest": "cleaning"},
]

# Only on the operator's confirmation, after a second Ctrl-C while unlocking: stop where
# the run stands and leave the jobs not yet unlocked locked (the audit row names them).
_ABANDON = {"trigger": "abandon", "source": "unlocking", "dest": "interrupted"}

_FINISH = [
    {
        "trigger": "cleaned",
        "source": "cleaning",
        "dest": "interrupted",
        "conditions": "was_interrupted",
    },
    {"trigger": "cleaned", "source": "cleaning", "dest": "failed", "conditions": "has_errors"},
    {"trigger": "cleaned", "source": "cleaning", "dest": "succeeded"},
    {
        "trigger": "cleanup_failed",
        "source": "cleaning",
        "dest": "interrupted",
        "conditions": "was_interrupted",
    },
    {"trigger": "cleanup_failed", "source": "cleaning", "dest": "failed"},
]

MACHINES: dict[str, dict[str, Any]] = {
    "pre-backup-check": {
        "initial": "ready",
        "states": ["ready", "discovering", "checking", *TERMINAL],
        "transitions": [
            {"trigger": "start", "source": "ready", "dest": "discovering"},
            {"trigger": "discovered", "source": "discovering", "dest": "checking"},
            {"trigger": "discovery_failed", "source": "discovering", "dest": "failed"},
            {"trigger": "checks_passed", "source": "checking", "dest": "succeeded"},
            {"trigger": "check_failed", "source": "checking", "dest": "failed"},
            {"trigger": "interrupt", "source": ["discovering", "checking"], "dest": "interrupted"},
        ],
    },
    "backup": {
        "initial": "ready",
        "states": [
            "ready",
            "discovering",
            "checking",
            "locking",
            "backing_up",
            "unlocking",
            "draining",
            "cleaning",
            *TERMINAL,
        ],
        "transitions": [
            {"trigger": "start", "source": "ready", "dest": "discovering"},
            {"trigger": "discovered", "source": "discovering", "dest": "checking"},
            {"trigger": "discovery_failed", "source": "discovering", "dest": "failed"},
            {"trigger": "checks_passed", "source": "checking", "dest": "locking"},
            {"trigger": "check_failed", "source": "checking", "dest": "failed"},
            {"trigger": "locked", "source": "locking", "dest": "backing_up"},
            {"trigger": "lock_failed", "source": "locking", "dest": "unlocking"},
            {"trigger": "backed_up", "source": "backing_up", "dest": "unlocking"},
            {"trigger": "backup_failed", "source": "backing_up", "dest": "unlocking"},
            # bbr drains after a good backup even when an unlock script failed (exit 8).
            {
                "trigger": "unlocked",
                "source": "unlocking",
                "dest": "draining",
                "conditions": "backup_succeeded",
            },
            {"trigger": "unlocked", "source": "unlocking", "dest": "cleaning"},
            {
                "trigger": "unlock_failed",
                "source": "unlocking",
                "dest": "draining",
                "conditions": "backup_succeeded",
            },
            {"trigger": "unlock_failed", "source": "unlocking", "dest": "cleaning"},
            {"trigger": "drained", "source": "draining", "dest": "cleaning"},
            {"trigger": "drain_failed", "source": "draining", "dest": "cleaning"},
            *_FINISH,
            *_INTERRUPT_BACKUP,
            _ABANDON,
        ],
    },
    "restore": {
        "initial": "ready",
        "states": [
            "ready",
            "validating",
            "discovering",
            "checking",
            "copying",
            "locking",
            "restoring",
            "unlocking",
            "cleaning",
            *TERMINAL,
        ],
        "transitions": [
            {"trigger": "start", "source": "ready", "dest": "validating"},
            {"trigger": "validated", "source": "validating", "dest": "discovering"},
            {"trigger": "validation_failed", "source": "validating", "dest": "failed"},
            {"trigger": "discovered", "source": "discovering", "dest": "checking"},
            {"trigger": "discovery_failed", "source": "discovering", "dest": "failed"},
            {"trigger": "checks_passed", "source": "checking", "dest": "copying"},
            {"trigger": "check_failed", "source": "checking", "dest": "failed"},
            {"trigger": "copied", "source": "copying", "dest": "locking"},
            {"trigger": "copy_failed", "source": "copying", "dest": "cleaning"},
            {"trigger": "locked", "source": "locking", "dest": "restoring"},
            {"trigger": "lock_failed", "source": "locking", "dest": "unlocking"},
            {"trigger": "restored", "source": "restoring", "dest": "unlocking"},
            {"trigger": "restore_failed", "source": "restoring", "dest": "unlocking"},
            {"trigger": "unlocked", "source": "unlocking", "dest": "cleaning"},
            {"trigger": "unlock_failed", "source": "unlocking", "dest": "cleaning"},
            *_FINISH,
            _ABANDON,
            {
                "trigger": "interrupt",
                "source": ["validating", "discovering"],
                "dest": "interrupted",
            },
            {"trigger": "interrupt", "source": ["checking", "copying"], "dest": "cleaning"},
            {"trigger": "interrupt", "source": ["locking", "restoring"], "dest": "unlocking"},
        ],
    },
}

for _cleanup in ("backup-cleanup", "restore-cleanup"):
    MACHINES[_cleanup] = {
        "initial": "ready",
        "states": ["ready", "discovering", "unlocking", "cleaning", *TERMINAL],
        "transitions": [
            {"trigger": "start", "source": "ready", "dest": "discovering"},
            {"trigger": "discovered", "source": "discovering", "dest": "unlocking"},
            {"trigger": "discovery_failed", "source": "discovering", "dest": "failed"},
            {"trigger": "unlocked", "source": "unlocking", "dest": "cleaning"},
            {"trigger": "unlock_failed", "source": "unlocking", "dest": "cleaning"},
            *_FINISH,
            _ABANDON,
            {"trigger": "interrupt", "source": "discovering", "dest": "interrupted"},
        ],
    }

OPERATIONS = tuple(MACHINES)

# States whose work a signal must not cut short: they are how the run gets the director
# back to normal. A signal there is noted and the work goes on.
PROTECTED_STATES = frozenset({"unlocking", "cleaning"})


def failure_trigger(operation: str, state: str) -> str:
    """The trigger that takes `state` down its failure path (what a raised error fires)."""
    for transition in MACHINES[operation]["transitions"]:
        if transition["source"] == state and transition["trigger"].endswith("_failed"):
            return str(transition["trigger"])
    raise KeyError(f"{operation}: state {state} has no failure transition")


# A job's life within one run. Script phases go intent -> ok | error, so the log holds
# what was about to happen before it happened, and what came of it.
_JOB_PHASES = {
    # phase: (states it may start from, running state, done state, failed state)
    "lock": (["idle", "copied"], "locking", "locked", "lock_failed"),
    "backup": (["idle", "locked"], "backing_up", "backed_up", "backup_failed"),
    "restore": (["copied", "locked"], "restoring", "restored", "restore_failed"),
    "drain": (["backed_up", "unlocked", "unlock_failed"], "draining", "drained", "drain_failed"),
    "copy": (["idle"], "copying", "copied", "copy_failed"),
}
JOB_STATES = ["idle"]
JOB_TRANSITIONS: list[dict[str, Any]] = []
for _phase, (_sources, _running, _done, _failed) in _JOB_PHASES.items():
    JOB_STATES += [_running, _done, _failed]
    JOB_TRANSITIONS += [
        {"trigger": _phase, "source": _sources, "dest": _running},
        {"trigger": f"{_phase}_ok", "source": _running, "dest": _done},
        {"trigger": f"{_phase}_error", "source": _running, "dest": _failed},
    ]
JOB_STATES += ["unlocking", "unlocked", "unlock_failed"]
JOB_TRANSITIONS += [
    # Unlock is attempted from wherever the job stands: that is the invariant.
    {
        "trigger": "unlock",
        "source": [s for s in JOB_STATES if s != "unlocking"],
        "dest": "unlocking",
    },
    {"trigger": "unlock_ok", "source": "unlocking", "dest": "unlocked"},
    {"trigger": "unlock_error", "source": "unlocking", "dest": "unlock_failed"},
    # No change of state: the row records the script's pid on the VM, so that a cleanup
    # after a killed run can end the scripts that run left running.
    {
        "trigger": "script_started",
        "source": ["locking", "backing_up", "restoring", "unlocking"],
        "dest": None,
    },
]
# Entering `locking` means the job's lock script has started; a failed unlock (a cleanup's
# included) means it may hold a lock from before. Only a successful unlock releases it:
# a job's later states (backing up, draining after a failed unlock) do not change that.
LOCK_TAKEN_STATES = frozenset({"locking", "unlock_failed"})


def lock_held_after(held: bool, state: str) -> bool:
    """Whether a job may hold a lock once it enters `state`, given whether it did."""
    if state == "unlocked":
        return False
    return held or state in LOCK_TAKEN_STATES


def cleanup_for(operation: str) -> str:
    """The command that unlocks what a run of `operation` may have left locked."""
    return "restore-cleanup" if operation.startswith("restore") else "backup-cleanup"


# Which script each job phase runs, per operation.
SCRIPTS = {
    "backup": {"lock": "pre-backup-lock", "backup": "backup", "unlock": "post-backup-unlock"},
    "pre-backup-check": {"lock": "pre-backup-lock", "backup": "backup"},
    "backup-cleanup": {"unlock": "post-backup-unlock"},
    "restore": {"lock": "pre-restore-lock", "restore": "restore", "unlock": "post-restore-unlock"},
    "restore-cleanup": {"unlock": "post-restore-unlock"},
}


def build_run_machine(
    model: object, operation: str, finalize: Callable[..., None] | None = None
) -> Machine:
    table = MACHINES[operation]
    return Machine(
        model=model,
        states=table["states"],
        transitions=table["transitions"],
        initial=table["initial"],
        auto_transitions=False,
        send_event=True,
        finalize_event=finalize,
    )


def build_job_machine(model: object, finalize: Callable[..., None] | None = None) -> Machine:
    return Machine(
        model=model,
        states=JOB_STATES,
        transitions=JOB_TRANSITIONS,
        initial="idle",
        auto_transitions=False,
        send_event=True,
        finalize_event=finalize,
    )


def mermaid(operation: str) -> str:
    """The run-level machine of `operation` as a Mermaid state diagram."""
    from transitions.extensions import GraphMachine

    if operation not in (*MACHINES, "job"):
        raise UsageError(
            f"unknown operation {operation}; choose one of: {', '.join((*MACHINES, 'job'))}"
        )
    if operation == "job":
        states, transitions, initial = JOB_STATES, JOB_TRANSITIONS, "idle"
    else:
        table = MACHINES[operation]
        states, transitions, initial = table["states"], table["transitions"], table["initial"]

    class _Model:
        # Conditions are drawn, never evaluated.
        def backup_succeeded(self, _event: object = None) -> bool:
            return True

        has_errors = was_interrupted = backup_succeeded

    model = _Model()
    GraphMachine(
        model=model,
        states=states,
        transitions=transitions,
        initial=initial,
        auto_transitions=False,
        graph_engine="mermaid",
        show_conditions=True,
        title=f"bbrx {operation}",
    )
    text: str = model.get_graph().draw(None)  # type: ignore[attr-defined]
    return text
