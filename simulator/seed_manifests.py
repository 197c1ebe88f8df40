"""The seed deployments' BOSH manifests: which jobs of which releases each group runs.

Modelled on the real deployments (cf-deployment with its backup-restore ops file, the
redis and concourse BOSH releases), cut down to what bbr reads. The manifests carry the
fields a real one has around them too (stemcells, azs, vm types, networks) so they read
like the real thing; the simulator's manifest reader ignores those.
"""

from __future__ import annotations

import yaml

# (job, release, backup_one_restore_all) per instance group.
SeedJob = tuple[str, str, bool]

SEED_JOBS: dict[str, dict[str, tuple[SeedJob, ...]]] = {
    "cf": {
        "api": (("cloud_controller_ng", "capi", False), ("cc-blobs", "capi", True)),
        "uaa": (("uaa", "uaa", False),),
        "router": (("gorouter", "routing", False),),
        "diego-cell": (("rep", "diego", False), ("garden", "garden-runc", False)),
        "database": (
            ("pxc-mysql", "pxc", False),
            ("credhub", "credhub", False),
            ("bbr-cloudcontrollerdb", "capi", False),
            ("bbr-uaadb", "uaa", False),
            ("bbr-credhubdb", "credhub", False),
        ),
    },
    "redis": {"redis": (("redis-server", "redis", False),)},
    "concourse": {
        "web": (("web", "concourse", False), ("bbr-atcdb", "concourse", False)),
        "worker": (("worker", "concourse", False),),
    },
}

_VERSIONS = {
    "capi": "1.190.0",
    "uaa": "77.20.0",
    "routing": "0.297.0",
    "diego": "2.99.0",
    "garden-runc": "1.53.0",
    "pxc": "1.2.0",
    "credhub": "2.12.70",
    "redis": "15.2.1",
    "concourse": "7.11.2",
}


def seed_manifest(deployment: str, groups: tuple[tuple[str, int, str], ...]) -> str:
    """The manifest of a seed deployment laid out as `groups` ((group, count, vm type))."""
    jobs = SEED_JOBS[deployment]
    releases: list[str] = []
    instance_groups = []
    for group, count, vm_type in groups:
        group_jobs = []
        for job, release, one_restore_all in jobs[group]:
            entry: dict[str, object] = {"name": job, "release": release}
            if one_restore_all:
                entry["properties"] = {"bbr": {"backup_one_restore_all": True}}
            group_jobs.append(entry)
            if release not in releases:
                releases.append(release)
        instance_groups.append(
            {
                "name": group,
                "instances": count,
                "azs": ["z1", "z2", "z3"],
                "vm_type": vm_type,
                "stemcell": "default",
                "networks": [{"name": "default"}],
                "jobs": group_jobs,
            }
        )
    manifest = {
        "name": deployment,
        "releases": [{"name": r, "version": _VERSIONS[r]} for r in releases],
        "stemcells": [{"alias": "default", "os": "ubuntu-jammy", "version": "1.406"}],
        "update": {
            "canaries": 1,
            "max_in_flight": 1,
            "canary_watch_time": "1000-60000",
            "update_watch_time": "1000-60000",
        },
        "instance_groups": instance_groups,
    }
    return yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False)
