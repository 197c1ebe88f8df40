"""The driver itself, in-process against the simulator: whatever an action returns, a run
that locked anything goes through unlocking."""

from __future__ import annotations

from pathlib import Path

from audit import AuditLog
from orchestrator import backup
from orchestrator.run import Identity, Run
from simulator.director import SimDirector, sim_root
from simulator.instance import SimInstance


def test_a_refused_trigger_still_leads_through_unlocking(tmp_path: Path):
    vm = SimDirector(sim_root(tmp_path, "demo"))
    vm.create()
    out = tmp_path / "out"
    out.mkdir()
    actions = dict(backup.backup_actions(out, "demo"))
    # An action with a bug: a trigger the tables refuse from its state, then one they lack.
    actions["backing_up"] = lambda run: "drained"
    instance = SimInstance(vm)
    with AuditLog(tmp_path / "audit.db") as audit:
        run = Run("backup", instance, audit, Identity("tester"), "sim://demo")
        outcome = run.drive(actions)
        backup.finish(run)
        rows = audit.timeline(run.run_id)
    instance.close()

    assert outcome.state == "failed"
    assert any("Can't trigger event drained from state backing_up" in e.message
               for e in outcome.errors)  # fmt: skip
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
    vm = SimDirector(sim_root(tmp_path, "demo"))
    vm.create()
    out = tmp_path / "out"
    out.mkdir()
    actions = dict(backup.backup_actions(out, "demo"))
    locking = actions["locking"]
    actions["locking"] = lambda run: (locking(run), "no_such_trigger")[1]
    instance = SimInstance(vm)
    with AuditLog(tmp_path / "audit.db") as audit:
        run = Run("backup", instance, audit, Identity("tester"), "sim://demo")
        outcome = run.drive(actions)
        backup.finish(run)
    instance.close()
    assert outcome.state == "failed"
    assert any("no_such_trigger" in e.message for e in outcome.errors)
    assert vm.locked_jobs() == []
    assert list(out.iterdir()) == []
