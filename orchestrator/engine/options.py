"""What a run is given and what it gives back, without the machinery that runs it: who runs
it (`Identity`), how long each phase's scripts may take (`Timeouts`), how many scripts at
once (`DEFAULT_MAX_PARALLEL`), and what the command line is told (`Outcome`).

Light on purpose (the standard library and `errors` only): the command line imports it to
parse, and a live director's SSH connection opens before the rest of bbrx is imported
(see `transport.targets.open_instance`).
"""

from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.errors import BbrxError

# Scripts at once across a deployment's instances (one lock level, the backup scripts, one
# unlock level). bbr runs 10: a deployment of 100 VMs then stays locked for ten rounds of
# lock scripts. Every script of a level runs at once up to this bound, which
# --max-parallel lowers for a jump box that cannot take as many sessions.
DEFAULT_MAX_PARALLEL = 100


@dataclass(frozen=True)
class Identity:
    """Who runs what, where and why: recorded on every audit row."""

    operator: str
    reason: str | None = None
    origin_host: str = field(default_factory=socket.gethostname)

    @staticmethod
    def default_operator() -> str:
        return f"{getpass.getuser()}@{socket.gethostname()}"


@dataclass(frozen=True)
class Timeouts:
    """Seconds a script of each phase may run before it is killed (None: no limit).

    bbr has no timeouts, so a hung lock script hangs it forever with the director locked.
    A script past its timeout is killed (on the VM too) and fails its phase, and the run
    takes that phase's failure path, which always leads through unlocking.
    """

    metadata: float | None = 60
    lock: float | None = 600
    backup: float | None = 6 * 3600
    unlock: float | None = 600
    restore: float | None = 6 * 3600

    def for_phase(self, phase: str) -> float | None:
        return getattr(self, phase, None)


@dataclass
class Outcome:
    """What a finished run tells the CLI."""

    run_id: str
    operation: str
    state: str
    errors: list[BbrxError]
    artifact: Path | None = None
    audit_db: Path | None = None
