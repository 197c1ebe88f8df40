"""The driver itself, in-process against the simulator: whatever an action returns, a run
that locked anything goes through unlocking."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from audit import AuditLog
from orchestrator.engine.run import Identity, Outcome, Run
from orchestrator.operations import backup
from simulator.director import SimDirector, sim_root
from simulator.instance import SimInstance


def drive_backup(
    tmp_path: Path,
    state: str,
    action: Callable[[Any, Run], str],
    instance_class: type[SimInstance] = SimInstance,
) -> tuple[Outcome, list[dict], SimDirector, Path]:
    """A backup of a fresh simulated director, with the action of `state` replaced by
    `action(original, run)`: the outcome, the run's audit rows, the VM and the output dir."""
    vm = SimDirector(sim_root(tmp_path, "demo"))
    vm.create()
    out = tmp_path / "out"
    out.mkdir()
    actions = dict(backup.backup_actions(out, "demo"))
    original = actions[state]
    actions[state] = lambda run: action(original, run)
    instance = instance_class(vm)
    with AuditLog(tmp_path / "audit.db") as audit:
        run = Run("backup", instance, audit, Identity("tester"), "sim://demo")
        outcome = run.drive(actions)
        backup.finish(run)
        rows = audit.timeline(run.run_id)
    instance.close()
    return outcome, rows, vm, out


def test_a_refused_trigger_still_leads_through_unlocking(tmp_path: Path):
    # An action with a bug: it returns a trigger the tables refuse from its state.
    outcome, rows, vm, out = drive_backup(tmp_path, "backing_up", lambda _original, _run: "drained")

    assert outcome.state == "failed"
    assert any(
        "Can't trigger event drained from state backing_up" in e.message for e in outcome.errors
    )
    refused = [r for r in rows if r["job"] is None and r["outcome"] == "refused"]
    assert [r["trigger"] for r in refused] == ["drained"]
    run_states = [r["to_state"] for r in rows if r["job"] is None and r["outcome"] != "refused"]
    assert run_states[-3:] == ["unlocking", "cleaning", "failed"]
    # What the VM's own scripts say: every lock was followed by its unlock.
    locked = {c.job for c in vm.calls() if (c.script, c.event) == ("pre-backup-lock", "start")}
    unlocked = {c.job for c in vm.calls() if (c.script, c.event) == ("post-backup-unlock", "start")}
    assert locked and locked <= unlocked
    assert vm.locked_jobs() == []
    assert list(out.iterdir()) == []  # and no partial backup


def test_an_unknown_trigger_after_locking_still_unlocks(tmp_path: Path):
    def lock_then_bug(original, run):
        original(run)
        return "no_such_trigger"

    outcome, _rows, vm, out = drive_backup(tmp_path, "locking", lock_then_bug)
    assert outcome.state == "failed"
    assert any("no_such_trigger" in e.message for e in outcome.errors)
    assert vm.locked_jobs() == []
    assert list(out.iterdir()) == []


class _ForkFailsOnOneUnlock(SimInstance):
    """A stand-in for what cannot be staged here: the jump box cannot fork for one unlock."""

    def run_script(self, call):
        if (call.job, call.script) == ("director", "post-backup-unlock"):
            raise OSError(11, "Resource temporarily unavailable")
        return super().run_script(call)


def test_an_unforeseen_error_in_one_unlock_does_not_skip_the_others(tmp_path: Path):
    outcome, rows, vm, _out = drive_backup(
        tmp_path, "backing_up", lambda original, run: original(run), _ForkFailsOnOneUnlock
    )
    unlocked = {c.job for c in vm.calls() if (c.script, c.event) == ("post-backup-unlock", "start")}
    # director is unlocked in level 1; the levels before and after it still ran.
    assert unlocked == {"bbr-credhubdb", "blobstore", "uaa"}
    assert outcome.state == "failed"
    assert any(
        "post-backup-unlock script for job director" in e.message
        and "Resource temporarily unavailable" in e.message
        for e in outcome.errors
    )
    assert [r["job"] for r in rows if r["trigger"] == "unlock_error"] == ["director"]
