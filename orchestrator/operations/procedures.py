"""The entry points the CLI calls: `bbrx director ... SUBCOMMAND` (`run_director`) and
`bbrx deployment ... SUBCOMMAND` (`run_deployment`; `run_all_deployments` for
--all-deployments, in `batch.py`).

Each opens the target, then drives the operation on it (`running.run_on`: the audit log,
the lease, the machine), and closes both. A run with errors raises `RunFailed`, which
carries every error (and so the exit-code bits) and the run id.

This module is light: the command line imports it to parse. The target is opened first,
and only then is `running` (the audit log, the engine, the operations) imported, so that
a live director's SSH handshake, begun when it is opened, overlaps that loading.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator import settings
from orchestrator.engine.options import Identity, Outcome, Timeouts
from orchestrator.errors import InterruptedRunError, UsageError
from orchestrator.transport.targets import Target, open_director, open_instance

if TYPE_CHECKING:
    from orchestrator.bosh.director import Director
    from orchestrator.engine.progress import ProgressSink
    from orchestrator.engine.run import SignalRelay

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    operation: str
    target: Target
    identity: Identity
    audit_db: Path
    home: Path
    artifact_path: Path | None = None
    username: str | None = None
    private_key_path: Path | None = None
    accept_new_host_key: bool = False
    known_hosts: Path | None = None
    progress: ProgressSink | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    # Asked after a second Ctrl-C while unlocking; None where there is no terminal.
    confirm_abandon: Callable[[list[str], threading.Event], bool] | None = None
    # A cleanup even over a work dir that a run this audit log does not know created.
    force: bool = False
    # Deployment mode: the deployment to act on (the director is `target`), and a live
    # director's secret and CA (never in a repr, a log or the audit log).
    deployment: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_cert: str | None = field(default=None, repr=False)
    # backup: save the deployment's manifest in the artifact (bbr's --with-manifest).
    with_manifest: bool = False
    # backup: run no lock or unlock script (bbr's --unsafe-lock-free); recorded in the audit.
    unsafe_lock_free: bool = False
    # At most this many scripts at once within the run. None: a deployment's default
    # (DEFAULT_MAX_PARALLEL); a director's few jobs run 8 at a time, as they always have.
    max_parallel: int | None = None
    # --all-deployments: the id tying the runs of one batch together in the audit log, and
    # the relay that passes the main thread's signals to runs driven in worker threads.
    batch_id: str | None = None
    signal_relay: SignalRelay | None = None
    # The config file's audit section: sign a checkpoint of the log when the run ends.
    checkpoint: settings.CheckpointSigning | None = None


def run_director(request: Request) -> Outcome:
    """Open the target named by the request and run one operation on it."""
    if request.operation == "restore" and request.artifact_path is None:
        raise UsageError("restore needs --artifact-path DIR (a directory a backup created)")
    with _stopped_by_signals_until_the_run_takes_them():
        instance = open_instance(
            request.target,
            home=request.home,
            username=request.username,
            private_key_path=request.private_key_path,
            accept_new_host_key=request.accept_new_host_key,
            known_hosts=request.known_hosts,
        )
        try:
            from orchestrator.operations.running import run_on  # loads while one connects

            return run_on(request, instance)
        finally:
            instance.close()


@contextlib.contextmanager
def _stopped_by_signals_until_the_run_takes_them() -> Iterator[None]:
    """SIGTERM and SIGHUP raise InterruptedRunError but while the run's own handlers have
    them (`Run.drive`, which hands back to these when it ends).

    A live director's connection opens with its target, before the audit log and the
    lease: killed there by a signal's default action, bbrx would leave that connection
    logged in on the director (and its lease taken). Raising is the exception to "handlers
    only set a flag": nothing has been done on the director yet, and there is no driver to
    wake. In a thread other than the main one (signals are the main thread's), a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = [signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup's choice stands
        signums.append(signal.SIGHUP)

    def stop(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        raise InterruptedRunError(
            f"stopped by {name} while the run was starting or ending, outside its locks: it "
            "left no job locked",
            hint="See what it did with bbrx audit show; run the command again if it is needed.",
        )

    previous = {signum: signal.signal(signum, stop) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def director_of(request: Request) -> Director:
    """The director `request.target` names, with the request's credentials for a live one."""
    return open_director(
        request.target,
        home=request.home,
        username=request.username,
        password=request.password,
        ca_cert=request.ca_cert,
    )


def run_deployment(request: Request, director: Director | None = None) -> Outcome:
    """Run one operation on a deployment of the director `request.target` names."""
    if request.deployment is None:
        raise UsageError("provide one of '--deployment' or '--all-deployments' flags.")
    if request.operation == "restore" and request.artifact_path is None:
        raise UsageError("--artifact-path flag is required.")
    if director is None:
        director = director_of(request)
    from orchestrator.engine.fleet import DeploymentFleet
    from orchestrator.operations.running import run_on

    fleet = DeploymentFleet(director, request.deployment, request.target.host)
    try:
        return run_on(request, fleet)
    finally:
        fleet.close()
