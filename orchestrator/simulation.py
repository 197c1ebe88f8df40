"""The `bbrx sim ...` commands: thin wrappers over `simulator.SimDirector` for trainees.

Each takes `home` ($BBRX_HOME) first and returns the message the CLI prints; refusals
raise TargetError or UsageError with a hint.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator import settings
from orchestrator.errors import TargetError, UsageError
from orchestrator.state import lease
from simulator.deploy import DeployResult, deploy_text, find_vm
from simulator.deploy import delete_deployment as _delete_deployment
from simulator.deploy import wipe_deployment as _wipe_deployment
from simulator.director import SimDirector, sim_root
from simulator.fleet import DEPLOYMENTS_DIR
from simulator.manifest import read_manifest


def _director(home: Path, name: str, *, must_exist: bool = True) -> SimDirector:
    director = SimDirector(sim_root(home, name))
    if must_exist and not director.exists():
        raise TargetError(
            f"there is no simulated director {name} (looked in {director.root})",
            hint=f"Create it with: bbrx sim create {name}",
        )
    return director


def create(home: Path, name: str, *, empty: bool = False) -> str:
    director = _director(home, name, must_exist=False)
    if director.exists():
        raise TargetError(
            f"simulated director {name} already exists at {director.root}",
            hint=f"Use it as --host sim://{name}, or remove it first: bbrx sim destroy {name}",
        )
    director.create(empty=empty)
    _in_training(home, name, "create", empty=empty)
    if empty:
        return (
            f"Created sim://{name}: an empty director (jobs and scripts, no data) at "
            f"{director.root}"
        )
    deployments = director.deployments()
    count = sum(len(d.vms) for d in deployments)
    return (
        f"Created sim://{name}: a director with demo data at {director.root}, and its "
        f"deployments {', '.join(d.name for d in deployments)} ({count} VMs under "
        f"{director.root / DEPLOYMENTS_DIR})"
    )


def _in_training(
    home: Path, name: str, action: str, deployment: str | None = None, **detail: object
) -> None:
    """A trainee's action on their session's director (or on one of its deployments) goes
    in the session's audit rows."""
    from orchestrator.training.session import record_sim

    record_sim(home, name, action, detail, deployment=deployment)


def vms(home: Path, name: str) -> str:
    answer = _director(home, name).render_vms()
    _in_training(home, name, "vms")
    return answer


def wipe(home: Path, name: str, deployment: str | None = None) -> str:
    """The director's disaster, or with `deployment` that deployment's."""
    if deployment is not None:
        return wipe_deployment(home, name, deployment)
    director = _director(home, name)
    director.wipe()
    _in_training(home, name, "wipe")
    return (
        f"sim://{name} was recreated empty: its jobs and scripts are there, its data is gone.\n"
        f"Restore it with: bbrx director --host sim://{name} restore --artifact-path BACKUP_DIR"
    )


def wipe_deployment(home: Path, name: str, deployment: str) -> str:
    """The deployment's disaster: its VMs recreated empty; the director still lists it."""
    count = _wipe_deployment(_director(home, name), deployment)
    _in_training(home, name, "wipe", deployment=deployment, vms=count)
    return (
        f"Deployment {deployment} on sim://{name} was recreated empty: its {count} VMs "
        "have their jobs and scripts, their data is gone; the director still lists it.\n"
        f"Restore it from a backup of deployment {deployment} (target sim://{name})."
    )


def destroy(home: Path, name: str) -> str:
    director = _director(home, name)
    lease.refuse_if_running(settings.audit_db_path(), f"sim://{name}", "destroy")
    director.destroy()
    _in_training(home, name, "destroy")
    return f"Removed sim://{name} ({director.root})"


def listing(home: Path) -> str:
    base = home / "sim"
    names = (
        sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        if base.is_dir()
        else []
    )
    if not names:
        return "No simulated directors yet. Create one with: bbrx sim create demo"
    lines = []
    for name in names:
        director = SimDirector(base / name)
        locked = director.locked_jobs()
        state = f"locked: {', '.join(locked)}" if locked else "idle"
        lines.append(f"sim://{name}\t{len(director.deployments())} deployments\t{state}")
    return "\n".join(lines)


def fault(
    home: Path,
    name: str,
    job: str,
    script: str,
    spec: str | None,
    *,
    deployment: str | None = None,
    instance: str | None = None,
) -> str:
    """Break (or with no spec, mend) one script of one job: on the director, or with
    `deployment` and `instance` (GROUP/INDEX) on that one VM of a deployment."""
    director = _director(home, name)
    if (deployment is None) != (instance is None):
        raise UsageError(
            "--deployment and --instance go together",
            hint="Give both to break a deployment VM's script (e.g. --deployment redis "
            "--instance redis/0), or neither for the director's.",
        )
    vm = director if deployment is None else find_vm(director, deployment, instance or "")
    if spec is None:
        vm.clear_faults(job, script)
        _in_training(home, name, "fault", job=job, script=script, spec=None, vm=vm.address)
        return f"Cleared the fault of {job}/{script} on {vm.address}"
    vm.set_fault(job, script, spec)
    _in_training(home, name, "fault", job=job, script=script, spec=spec, vm=vm.address)
    return f"{job}/{script} on {vm.address} will now: {spec}"


def deploy(home: Path, name: str, deployment: str, manifest_path: Path) -> str:
    """Add deployment `deployment`, or replace it, from the BOSH manifest at `manifest_path`."""
    director = _director(home, name)
    text = read_manifest(manifest_path)
    result = deploy_text(director, deployment, text, source=str(manifest_path))
    _in_training(home, name, "deploy", deployment=deployment, manifest=str(manifest_path.resolve()))
    where = director.root / DEPLOYMENTS_DIR / deployment
    return f"Deployed {deployment} to sim://{name}: {_summary(result)}, at {where}"


def delete_deployment(home: Path, name: str, deployment: str) -> str:
    director = _director(home, name)
    count = _delete_deployment(director, deployment)
    _in_training(home, name, "delete-deployment", deployment=deployment, vms=count)
    return (
        f"Deleted deployment {deployment} from sim://{name}: {count} VM{'s' * (count != 1)} removed"
    )


def _summary(result: DeployResult) -> str:
    total = result.created + result.kept
    intact = result.kept - result.recreated
    parts = [f"{result.created} new"] if result.created else []
    if intact:
        parts.append(f"{intact} kept with their ids and data")
    if result.recreated:
        parts.append(f"{result.recreated} rebuilt with their ids (their VMs were gone)")
    if result.removed:
        parts.append(f"{result.removed} removed")
    return f"{total} VM{'s' * (total != 1)}" + (f" ({'; '.join(parts)})" if parts else "")
