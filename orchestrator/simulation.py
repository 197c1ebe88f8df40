"""The `bbrx sim ...` commands: thin wrappers over `simulator.SimDirector` for trainees."""

from __future__ import annotations

from pathlib import Path

from orchestrator.errors import TargetError
from simulator.director import SimDirector, sim_root


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
    what = "an empty director (jobs and scripts, no data)" if empty else "a director with demo data"
    return f"Created sim://{name}: {what} at {director.root}"


def vms(home: Path, name: str) -> str:
    return _director(home, name).render_vms()


def wipe(home: Path, name: str) -> str:
    director = _director(home, name)
    director.wipe()
    return (
        f"sim://{name} was recreated empty: its jobs and scripts are there, its data is gone.\n"
        f"Restore it with: bbrx director --host sim://{name} restore --artifact-path BACKUP_DIR"
    )


def destroy(home: Path, name: str) -> str:
    director = _director(home, name)
    director.destroy()
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


def fault(home: Path, name: str, job: str, script: str, spec: str | None) -> str:
    director = _director(home, name)
    if spec is None:
        director.clear_faults(job, script)
        return f"Cleared the fault of {job}/{script} on sim://{name}"
    director.set_fault(job, script, spec)
    return f"{job}/{script} on sim://{name} will now: {spec}"
