"""The director contract: what a deployment run asks of a BOSH Director, whatever carries it.

The simulator (`simulator.deployments.SimBosh`) and the live Director API client are
peers behind this Protocol, as the simulator and SSH are behind the instance contract.
A deployment run lists the VMs of its deployment, reads the manifest (releases, and
which jobs back up once and restore everywhere), and for each instance group in turn
sets up access and gets one `Instance` per VM; when the run ends it tears access down.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from orchestrator.transport.instance import Instance


@dataclass(frozen=True)
class VmInfo:
    """One VM of a deployment, as the Director API's `vms?format=full` describes it."""

    group: str  # the instance group (BOSH's `job_name`)
    index: str  # as text: bbr's artifact names and metadata use it so
    id: str  # the instance's UUID
    ips: tuple[str, ...]
    bootstrap: bool
    az: str | None = None

    @property
    def name(self) -> str:
        return f"{self.group}/{self.index}"


@runtime_checkable
class Director(Protocol):
    """A BOSH Director: its deployments, their VMs and manifests, and access to them."""

    #: For messages and the audit log's target ("sim://demo", "https://10.0.0.6:25555").
    address: str
    #: "sim" or "live": recorded in the audit log.
    mode: str

    @property
    def access_user(self) -> str | None:
        """The user access is set up as (a live Director's `bosh_…`; None on the simulator):
        recorded when a run starts, so that the cleanup after a killed run can remove it."""
        ...

    def deployments(self) -> list[str]:
        """Every deployment's name, in the director's order.

        Raises `errors.TargetError` when the director cannot be asked."""
        ...

    def vms(self, deployment: str) -> list[VmInfo]:
        """The deployment's VMs; `errors.TargetError` naming it if there is no such one."""
        ...

    def manifest(self, deployment: str) -> str:
        """The deployment's manifest, as the director stores it (YAML text)."""
        ...

    def open_instances(self, deployment: str, group: str) -> Sequence[Instance]:
        """Set up access to the group's instances; one `Instance` per VM, in index order."""
        ...

    def close_access(self, deployment: str, group: str) -> None:
        """Tear down the access `open_instances` set up. Idempotent."""
        ...

    def interrupt(self) -> None:
        """The run is being stopped: a call that waits on the director gives up now.
        Called from the run's signal watcher thread."""
        ...

    def revoke_access(self, deployment: str, groups: Sequence[str], user: str) -> None:
        """Remove another run's `user` from the groups' instances (a killed run's access,
        which it could not tear down). Idempotent."""
        ...

    def close(self) -> None:
        """Release connections. Idempotent."""
        ...
