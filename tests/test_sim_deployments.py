"""The simulated director's deployments: their VM trees, the director contract (SimBosh),
deploying from a manifest, deleting, wiping, faults on one VM.

Everything runs for real under tmp_path: files, bash subprocesses, GNU tar. What is
asserted is what a user would see: paths and files on disk, the VMs' own call logs,
messages, and the data bytes.
"""

from __future__ import annotations

import hashlib
import io
import re
import stat
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from orchestrator import simulation
from orchestrator.engine.run import Identity
from orchestrator.errors import TargetError, TransportError, UsageError
from orchestrator.operations.procedures import Request
from orchestrator.operations.running import run_on
from orchestrator.transport.instance import Instance, ScriptCall, ScriptResult
from orchestrator.transport.targets import parse_host
from simulator.deploy import wipe_deployment
from simulator.deployments import SimBosh, VmInfo
from simulator.director import SimDirector, sim_root
from simulator.director_db import Deployment, parse_dump
from simulator.fleet import read_identity
from simulator.instance import SimInstance
from simulator.seed_manifests import SEED_JOBS

ROOT = Path(__file__).resolve().parent.parent
SEED_LAYOUT = {
    "cf": [("api", 2), ("uaa", 1), ("router", 2), ("diego-cell", 3), ("database", 1)],
    "redis": [("redis", 3)],
    "concourse": [("web", 1), ("worker", 2)],
}
# Which jobs bbr finds scripts for on each group's VMs, and which scripts.
LOCKS = {"pre-backup-lock", "post-backup-unlock", "pre-restore-lock", "post-restore-unlock"}
DATA = {"backup", "restore"}
SCRIPTED = {
    ("cf", "api"): {"cloud_controller_ng": LOCKS | {"metadata"}, "cc-blobs": DATA},
    ("cf", "uaa"): {},
    ("cf", "router"): {},
    ("cf", "diego-cell"): {},
    ("cf", "database"): {
        "bbr-cloudcontrollerdb": DATA,
        "bbr-credhubdb": DATA,
        "bbr-uaadb": DATA,
        "credhub": LOCKS,
    },
    ("redis", "redis"): {"redis-server": LOCKS | DATA},
    ("concourse", "web"): {"bbr-atcdb": DATA},
    ("concourse", "worker"): {},
}
BORA = "cc-blobs-capi-backup-one-restore-all"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def director(home: Path) -> SimDirector:
    d = SimDirector(sim_root(home, "demo"))
    d.create()
    return d


@pytest.fixture
def bosh(home: Path, director: SimDirector) -> Iterator[SimBosh]:
    b = SimBosh(home, "demo")
    yield b
    b.close()


def run(inst: SimInstance, job: str, script: str, **env: str) -> ScriptResult:
    return inst.run_script(ScriptCall(job, script, env))


def run_ok(inst: SimInstance, job: str, script: str, **env: str) -> ScriptResult:
    result = run(inst, job, script, **env)
    assert result.ok, (inst.address, job, script, result.exit_code, result.stderr)
    return result


def with_artifact(inst: SimInstance, name: str) -> dict[str, str]:
    inst.make_artifact_directory(name)
    return {"BBR_ARTIFACT_DIRECTORY": inst.artifact_directory(name)}


def store(inst: SimInstance) -> dict[str, str]:
    """SHA-256 of every file in the VM's store (bbr's work dir aside)."""
    return inst.vm.store_digest()


