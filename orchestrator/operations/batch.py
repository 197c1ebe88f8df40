"""`--all-deployments`: one run per deployment of a director, a bounded number at once.

Each deployment gets a run of its own (its own lease, machine, artifact directory and
audit rows), tied to the others by the batch id in its `start` row. The runs are driven
in worker threads; the main thread's signal handler passes a Ctrl-C to every run under
way (`SignalRelay`), and no deployment starts after one. What bbr prints is reproduced:
`Pending: …`, a line as each starts and ends, and the summary; the exit code is 0 when
every deployment succeeded and 1 otherwise (bbr does not use its bitmask here).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from audit import AuditError
from orchestrator.engine.options import Outcome
from orchestrator.engine.run import SignalRelay
from orchestrator.errors import BbrxError, RunFailed, UsageError
from orchestrator.operations.procedures import Request, director_of, run_deployment

log = logging.getLogger(__name__)

# bbr's bound: ten deployments at once (a semaphore of 10).
DEPLOYMENTS_AT_ONCE = 10
BATCH_OPERATIONS = ("pre-backup-check", "backup", "backup-cleanup")

# What bbr calls each operation in its summary lines.
_VERBS = {
    "backup": ("backup", "backed up", "cannot be backed up"),
    "pre-backup-check": ("pre-backup-check", "can be backed up", "cannot be backed up"),
    "backup-cleanup": ("cleanup", "cleaned up", "could not be cleaned up"),
}


@dataclass
class BatchOutcome:
    batch_id: str
    operation: str
    deployments: list[str]
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    failures: dict[str, list[BbrxError]] = field(default_factory=dict)
    run_ids: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False

    @property
    def succeeded(self) -> list[str]:
        return [name for name in self.deployments if name in self.outcomes]

    @property
    def failed(self) -> list[str]:
        return [name for name in self.deployments if name in self.failures]


class BatchFailed(BbrxError):
    """Some deployments of an --all-deployments run failed (bbr: exit 1)."""

    def __init__(self, outcome: BatchOutcome) -> None:
        self.outcome = outcome
        _, _, cannot = _VERBS[outcome.operation]
        failed = outcome.failed
        lines = [f"{len(failed)} out of {len(outcome.deployments)} deployments {cannot}:"]
        lines += [f"  {name}" for name in failed]
        lines.append("")
        for name in failed:
            lines.append(f"Deployment '{name}':")
            for error in outcome.failures[name]:
                lines += [f"  {line}" for line in str(error).splitlines()]
            if name in outcome.run_ids:
                lines.append(f"  (audit run {outcome.run_ids[name]})")
        super().__init__("\n".join(lines))


def new_batch_id() -> str:
    return f"batch-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def run_all_deployments(request: Request, say: Callable[[str], None]) -> BatchOutcome:
    """Run `request.operation` on every deployment of the director; `say` gets bbr's lines.

    Raises `BatchFailed` when any deployment failed (after all have ended)."""
    if request.operation not in BATCH_OPERATIONS:
        raise UsageError(
            f"{request.operation} does not take --all-deployments: give --deployment NAME"
        )
    director = director_of(request)
    try:
        names = director.deployments()
    finally:
        director.close()
    if not names:
        raise BbrxError("Failed to find any deployments", hint="Deploy something first.")
    batch = BatchOutcome(new_batch_id(), request.operation, names)
    verb, done, _ = _VERBS[request.operation]
    log.info("Batch %s: %s of %d deployments", batch.batch_id, request.operation, len(names))
    if request.operation == "backup":
        say("Starting backup...")
    elif request.operation == "backup-cleanup":
        say("Starting cleanup...")
    say(f"{_now()} Pending: {', '.join(names)}")
    say(f"{_now()} -------------------------")
    relay = SignalRelay()
    lock = threading.Lock()

    def one(name: str) -> None:
        if relay.signalled is not None:
            with lock:
                batch.failures[name] = [BbrxError("not started: the batch was interrupted")]
            return
        checking = request.operation == "pre-backup-check"
        if not checking:
            say(f"{_now()} Starting {verb} of {name}")
        single = replace(
            request,
            deployment=name,
            batch_id=batch.batch_id,
            signal_relay=relay,
            # Ten runs cannot share one terminal's question or one progress display.
            confirm_abandon=None,
            progress=None,
        )
        try:
            outcome = run_deployment(single)
        except Exception as exc:  # one deployment's trouble is its own: the others go on
            if isinstance(exc, BbrxError):
                error: BbrxError = exc
            elif isinstance(exc, AuditError):
                error = BbrxError(exc.message, hint=exc.hint)
            else:
                log.error("internal error in the run of %s", name, exc_info=True)
                error = BbrxError(f"internal error: {exc!r}")
            errors = list(error.errors) if isinstance(error, RunFailed) else [error]
            with lock:
                batch.failures[name] = errors
                if isinstance(error, RunFailed):
                    batch.run_ids[name] = error.run_id
            if checking:
                # bbr's pre-backup-check: the verdict, and the error indented beneath it.
                lines = [f"{_now()} Deployment '{name}' cannot be backed up."]
                lines += [f"  {line}" for e in errors for line in str(e).splitlines()]
                say("\n".join(lines))
            elif request.operation == "backup-cleanup":
                say(f"{_now()} Failed to cleanup deployment '{name}'")
                say(f"{_now()} ERROR: failed to {verb} {name}")
            else:
                say(f"{_now()} ERROR: failed to {verb} {name}")
            return
        with lock:
            batch.outcomes[name] = outcome
            batch.run_ids[name] = outcome.run_id
        if checking:
            say(f"{_now()} Deployment '{name}' can be backed up.")
        else:
            say(f"{_now()} Finished {verb} of {name}")

    with relay.guard(), ThreadPoolExecutor(max_workers=DEPLOYMENTS_AT_ONCE) as pool:
        list(pool.map(one, names))
    batch.interrupted = relay.signalled is not None
    say(f"{_now()} -------------------------")
    if batch.succeeded:
        label = (
            "Successfully can be backed up"
            if request.operation == "pre-backup-check"
            else (f"Successfully {done}")
        )
        say(f"{_now()} {label}: {', '.join(batch.succeeded)}")
    if batch.failed:
        say(f"{_now()} FAILED: {', '.join(batch.failed)}")
        raise BatchFailed(batch)
    return batch


def _now() -> str:
    return f"[{datetime.now(UTC):%H:%M:%S}]"
