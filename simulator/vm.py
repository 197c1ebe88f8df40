"""SimVm: one simulated VM kept as a directory tree, whatever it runs.

The tree mirrors the VM's filesystem (`var/vcap/jobs`, `var/vcap/store`, ...) and is the
same for the director and for a deployment's VMs: job scripts, lock files, fault files and
the call log all live at the same paths relative to the VM's root, because lib.sh finds
that root from each script's own path. This class builds, breaks and inspects a tree; it
never plays a script's part.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from orchestrator.errors import TargetError
from orchestrator.transport.instance import SCRIPT_NAMES
from simulator.calllog import CALL_LOG, ScriptCallRecord, parse_call_log
from simulator.faults import TRANSFER, calls_file, validate_fault, validate_transfer_fault
from simulator.releases import install_job, install_lib

log = logging.getLogger(__name__)

JOBS_DIR = Path("var/vcap/jobs")
STORE_DIR = Path("var/vcap/store")
SYS_DIR = Path("var/vcap/sys")
RUN_DIR = SYS_DIR / "run/bbr-sim"
LOCKS_DIR = RUN_DIR / "locks"
FAULTS_DIR = RUN_DIR / "faults"
WORK_DIR = STORE_DIR / "bbr-backup"


class SimVm:
    """One VM tree rooted at `root`, named `address` in messages.

    `group`, `index` and `instance_id` are the identity bbr gives the VM: the director is
    `bosh`/`0` with no instance id; a deployment VM carries its own (see fleet.DeploymentVm).
    """

    group = "bosh"
    index = "0"
    instance_id: str | None = None

    def __init__(self, root: Path, address: str) -> None:
        self.root = Path(root)
        self.address = address

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    def missing_hint(self) -> str:
        """What to do when the tree is not there (shown by SimInstance.discover)."""
        return "Recreate it with `bbrx sim create`."

    # -- building ------------------------------------------------------------------

    def install_jobs(self, jobs: list[tuple[str, str]]) -> None:
        """Install lib.sh and each (release, job): its scripts if the simulator has them,
        else an empty job directory (a release without bbr support)."""
        install_lib(self.root)
        for release, job in jobs:
            install_job(self.root, release, job)

    def make_empty_dirs(self) -> None:
        (self.root / STORE_DIR).mkdir(parents=True, exist_ok=True)
        (self.root / SYS_DIR).mkdir(parents=True, exist_ok=True)

    def wipe_data(self) -> None:
        """The VM recreated empty: jobs, config and packages survive; store and sys do not."""
        for relative in (STORE_DIR, SYS_DIR):
            shutil.rmtree(self.root / relative, ignore_errors=True)
        self.make_empty_dirs()

    # -- inspection ----------------------------------------------------------------

    def jobs(self) -> list[str]:
        jobs_dir = self.root / JOBS_DIR
        if not jobs_dir.is_dir():
            return []
        return sorted(p.name for p in jobs_dir.iterdir() if p.is_dir())

    def locked_jobs(self) -> list[str]:
        locks = self.root / LOCKS_DIR
        if not locks.is_dir():
            return []
        return sorted(p.name for p in locks.iterdir() if p.is_file())

    def lock_holder(self, job: str) -> str | None:
        """What the job's lock file says (`SCRIPT PID`), or None when it is not locked."""
        path = self.root / LOCKS_DIR / job
        return path.read_text(errors="replace").strip() if path.is_file() else None

    def run_in_progress(self) -> str | None:
        """Why the VM looks busy with a bbr run (a lock held, bbr's work dir), or None."""
        locked = self.locked_jobs()
        if locked:
            return f"{', '.join(locked)} locked"
        if (self.root / WORK_DIR).exists():
            return f"{WORK_DIR} exists"
        return None

    def calls(self) -> list[ScriptCallRecord]:
        path = self.root / CALL_LOG
        if not path.is_file():
            return []
        return parse_call_log(path.read_text(errors="replace"))

    def clear_calls(self) -> None:
        (self.root / CALL_LOG).unlink(missing_ok=True)

    def store_digest(self, stores: tuple[str, ...] | None = None) -> dict[str, str]:
        """SHA-256 of every data file, keyed by its path relative to var/vcap/store: of the
        named stores, or of the whole store but bbr's work dir."""
        store = self.root / STORE_DIR
        if stores is None:
            names = sorted(
                p.name for p in store.glob("*") if p.is_dir() and p.name != WORK_DIR.name
            )
        else:
            names = list(stores)
        digest: dict[str, str] = {}
        for name in names:
            for dirpath, dirnames, filenames in os.walk(store / name):
                dirnames.sort()
                for filename in sorted(filenames):
                    path = Path(dirpath) / filename
                    if path.is_file() and not path.is_symlink():
                        digest[path.relative_to(store).as_posix()] = sha256(path)
        return digest

    # -- faults --------------------------------------------------------------------

    def set_fault(self, job: str, script: str, spec: str) -> None:
        """Make `job`'s `script` misbehave on its next runs (until cleared)."""
        jobs = self.jobs()
        if job not in jobs:
            raise TargetError(f"no job {job!r} on {self.address}", hint=f"Jobs: {', '.join(jobs)}")
        scripts = self.root / JOBS_DIR / job / "bin/bbr"
        if script == TRANSFER:
            normalised = validate_transfer_fault(spec)
        elif script not in SCRIPT_NAMES or not (scripts / script).is_file():
            present = sorted(p.name for p in scripts.iterdir()) if scripts.is_dir() else []
            raise TargetError(
                f"job {job!r} on {self.address} has no {script!r} script",
                hint=f"Scripts of {job}: {', '.join(present) or 'none'} "
                f"(or '{TRANSFER}' for the copy of its artifact)",
            )
        else:
            normalised = validate_fault(spec)
        path = self.root / FAULTS_DIR / job / script
        path.parent.mkdir(parents=True, exist_ok=True)
        calls_file(path).unlink(missing_ok=True)  # a `call N` fault counts from now
        path.write_text(normalised + "\n")
        log.info("fault set on %s %s/%s: %s", self.address, job, script, normalised)

    def clear_faults(self, job: str | None = None, script: str | None = None) -> None:
        """Clear every fault, a job's faults, or one script's fault."""
        target = self.root / FAULTS_DIR
        if job is not None:
            target = target / job
            if script is not None:
                target.joinpath(script).unlink(missing_ok=True)
                calls_file(target / script).unlink(missing_ok=True)
                return
        shutil.rmtree(target, ignore_errors=True)

    def faults(self) -> dict[tuple[str, str], str]:
        """Every fault in place, keyed (job, script)."""
        faults_dir = self.root / FAULTS_DIR
        result: dict[tuple[str, str], str] = {}
        if faults_dir.is_dir():
            for path in sorted(faults_dir.glob("*/*")):
                if path.is_file() and not path.name.startswith("."):  # not a call count
                    result[(path.parent.name, path.name)] = path.read_text().strip()
        return result


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
