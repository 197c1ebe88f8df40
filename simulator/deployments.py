"""SimBosh: the simulated director as the Director API shows it to bbr in deployment mode.

bbr asks a director for the deployments (`GET /deployments`), a deployment's VMs
(`vms?format=full`), its manifest, and SSH access to an instance group's VMs (set up and
torn down per group). SimBosh answers those from the simulated director's database, the
source of truth for which deployments and VMs exist, and hands out a SimInstance per VM.
While the director's own job is locked (a director backup or restore is under way) the
API is unavailable, as it is on a real director.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from orchestrator.bosh.director import VmInfo
from orchestrator.errors import TargetError
from simulator.deploy import DeployResult, deploy_text, find_deployment, manifest_of
from simulator.deploy import delete_deployment as _delete_deployment
from simulator.director import SimDirector, sim_root
from simulator.director_db import Deployment
from simulator.instance import SimInstance

log = logging.getLogger(__name__)

#: The director's record of access set up and torn down (a real director's ssh tasks).
ACCESS_LOG = Path("var/vcap/sys/log/director/access.log")


class SimBosh:
    """The simulated director `name` under `home`, as the Director API would show it."""

    mode = "sim"
    access_user = None  # no user is made on the simulator's VMs

    def __init__(self, home: Path, name: str) -> None:
        self.director = SimDirector(sim_root(home, name))
        self.name = name
        self.address = f"sim://{name}"
        self._lock = threading.Lock()
        self._opened: dict[tuple[str, str], list[SimInstance]] = {}

    @classmethod
    def open(cls, home: Path, name: str) -> SimBosh:
        """The director, created with its demo data on first use (as `--host sim://NAME`
        creates one for director mode)."""
        bosh = cls(home, name)
        bosh.director.ensure()
        return bosh

    def __repr__(self) -> str:
        return f"SimBosh({self.address!r})"

    # -- what the API serves ---------------------------------------------------------

    def deployments(self) -> list[str]:
        return [d.name for d in self._database()]

    def vms(self, deployment: str) -> list[VmInfo]:
        return [
            VmInfo(
                group=vm.group,
                index=str(vm.index),
                id=vm.instance_id,
                ips=vm.ips,
                bootstrap=vm.index == 0,
                az=vm.az or None,
            )
            for vm in self._deployment(deployment).vms
        ]

    def manifest(self, deployment: str) -> str:
        found = self._deployment(deployment)
        text = manifest_of(found)
        if text is None:
            raise TargetError(
                f"{self.address} holds no manifest for deployment {deployment!r}",
                hint=f"Redeploy it: bbrx sim deploy {self.name} {deployment} --manifest FILE",
            )
        return text

    # -- what the API changes (`bosh deploy`, `bosh delete-deployment`) --------------

    def deploy(
        self, deployment: str, manifest: str, *, source: str = "the manifest"
    ) -> DeployResult:
        """Add or replace `deployment` from the manifest text (`source` names it in errors)."""
        self._require_director()
        return deploy_text(self.director, deployment, manifest, source=source)

    def delete_deployment(self, deployment: str) -> int:
        """Remove the deployment's VMs and its rows; the number of VMs removed."""
        self._require_director()
        return _delete_deployment(self.director, deployment)

    # -- access to a group's instances -----------------------------------------------

    def open_instances(self, deployment: str, group: str) -> list[SimInstance]:
        """One Instance per VM of the group, in index order (BOSH's `ssh` setup)."""
        found = self._deployment(deployment)
        vms = sorted((vm for vm in found.vms if vm.group == group), key=lambda vm: vm.index)
        if not vms:
            groups = list(dict.fromkeys(vm.group for vm in found.vms))
            raise TargetError(
                f"deployment {deployment!r} on {self.address} has no instance group {group!r}",
                hint=f"Instance groups: {', '.join(groups) or 'none'}",
            )
        trees = [self.director.deployment_vm(deployment, vm) for vm in vms]
        for tree in trees:
            # A VM the director lists but cannot reach fails the setup, as an
            # unresponsive agent fails a real director's ssh task.
            if not tree.exists():
                raise TargetError(
                    f"cannot set up access to {deployment}/{group} on {self.address}: "
                    f"{tree.group}/{tree.instance_id} (index {tree.index}) does not respond "
                    f"({tree.root} is missing or is another VM)",
                    hint=tree.missing_hint(),
                )
        instances = [SimInstance(tree) for tree in trees]
        with self._lock:
            self._opened.setdefault((deployment, group), []).extend(instances)
        self._record("setup", deployment, group)
        log.info(
            "access set up to %s/%s on %s: %d instance(s)",
            deployment,
            group,
            self.address,
            len(instances),
        )
        return instances

    def close_access(self, deployment: str, group: str) -> None:
        """Tear down access to the group (BOSH's `ssh` cleanup). Nothing to remove on
        the simulator; recorded and logged. Idempotent."""
        with self._lock:
            was_open = self._opened.pop((deployment, group), None) is not None
        self._record("cleanup", deployment, group)
        if was_open:
            log.info("access to %s/%s on %s torn down", deployment, group, self.address)
        else:
            log.debug("access to %s/%s on %s was not open", deployment, group, self.address)

    def interrupt(self) -> None:
        """The simulator's answers do not wait."""

    def revoke_access(self, deployment: str, groups: Sequence[str], user: str) -> None:
        """Nothing was added to the simulator's VMs; each group's cleanup is recorded."""
        for group in groups:
            self._record("cleanup", deployment, group)

    def access_log(self) -> list[tuple[str, str, str]]:
        """(event, deployment, group) of every setup and cleanup recorded, in order."""
        path = self.director.root / ACCESS_LOG
        if not path.is_file():
            return []
        events = []
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split("\t")
            if len(parts) == 4:
                events.append((parts[1], parts[2], parts[3]))
        return events

    def close(self) -> None:
        """Close every instance this handed out (idempotent: SimInstance.close is)."""
        with self._lock:
            opened = [i for instances in self._opened.values() for i in instances]
            self._opened.clear()
        for instance in opened:
            instance.close()

    # -- helpers ---------------------------------------------------------------------

    def _require_director(self) -> None:
        if not self.director.exists():
            raise TargetError(
                f"there is no simulated director {self.name} (looked in {self.director.root})",
                hint=f"Create it with: bbrx sim create {self.name}",
            )

    def _database(self) -> list[Deployment]:
        self._require_director()
        locked = self.director.api_locked()
        if locked is not None:
            raise TargetError(
                f"{self.address}: {locked}: deployments unavailable",
                hint="A director backup or restore holds the director; try again when it ends.",
            )
        return self.director.deployments()

    def _deployment(self, name: str) -> Deployment:
        self._database()  # the existence and lock checks
        return find_deployment(self.director, name)

    def _record(self, event: str, deployment: str, group: str) -> None:
        path = self.director.root / ACCESS_LOG
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as handle:
                handle.write(f"{time.time():.6f}\t{event}\t{deployment}\t{group}\n")
        except OSError as error:
            log.warning("could not record %s of %s/%s: %s", event, deployment, group, error)
