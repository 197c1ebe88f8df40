"""The data a deployment job keeps in its VM's store, seeded deterministically.

Each job with bbr scripts that back something up owns some files under
`var/vcap/store/`; its backup script copies exactly those. The bytes come from a seed
key (deployment, group, index, job) so two simulators hold identical data and tests can
compare digests; a job whose data is the same on every instance of its group (the
`backup_one_restore_all` kind) leaves the index out of its key.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

STORE_DIR = Path("var/vcap/store")
_SEED = 20260530


def _rng(key: str) -> random.Random:
    return random.Random(f"{_SEED}:{key}")


def _write(path: Path, data: bytes) -> None:
    # Only what is missing: a redeploy that adds a job to a VM keeps the data already there.
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _redis(store: Path, key: str) -> None:
    rng = _rng(key)
    pairs = [(f"session:{rng.getrandbits(48):012x}", rng.getrandbits(64)) for _ in range(40)]
    # An RDB file starts with its magic and version; the rest stands for the keyspace.
    _write(store / "redis/dump.rdb", b"REDIS0011" + rng.randbytes(rng.randint(4096, 8192)))
    aof = "".join(
        f"*3\r\n$3\r\nSET\r\n${len(k)}\r\n{k}\r\n${len(str(v))}\r\n{v}\r\n" for k, v in pairs
    )
    _write(store / "redis/appendonly.aof", aof.encode())


def _database(relative: str, table: str, rows: int) -> Callable[[Path, str], None]:
    """A seeder writing a small SQL dump of one table at `relative` under the store."""

    def seed(store: Path, key: str) -> None:
        rng = _rng(key)
        lines = [f"-- bbr-sim {table} dump (simulated)", f"CREATE TABLE {table} (id, guid);"]
        lines += [
            f"INSERT INTO {table} VALUES ({n}, '{rng.getrandbits(128):032x}');"
            for n in range(1, rows + 1)
        ]
        _write(store / relative, ("\n".join(lines) + "\n").encode())

    return seed


def _cc_blobs(store: Path, key: str) -> None:
    rng = _rng(key)
    for _ in range(3):
        blob_id = f"{rng.getrandbits(128):032x}"
        _write(store / f"cc-blobs/droplets/{blob_id[:2]}/{blob_id}", rng.randbytes(4096))


# (release, job) -> (seeder, whether its data is the same on every instance of the group)
_SEEDERS: dict[tuple[str, str], tuple[Callable[[Path, str], None], bool]] = {
    ("redis", "redis-server"): (_redis, False),
    ("capi", "cc-blobs"): (_cc_blobs, True),
    ("capi", "bbr-cloudcontrollerdb"): (_database("pxc-mysql/ccdb.sql", "apps", 60), False),
    ("uaa", "bbr-uaadb"): (_database("pxc-mysql/uaadb.sql", "users", 30), False),
    ("credhub", "bbr-credhubdb"): (_database("pxc-mysql/credhubdb.sql", "credentials", 20), False),
    ("concourse", "bbr-atcdb"): (_database("postgres/atc.sql", "builds", 50), False),
}


def seed_job_data(
    root: Path, release: str, job: str, *, deployment: str, group: str, index: int
) -> None:
    """Write the job's seed data into the VM at `root`, where it is not there yet."""
    entry = _SEEDERS.get((release, job))
    if entry is None:
        return
    seeder, shared = entry
    where = f"{deployment}/{group}" if shared else f"{deployment}/{group}/{index}"
    seeder(root / STORE_DIR, f"{where}/{job}")
