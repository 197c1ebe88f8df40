"""Deployments on the simulator, driven in-process: bbr's order across instances, its
artifact, restore's checks, backup_one_restore_all, and faults on one instance of many.

What is asserted is what an operator (or bbr) would see: the files of the artifact, the
scripts each VM's own call log says ran and in what order, the data on each VM, the
audit rows and their instance columns. The CLI as a process is in test_deployment_cli.py.
"""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from audit import AuditLog, verify_log
from orchestrator import simulation
from orchestrator.bbr import artifact
from orchestrator.engine.run import Identity, Timeouts
from orchestrator.errors import RunFailed
from orchestrator.operations.procedures import Request, run_deployment, run_director
from orchestrator.transport.targets import parse_director, parse_host
from simulator.calllog import CALL_LOG, parse_call_log
from simulator.director import SimDirector, sim_root
from tests import live_world
from tests.live_world import LiveWorld

FIXTURES = Path(__file__).resolve().parents[2] / "shared/fixtures/bbr"


# The worlds a home's director is reached in, by home: live ones only (sim is the default).
_LIVE: dict[Path, LiveWorld] = {}


@pytest.fixture(params=["sim", "live"])
def home(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A simulated director `demo`, reached through the simulator, or as a live BOSH
    Director (tests/live_world.py: the fake Director, UAA and one real sshd per VM)."""
    SimDirector(sim_root(tmp_path, "demo")).create()
    if request.param == "sim":
        yield tmp_path
        return
    with live_world.serving(request, tmp_path, tmp_path) as world:
        _LIVE[tmp_path] = world
        try:
            yield tmp_path
        finally:
            del _LIVE[tmp_path]


def transport(home: Path) -> str:
    return "live" if home in _LIVE else "sim"


def address(home: Path) -> str:
    """How bbrx names the director the home's runs reach."""
    return _LIVE[home].fake.url if home in _LIVE else "sim://demo"


def request(
    home: Path,
    operation: str,
    deployment: str,
    artifact_path: Path | None = None,
    **changes: object,
) -> Request:
    world = _LIVE.get(home)
    base = Request(
        operation=operation,
        target=world.target if world else parse_director("sim://demo"),
        identity=Identity("tester"),
        audit_db=home / "audit.db",
        home=home,
        artifact_path=artifact_path,
        deployment=deployment,
        timeouts=Timeouts(metadata=20, lock=20, backup=60, unlock=20, restore=60),
        **(world.credentials() if world else {}),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def vm(home: Path, deployment: str, name: str) -> Path:
    group, index = name.split("/")
    return home / "sim/demo/deployments" / deployment / group / index


def calls(root: Path) -> list:
    path = root / CALL_LOG
    return parse_call_log(path.read_text()) if path.is_file() else []


def store_digest(root: Path) -> dict[str, str]:
    store = root / "var/vcap/store"
    digest = {}
    for path in sorted(store.rglob("*")):
        if path.is_file() and "bbr-backup" not in path.relative_to(store).parts:
            digest[str(path.relative_to(store))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def locks_held(root: Path) -> list[str]:
    locks = root / "var/vcap/sys/run/bbr-sim/locks"
    return sorted(p.name for p in locks.iterdir()) if locks.is_dir() else []


def backup(home: Path, deployment: str, **changes: object) -> Path:
    out = home / "out"
    out.mkdir(exist_ok=True)
    outcome = run_deployment(request(home, "backup", deployment, out, **changes))
    assert outcome.artifact is not None
    return outcome.artifact


REDIS = ["redis/0", "redis/1", "redis/2"]


def test_a_deployment_backup_is_bbrs_artifact_with_every_instance(home: Path):
    published = backup(home, "redis")

    assert published.name.startswith("redis_")
    assert sorted(p.name for p in published.iterdir()) == [
        "bbrx-audit.yml",
        "metadata",
        "redis-0-redis-server.tar",
        "redis-1-redis-server.tar",
        "redis-2-redis-server.tar",
    ]
    text = (published / "metadata").read_text()
    assert 'index: "1"' in text  # bbr writes the index as a string
    document = yaml.safe_load(text)
    assert [(i["name"], i["index"]) for i in document["instances"]] == [
        ("redis", "0"),
        ("redis", "1"),
        ("redis", "2"),
    ]
    for instance in document["instances"]:
        [entry] = instance["artifacts"]
        assert entry["name"] == "redis-server"
        assert set(entry["checksums"]) == {"./dump.rdb", "./appendonly.aof"}
    artifact.validate(published)  # every tar against its checksums
    # Each VM's data, byte for byte, in its own tar.
    for name in REDIS:
        group, index = name.split("/")
        with tarfile.open(published / f"{group}-{index}-redis-server.tar") as tar:
            member = tar.extractfile("./dump.rdb")
            assert member is not None
            data = member.read()
        assert data == (vm(home, "redis", name) / "var/vcap/store/redis/dump.rdb").read_bytes()
    for name in REDIS:
        assert locks_held(vm(home, "redis", name)) == []
        assert not (vm(home, "redis", name) / "var/vcap/store/bbr-backup").exists()


def test_locks_span_every_instance_before_any_backup_and_unlocks_follow(home: Path):
    backup(home, "redis")
    events = [(c, name) for name in REDIS for c in calls(vm(home, "redis", name))]

    def times(script: str, event: str) -> list[float]:
        return [c.time for c, _ in events if (c.script, c.event) == (script, event)]

    assert len(times("pre-backup-lock", "start")) == 3
    assert max(times("pre-backup-lock", "exit")) < min(times("backup", "start"))
    assert max(times("backup", "exit")) < min(times("post-backup-unlock", "start"))
    assert len(times("post-backup-unlock", "exit")) == 3


def test_every_job_row_names_its_instance_and_the_log_verifies(home: Path):
    backup(home, "redis")
    ids = {
        name: yaml.safe_load((vm(home, "redis", name) / "instance.yml").read_text())["id"]
        for name in REDIS
    }
    with AuditLog(home / "audit.db", readonly=True) as audit:
        [run] = audit.runs()
        rows = audit.timeline(run.run_id)
    assert run.target == f"{address(home)}/redis"
    job_rows = [r for r in rows if r["job"]]
    assert job_rows
    for row in job_rows:
        name = f"{row['instance_group']}/{row['instance_index']}"
        assert name in REDIS
        assert row["instance_id"] == ids[name]
    locked = {
        f"{r['instance_group']}/{r['instance_index']}" for r in job_rows if r["trigger"] == "lock"
    }
    assert locked == set(REDIS)
    assert verify_log(home / "audit.db").ok


def test_a_wiped_deployment_is_restored_instance_by_instance(home: Path):
    before = {name: store_digest(vm(home, "redis", name)) for name in REDIS}
    published = backup(home, "redis")
    simulation.wipe(home, "demo", deployment="redis")
    assert all(store_digest(vm(home, "redis", name)) != before[name] for name in REDIS)

    run_deployment(request(home, "restore", "redis", published))

    assert {name: store_digest(vm(home, "redis", name)) for name in REDIS} == before
    for name in REDIS:
        ran = [(c.script, c.event) for c in calls(vm(home, "redis", name))]
        assert ran[-6:] == [
            ("pre-restore-lock", "start"),
            ("pre-restore-lock", "exit"),
            ("restore", "start"),
            ("restore", "exit"),
            ("post-restore-unlock", "start"),
            ("post-restore-unlock", "exit"),
        ]
        assert locks_held(vm(home, "redis", name)) == []


def test_cf_locks_the_api_before_its_databases_and_backs_up_cc_blobs_once(home: Path):
    published = backup(home, "cf")
    api = [vm(home, "cf", "api/0"), vm(home, "cf", "api/1")]
    database = vm(home, "cf", "database/0")

    cc_lock = ("cloud_controller_ng", "pre-backup-lock", "exit")
    cc_locked = [
        c.time for root in api for c in calls(root) if (c.job, c.script, c.event) == cc_lock
    ]
    db_backups = [c.time for c in calls(database) if c.script == "backup" and c.event == "start"]
    assert len(cc_locked) == 2 and db_backups
    assert max(cc_locked) < min(db_backups)
    names = sorted(p.name for p in published.iterdir())
    # The bootstrap api's cc-blobs is the custom artifact; the other api's is ordinary.
    assert "cc-blobs-capi-backup-one-restore-all.tar" in names
    assert "api-1-cc-blobs.tar" in names
    assert "api-0-cc-blobs.tar" not in names
    document = yaml.safe_load((published / "metadata").read_text())
    assert [c["name"] for c in document["custom_artifacts"]] == [
        "cc-blobs-capi-backup-one-restore-all"
    ]
    artifact.validate(published)

    simulation.wipe(home, "demo", deployment="cf")
    run_deployment(request(home, "restore", "cf", published))
    # Every api VM restores cc-blobs from the one custom artifact.
    for root in api:
        [restore] = [
            c for c in calls(root) if (c.job, c.script, c.event) == ("cc-blobs", "restore", "start")
        ]
        assert restore.extra["BBR_ARTIFACT_DIRECTORY"].endswith(
            "/bbr-backup/cc-blobs-capi-backup-one-restore-all/"
        )


def test_with_manifest_saves_the_manifest_as_the_director_gave_it(home: Path):
    from simulator.deployments import SimBosh

    published = backup(home, "concourse", with_manifest=True)
    assert (published / "manifest.yml").read_text() == SimBosh(home, "demo").manifest("concourse")
    artifact.read_manifest(published)  # a manifest.yml does not upset the reader


def test_unsafe_lock_free_runs_no_lock_script_and_the_audit_says_so(home: Path, caplog):
    # cf's databases back up without locks of their own; its API would be locked first.
    backup(home, "cf", unsafe_lock_free=True)

    for name in ("api/0", "api/1", "database/0"):
        scripts = {c.script for c in calls(vm(home, "cf", name))}
        assert "pre-backup-lock" not in scripts and "post-backup-unlock" not in scripts, name
    assert "backup" in {c.script for c in calls(vm(home, "cf", "database/0"))}
    assert "--unsafe-lock-free: NOT locking" in caplog.text
    assert "cloud_controller_ng on api/0" in caplog.text
    with AuditLog(home / "audit.db", readonly=True) as audit:
        rows = audit.timeline(audit.runs()[-1].run_id)
    assert rows[0]["detail"]["unsafe_lock_free"] is True
    [skipped] = [r for r in rows if r["job"] is None and r["to_state"] == "backing_up"]
    assert "cloud_controller_ng on api/1" in skipped["detail"]["locks_skipped"]


def test_a_job_that_refuses_to_back_up_unlocked_fails_an_unsafe_lock_free_backup(home: Path):
    out = home / "out"
    out.mkdir()
    with pytest.raises(RunFailed) as failed:
        run_deployment(request(home, "backup", "redis", out, unsafe_lock_free=True))
    assert "is not locked" in str(failed.value.errors[0])
    assert list(out.iterdir()) == []


# --- faults on one instance of many --------------------------------------------------------


def _every_lock_was_unlocked(home: Path, deployment: str, names: list[str]) -> None:
    for name in names:
        root = vm(home, deployment, name)
        ran = calls(root)
        locked = {c.job for c in ran if (c.script, c.event) == ("pre-backup-lock", "start")}
        unlocked = {c.job for c in ran if (c.script, c.event) == ("post-backup-unlock", "exit")}
        assert locked <= unlocked, name
        assert locks_held(root) == [], name
        assert not (root / "var/vcap/store/bbr-backup").exists(), name


def test_the_third_vms_lock_script_hangs_and_every_instance_is_unlocked(home: Path):
    simulation.fault(
        home,
        "demo",
        "redis-server",
        "pre-backup-lock",
        "hang",
        deployment="redis",
        instance="redis/2",
    )
    out = home / "out"
    out.mkdir()
    with pytest.raises(RunFailed) as failed:
        run_deployment(
            request(home, "backup", "redis", out, timeouts=Timeouts(lock=1.5, metadata=20))
        )
    assert failed.value.exit_code & 4  # bbr's lock bit
    assert "redis-server on redis/2" in str(failed.value.errors[0]) or any(
        "redis/2" in str(e) for e in failed.value.errors
    )
    _every_lock_was_unlocked(home, "redis", REDIS)
    assert list(out.iterdir()) == []  # nothing incomplete left, nothing published
    assert verify_log(home / "audit.db").ok


def test_one_broken_drain_fails_the_backup_and_leaves_nothing_locked(home: Path):
    simulation.fault(
        home,
        "demo",
        "redis-server",
        "transfer",
        "fail connection reset",
        deployment="redis",
        instance="redis/1",
    )
    out = home / "out"
    out.mkdir()
    with pytest.raises(RunFailed) as failed:
        run_deployment(request(home, "backup", "redis", out))
    assert any("connection reset" in str(e) for e in failed.value.errors)
    _every_lock_was_unlocked(home, "redis", REDIS)
    assert list(out.iterdir()) == []
    assert verify_log(home / "audit.db").ok


# --- restore's checks ----------------------------------------------------------------------


def test_a_director_backup_is_refused_by_a_deployment_and_the_reverse(home: Path):
    out = home / "out"
    out.mkdir()
    director = run_director(
        replace(
            request(home, "backup", "redis", out), target=parse_host("sim://demo"), deployment=None
        )
    ).artifact
    assert director is not None
    with pytest.raises(RunFailed) as failed:
        run_deployment(request(home, "restore", "redis", director))
    assert "is a director backup" in str(failed.value.errors[0])

    deployment = backup(home, "redis")
    with pytest.raises(RunFailed) as failed:
        run_director(
            replace(
                request(home, "restore", "redis", deployment),
                target=parse_host("sim://demo"),
                deployment=None,
            )
        )
    assert "is a deployment backup (it holds redis/0, redis/1, redis/2)" in str(
        failed.value.errors[0]
    )
    for name in REDIS:
        assert "pre-restore-lock" not in {c.script for c in calls(vm(home, "redis", name))}


def test_a_backup_with_more_instances_than_the_deployment_is_refused(home: Path, tmp_path: Path):
    published = backup(home, "redis")
    manifest = yaml.safe_load(simulation_manifest(home, "redis"))
    manifest["instance_groups"][0]["instances"] = 2
    path = tmp_path / "smaller.yml"
    path.write_text(yaml.safe_dump(manifest))
    simulation.deploy(home, "demo", "redis", path)

    with pytest.raises(RunFailed) as failed:
        run_deployment(request(home, "restore", "redis", published))
    message = str(failed.value.errors[0])
    assert "does not match the structure of the provided backup" in message
    assert "redis/2" in message
    for name in ["redis/0", "redis/1"]:
        assert "pre-restore-lock" not in {c.script for c in calls(vm(home, "redis", name))}


def simulation_manifest(home: Path, deployment: str) -> str:
    from simulator.deployments import SimBosh

    return SimBosh(home, "demo").manifest(deployment)


# --- backups bbr wrote, or written to bbr's schema by hand --------------------------------

RECORDER = """#!/usr/bin/env bash
# Keeps what the restore was given, outside the work dir (which the cleanup removes), in
# the VM's /var/vcap: the script's own path, which is /var/vcap/jobs/JOB/bin/bbr/ on every
# transport (an sshd's VM sees its tree there), is four levels below it.
set -euo pipefail
root="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../../../.." && pwd)"
mkdir -p "$root/restored"
cp -R "$BBR_ARTIFACT_DIRECTORY." "$root/restored/"
printf '%s\\n' "$BBR_ARTIFACT_DIRECTORY" > "$root/restored.from"
"""


def plant(root: Path, job: str, script: str, text: str) -> None:
    path = root / "var/vcap/jobs" / job / "bin/bbr" / script
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def landed(root: Path) -> dict[str, str]:
    base = root / "var/vcap/restored"
    return {
        f"./{p.relative_to(base).as_posix()}": hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(base.rglob("*"))
        if p.is_file()
    }


def test_bbrs_own_deployment_backup_restores_onto_a_deployment_of_its_shape(
    home: Path, tmp_path: Path
):
    fixture = FIXTURES / "redis-backup"
    # The fixture's own manifest: groups redis x2 and other-redis x1, job redis-server of
    # release redis-test, which the simulator has no scripts for: the test plants them.
    simulation.deploy(home, "demo", "redis-dev-2", fixture / "manifest.yml")
    names = ["redis/0", "redis/1", "other-redis/0"]
    for name in names:
        plant(vm(home, "redis-dev-2", name), "redis-server", "restore", RECORDER)

    run_deployment(request(home, "restore", "redis-dev-2", fixture))

    document = yaml.safe_load((fixture / "metadata").read_text())
    for entry in document["instances"]:
        root = vm(home, "redis-dev-2", f"{entry['name']}/{entry['index']}")
        [job] = entry["artifacts"]
        assert landed(root) == job["checksums"]
        recorded = (root / "var/vcap/restored.from").read_text().strip()
        assert recorded.endswith("/bbr-backup/redis-server/")
        assert not (root / "var/vcap/store/bbr-backup").exists()
    assert verify_log(home / "audit.db").ok


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        root = tarfile.TarInfo("./")
        root.type = tarfile.DIRTYPE
        root.mode = 0o755
        tar.addfile(root)
        for name, data in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_a_hand_written_bbr_deployment_backup_with_a_custom_artifact_restores(
    home: Path, tmp_path: Path
):
    manifest = {
        "name": "kv",
        "releases": [{"name": "kv", "version": "1.0"}],
        "instance_groups": [
            {
                "name": "store",
                "instances": 2,
                "jobs": [
                    {"name": "kv-data", "release": "kv"},
                    {
                        "name": "kv-config",
                        "release": "kv",
                        "properties": {"bbr": {"backup_one_restore_all": True}},
                    },
                ],
            },
            {"name": "proxy", "instances": 1, "jobs": [{"name": "kv-proxy", "release": "kv"}]},
        ],
    }
    manifest_path = tmp_path / "kv.yml"
    manifest_path.write_text(yaml.safe_dump(manifest))
    simulation.deploy(home, "demo", "kv", manifest_path)
    for name in ["store/0", "store/1"]:
        root = vm(home, "kv", name)
        for job in ("kv-data", "kv-config"):
            plant(root, job, "restore", RECORDER.replace("restored", f"restored-{job}"))
    backup_dir = tmp_path / "kv_20260821T080000Z"
    backup_dir.mkdir()
    instances = []
    for index in ("0", "1"):
        files = {f"shard-{index}.db": f"shard {index} data".encode()}
        (backup_dir / f"store-{index}-kv-data.tar").write_bytes(_tar(files))
        sums = {f"./{k}": hashlib.sha256(v).hexdigest() for k, v in files.items()}
        instances.append(
            {"name": "store", "index": index, "artifacts": [{"name": "kv-data", "checksums": sums}]}
        )
    config = {"settings.yml": b"replicas: 2\n"}
    (backup_dir / "kv-config-kv-backup-one-restore-all.tar").write_bytes(_tar(config))
    document = {
        "instances": instances,
        "custom_artifacts": [
            {
                "name": "kv-config-kv-backup-one-restore-all",
                "checksums": {"./settings.yml": hashlib.sha256(config["settings.yml"]).hexdigest()},
            }
        ],
        "backup_activity": {
            "start_time": "2026/08/21 08:00:00 UTC",
            "finish_time": "2026/08/21 08:00:09 UTC",
        },
    }
    (backup_dir / "metadata").write_text(yaml.safe_dump(document))

    run_deployment(request(home, "restore", "kv", backup_dir))

    for index in ("0", "1"):
        root = vm(home, "kv", f"store/{index}")
        data = (root / "var/vcap/restored-kv-data" / f"shard-{index}.db").read_bytes()
        assert data == f"shard {index} data".encode()
        # Both instances got the one custom artifact, in its own directory.
        config_dir = root / "var/vcap/restored-kv-config"
        assert (config_dir / "settings.yml").read_bytes() == b"replicas: 2\n"
        assert (
            (root / "var/vcap/restored-kv-config.from")
            .read_text()
            .strip()
            .endswith("/bbr-backup/kv-config-kv-backup-one-restore-all/")
        )
    assert not (vm(home, "kv", "proxy/0") / "var/vcap/restored-kv-data").exists()


# --- the fault matrix's instance axis: one instance of many breaks, in every phase ---------

# (operation, script, fault, exit bits the run must have, whether the broken unlock leaves
# that one job locked until a cleanup with the fault cleared)
INSTANCE_FAULTS = [
    ("backup", "pre-backup-lock", "fail 3 lock refused", 4, False),
    ("backup", "pre-backup-lock", "hang", 4, False),
    ("backup", "backup", "fail 5 disk on fire", 1, False),
    ("backup", "backup", "hang", 1, False),
    ("backup", "post-backup-unlock", "fail 7 stuck", 8, True),
    ("backup", "transfer", "fail connection reset", 1, False),
    # A byte changed on its way out of the VM (after the VM's digest of it), and one
    # changed in the jump box's copy once written: the VM's digest and the copy's differ.
    ("backup", "transfer", "corrupt", 1, False),
    ("backup", "transfer", "corrupt-local", 1, False),
    ("restore", "pre-restore-lock", "fail 3 lock refused", 1, False),
    ("restore", "restore", "fail 4 bad dump", 1, False),
    ("restore", "restore", "hang", 1, False),
    ("restore", "post-restore-unlock", "fail 9 stuck", 8, True),
    ("restore", "transfer", "corrupt", 1, False),
]


@pytest.mark.parametrize(
    ("operation", "script", "fault", "bits", "unlock_broken"),
    INSTANCE_FAULTS,
    ids=[f"{o}-{s}-{f.split()[0]}" for o, s, f, _, _ in INSTANCE_FAULTS],
)
def test_a_fault_on_one_instance_of_three_leaves_every_instance_unlocked(
    home: Path, operation: str, script: str, fault: str, bits: int, unlock_broken: bool
):
    published = backup(home, "redis") if operation == "restore" else None
    out = home / "out-faulty"
    out.mkdir()
    if fault == "corrupt-local":
        # More than the MiB the jump box writes its copy in, so that part of it is on disk
        # while the rest is still coming (the test sshd's shim damages it then).
        dump = vm(home, "redis", "redis/2") / "var/vcap/store/redis/dump.rdb"
        dump.write_bytes(dump.read_bytes() + bytes(range(256)) * 8192)
    simulation.fault(
        home, "demo", "redis-server", script, fault, deployment="redis", instance="redis/2"
    )
    quick = Timeouts(metadata=20, lock=1.5, backup=1.5, unlock=5, restore=1.5)
    faulty = request(home, operation, "redis", published or out, timeouts=quick)
    with pytest.raises(RunFailed) as failed:
        run_deployment(faulty)
    assert failed.value.exit_code & bits == bits, failed.value.errors
    message = "\n".join(str(e) for e in failed.value.errors)
    # The error names the instance at fault (transfer faults: the copy of its tar).
    assert "redis/2" in message or "redis-2-redis-server.tar" in message, message
    if operation == "backup" and fault.startswith("corrupt"):
        # The job, the instance and both digests, and what to do.
        assert re.search(
            r"the copy of redis-2-redis-server\.tar \(job redis-server on redis/2, "
            + (r"127\.0\.0\.1:\d+" if transport(home) == "live" else "sim://demo/redis/redis/2")
            + r"\) is corrupted: the VM sent a tar stream with tar digest "
            r"[0-9a-f]{64}, the jump box's copy on disk has tar digest [0-9a-f]{64}\n"
            r"Nothing was published",
            message,
        ), message

    lock_script = "pre-backup-lock" if operation == "backup" else "pre-restore-lock"
    unlock_script = "post-backup-unlock" if operation == "backup" else "post-restore-unlock"
    for name in REDIS:
        root = vm(home, "redis", name)
        ran = calls(root)
        locked = any((c.script, c.event) == (lock_script, "start") for c in ran)
        unlocked = any((c.script, c.event) == (unlock_script, "start") for c in ran)
        assert unlocked or not locked, name
        assert not (root / "var/vcap/store/bbr-backup").exists(), name
        expect = ["redis-server"] if unlock_broken and name == "redis/2" else []
        assert locks_held(root) == expect, name
    if operation == "backup" and bits != 8:
        assert list(out.iterdir()) == []  # nothing incomplete, nothing published
    assert verify_log(home / "audit.db").ok

    if unlock_broken:
        # The run said which job may be locked; the cleanup, once the fault is gone, unlocks it.
        assert "redis-server on redis/2" in message
        simulation.fault(
            home, "demo", "redis-server", script, None, deployment="redis", instance="redis/2"
        )
        cleanup = "backup-cleanup" if operation == "backup" else "restore-cleanup"
        run_deployment(request(home, cleanup, "redis"))
        assert locks_held(vm(home, "redis", "redis/2")) == []


def test_a_member_name_no_utf8_spells_is_recorded_and_the_run_ends_cleanly(home: Path):
    # A backup script on redis/1 leaves a symlink whose name is not UTF-8: the drain
    # refuses it, and the error (which quotes the name) must still reach the audit log.
    root = vm(home, "redis", "redis/1")
    script = root / "var/vcap/jobs/redis-server/bin/bbr/backup"
    script.write_text(script.read_text() + "\nln -s /etc/hostname \"${art}$(printf 'caf\\351')\"\n")
    out = home / "out"
    out.mkdir()
    with pytest.raises(RunFailed) as failed:
        run_deployment(request(home, "backup", "redis", out))
    assert "symbolic link" in str(failed.value.errors[0]), failed.value.errors
    assert verify_log(home / "audit.db").ok
    with AuditLog(home / "audit.db", readonly=True) as audit:
        [run] = audit.runs()
        rows = audit.timeline(run.run_id)
    assert run.outcome == "failed"  # its end is on the record: nothing looks interrupted
    assert any(r["trigger"] == "drain_error" and "caf" in str(r["detail"]) for r in rows)
    # So the deployment is not blocked: the next backup runs (and fails the same way).
    with pytest.raises(RunFailed) as again:
        run_deployment(request(home, "backup", "redis", out))
    assert "did not finish" not in str(again.value.errors[0])


def test_a_deployment_with_a_bosh_group_backs_up_and_restores(home: Path, tmp_path: Path):
    # A director deployed by another director is a deployment whose group is `bosh`.
    manifest = {
        "name": "inner",
        "releases": [{"name": "redis", "version": "15.2.1"}],
        "instance_groups": [
            {
                "name": "bosh",
                "instances": 1,
                "jobs": [{"name": "redis-server", "release": "redis"}],
            },
        ],
    }
    path = tmp_path / "inner.yml"
    path.write_text(yaml.safe_dump(manifest))
    simulation.deploy(home, "demo", "inner", path)
    published = backup(home, "inner")
    assert (published / "bosh-0-redis-server.tar").is_file()
    with AuditLog(home / "audit.db", readonly=True) as audit:
        rows = audit.timeline(audit.runs()[-1].run_id)
    plan = next(r for r in rows if r["trigger"] == "checks_passed")["detail"]["lock_plan"]
    assert plan[0]["jobs"] == ["redis-server on bosh/0"]

    simulation.wipe(home, "demo", deployment="inner")
    run_deployment(request(home, "restore", "inner", published))
    assert "restore" in {c.script for c in calls(vm(home, "inner", "bosh/0"))}


def test_bbr_metadata_with_only_custom_artifacts_restores(home: Path, tmp_path: Path):
    manifest = {
        "name": "solo",
        "releases": [{"name": "kv", "version": "1.0"}],
        "instance_groups": [
            {
                "name": "store",
                "instances": 2,
                "jobs": [
                    {
                        "name": "kv-config",
                        "release": "kv",
                        "properties": {"bbr": {"backup_one_restore_all": True}},
                    }
                ],
            },
        ],
    }
    path = tmp_path / "solo.yml"
    path.write_text(yaml.safe_dump(manifest))
    simulation.deploy(home, "demo", "solo", path)
    for name in ("store/0", "store/1"):
        plant(vm(home, "solo", name), "kv-config", "restore", RECORDER)
    backup_dir = tmp_path / "solo_20260821T080000Z"
    backup_dir.mkdir()
    config = {"settings.yml": b"replicas: 2\n"}
    (backup_dir / "kv-config-kv-backup-one-restore-all.tar").write_bytes(_tar(config))
    digest = hashlib.sha256(config["settings.yml"]).hexdigest()
    # bbr leaves `instances` out when no instance has an artifact of its own.
    document = {
        "custom_artifacts": [
            {"name": "kv-config-kv-backup-one-restore-all", "checksums": {"./settings.yml": digest}}
        ],
        "backup_activity": {
            "start_time": "2026/08/21 08:00:00 UTC",
            "finish_time": "2026/08/21 08:00:01 UTC",
        },
    }
    (backup_dir / "metadata").write_text(yaml.safe_dump(document))

    run_deployment(request(home, "restore", "solo", backup_dir))
    for name in ("store/0", "store/1"):
        assert landed(vm(home, "solo", name)) == {"./settings.yml": digest}


def test_a_cleanup_unlocks_what_it_reaches_when_one_group_does_not_respond(home: Path):
    api = vm(home, "cf", "api/0")
    lock = api / "var/vcap/jobs/cloud_controller_ng/bin/bbr/pre-backup-lock"
    subprocess.run([str(lock)], check=True, capture_output=True)
    assert locks_held(api) == ["cloud_controller_ng"]
    database = vm(home, "cf", "database/0")
    aside = database.with_name("0.aside")
    database.rename(aside)  # its agent does not respond

    with pytest.raises(RunFailed) as failed:
        run_deployment(request(home, "backup-cleanup", "cf"))
    message = str(failed.value.errors[0])
    assert "could not reach database/0" in message
    assert f"bbrx deployment --target {address(home)} --deployment cf backup-cleanup" in str(
        failed.value.errors[0].hint
    )
    assert locks_held(api) == []  # what it could reach, it unlocked

    aside.rename(database)
    run_deployment(request(home, "backup-cleanup", "cf"))


def test_one_backup_one_restore_all_job_in_two_groups_is_refused_not_half_kept(
    home: Path, tmp_path: Path
):
    # Each group gets its own dicts: shared ones would make PyYAML write an anchor.
    job = {"name": "kv-config", "release": "kv"}
    manifest = {
        "name": "twice",
        "releases": [{"name": "kv", "version": "1.0"}],
        "instance_groups": [
            {
                "name": g,
                "instances": 1,
                "jobs": [{**job, "properties": {"bbr": {"backup_one_restore_all": True}}}],
            }
            for g in ("east", "west")
        ],
    }
    path = tmp_path / "twice.yml"
    path.write_text(yaml.safe_dump(manifest))
    simulation.deploy(home, "demo", "twice", path)
    for name in ("east/0", "west/0"):
        plant(
            vm(home, "twice", name),
            "kv-config",
            "backup",
            '#!/bin/sh\necho x > "${BBR_ARTIFACT_DIRECTORY}settings.yml"\n',
        )
    out = home / "out"
    out.mkdir()
    with pytest.raises(RunFailed) as failed:
        run_deployment(request(home, "backup", "twice", out))
    assert "two instance groups back up kv-config-kv-backup-one-restore-all" in str(
        failed.value.errors[0]
    )
    assert list(out.iterdir()) == []
