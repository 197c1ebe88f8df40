"""A simulated director served as a live one: the fake Director and UAA over HTTPS
(tests/fake_director.py) answer from the simulator's director database, and each of its
deployment VMs is a real sshd (tests/sshd.py) serving that VM's own tree as /var/vcap.

So the deployment behaviour suite runs unchanged on both transports: a test deploys,
wipes, faults and inspects the simulated VMs as it always does, and `bbrx deployment`
reaches the same trees either through the simulator (`sim://demo`) or as it reaches a real
BOSH Director's VMs: UAA, the Director's tasks, a user and key made per run by the SSH
setup, host keys pinned from its answer, and OpenSSH.

A VM's sshd starts when the Director is first asked to set up SSH to it (a test may deploy
new VMs at any time), and again if the VM's tree was replaced since. A VM whose tree is
missing fails its setup, as an unresponsive agent fails a real Director's ssh task.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from orchestrator.transport.targets import parse_director
from simulator.deploy import manifest_of
from simulator.director import SimDirector, sim_root
from simulator.fleet import DeploymentVm
from tests import sshd
from tests.fake_director import FakeDirector, FakeVm


@dataclass
class LiveWorld:
    """The simulated director `name` under `home`, behind a fake Director."""

    home: Path
    keys: sshd.Keys
    workdir: Path
    name: str = "demo"
    fake: FakeDirector = field(init=False)
    servers: dict[str, sshd.TestSshd] = field(default_factory=dict)  # instance id -> sshd

    def __post_init__(self) -> None:
        self.director = SimDirector(sim_root(self.home, self.name))
        # Tasks end at their first poll: the suite runs many; their `processing` polls are
        # test_director_api.py's and test_live_deployment.py's.
        self.fake = FakeDirector(auth="uaa", task_polls=0, world=self._deployments)
        self.fake.on_setup = self._setup
        self.fake.on_cleanup = self._cleanup
        self.ca = self.workdir / "live-director-ca.pem"
        self._trees: dict[str, DeploymentVm] = {}  # instance id -> its tree
        self._mounted: dict[str, int] = {}  # instance id -> inode of the tree its sshd serves
        self._started = 0
        self._stopped = False
        self._lock = threading.Lock()
        self._host_key = Path(f"{self.keys.host_key}.pub").read_text().strip()

    def start(self) -> LiveWorld:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.fake.serve()
        self.ca.write_text(self.fake.ca_pem)
        return self

    def stop(self) -> None:
        """Every sshd it started is stopped, whatever the Director's stop does; a setup
        still being answered starts none after this."""
        try:
            self.fake.stop()
        finally:
            with self._lock:
                self._stopped = True
                servers = list(self.servers.values())
            for server in servers:
                with contextlib.suppress(Exception):
                    server.stop()

    # --- how bbrx is pointed at it ---

    @property
    def target(self):  # type: ignore[no-untyped-def]
        return parse_director(self.fake.url)

    def credentials(self) -> dict[str, str]:
        """The Request fields a live run needs beside its target."""
        return {"username": self.fake.client, "password": self.fake.secret, "ca_cert": str(self.ca)}

    def cli_args(self) -> list[str]:
        return [
            "--target", self.fake.url, "--username", self.fake.client,
            "--password", self.fake.secret, "--ca-cert", str(self.ca),
        ]  # fmt: skip

    def users(self) -> dict[str, list[str]]:
        """The users the Director's SSH setups left on each VM's sshd (instance id -> users)."""
        with self._lock:  # a setup still being answered may add a server
            servers = dict(self.servers)
        return {vm_id: server.users() for vm_id, server in servers.items()}

    # --- what the fake Director asks of it ---

    def _deployments(self) -> dict[str, dict[str, Any]]:
        answer: dict[str, dict[str, Any]] = {}
        trees: dict[str, DeploymentVm] = {}
        for deployment in self.director.deployments():
            vms = []
            for vm in sorted(deployment.vms, key=lambda v: (v.group, v.index)):
                trees[vm.instance_id] = self.director.deployment_vm(deployment.name, vm)
                server = self.servers.get(vm.instance_id)
                address = f"127.0.0.1:{server.port}" if server else "127.0.0.1"
                vms.append(
                    FakeVm(vm.group, vm.index, vm.instance_id, address, self._host_key,
                           bootstrap=vm.index == 0)
                )  # fmt: skip
            answer[deployment.name] = {"manifest": manifest_of(deployment) or "", "vms": vms}
        with self._lock:
            self._trees = trees
        return answer

    def _setup(self, vm: FakeVm, user: str, public_key: str) -> bool:
        with self._lock:
            tree = self._trees.get(vm.id)
            if self._stopped or tree is None or not tree.exists():
                return False  # the agent does not respond
            server = self._serve(vm.id, tree)
        server.add_user(user, public_key)
        vm.ip = f"127.0.0.1:{server.port}"
        return True

    def _cleanup(self, vm: FakeVm, pattern: str) -> None:
        server = self.servers.get(vm.id)
        if server is not None:
            server.remove_users(pattern)

    def _serve(self, vm_id: str, tree: DeploymentVm) -> sshd.TestSshd:
        """The VM's sshd, started now if it has none or serves a tree since replaced."""
        inode = os.stat(tree.root / "var/vcap").st_ino
        server = self.servers.get(vm_id)
        if server is not None and self._mounted.get(vm_id) != inode:
            server.stop()
            server = None
        if server is None:
            self._started += 1
            # Beside the backups a test makes: the tar shim's corrupt-local finds them there.
            workdir = self.workdir / f"live-sshd-{self._started}"
            server = sshd.TestSshd(self.keys, tree.root, workdir, accounts=True).start()
            self.servers[vm_id] = server
            self._mounted[vm_id] = inode
        return server


@contextlib.contextmanager
def serving(request: pytest.FixtureRequest, home: Path, workdir: Path) -> Iterator[LiveWorld]:
    """A fixture's live world for the simulated director `demo` under `home` (skipped where
    no sshd can be started), stopped after the test, which must leave no run's user on any
    VM: every run, failed ones included, removes the user its SSH setup made."""
    request.getfixturevalue("vcap_mount_point")  # skips where no sshd can start
    world = LiveWorld(home, request.getfixturevalue("ssh_keys"), workdir).start()
    try:
        yield world
        left = {vm: users for vm, users in world.users().items() if users}
        assert not left, f"users left on the VMs: {left}"
    finally:
        world.stop()
