"""The default contents of a simulated director: deployments, blobs and credentials.

Everything is derived from fixed seeds so two simulators created apart hold identical
data, which keeps tests and trainee exercises reproducible.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from pathlib import Path

from simulator.director_db import Deployment, Vm
from simulator.seed_manifests import seed_manifest

_SEED = 20260530

# (deployment, [(instance group, count, vm type)])
_LAYOUT: tuple[tuple[str, tuple[tuple[str, int, str], ...]], ...] = (
    (
        "cf",
        (
            ("api", 2, "small"),
            ("uaa", 1, "small"),
            ("router", 2, "minimal"),
            ("diego-cell", 3, "large"),
            ("database", 1, "medium"),
        ),
    ),
    ("redis", (("redis", 3, "medium"),)),
    ("concourse", (("web", 1, "small"), ("worker", 2, "large"))),
)
AZS = ("z1", "z2", "z3")


@dataclass(frozen=True)
class Blob:
    """One blobstore object: what it stands for, its id and its size."""

    kind: str  # "stemcell" or "release"
    name: str
    blob_id: str
    size: int

    @property
    def relative_path(self) -> str:
        # The real director blobstore shards by the first two hex digits of the id.
        return f"{self.blob_id[:2]}/{self.blob_id}"


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def default_deployments() -> list[Deployment]:
    rng = random.Random(_SEED)
    deployments = []
    for subnet, (name, groups) in enumerate(_LAYOUT, start=1):
        vms = []
        host = 10
        for group, count, vm_type in groups:
            for i in range(count):
                vms.append(
                    Vm(
                        instance=f"{group}/{_uuid(rng)}",
                        process_state="running",
                        az=AZS[i % len(AZS)],
                        ips=(f"10.0.{subnet}.{host}",),
                        vm_cid=f"vm-{_uuid(rng)}",
                        vm_type=vm_type,
                        index=i,
                    )
                )
                host += 1
        deployments.append(Deployment(name, vms, seed_manifest(name, groups)))
    return deployments


def seed_manifest_for(deployment: str) -> str | None:
    """The manifest of a seed deployment: what a database dumped by an older simulator,
    which kept no manifests, had deployed (only the seed deployments existed then)."""
    for name, groups in _LAYOUT:
        if name == deployment:
            return seed_manifest(name, groups)
    return None


def default_blobs() -> list[Blob]:
    rng = random.Random(_SEED + 1)
    blobs = [
        Blob("stemcell", "bosh-warden-boshlite-ubuntu-jammy-go_agent/1.406", _uuid(rng), 1 << 20)
    ]
    for release in ("cf-networking/3.46.0", "routing/0.297.0", "redis/15.2.1", "concourse/7.11.2"):
        blobs.append(Blob("release", release, _uuid(rng), rng.randint(50, 300) * 1024))
    return blobs


def write_blobs(store: Path) -> list[Blob]:
    """Write the default blobs (deterministic pseudo-random bytes) under `store`."""
    blobs = default_blobs()
    for blob in blobs:
        path = store / blob.relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        # Seeding per blob keeps each blob's bytes independent of the others' sizes.
        path.write_bytes(random.Random(f"{_SEED}:{blob.blob_id}").randbytes(blob.size))
    return blobs


def default_credentials() -> str:
    """A fake credhub database. Values are obviously not secrets."""
    lines = [
        "# bbr-sim credhub database (simulated; every value here is FAKE)",
        "credentials:",
    ]
    for name in (
        "/bosh-sim/cf/cf_admin_password",
        "/bosh-sim/cf/uaa_admin_client_secret",
        "/bosh-sim/redis/redis_password",
        "/bosh-sim/concourse/atc_encryption_key",
    ):
        lines += [
            f"- name: {name}",
            "  type: password",
            f"  value: not-a-secret-{name.rsplit('/', 1)[-1].replace('_', '-')}",
        ]
    return "\n".join(lines) + "\n"
