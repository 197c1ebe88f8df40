"""What a deployment run reads from the BOSH manifest: each job's release, and which jobs
back up once and restore everywhere (bbr-deployment-mode.md §4.5).

bbr reads nothing else. A job missing from the manifest (an add-on, say) still runs, with
no release: a lock constraint naming it by release then never matches it, as in bbr.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.bbr import safeyaml
from orchestrator.errors import TargetError

MANIFEST_CAP = 16 * safeyaml.MIB


@dataclass(frozen=True)
class DeploymentManifest:
    """The manifest's answers, keyed (instance group, job)."""

    text: str
    releases: dict[tuple[str, str], str] = field(default_factory=dict)
    backup_one_restore_all: frozenset[tuple[str, str]] = frozenset()

    def release_of(self, group: str, job: str) -> str | None:
        return self.releases.get((group, job))

    def is_backup_one_restore_all(self, group: str, job: str) -> bool:
        return (group, job) in self.backup_one_restore_all


def parse_manifest(deployment: str, text: str) -> DeploymentManifest:
    """Read the subset bbr reads, from a v2 (`instance_groups`) or v1 (`jobs`) manifest."""
    try:
        data = safeyaml.load(text, cap=MANIFEST_CAP) if text.strip() else {}
    except safeyaml.YamlRefused as exc:
        raise TargetError(
            f"the manifest of deployment {deployment} cannot be read: {exc}",
            hint="Check the deployment's manifest on the director (`bosh manifest`).",
        ) from None
    if not isinstance(data, dict):
        raise TargetError(f"the manifest of deployment {deployment} is not a YAML mapping")
    v2 = "instance_groups" in data
    groups = data.get("instance_groups" if v2 else "jobs") or []
    releases: dict[tuple[str, str], str] = {}
    once: set[tuple[str, str]] = set()
    if not isinstance(groups, list):
        groups = []
    for group in groups:
        if not isinstance(group, dict) or not isinstance(group.get("name"), str):
            continue
        jobs = group.get("jobs" if v2 else "templates") or []
        where = f"instance group {group['name']}"
        group_once = not v2 and _flag(deployment, where, group.get("properties"))
        for job in jobs if isinstance(jobs, list) else []:
            if not isinstance(job, dict) or not isinstance(job.get("name"), str):
                continue
            key = (group["name"], job["name"])
            if isinstance(job.get("release"), str):
                releases[key] = job["release"]
            job_where = f"job {job['name']} of {where}"
            if group_once or (v2 and _flag(deployment, job_where, job.get("properties"))):
                once.add(key)
    return DeploymentManifest(text, releases, frozenset(once))


def _flag(deployment: str, where: str, properties: object) -> bool:
    """`properties.bbr.backup_one_restore_all`; absent is false. Anything but a boolean is
    refused: guessing would change which instance's data the backup keeps."""
    if not isinstance(properties, dict):
        return False
    bbr = properties.get("bbr")
    if not isinstance(bbr, dict):
        return False
    value = bbr.get("backup_one_restore_all", False)
    if not isinstance(value, bool):
        raise TargetError(
            f"the manifest of deployment {deployment}: properties.bbr.backup_one_restore_all "
            f"of {where} is {value!r}, not true or false",
            hint="Fix the manifest and redeploy, then run bbrx again.",
        )
    return value