def tree_state(root: Path) -> dict[str, str]:
    """Every file under `root` and its digest: to show that nothing changed."""
    state = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != ".lock":
            state[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            state[path.relative_to(root).as_posix() + "/"] = ""
    return state


def database(director: SimDirector) -> bytes:
    return (director.root / "var/vcap/store/director/bosh.sql").read_bytes()


def write_manifest(tmp_path: Path, document: object, name: str = "manifest.yml") -> Path:
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    return path


def kv_manifest(**groups: int) -> dict:
    """A small deployment of the redis release: `redis` VMs, and optional extra groups."""
    counts = {"redis": 2, **groups}
    return {
        "name": "kv",
        "releases": [{"name": "redis", "version": "latest"}, {"name": "acme", "version": "1"}],
        "instance_groups": [
            {
                "name": group,
                "instances": count,
                "jobs": [{"name": "redis-server", "release": "redis"}]
                if group == "redis"
                else [{"name": "acme-agent", "release": "acme"}],
            }
            for group, count in counts.items()
        ],
    }


# -- the layout ---------------------------------------------------------------------


def test_create_builds_a_vm_tree_for_every_vm_the_database_lists(director: SimDirector) -> None:
    deployments = director.deployments()
    assert [d.name for d in deployments] == ["cf", "redis", "concourse"]
    base = director.root / "deployments"
    for deployment in deployments:
        groups: dict[str, int] = {}
        for vm in deployment.vms:
            groups[vm.group] = groups.get(vm.group, 0) + 1
            root = base / deployment.name / vm.group / str(vm.index)
            identity = yaml.safe_load((root / "instance.yml").read_text())
            assert identity == {
                "id": vm.instance_id,
                "deployment": deployment.name,
                "group": vm.group,
                "index": vm.index,
                "bootstrap": vm.index == 0,
                "ips": list(vm.ips),
                "az": vm.az,
            }
            assert uuid.UUID(identity["id"]).version == 4
            assert (root / "var/vcap/packages/bbr-sim/lib.sh").is_file()
            for sub in ("var/vcap/store", "var/vcap/sys"):
                assert (root / sub).is_dir()
            # Every job of the group is there; only the simulated releases' have scripts.
            jobs = {job for job, _, _ in SEED_JOBS[deployment.name][vm.group]}
            assert {p.name for p in (root / "var/vcap/jobs").iterdir()} == jobs
            scripted = SCRIPTED[(deployment.name, vm.group)]
            for job in jobs:
                scripts = root / "var/vcap/jobs" / job / "bin/bbr"
                if job not in scripted:
                    assert not scripts.exists(), job
                    continue
                assert {p.name for p in scripts.iterdir()} == scripted[job]
                for script in scripts.iterdir():
                    assert stat.S_IMODE(script.stat().st_mode) == 0o755
                    assert script.read_text().startswith("#!/usr/bin/env bash\n")
            assert not (root / "var/vcap/sys/log/bbr-sim/calls.log").exists()
        assert list(groups.items()) == SEED_LAYOUT[deployment.name]
    assert sorted(p.name for p in base.iterdir() if p.is_dir()) == ["cf", "concourse", "redis"]


def test_ids_and_data_are_the_same_in_every_home(tmp_path: Path, director: SimDirector) -> None:
    other = SimDirector(sim_root(tmp_path / "other-home", "demo"))
    other.create()
    for deployment in director.deployments():
        for vm in deployment.vms:
            mine, theirs = (d.deployment_vm(deployment.name, vm) for d in (director, other))
            assert read_identity(mine.root) == read_identity(theirs.root)
            assert mine.store_digest() == theirs.store_digest()
    assert other.deployments() == director.deployments()


def test_an_empty_director_has_no_deployment_vms(tmp_path: Path) -> None:
    empty = SimDirector(tmp_path / "empty")
    empty.create(empty=True)
    assert not (empty.root / "deployments").exists()
    assert SimBosh(tmp_path, "empty").director.deployments() == []


def test_the_seed_data_is_what_each_job_backs_up(director: SimDirector, bosh: SimBosh) -> None:
    expected = {
        ("redis", "redis"): {"redis/appendonly.aof", "redis/dump.rdb"},
        ("cf", "database"): {
            "pxc-mysql/ccdb.sql",
            "pxc-mysql/credhubdb.sql",
            "pxc-mysql/uaadb.sql",
        },
        ("concourse", "web"): {"postgres/atc.sql"},
    }
    for deployment in bosh.deployments():
        for vm in bosh.vms(deployment):
            [inst] = [i for i in bosh.open_instances(deployment, vm.group) if i.index == vm.index]
            files = set(store(inst))
            if vm.group == "api":
                assert len(files) == 3 and all(f.startswith("cc-blobs/droplets/") for f in files)
            else:
                assert files == expected.get((deployment, vm.group), set()), (deployment, vm)
    # Each redis node has its own keyspace; both api VMs mount the same droplets.
    redis = bosh.open_instances("redis", "redis")
    assert len({store(i)["redis/dump.rdb"] for i in redis}) == 3
    api = bosh.open_instances("cf", "api")
    assert store(api[0]) == store(api[1])


# -- the director contract ------------------------------------------------------------


def test_deployments_and_vms_are_the_database(director: SimDirector, bosh: SimBosh) -> None:
    assert (bosh.name, bosh.address, bosh.mode) == ("demo", "sim://demo", "sim")
    assert bosh.deployments() == ["cf", "redis", "concourse"]
    for deployment in director.deployments():
        vms = bosh.vms(deployment.name)
        assert vms == [
            VmInfo(
                group=vm.group,
                index=str(vm.index),
                id=vm.instance_id,
                ips=vm.ips,
                bootstrap=vm.index == 0,
                az=vm.az,
            )
            for vm in deployment.vms
        ]
    redis = bosh.vms("redis")
    assert [(v.group, v.index, v.bootstrap, v.az) for v in redis] == [
        ("redis", "0", True, "z1"),
        ("redis", "1", False, "z2"),
        ("redis", "2", False, "z3"),
    ]
    assert redis[0].ips == ("10.0.2.10",)
    cf = bosh.vms("cf")
    assert list(dict.fromkeys(v.group for v in cf)) == [
        "api",
        "uaa",
        "router",
        "diego-cell",
        "database",
    ]
    assert [v.group for v in cf if v.bootstrap] == [
        "api",
        "uaa",
        "router",
        "diego-cell",
        "database",
    ]
    with pytest.raises(TargetError, match="sim://demo has no deployment 'nope'") as error:
        bosh.vms("nope")
    assert error.value.hint == "Deployments: cf, redis, concourse"


def test_a_wiped_director_lists_no_deployments(director: SimDirector, bosh: SimBosh) -> None:
    director.wipe()
    assert bosh.deployments() == []
    with pytest.raises(TargetError, match="no deployment 'redis'") as error:
        bosh.vms("redis")
    assert error.value.hint is not None and "lists no deployments" in error.value.hint
    # Its deployments' VMs still run, unlisted, as a real director's do when it dies.
    assert (director.root / "deployments/redis/redis/0/instance.yml").is_file()
    assert director.render_vms() == "No deployments (the director database is empty)\n"


def test_a_locked_director_api_serves_nothing(director: SimDirector, bosh: SimBosh) -> None:
    inst = SimInstance(director)
    result = run_ok(inst, "director", "pre-backup-lock")
    pid = director.calls()[0].pid
    message = f"sim://demo: director API is locked by pre-backup-lock (pid {pid})"
    for call in (bosh.deployments, lambda: bosh.vms("redis"), lambda: bosh.manifest("redis")):
        with pytest.raises(TargetError, match=re.escape(message)):
            call()
    with pytest.raises(TargetError, match="locked"):
        bosh.open_instances("redis", "redis")
    assert "locked" in result.stdout
    run_ok(inst, "director", "post-backup-unlock", BBR_AFTER_BACKUP_SCRIPTS_SUCCESSFUL="true")
    assert bosh.deployments() == ["cf", "redis", "concourse"]


def test_a_missing_director_is_named(tmp_path: Path) -> None:
    bosh = SimBosh(tmp_path, "nowhere")
    with pytest.raises(TargetError, match="there is no simulated director nowhere") as error:
        bosh.deployments()
    assert error.value.hint == "Create it with: bbrx sim create nowhere"
    created = SimBosh.open(tmp_path, "fresh")
    assert created.deployments() == ["cf", "redis", "concourse"]


def test_seed_manifests_say_what_the_vms_run(bosh: SimBosh) -> None:
    for deployment in bosh.deployments():
        manifest = yaml.safe_load(bosh.manifest(deployment))
        assert manifest["name"] == deployment
        releases = {r["name"] for r in manifest["releases"]}
        groups = [(g["name"], g["instances"]) for g in manifest["instance_groups"]]
        assert groups == SEED_LAYOUT[deployment]
        for group in manifest["instance_groups"]:
            for job in group["jobs"]:
                assert job["release"] in releases
                bora = job.get("properties", {}).get("bbr", {}).get("backup_one_restore_all")
                assert bora is (True if job["name"] == "cc-blobs" else None)


def test_lock_order_constraints_name_jobs_as_the_manifest_releases_them(bosh: SimBosh) -> None:
    """bbr matches a constraint by job name and release (the manifest's): the API VMs'
    cloud_controller_ng must lock before the database VM's jobs, and unlock after them."""
    manifest = yaml.safe_load(bosh.manifest("cf"))
    release_of = {
        (g["name"], j["name"]): j["release"] for g in manifest["instance_groups"] for j in g["jobs"]
    }
    [api0, api1] = bosh.open_instances("cf", "api")
    metadata = [
        yaml.safe_load(run_ok(i, "cloud_controller_ng", "metadata").stdout) for i in (api0, api1)
    ]
    assert metadata[0] == metadata[1]
    for key in ("backup_should_be_locked_before", "restore_should_be_locked_before"):
        named = {(e["job_name"], e["release"]) for e in metadata[0][key]}
        assert named == {
            ("credhub", "credhub"),
            ("bbr-cloudcontrollerdb", "capi"),
            ("bbr-uaadb", "uaa"),
            ("bbr-credhubdb", "credhub"),
        }
        assert named <= {
            (job, release) for (group, job), release in release_of.items() if group == "database"
        }
    assert release_of[("api", "cloud_controller_ng")] == "capi"


# -- director backup and restore carry the deployments ---------------------------------


def director_run(home: Path, director: SimDirector, operation: str, path: Path) -> None:
    inst = SimInstance(director)
    try:
        request = Request(
            operation=operation,
            target=parse_host("sim://demo"),
            identity=Identity("tester"),
            audit_db=home / "audit.db",
            home=home,
            artifact_path=path,
        )
        run_on(request, inst)
    finally:
        inst.close()


def test_a_director_restore_brings_back_deployments_and_manifests(
    tmp_path: Path, home: Path, director: SimDirector, bosh: SimBosh
) -> None:
    manifest = write_manifest(tmp_path, kv_manifest())
    simulation.deploy(home, "demo", "kv", manifest)
    kv_vms = bosh.vms("kv")
    out = tmp_path / "backups"
    out.mkdir()
    director_run(home, director, "backup", out)
    [artifact] = list(out.iterdir())

    simulation.delete_deployment(home, "demo", "kv")
    director.wipe()
    assert bosh.deployments() == []
    director_run(home, director, "restore", artifact)

    assert bosh.deployments() == ["cf", "redis", "concourse", "kv"]
    assert bosh.manifest("kv") == manifest.read_text()
    assert bosh.vms("kv") == kv_vms
    # The director remembers VMs that were deleted since its backup: they do not answer.
    vms_text = director.render_vms()
    assert vms_text.count("unresponsive agent") == 2
    with pytest.raises(TargetError, match="does not respond") as error:
        bosh.open_instances("kv", "redis")
    assert (
        error.value.hint is not None
        and "bbrx sim deploy demo kv --manifest FILE" in error.value.hint
    )
    # Redeploying rebuilds them with the ids the director knows.
    message = simulation.deploy(home, "demo", "kv", manifest)
    assert "2 VMs (2 rebuilt with their ids (their VMs were gone))" in message
    assert [i.instance_id for i in bosh.open_instances("kv", "redis")] == [v.id for v in kv_vms]
    assert "unresponsive agent" not in director.render_vms()


def old_dump(deployments: list[Deployment]) -> str:
    """The database as simulators before deployments wrote it: no index, no manifests."""
    lines = ["-- bbr-sim director database dump (simulated; not a real PostgreSQL dump)", "BEGIN;"]
    lines += [f"INSERT INTO deployments (name) VALUES ('{d.name}');" for d in deployments]
    for d in deployments:
        for vm in d.vms:
            values = (
                d.name,
                vm.instance,
                vm.process_state,
                vm.az,
                ",".join(vm.ips),
                vm.vm_cid,
                vm.vm_type,
            )
            lines.append(
                "INSERT INTO vms (deployment, instance, process_state, az, ips, vm_cid, vm_type) "
                f"VALUES ({', '.join(repr(v) for v in values)});"
            )
    return "\n".join([*lines, "COMMIT;"]) + "\n"


def test_an_older_director_backup_still_restores(director: SimDirector, bosh: SimBosh) -> None:
    """A director artifact from before deployments holds director.sql alone, in the old
    format: it restores, indexes come from the order of each group, manifests from the seed."""
    seed_vms = {d: bosh.vms(d) for d in bosh.deployments()}
    seed_manifests = {d: bosh.manifest(d) for d in bosh.deployments()}
    text = old_dump(director.deployments())
    assert "manifests" not in text and "index" not in text
    director.wipe()
    inst = SimInstance(director)
    env = with_artifact(inst, "director")
    Path(env["BBR_ARTIFACT_DIRECTORY"], "director.sql").write_text(text)
    run_ok(inst, "director", "pre-restore-lock")
    run_ok(inst, "director", "restore", **env)
    run_ok(inst, "director", "post-restore-unlock")
    inst.remove_work_dir()
    inst.close()
    assert (director.root / "var/vcap/store/director/bosh.sql").read_text() == text
    assert {d: bosh.vms(d) for d in bosh.deployments()} == seed_vms
    assert {d: bosh.manifest(d) for d in bosh.deployments()} == seed_manifests
    assert [i.index for i in bosh.open_instances("redis", "redis")] == ["0", "1", "2"]


def test_the_database_file_keeps_manifests_on_single_lines(director: SimDirector) -> None:
    text = (director.root / "var/vcap/store/director/bosh.sql").read_text()
    rows = [line for line in text.splitlines() if line.startswith("INSERT INTO manifests")]
    assert len(rows) == 3
    assert all(
        re.fullmatch(
            r"INSERT INTO manifests \(deployment, encoding, text\) "
            r"VALUES \('\w+', 'base64', '[A-Za-z0-9+/=]+'\);",
            row,
        )
        for row in rows
    )
    assert [d.manifest is not None for d in parse_dump(text)] == [True] * 3


# -- each deployment's scripts, run in bbr's order ------------------------------------


def backup_instances(
    instances: list[SimInstance], jobs: list[str], *, locks: list[str] | None = None
) -> dict[tuple[str, str], bytes]:
    """Lock, back up, unlock as bbr does; each (address, job)'s artifact as tar bytes."""
    locks = jobs if locks is None else locks
    for inst in instances:
        for job in locks:
            run_ok(inst, job, "pre-backup-lock")
    for inst in instances:
        for job in jobs:
            run_ok(inst, job, "backup", **with_artifact(inst, job))
    for inst in reversed(instances):
        for job in reversed(locks):
            run_ok(inst, job, "post-backup-unlock", BBR_AFTER_BACKUP_SCRIPTS_SUCCESSFUL="true")
    tars = {}
    for inst in instances:
        for job in jobs:
            with inst.stream_out(job) as stream:
                tars[(inst.address, job)] = stream.read()
        inst.remove_work_dir()
    return tars


def chunked(data: bytes, size: int = 4096) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def tar_names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return sorted(m.name for m in tar.getmembers() if m.isfile())


def test_redis_backup_and_restore_on_every_node(director: SimDirector, bosh: SimBosh) -> None:
    nodes = bosh.open_instances("redis", "redis")
    assert [n.address for n in nodes] == [f"sim://demo/redis/redis/{i}" for i in range(3)]
    before = [store(n) for n in nodes]
    tars = backup_instances(nodes, ["redis-server"])
    for node in nodes:
        assert tar_names(tars[(node.address, "redis-server")]) == ["./appendonly.aof", "./dump.rdb"]
        calls = [(c.job, c.script, c.event) for c in node.vm.calls()]
        assert calls == [
            *(
                ("redis-server", script, event)
                for script in ("pre-backup-lock", "backup", "post-backup-unlock")
                for event in ("start", "exit")
            ),
            ("redis-server", "transfer", "start"),  # the copy of its artifact
        ]
        assert node.vm.locked_jobs() == []
        backup_call = node.vm.calls()[2]
        assert backup_call.extra["BBR_ARTIFACT_DIRECTORY"].endswith(
            "/var/vcap/store/bbr-backup/redis-server/"
        )
        assert backup_call.extra["BBR_ARTIFACT_DIRECTORY"].startswith(str(node.root))
    # The director and the other deployments saw none of it.
    assert director.calls() == []
    assert all(i.vm.calls() == [] for i in bosh.open_instances("cf", "api"))

    assert wipe_deployment(director, "redis") == 3
    assert all(store(n) == {} for n in nodes)
    for node in nodes:
        node.stream_in("redis-server", chunked(tars[(node.address, "redis-server")]))
        run_ok(node, "redis-server", "pre-restore-lock")
        result = run_ok(
            node,
            "redis-server",
            "restore",
            BBR_ARTIFACT_DIRECTORY=node.artifact_directory("redis-server"),
        )
        assert "redis data restored" in result.stdout
        run_ok(node, "redis-server", "post-restore-unlock")
        node.remove_work_dir()
    assert [store(n) for n in nodes] == before


def test_scripts_refuse_where_the_real_job_would(bosh: SimBosh) -> None:
    node = bosh.open_instances("redis", "redis")[1]
    for script in ("backup", "restore"):
        result = run(node, "redis-server", script, **with_artifact(node, "redis-server"))
        assert result.exit_code == 1
        assert "redis-server is not locked" in result.stderr
    # Database jobs have no lock of their own (as in the real releases): no lock needed.
    [db] = bosh.open_instances("cf", "database")
    for job in ("bbr-cloudcontrollerdb", "bbr-uaadb", "bbr-credhubdb"):
        run_ok(db, job, "backup", **with_artifact(db, job))
    assert db.vm.locked_jobs() == []
    bad = db.artifact_directory("bbr-uaadb").rstrip("/")
    result = run(db, "bbr-uaadb", "backup", BBR_ARTIFACT_DIRECTORY=bad)
    assert result.exit_code == 1 and "must end with '/'" in result.stderr


def test_cf_backup_in_lock_order_and_restore_one_to_all(
    director: SimDirector, bosh: SimBosh
) -> None:
    api = bosh.open_instances("cf", "api")
    [db] = bosh.open_instances("cf", "database")
    assert [(i.index, i.vm.identity.bootstrap) for i in api] == [("0", True), ("1", False)]
    before = {i.address: store(i) for i in [*api, db]}

    # Lock levels across groups: cloud_controller_ng on both api VMs, then credhub.
    for inst in api:
        run_ok(inst, "cloud_controller_ng", "pre-backup-lock")
    run_ok(db, "credhub", "pre-backup-lock")
    assert [i.vm.locked_jobs() for i in api] == [["cloud_controller_ng"]] * 2
    # The bootstrap api VM's cc-blobs is the one-to-all artifact; the other's is ordinary.
    run_ok(api[0], "cc-blobs", "backup", **with_artifact(api[0], BORA))
    run_ok(api[1], "cc-blobs", "backup", **with_artifact(api[1], "cc-blobs"))
    db_jobs = ["bbr-cloudcontrollerdb", "bbr-uaadb", "bbr-credhubdb"]
    for job in db_jobs:
        run_ok(db, job, "backup", **with_artifact(db, job))
    run_ok(db, "credhub", "post-backup-unlock", BBR_AFTER_BACKUP_SCRIPTS_SUCCESSFUL="true")
    for inst in reversed(api):
        run_ok(
            inst,
            "cloud_controller_ng",
            "post-backup-unlock",
            BBR_AFTER_BACKUP_SCRIPTS_SUCCESSFUL="true",
        )
    with api[0].stream_out(BORA) as stream:
        blobs = stream.read()
    with api[1].stream_out("cc-blobs") as stream:
        assert tar_names(stream.read()) == tar_names(blobs)
    dumps = {}
    for job in db_jobs:
        with db.stream_out(job) as stream:
            dumps[job] = stream.read()
    assert tar_names(dumps["bbr-uaadb"]) == ["./uaadb_dump"]
    for inst in [*api, db]:
        inst.remove_work_dir()

    wipe_deployment(director, "cf")
    assert all(store(i) == {} for i in [*api, db])
    # Restore: locks in order, every api VM gets the one artifact, unlocks in reverse.
    for inst in api:
        run_ok(inst, "cloud_controller_ng", "pre-restore-lock")
    run_ok(db, "credhub", "pre-restore-lock")
    for inst in api:
        inst.stream_in(BORA, chunked(blobs))
        run_ok(inst, "cc-blobs", "restore", BBR_ARTIFACT_DIRECTORY=inst.artifact_directory(BORA))
    for job in db_jobs:
        db.stream_in(job, chunked(dumps[job]))
        run_ok(db, job, "restore", BBR_ARTIFACT_DIRECTORY=db.artifact_directory(job))
    run_ok(db, "credhub", "post-restore-unlock")
    for inst in reversed(api):
        run_ok(inst, "cloud_controller_ng", "post-restore-unlock")
        inst.remove_work_dir()
    db.remove_work_dir()
    assert {i.address: store(i) for i in [*api, db]} == before
    times = {
        (i.address, c.job, c.script): c.time
        for i in [*api, db]
        for c in i.vm.calls()
        if c.event == "start"
    }
    credhub_lock = times[(db.address, "credhub", "pre-restore-lock")]
    assert all(
        times[(i.address, "cloud_controller_ng", "pre-restore-lock")] < credhub_lock for i in api
    )
    assert all(i.vm.locked_jobs() == [] for i in [*api, db])


def test_concourse_backs_up_its_database_and_workers_have_no_scripts(bosh: SimBosh) -> None:
    [web] = bosh.open_instances("concourse", "web")
    assert [j.name for j in web.discover()] == ["bbr-atcdb"]
    before = store(web)
    env = with_artifact(web, "bbr-atcdb")
    run_ok(web, "bbr-atcdb", "backup", **env)
    assert sorted(p.name for p in Path(env["BBR_ARTIFACT_DIRECTORY"]).iterdir()) == ["atcdb_dump"]
    (web.root / "var/vcap/store/postgres/atc.sql").write_text("lost\n")
    result = run_ok(web, "bbr-atcdb", "restore", **env)
    assert "loaded atcdb_dump into atc.sql" in result.stdout
    assert store(web) == before
    for deployment, group in (
        ("concourse", "worker"),
        ("cf", "router"),
        ("cf", "diego-cell"),
        ("cf", "uaa"),
    ):
        for inst in bosh.open_instances(deployment, group):
            assert inst.discover() == []
            assert inst.vm.jobs() != []  # the jobs are there, without bbr scripts


def test_a_deployment_vm_is_an_instance(bosh: SimBosh) -> None:
    inst = bosh.open_instances("redis", "redis")[2]
    assert isinstance(inst, Instance)
    vm = bosh.vms("redis")[2]
    assert (inst.group, inst.index, inst.instance_id, inst.mode) == ("redis", "2", vm.id, "sim")
    assert inst.address == "sim://demo/redis/redis/2"
    assert inst.store_size() > 0


# -- faults on one VM -------------------------------------------------------------------


def test_a_fault_breaks_one_script_on_one_vm_only(
    home: Path, director: SimDirector, bosh: SimBosh
) -> None:
    message = simulation.fault(
        home,
        "demo",
        "redis-server",
        "backup",
        "fail 7 disk full",
        deployment="redis",
        instance="redis/1",
    )
    assert message == "redis-server/backup on sim://demo/redis/redis/1 will now: fail 7 disk full"
    nodes = bosh.open_instances("redis", "redis")
    for node in nodes:
        run_ok(node, "redis-server", "pre-backup-lock")
        result = run(node, "redis-server", "backup", **with_artifact(node, "redis-server"))
        if node.index == "1":
            assert (result.exit_code, result.stderr.strip()) == (7, "disk full")
        else:
            assert result.ok, result.stderr
    assert [n.vm.faults() for n in nodes] == [
        {},
        {("redis-server", "backup"): "fail 7 disk full"},
        {},
    ]
    assert director.faults() == {}
    assert (nodes[1].root / "var/vcap/sys/run/bbr-sim/faults/redis-server/backup").is_file()
    cleared = simulation.fault(
        home, "demo", "redis-server", "backup", None, deployment="redis", instance="redis/1"
    )
    assert cleared == "Cleared the fault of redis-server/backup on sim://demo/redis/redis/1"
    assert nodes[1].vm.faults() == {}


def test_a_corrupt_copy_fault_reaches_a_small_artifact(home: Path, bosh: SimBosh) -> None:
    simulation.fault(
        home, "demo", "bbr-uaadb", "transfer", "corrupt", deployment="cf", instance="database/0"
    )
    [db] = bosh.open_instances("cf", "database")
    run_ok(db, "bbr-uaadb", "backup", **with_artifact(db, "bbr-uaadb"))
    checksums = db.checksum_artifact_directory("bbr-uaadb")
    with db.stream_out("bbr-uaadb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if member.isfile():
                data = tar.extractfile(member)
                assert data is not None
                assert hashlib.sha256(data.read()).hexdigest() != checksums[member.name]
    assert [c.script for c in db.vm.calls() if c.event == "start"] == ["backup", "transfer"]


def test_a_copy_fault_on_a_job_breaks_its_one_to_all_artifact_too(
    home: Path, bosh: SimBosh
) -> None:
    simulation.fault(
        home, "demo", "cc-blobs", "transfer", "fail link down", deployment="cf", instance="api/0"
    )
    api0 = bosh.open_instances("cf", "api")[0]
    run_ok(api0, "cc-blobs", "backup", **with_artifact(api0, BORA))
    message = f"lost while copying the artifact of job {BORA}: link down"
    with pytest.raises(TransportError, match=re.escape(message)), api0.stream_out(BORA) as stream:
        while stream.read(4096):  # read to the end, as a drain does: the end never comes
            pass


@pytest.mark.parametrize(
    ("deployment", "instance", "job", "error", "message", "hint"),
    [
        ("nope", "redis/0", "redis-server", TargetError, "no deployment 'nope'", "Deployments: cf"),
        (
            "redis",
            "redis/3",
            "redis-server",
            TargetError,
            "has no instance redis/3",
            "Instances: redis/0, redis/1, redis/2",
        ),
        ("redis", "redis", "redis-server", UsageError, "expected GROUP/INDEX", None),
        ("redis", "../x/0", "redis-server", UsageError, "expected GROUP/INDEX", None),
        (
            "redis",
            "redis/0",
            "nope",
            TargetError,
            "no job 'nope' on sim://demo/redis/redis/0",
            "Jobs: redis-server",
        ),
        (
            "cf",
            "router/0",
            "gorouter",
            TargetError,
            "has no 'backup' script",
            "Scripts of gorouter: none",
        ),
    ],
)
def test_faults_name_what_there_is(
    home: Path, director: SimDirector, deployment, instance, job, error, message, hint
) -> None:
    with pytest.raises(error, match=re.escape(message)) as raised:
        simulation.fault(
            home, "demo", job, "backup", "fail", deployment=deployment, instance=instance
        )
    if hint is not None:
        assert raised.value.hint is not None and hint in raised.value.hint
    with pytest.raises(UsageError, match="go together"):
        simulation.fault(home, "demo", "redis-server", "backup", "fail", deployment="redis")


# -- deploy, replace, delete, wipe ------------------------------------------------------


def test_deploy_a_new_deployment(
    tmp_path: Path, home: Path, director: SimDirector, bosh: SimBosh
) -> None:
    path = write_manifest(tmp_path, kv_manifest(agent=1))
    message = simulation.deploy(home, "demo", "kv", path)
    root = director.root / "deployments/kv"
    assert message == f"Deployed kv to sim://demo: 3 VMs (3 new), at {root}"
    assert bosh.deployments() == ["cf", "redis", "concourse", "kv"]
    assert bosh.manifest("kv") == path.read_text()
    vms = bosh.vms("kv")
    assert [(v.group, v.index, v.bootstrap) for v in vms] == [
        ("redis", "0", True),
        ("redis", "1", False),
        ("agent", "0", True),
    ]
    assert len({v.id for v in vms}) == 3 and all(uuid.UUID(v.id).version == 4 for v in vms)
    assert [v.ips for v in vms] == [("10.0.4.10",), ("10.0.4.11",), ("10.0.4.12",)]
    for vm in vms:
        identity = read_identity(root / vm.group / vm.index)
        assert identity is not None and identity.id == vm.id
    # A job the simulator knows gets its scripts and seed data; any other gets neither.
    [redis0, redis1] = bosh.open_instances("kv", "redis")
    assert [j.name for j in redis0.discover()] == ["redis-server"]
    assert set(store(redis0)) == {"redis/dump.rdb", "redis/appendonly.aof"}
    assert store(redis0) != store(redis1)
    [agent] = bosh.open_instances("kv", "agent")
    assert agent.discover() == [] and agent.vm.jobs() == ["acme-agent"]
    assert not (agent.root / "var/vcap/jobs/acme-agent/bin").exists()
    assert "Deployment 'kv'" in director.render_vms()


def test_redeploy_keeps_what_stays_and_removes_what_goes(
    tmp_path: Path, home: Path, director: SimDirector, bosh: SimBosh
) -> None:
    path = write_manifest(tmp_path, kv_manifest(agent=2))
    simulation.deploy(home, "demo", "kv", path)
    first = {(v.group, v.index): v.id for v in bosh.vms("kv")}
    [keep, _] = bosh.open_instances("kv", "redis")
    (keep.root / "var/vcap/store/redis/dump.rdb").write_bytes(b"REDIS0011 written since")
    kept_data = store(keep)

    manifest = kv_manifest(agent=1)
    manifest["instance_groups"][0]["instances"] = 3
    manifest["instance_groups"][1]["jobs"].append({"name": "redis-server", "release": "redis"})
    path = write_manifest(tmp_path, manifest, "scaled.yml")
    message = simulation.deploy(home, "demo", "kv", path)
    assert "4 VMs (1 new; 3 kept with their ids and data; 1 removed)" in message
    second = {(v.group, v.index): v.id for v in bosh.vms("kv")}
    assert list(second) == [("redis", "0"), ("redis", "1"), ("redis", "2"), ("agent", "0")]
    for key in (("redis", "0"), ("redis", "1"), ("agent", "0")):
        assert second[key] == first[key]
    assert second[("redis", "2")] not in first.values()
    assert not (director.root / "deployments/kv/agent/1").exists()
    assert store(keep) == kept_data
    # The kept agent VM now runs redis-server too: its scripts and its seed data.
    [agent] = bosh.open_instances("kv", "agent")
    assert [j.name for j in agent.discover()] == ["redis-server"]
    assert "redis/dump.rdb" in store(agent)
    assert bosh.manifest("kv") == path.read_text()
    assert bosh.vms("kv")[2].ips == ("10.0.4.14",)  # not agent/1's .13, which goes meanwhile

    simulation.deploy(
        home,
        "demo",
        "kv",
        write_manifest(tmp_path, {**manifest, "instance_groups": []}, "none.yml"),
    )
    assert bosh.vms("kv") == [] and bosh.deployments()[-1] == "kv"
    assert not (director.root / "deployments/kv").exists()


def test_redeploying_a_seed_deployment_changes_nothing_but_the_manifest(
    tmp_path: Path, home: Path, director: SimDirector, bosh: SimBosh
) -> None:
    vms = bosh.vms("cf")
    data = {i.address: store(i) for g in ("api", "database") for i in bosh.open_instances("cf", g)}
    path = write_manifest(tmp_path, bosh.manifest("cf"))
    message = simulation.deploy(home, "demo", "cf", path)
    assert "9 VMs (9 kept with their ids and data)" in message
    assert bosh.vms("cf") == vms
    assert {
        i.address: store(i) for g in ("api", "database") for i in bosh.open_instances("cf", g)
    } == data


BAD_MANIFESTS = [
    ("[1, 2]", "the manifest must be a YAML mapping (it is a list)"),
    ({"releases": [], "instance_groups": []}, "name must be a name (it is missing)"),
    (
        {"name": "other", "releases": [], "instance_groups": []},
        "name is 'other', not the deployment 'kv'",
    ),
    ({"name": "kv", "jobs": []}, "jobs is a v1 manifest's list"),
    ({"name": "kv", "instance_groups": []}, "releases must be a list (it is missing)"),
    (
        {"name": "kv", "releases": [], "instance_groups": {}},
        "instance_groups must be a list (it is a mapping)",
    ),
]


def group_manifest(**group: object) -> dict:
    manifest = kv_manifest()
    manifest["instance_groups"][0].update(group)
    return manifest


BAD_GROUPS = [
    ({"instances": "two"}, "instance_groups[0].instances must be a whole number ≥ 0 (it is 'two')"),
    ({"instances": -1}, "instance_groups[0].instances must be a whole number ≥ 0 (it is -1)"),
    ({"instances": True}, "instance_groups[0].instances must be a whole number ≥ 0 (it is True)"),
    ({"instances": 1.5}, "instance_groups[0].instances must be a whole number ≥ 0 (it is 1.5)"),
    ({"instances": 201}, "instance_groups[0].instances is 201; the simulator makes at most 200"),
    ({"name": "../escape"}, "instance_groups[0].name '../escape' is not a safe name"),
    ({"name": "a/b"}, "instance_groups[0].name 'a/b' is not a safe name"),
    ({"name": ".."}, "instance_groups[0].name '..' is not a safe name"),
    ({"name": "Redis"}, "instance_groups[0].name 'Redis' is not a safe name"),
    ({"name": ""}, "instance_groups[0].name '' is not a safe name"),
    ({"name": 7}, "instance_groups[0].name must be a name (it is a number)"),
    ({"jobs": "redis-server"}, "instance_groups[0].jobs must be a list (it is a string)"),
    (
        {"jobs": [{"name": "redis-server"}]},
        "instance_groups[0].jobs[0].release must be a name (it is missing)",
    ),
    (
        {"jobs": [{"name": "x", "release": "nope"}]},
        "instance_groups[0].jobs[0].release 'nope' is not in releases",
    ),
    (
        {"jobs": [{"name": "x/../y", "release": "redis"}]},
        "instance_groups[0].jobs[0].name 'x/../y' is not a safe name",
    ),
    (
        {"jobs": [{"name": "x", "release": "redis"}, {"name": "x", "release": "redis"}]},
        "instance_groups[0].jobs[1].name 'x' is a duplicate",
    ),
    (
        {
            "jobs": [
                {
                    "name": "x",
                    "release": "redis",
                    "properties": {"bbr": {"backup_one_restore_all": "yes"}},
                }
            ]
        },
        "instance_groups[0].jobs[0].properties.bbr.backup_one_restore_all must be true or false "
        "(it is 'yes')",
    ),
    (
        {"jobs": [{"name": "x", "release": "redis", "properties": []}]},
        "instance_groups[0].jobs[0].properties must be a mapping",
    ),
]


def refusal_cases() -> list[tuple[object, str]]:
    cases: list[tuple[object, str]] = list(BAD_MANIFESTS)
    cases += [(group_manifest(**group), message) for group, message in BAD_GROUPS]
    duplicate = kv_manifest(agent=1)
    duplicate["instance_groups"][1]["name"] = "redis"
    cases.append((duplicate, "instance_groups[1].name 'redis' is a duplicate"))
    big = kv_manifest(**{f"g{n}": 50 for n in range(4)})
    cases.append((big, "instance_groups ask for 202 VMs; the simulator makes at most 200"))
    cases.append(
        (
            "name: kv\nreleases: []\ninstance_groups: &g []\nother: *g\n",
            "the manifest is refused: it uses the YAML anchor &g (line 3)",
        )
    )
    bomb = "name: kv\nreleases: []\na: &a [x, x]\nb: [*a, *a]\ninstance_groups: []\n"
    cases.append((bomb, "anchors and aliases are refused"))
    cases.append(("name: kv\ninstance_groups: [\n", "the manifest is refused: while parsing"))
    return cases


@pytest.mark.parametrize(("document", "message"), refusal_cases())
def test_a_refused_manifest_changes_nothing(
    tmp_path: Path, home: Path, director: SimDirector, document: object, message: str
) -> None:
    simulation.deploy(home, "demo", "kv", write_manifest(tmp_path, kv_manifest(), "first.yml"))
    before = tree_state(director.root)
    path = write_manifest(tmp_path, document)
    with pytest.raises(UsageError) as error:
        simulation.deploy(home, "demo", "kv", path)
    assert str(error.value).startswith(f"{path}: "), error.value
    assert message in str(error.value)
    assert tree_state(director.root) == before


def test_manifest_files_that_are_not_manifests(
    tmp_path: Path, home: Path, director: SimDirector
) -> None:
    before = tree_state(director.root)
    missing = tmp_path / "missing.yml"
    with pytest.raises(UsageError, match=f"cannot read the manifest {missing}: No such file"):
        simulation.deploy(home, "demo", "kv", missing)
    huge = tmp_path / "huge.yml"
    huge.write_bytes(b"name: kv\n" + b"#" * (1 << 20))
    with pytest.raises(UsageError, match="the manifest is over the 1 MiB cap"):
        simulation.deploy(home, "demo", "kv", huge)
    binary = tmp_path / "binary.yml"
    binary.write_bytes(b"name: kv\xff\n")
    with pytest.raises(UsageError, match="not UTF-8"):
        simulation.deploy(home, "demo", "kv", binary)
    with pytest.raises(TargetError, match="invalid simulator name"):
        simulation.deploy(home, "../demo", "kv", binary)
    with pytest.raises(TargetError, match="there is no simulated director other"):
        simulation.deploy(home, "other", "kv", binary)
    assert tree_state(director.root) == before


def test_deploy_refuses_while_a_run_holds_the_deployment_or_the_director(
    tmp_path: Path, home: Path, director: SimDirector, bosh: SimBosh
) -> None:
    path = write_manifest(tmp_path, bosh.manifest("redis"))
    node = bosh.open_instances("redis", "redis")[2]
    run_ok(node, "redis-server", "pre-backup-lock")
    before, vms = database(director), bosh.vms("redis")
    for change in (
        lambda: simulation.deploy(home, "demo", "redis", path),
        lambda: simulation.delete_deployment(home, "demo", "redis"),
    ):
        with pytest.raises(
            TargetError,
            match=re.escape(
                "a bbr run is in progress on sim://demo/redis/redis/2 (redis-server locked)"
            ),
        ):
            change()
    run_ok(node, "redis-server", "post-backup-unlock")
    node.make_artifact_directory("redis-server")
    with pytest.raises(TargetError, match=re.escape("(var/vcap/store/bbr-backup exists)")):
        simulation.delete_deployment(home, "demo", "redis")
    node.remove_work_dir()
    assert database(director) == before
    assert bosh.vms("redis") == vms

    inst = SimInstance(director)
    run_ok(inst, "director", "pre-backup-lock")
    with pytest.raises(TargetError, match="cannot deploy on sim://demo: director API is locked"):
        simulation.deploy(home, "demo", "redis", path)
    with pytest.raises(TargetError, match="cannot delete a deployment on sim://demo: director API"):
        simulation.delete_deployment(home, "demo", "redis")
    run_ok(inst, "director", "post-backup-unlock")
    assert "3 VMs (3 kept" in simulation.deploy(home, "demo", "redis", path)


def test_deploy_refuses_vms_the_director_lost(
    tmp_path: Path, home: Path, director: SimDirector, bosh: SimBosh
) -> None:
    path = write_manifest(tmp_path, bosh.manifest("redis"))
    director.wipe()  # the director forgets redis; its VMs still run
    with pytest.raises(
        TargetError, match="its VMs redis/0, redis/1, redis/2 are not the ones"
    ) as error:
        simulation.deploy(home, "demo", "redis", path)
    assert (
        error.value.hint is not None and "bbrx sim delete-deployment demo redis" in error.value.hint
    )
    assert simulation.delete_deployment(home, "demo", "redis") == (
        "Deleted deployment redis from sim://demo: 3 VMs removed"
    )
    assert "3 VMs (3 new)" in simulation.deploy(home, "demo", "redis", path)


def test_a_redeploy_after_a_wipe_does_not_bring_the_data_back(
    tmp_path: Path, home: Path, director: SimDirector, bosh: SimBosh
) -> None:
    path = write_manifest(tmp_path, bosh.manifest("redis"))
    simulation.wipe(home, "demo", deployment="redis")
    simulation.deploy(home, "demo", "redis", path)
    assert all(store(n) == {} for n in bosh.open_instances("redis", "redis"))


def test_delete_deployment(home: Path, director: SimDirector, bosh: SimBosh) -> None:
    message = simulation.delete_deployment(home, "demo", "concourse")
    assert message == "Deleted deployment concourse from sim://demo: 3 VMs removed"
    assert bosh.deployments() == ["cf", "redis"]
    assert not (director.root / "deployments/concourse").exists()
    with pytest.raises(TargetError, match="has no deployment 'concourse'") as error:
        simulation.delete_deployment(home, "demo", "concourse")
    assert error.value.hint == "Deployments: cf, redis"
    with pytest.raises(TargetError, match="has no deployment"):
        bosh.manifest("concourse")


def test_wipe_a_deployment(home: Path, director: SimDirector, bosh: SimBosh) -> None:
    database = (director.root / "var/vcap/store/director/bosh.sql").read_bytes()
    others = {i.address: store(i) for i in bosh.open_instances("redis", "redis")}
    [db] = bosh.open_instances("cf", "database")
    run_ok(db, "bbr-uaadb", "backup", **with_artifact(db, "bbr-uaadb"))
    simulation.fault(
        home, "demo", "bbr-uaadb", "backup", "fail", deployment="cf", instance="database/0"
    )
    message = simulation.wipe(home, "demo", deployment="cf")
    assert message.startswith(
        "Deployment cf on sim://demo was recreated empty: its 9 VMs have their jobs and scripts"
    )
    assert store(db) == {} and db.vm.calls() == [] and db.vm.faults() == {}
    assert not db.work_dir_exists()
    assert [j.name for j in db.discover()] == [
        "bbr-cloudcontrollerdb",
        "bbr-credhubdb",
        "bbr-uaadb",
        "credhub",
    ]
    assert (director.root / "var/vcap/store/director/bosh.sql").read_bytes() == database
    assert {i.address: store(i) for i in bosh.open_instances("redis", "redis")} == others
    assert director.data_digest() != {}
    with pytest.raises(TargetError, match="has no deployment 'nope'"):
        simulation.wipe(home, "demo", deployment="nope")


# -- access and sim vms --------------------------------------------------------------


def test_access_to_a_group(director: SimDirector, bosh: SimBosh) -> None:
    api = bosh.open_instances("cf", "api")
    assert [(i.group, i.index) for i in api] == [("api", "0"), ("api", "1")]
    assert [i.instance_id for i in api] == [v.id for v in bosh.vms("cf") if v.group == "api"]
    with pytest.raises(
        TargetError, match="deployment 'cf' on sim://demo has no instance group 'web'"
    ) as error:
        bosh.open_instances("cf", "web")
    assert error.value.hint == "Instance groups: api, uaa, router, diego-cell, database"
    bosh.close_access("cf", "api")
    bosh.close_access("cf", "api")  # idempotent
    assert bosh.access_log() == [
        ("setup", "cf", "api"),
        ("cleanup", "cf", "api"),
        ("cleanup", "cf", "api"),
    ]
    bosh.close()
    bosh.close()

    # A VM the director lists but whose tree is gone does not answer.
    gone = director.root / "deployments/cf/api/1"
    gone.rename(gone.with_name("moved"))
    with pytest.raises(TargetError, match=r"api/\S+ \(index 1\) does not respond"):
        bosh.open_instances("cf", "api")
    gone.with_name("moved").rename(gone)


def test_sim_vms_shows_locked_and_lost_vms(director: SimDirector, bosh: SimBosh) -> None:
    node = bosh.open_instances("redis", "redis")[0]
    run_ok(node, "redis-server", "pre-backup-lock")
    [web] = bosh.vms("concourse")[:1]
    (director.root / "deployments/concourse/web/0/instance.yml").unlink()
    text = simulation.vms(director.root.parent.parent, "demo")
    redis0 = next(line for line in text.splitlines() if line.startswith("redis/"))
    assert "locked: redis-server" in redis0
    web_line = next(line for line in text.splitlines() if line.startswith(f"web/{web.id}"))
    assert "unresponsive agent" in web_line
    run_ok(node, "redis-server", "post-backup-unlock")
    assert "locked" not in simulation.vms(director.root.parent.parent, "demo")


def test_create_says_what_it_built(home: Path) -> None:
    message = simulation.create(home, "lab")
    root = home / "sim/lab"
    assert message == (
        f"Created sim://lab: a director with demo data at {root}, and its deployments "
        f"cf, redis, concourse (15 VMs under {root / 'deployments'})"
    )


# -- the README documents this layout --------------------------------------------------


def readme_jobs_table() -> list[list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("#### The seed deployments")
    section = text[start : text.index("\n#", start + 10)]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0].startswith("`"):
            rows.append(cells)
    return rows


def test_the_readme_table_lists_every_seed_job_with_its_scripts() -> None:
    rows = readme_jobs_table()
    listed = {}
    for deployment_group, count, job, release, scripts, _what, _before, _bora in rows:
        deployment, _, group = deployment_group.strip("`").partition("/")
        listed[(deployment, group, job.strip("`"))] = (
            int(count.strip("× ")),
            release.strip("`"),
            scripts,
        )
    expected = {}
    for deployment, groups in SEED_JOBS.items():
        counts = dict(SEED_LAYOUT[deployment])
        for group, jobs in groups.items():
            for job, release, _ in jobs:
                expected[(deployment, group, job)] = (counts[group], release)
    assert {k: v[:2] for k, v in listed.items()} == expected
    for (deployment, group, job), (_, _, scripts) in listed.items():
        have = SCRIPTED[(deployment, group)].get(job, set())
        if not have:
            assert scripts == "none", job
        else:
            words = {
                "locks": LOCKS,
                "backup": {"backup"},
                "restore": {"restore"},
                "metadata": {"metadata"},
            }
            named: set[str] = set()
            for word in scripts.split(", "):
                named |= words[word]
            assert named == have, job
