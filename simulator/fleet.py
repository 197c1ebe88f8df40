"""The VMs of a simulated director's deployments, one directory tree each.

A deployment VM lives at `<director root>/deployments/<deployment>/<group>/<index>/`. That
directory is the VM's root, laid out exactly as the director's (`var/vcap/jobs`, `store`,
`sys`, ...), with `instance.yml` beside the tree saying who the VM is. The director's
database says which VMs *should* exist; these trees are the VMs that *do*, so the two can
disagree after a disaster (a wiped director keeps its VMs running; a restored director
may list VMs that were deleted since), as they can on a real BOSH.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from simulator.job_data import seed_job_data
from simulator.manifest import NAME_PATTERN
from simulator.vm import SimVm

log = logging.getLogger(__name__)

DEPLOYMENTS_DIR = "deployments"
INSTANCE_FILE = "instance.yml"
IDENTITY_CAP = 64 * 1024


@dataclass(frozen=True)
class Identity:
    """What instance.yml records: who the VM is, as the director lists it."""

    deployment: str
    group: str
    index: int
    id: str
    ips: tuple[str, ...]
    az: str | None

    @property
    def bootstrap(self) -> bool:
        return self.index == 0

    def render(self) -> str:
        return yaml.safe_dump(
            {
                "id": self.id,
                "deployment": self.deployment,
                "group": self.group,
                "index": self.index,
                "bootstrap": self.bootstrap,
                "ips": list(self.ips),
                "az": self.az,
            },
            sort_keys=False,
        )


class DeploymentVm(SimVm):
    """One VM of a deployment: a tree like the director's, with its own identity."""

    def __init__(self, root: Path, director: str, identity: Identity) -> None:
        super().__init__(
            root, f"sim://{director}/{identity.deployment}/{identity.group}/{identity.index}"
        )
        self.director = director
        self.identity = identity
        self.deployment = identity.deployment
        self.group = identity.group
        self.index = str(identity.index)
        self.instance_id = identity.id

    def missing_hint(self) -> str:
        return (
            f"The director lists {self.group}/{self.instance_id} but its VM is gone: "
            f"redeploy with `bbrx sim deploy {self.director} {self.deployment} --manifest FILE`."
        )

    def exists(self) -> bool:
        """Whether this VM's tree is there and is this instance (not another one's)."""
        found = read_identity(self.root)
        return found is not None and found.id == self.identity.id


def vm_root(director_root: Path, deployment: str, group: str, index: int) -> Path:
    return director_root / DEPLOYMENTS_DIR / deployment / group / str(index)


def read_identity(root: Path) -> Identity | None:
    """The identity in `root/instance.yml`, or None when it is missing or unreadable."""
    path = root / INSTANCE_FILE
    try:
        with path.open("rb") as handle:
            data = yaml.safe_load(handle.read(IDENTITY_CAP))
        return Identity(
            deployment=str(data["deployment"]),
            group=str(data["group"]),
            index=int(data["index"]),
            id=str(data["id"]),
            ips=tuple(str(ip) for ip in data.get("ips") or ()),
            az=None if data.get("az") is None else str(data["az"]),
        )
    except FileNotFoundError:
        return None
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError) as error:
        log.warning("unreadable %s: %s", path, error)
        return None


def trees_on_disk(director_root: Path, deployment: str) -> list[tuple[str, int]]:
    """(group, index) of every VM tree under the deployment's directory."""
    base = director_root / DEPLOYMENTS_DIR / deployment
    if not base.is_dir():
        return []
    found = []
    for group in sorted(base.iterdir()):
        if not group.is_dir() or not NAME_PATTERN.fullmatch(group.name):
            continue
        for index in group.iterdir():
            if index.is_dir() and index.name.isdigit():
                found.append((group.name, int(index.name)))
    return sorted(found)


def build_vm(root: Path, identity: Identity, jobs: list[tuple[str, str]], *, seed: bool) -> None:
    """Create the VM at `root` (which must not exist): jobs, identity, and seed data.

    Built aside and renamed into place, so nothing ever sees half a VM.
    """
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.creating-", dir=root.parent))
    try:
        vm = SimVm(staging, "staging")
        vm.install_jobs(jobs)
        vm.make_empty_dirs()
        if seed:
            seed_data(staging, identity, jobs)
        (staging / INSTANCE_FILE).write_text(identity.render())
        os.chmod(staging, 0o755)  # mkdtemp's 0700 is not what a VM root has
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def seed_data(root: Path, identity: Identity, jobs: list[tuple[str, str]]) -> None:
    for release, job in jobs:
        seed_job_data(
            root,
            release,
            job,
            deployment=identity.deployment,
            group=identity.group,
            index=identity.index,
        )


def reinstall_jobs(root: Path, jobs: list[tuple[str, str]]) -> None:
    """A redeploy of a VM that stays: its jobs as the new manifest says, its data kept.

    Only a job the VM did not run before gets seed data: a redeploy after a wipe must not
    bring the lost data back.
    """
    identity = read_identity(root)
    vm = SimVm(root, "redeploy")
    before = set(vm.jobs())
    shutil.rmtree(root / "var/vcap/jobs", ignore_errors=True)
    vm.install_jobs(jobs)
    added = [(release, job) for release, job in jobs if job not in before]
    if identity is not None and added:
        seed_data(root, identity, added)


def remove_tree(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    # Empty group and deployment directories go too: they stood for nothing but the VMs.
    for parent in (root.parent, root.parent.parent):
        try:
            parent.rmdir()
        except OSError:
            break
