"""SimDirector: a simulated BOSH director VM kept as a directory tree, and its deployments.

The director's tree is a SimVm at `$BBRX_HOME/sim/<name>/` whose jobs are the `bosh`
release's; its database (`var/vcap/store/director/bosh.sql`) lists the deployments, their
VMs and their manifests, and each listed VM is a tree of its own under `deployments/`
(see fleet.py). This class builds, breaks and inspects them; it never plays a script's
part. Deploying, deleting and wiping deployments are in deploy.py.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.errors import TargetError
from simulator.director_db import Deployment, Vm, parse_dump, render_dump, render_vms_table
from simulator.fleet import DEPLOYMENTS_DIR, DeploymentVm, Identity, build_vm, vm_root
from simulator.releases import PACKAGE_DIR, release_jobs
from simulator.seed_data import default_credentials, default_deployments, write_blobs
from simulator.seed_manifests import SEED_JOBS
from simulator.vm import FAULTS_DIR, JOBS_DIR, LOCKS_DIR, RUN_DIR, STORE_DIR, SYS_DIR, SimVm

log = logging.getLogger(__name__)

__all__ = [
    "BLOBSTORE_DIR",
    "CREDHUB_DB",
    "DATA_STORES",
    "DIRECTOR_DB",
    "FAULTS_DIR",
    "JOBS_DIR",
    "LOCKS_DIR",
    "MARKER",
    "NAME_PATTERN",
    "PACKAGE_DIR",
    "RUN_DIR",
    "STORE_DIR",
    "SYS_DIR",
    "SimDirector",
    "sim_root",
]

MARKER = ".bbrx-sim"
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")

DIRECTOR_DB = STORE_DIR / "director/bosh.sql"
BLOBSTORE_DIR = STORE_DIR / "blobstore/store"
CREDHUB_DB = STORE_DIR / "credhub/credentials.yml"
# The stores whose bytes a backup must preserve (data_digest covers exactly these).
DATA_STORES = ("director", "blobstore", "credhub")
# Held while the deployments change, so two bbrx processes never interleave their edits.
_EDIT_LOCK = ".lock"


def sim_root(home: Path, name: str) -> Path:
    """`$BBRX_HOME/sim/<name>/`, after checking the name is safe as one path component."""
    if not NAME_PATTERN.fullmatch(name):
        raise TargetError(
            f"invalid simulator name {name!r}",
            hint="A simulator name is 1-63 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit (e.g. sim://demo).",
        )
    return home / "sim" / name


class SimDirector(SimVm):
    """One simulated director VM rooted at `root`, and its deployments' VMs below it."""

    def __init__(self, root: Path) -> None:
        super().__init__(Path(root), f"sim://{Path(root).name}")
        self.name = self.root.name

    def missing_hint(self) -> str:
        return f"Create it with `bbrx sim create {self.name}`."

    # -- lifecycle -----------------------------------------------------------------

    def exists(self) -> bool:
        return (self.root / MARKER).is_file()

    def create(self, empty: bool = False) -> None:
        """Build the VM: jobs, scripts and config always; the data unless `empty`."""
        if self.exists():
            raise TargetError(f"simulated director sim://{self.name} already exists at {self.root}")
        if self.root.exists() and any(self.root.iterdir()):
            raise TargetError(
                f"cannot create sim://{self.name}: {self.root} exists, is not empty and is "
                "not a simulated director"
            )
        log.info("creating simulated director %s at %s (empty=%s)", self.name, self.root, empty)
        # Built aside and renamed into place, so two bbrx processes creating the same
        # director at once never see, or build on, each other's half-built tree.
        self.root.parent.mkdir(parents=True, exist_ok=True)
        staging = SimDirector(
            Path(tempfile.mkdtemp(prefix=f".{self.name}.creating-", dir=self.root.parent))
        )
        try:
            staging._install_jobs()
            staging.make_empty_dirs()
            if not empty:
                staging._seed_data()
                staging._build_seed_deployments()
            (staging.root / MARKER).write_text(
                "bbrx simulated director; safe to delete with bbrx\n"
            )
            os.chmod(staging.root, 0o755)  # mkdtemp's 0700 is not what a VM root has
            try:
                # Replaces a missing or empty directory; fails if another process won.
                staging.root.rename(self.root)
            except OSError as error:
                if error.errno in (errno.ENOTEMPTY, errno.EEXIST) and self.exists():
                    raise TargetError(
                        f"simulated director sim://{self.name} already exists at {self.root}"
                    ) from None
                raise
        finally:
            shutil.rmtree(staging.root, ignore_errors=True)

    def ensure(self) -> bool:
        """Create the director with its data if it does not exist. True if it was created."""
        if self.exists():
            return False
        try:
            self.create()
        except TargetError:
            if self.exists():  # another process created it meanwhile: that is fine
                return False
            raise
        return True

    def wipe(self) -> None:
        """The disaster: the VM recreated empty. Jobs, config and packages survive.

        Its deployments' VMs keep running (as a real director's do when it dies), but the
        database that listed them is gone until the director is restored.
        """
        self._require_exists()
        log.info("wiping simulated director %s", self.name)
        self.wipe_data()

    def destroy(self) -> None:
        if not (self.root / MARKER).is_file():
            raise TargetError(
                f"refusing to delete {self.root}: it is not a simulated director "
                f"(no {MARKER} marker)"
            )
        log.info("destroying simulated director %s at %s", self.name, self.root)
        shutil.rmtree(self.root)

    def _require_exists(self) -> None:
        if not self.exists():
            raise TargetError(f"simulated director sim://{self.name} does not exist ({self.root})")

    def _install_jobs(self) -> None:
        self.install_jobs([("bosh", job) for job in release_jobs("bosh")])

    def _seed_data(self) -> None:
        db = self.root / DIRECTOR_DB
        db.parent.mkdir(parents=True, exist_ok=True)
        db.write_text(render_dump(default_deployments()))
        write_blobs(self.root / BLOBSTORE_DIR)
        credhub = self.root / CREDHUB_DB
        credhub.parent.mkdir(parents=True, exist_ok=True)
        credhub.write_text(default_credentials())

    def _build_seed_deployments(self) -> None:
        for deployment in self.deployments():
            jobs = SEED_JOBS[deployment.name]
            for vm in deployment.vms:
                group_jobs = [(release, job) for job, release, _ in jobs[vm.group]]
                identity = identity_of(deployment.name, vm)
                build_vm(self.vm_root(identity), identity, group_jobs, seed=True)

    # -- the database --------------------------------------------------------------

    def deployments(self) -> list[Deployment]:
        """What the director's database lists, in its order (nothing if it is gone)."""
        db = self.root / DIRECTOR_DB
        if not db.is_file():
            return []
        return parse_dump(db.read_text())

    def api_locked(self) -> str | None:
        """Why the director's API is unavailable (its job is locked), or None."""
        holder = self.lock_holder("director")
        if holder is None:
            return None
        script, _, pid = holder.partition(" ")
        return f"director API is locked by {script or 'unknown script'} (pid {pid or '?'})"

    def write_deployments(self, deployments: list[Deployment]) -> None:
        """Replace the database with these deployments, atomically."""
        db = self.root / DIRECTOR_DB
        db.parent.mkdir(parents=True, exist_ok=True)
        temporary = db.with_name(f".{db.name}.writing")
        temporary.write_text(render_dump(deployments))
        temporary.replace(db)

    @contextmanager
    def editing(self) -> Iterator[None]:
        """Held while the deployments change: one bbrx process at a time edits them."""
        base = self.root / DEPLOYMENTS_DIR
        base.mkdir(parents=True, exist_ok=True)
        with (base / _EDIT_LOCK).open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- deployment VMs ------------------------------------------------------------

    def vm_root(self, identity: Identity) -> Path:
        return vm_root(self.root, identity.deployment, identity.group, identity.index)

    def deployment_vm(self, deployment: str, vm: Vm) -> DeploymentVm:
        """The VM tree the database row `vm` of `deployment` stands for (it may be gone)."""
        identity = identity_of(deployment, vm)
        return DeploymentVm(self.vm_root(identity), self.name, identity)

    # -- inspection ----------------------------------------------------------------

    def render_vms(self) -> str:
        locked = self.api_locked()
        if locked is not None:
            return f"{locked}: deployments unavailable\n"
        deployments = self.deployments()
        if not deployments:
            return "No deployments (the director database is empty)\n"
        # The rows are the database's; the process state is what each VM would report.
        shown = [
            Deployment(d.name, [self._as_reported(d.name, vm) for vm in d.vms], d.manifest)
            for d in deployments
        ]
        return render_vms_table(shown)

    def _as_reported(self, deployment: str, vm: Vm) -> Vm:
        tree = self.deployment_vm(deployment, vm)
        if not tree.exists():
            state = "unresponsive agent"
        elif locked := tree.locked_jobs():
            state = f"locked: {', '.join(locked)}"
        else:
            return vm
        return dataclasses.replace(vm, process_state=state)

    def data_digest(self) -> dict[str, str]:
        """SHA-256 of every data file, keyed by its path relative to var/vcap/store."""
        return self.store_digest(DATA_STORES)


def identity_of(deployment: str, vm: Vm) -> Identity:
    return Identity(
        deployment=deployment,
        group=vm.group,
        index=vm.index,
        id=vm.instance_id,
        ips=vm.ips,
        az=vm.az or None,
    )
