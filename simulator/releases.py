"""The releases the simulator has bbr scripts for, and installing their jobs on a VM tree.

Scripts are package data under `simulator/jobs/<release>/<job>/` (`bin/bbr/*`,
`config/metadata.yml`), with `simulator/jobs/lib.sh` shared by all of them. A job of any
other release is installed as a bare job directory with no `bin/bbr`: what a release
without bbr support looks like on a VM, so bbr finds no scripts there.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE_DIR = Path("var/vcap/packages/bbr-sim")
_JOBS_DIR = Path("var/vcap/jobs")


def jobs_source() -> Path:
    # A path next to this module rather than importlib.resources.files("simulator"): the
    # latter fails when an editable install exposes the package as a namespace package.
    return Path(__file__).resolve().parent / "jobs"


def job_source(release: str, job: str) -> Path | None:
    """The package directory of the job's scripts, or None if the simulator has none."""
    path = jobs_source() / release / job
    return path if (path / "bin/bbr").is_dir() else None


def release_jobs(release: str) -> list[str]:
    """The jobs of `release` that have scripts, by name."""
    base = jobs_source() / release
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if job_source(release, p.name) is not None)


def install_lib(root: Path) -> None:
    package_dir = root / PACKAGE_DIR
    package_dir.mkdir(parents=True, exist_ok=True)
    (package_dir / "lib.sh").write_bytes((jobs_source() / "lib.sh").read_bytes())


def install_job(root: Path, release: str, job: str) -> None:
    """Install the job's scripts and config (or an empty job directory) under `root`."""
    dest = root / _JOBS_DIR / job
    source = job_source(release, job)
    if source is None:
        log.debug("no bbr scripts for %s/%s: installing an empty job directory", release, job)
        dest.mkdir(parents=True, exist_ok=True)
        return
    _copy_tree(source, dest)
    # Set modes explicitly: wheels and resource readers do not keep exec bits.
    for script in (dest / "bin/bbr").iterdir():
        script.chmod(0o755)


def _copy_tree(source: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.name == "__pycache__":
            continue
        if entry.is_dir():
            _copy_tree(entry, dest / entry.name)
        else:
            (dest / entry.name).write_bytes(entry.read_bytes())
