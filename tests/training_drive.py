"""Training sessions driven in-process, for the determinism test: a worker process (so that
two of them share the machine's cores) starts a scenario with a seed, runs the trainee's
commands as library calls, and returns what the session armed and logged, times, ids and
paths aside. Importable by name, as a spawned worker needs."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from audit import AuditLog
from orchestrator.engine.run import Identity
from orchestrator.errors import BbrxError
from orchestrator.operations.procedures import Request, run_director
from orchestrator.training import session as sessions
from orchestrator.transport.targets import parse_host

#: Scenarios whose faults a plain backup sets off, and their directors. Seed N drives
#: DRIVES[N % len(DRIVES)]; a scenario whose fault kills bbrx cannot run in-process.
DRIVES = (
    ("corrupted-in-transit", "dr-transit"),
    ("unlock-failure", "dr-unlock"),
    ("jump-box-disk-full", "dr-full"),
    ("leftover-work-dir", "dr-leftover"),
)
OPERATOR = "trainee@test"


def session_events(home: Path, seed: int) -> dict[str, Any]:
    """One session of seed's scenario: the faults it armed on disk, the plan its train-start
    row records, and every run's events (each job's in its order: jobs of one lock level
    run at once, so their rows interleave as the scheduler has it)."""
    scenario, director = DRIVES[seed % len(DRIVES)]
    audit_db = home / "audit.db"
    backups = home / "backups"
    backups.mkdir(parents=True, exist_ok=True)
    sessions.start(home, audit_db, scenario, seed, OPERATOR)
    faults = home / "sim" / director / "var/vcap/sys/run/bbr-sim/faults"
    armed = sorted([p.parent.name, p.name, p.read_text()] for p in faults.glob("*/*"))
    # The scenario's fault fails the run: its rows are what is compared.
    with contextlib.suppress(BbrxError):
        run_director(
            Request(
                operation="backup",
                target=parse_host(f"sim://{director}"),
                identity=Identity(OPERATOR, reason="determinism"),
                audit_db=audit_db,
                home=home,
                artifact_path=backups,
            )
        )
    with AuditLog(audit_db, readonly=True) as audit:
        rows = list(audit.rows())
    sessions.reset(home)
    mark = max(i for i, r in enumerate(rows) if r["operation"] == "train-start")
    plan = json.loads(rows[mark]["detail"])["plan"]
    runs: dict[str, dict[str, list[list[Any]]]] = {}
    for row in rows[mark:]:
        event = [row["operation"], row["trigger"], row["script"], row["outcome"], row["to_state"]]
        runs.setdefault(row["run_id"], {}).setdefault(row["job"] or "", []).append(event)
    return {"scenario": scenario, "armed": armed, "plan": plan, "runs": list(runs.values())}


def two_sessions(work: str, seeds: list[int]) -> dict[int, list[dict[str, Any]]]:
    """For each seed, two sessions one after the other in one home under `work`."""
    logging.disable(logging.CRITICAL)  # a worker's log would go nowhere useful
    home = Path(work)
    return {seed: [session_events(home, seed), session_events(home, seed)] for seed in seeds}
