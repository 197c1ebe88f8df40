"""The simulated director: its tree, its real bash scripts, and SimInstance over it.

Everything runs for real under tmp_path: files, bash subprocesses, GNU tar.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from orchestrator.bbr.tardigest import TarDigest
from orchestrator.errors import DiscoveryError, TargetError, TransportError
from orchestrator.transport.instance import Instance, ScriptCall, ScriptResult, SentDigest
from simulator.director import SimDirector, sim_root
from simulator.instance import SimInstance

ALL_SCRIPTS = {
    "metadata",
    "pre-backup-lock",
    "backup",
    "post-backup-unlock",
    "pre-restore-lock",
    "restore",
    "post-restore-unlock",
}
LOCK_SCRIPTS = ALL_SCRIPTS - {"backup", "restore"}
BACKUP_LEVELS = [["bbr-credhubdb", "uaa"], ["director"], ["blobstore"]]
ARTIFACT_JOBS = ["bbr-credhubdb", "blobstore", "director"]
ALL_JOBS = ["bbr-credhubdb", "blobstore", "director", "uaa"]


@pytest.fixture
def director(tmp_path: Path) -> SimDirector:
    d = SimDirector(sim_root(tmp_path / "home", "demo"))
    d.create()
    return d


@pytest.fixture
def instance(director: SimDirector) -> Iterator[SimInstance]:
    inst = SimInstance(director)
    yield inst
    inst.close()


def run(inst: SimInstance, job: str, script: str, **env: str) -> ScriptResult:
    return inst.run_script(ScriptCall(job, script, env))


def artifact_env(inst: SimInstance, job: str) -> dict[str, str]:
    path = inst.artifact_directory(job)
    return {"BBR_ARTIFACT_DIRECTORY": path, "ARTIFACT_DIRECTORY": path}


def run_ok(inst: SimInstance, job: str, script: str, **env: str) -> ScriptResult:
    result = run(inst, job, script, **env)
    assert result.ok, (job, script, result.exit_code, result.stderr)
    return result


def backup_all(inst: SimInstance) -> dict[str, bytes]:
    """A bbr-like backup of every job; returns each job's artifact as tar bytes."""
    for level in BACKUP_LEVELS:
        for job in level:
            run_ok(inst, job, "pre-backup-lock")
    for job in ARTIFACT_JOBS:
        inst.make_artifact_directory(job)
        run_ok(inst, job, "backup", **artifact_env(inst, job))
    for level in reversed(BACKUP_LEVELS):
        for job in level:
            run_ok(inst, job, "post-backup-unlock", BBR_AFTER_BACKUP_SCRIPTS_SUCCESSFUL="true")
    tars = {}
    for job in ARTIFACT_JOBS:
        with inst.stream_out(job) as stream:
            tars[job] = stream.read()
    inst.remove_work_dir()
    return tars


def chunked(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


# -- the tree -----------------------------------------------------------------------


def test_create_builds_tree_with_executable_scripts_and_data(director: SimDirector) -> None:
    root = director.root
    assert director.exists()
    assert director.name == "demo"
    assert (root / ".bbrx-sim").is_file()
    assert director.jobs() == ALL_JOBS
    assert (root / "var/vcap/packages/bbr-sim/lib.sh").is_file()
    for job in director.jobs():
        scripts = root / "var/vcap/jobs" / job / "bin/bbr"
        expected = LOCK_SCRIPTS if job == "uaa" else ALL_SCRIPTS
        assert {p.name for p in scripts.iterdir()} == expected
        for script in scripts.iterdir():
            assert stat.S_IMODE(script.stat().st_mode) == 0o755
            assert script.read_text().startswith("#!/usr/bin/env bash\n")
        assert (root / "var/vcap/jobs" / job / "config/metadata.yml").is_file()
    digest = director.data_digest()
    assert "director/bosh.sql" in digest
    assert "credhub/credentials.yml" in digest
    blobs = sorted((root / "var/vcap/store/blobstore/store").glob("*/*"))
    assert len(blobs) == 5
    for blob in blobs:
        assert blob.parent.name == blob.name[:2]
    sizes = sorted(b.stat().st_size for b in blobs)
    assert sizes[-1] == 1 << 20
    assert all(50 * 1024 <= s <= 300 * 1024 for s in sizes[:-1])
    assert sum(sizes) < 3 << 20
    assert [d.name for d in director.deployments()] == ["cf", "redis", "concourse"]
    assert director.locked_jobs() == []
    assert director.calls() == []


def test_seed_data_is_deterministic(tmp_path: Path, director: SimDirector) -> None:
    other = SimDirector(tmp_path / "other")
    other.create()
    assert other.data_digest() == director.data_digest()


def test_create_twice_errors_and_ensure(tmp_path: Path, director: SimDirector) -> None:
    with pytest.raises(TargetError, match="already exists"):
        director.create()
    assert director.ensure() is False
    fresh = SimDirector(tmp_path / "fresh")
    assert fresh.ensure() is True
    assert fresh.exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(TargetError, match="not a simulated director"):
        SimDirector(foreign).create()
    assert (foreign / "keep.txt").read_text() == "mine"


def test_create_empty_has_jobs_but_no_data(tmp_path: Path) -> None:
    empty = SimDirector(tmp_path / "empty")
    empty.create(empty=True)
    assert empty.jobs() == ALL_JOBS
    assert empty.data_digest() == {}
    assert empty.deployments() == []
    assert empty.render_vms() == "No deployments (the director database is empty)\n"


def test_render_vms_lists_deployments(director: SimDirector) -> None:
    text = director.render_vms()
    assert text.startswith("Deployment 'cf'\n\nInstance")
    header = text.splitlines()[2]
    for column in ("Instance", "Process State", "AZ", "IPs", "VM CID", "VM Type"):
        assert column in header
    assert "9 vms" in text and "Deployment 'redis'" in text and "Deployment 'concourse'" in text
    vm = director.deployments()[0].vms[0]
    assert vm.instance.startswith("api/") and vm.process_state == "running"
    assert vm.ips == ("10.0.1.10",) and vm.vm_cid.startswith("vm-")


def test_destroy_refuses_without_marker(tmp_path: Path, director: SimDirector) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "data").write_text("x")
    with pytest.raises(TargetError, match="not a simulated director"):
        SimDirector(plain).destroy()
    assert (plain / "data").exists()
    director.destroy()
    assert not director.root.exists()


@pytest.mark.parametrize("name", ["", "Demo", "-x", ".x", "a/b", "a b", "x" * 64, "..", "é"])
def test_sim_root_rejects_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(TargetError, match="invalid simulator name"):
        sim_root(tmp_path, name)


def test_sim_root_accepts_good_names(tmp_path: Path) -> None:
    assert sim_root(tmp_path, "demo") == tmp_path / "sim/demo"
    assert sim_root(tmp_path, "0.a_b-c") == tmp_path / "sim/0.a_b-c"
    assert sim_root(tmp_path, "x" * 63).name == "x" * 63


# -- discovery and metadata ---------------------------------------------------------


def test_instance_satisfies_the_protocol(instance: SimInstance) -> None:
    assert isinstance(instance, Instance)
    assert (instance.group, instance.index, instance.mode) == ("bosh", "0", "sim")
    assert instance.address == "sim://demo"


def test_discover_lists_jobs_and_ignores_the_rest(
    director: SimDirector, instance: SimInstance
) -> None:
    jobs_dir = director.root / "var/vcap/jobs"

    def add(job: str, script: str, mode: int = 0o755) -> None:
        path = jobs_dir / job / "bin/bbr" / script
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(mode)

    add("mysql-backup", "backup")
    add("mysql-restore", "restore")
    add("odd-job", "frobnicate")
    add("director", "frobnicate")
    add("sleepy", "backup", mode=0o644)  # not executable: bbr would not run it
    (jobs_dir / "no-bbr").mkdir()

    jobs = instance.discover()
    assert [j.name for j in jobs] == ALL_JOBS
    by_name = {j.name: j for j in jobs}
    assert by_name["director"].scripts == frozenset(ALL_SCRIPTS)
    assert by_name["uaa"].scripts == frozenset(LOCK_SCRIPTS)
    assert not by_name["uaa"].has("backup")


def test_discover_missing_root_names_the_path(tmp_path: Path) -> None:
    missing = SimInstance(SimDirector(tmp_path / "nowhere"))
    with pytest.raises(DiscoveryError, match="nowhere"):
        missing.discover()


def test_metadata_scripts_print_the_lock_order(instance: SimInstance) -> None:
    before: dict[str, set[str]] = {}
    for job in instance.discover():
        result = run_ok(instance, job.name, "metadata", BBR_VERSION="1.9.38")
        metadata = yaml.safe_load(result.stdout)
        for key in ("backup_should_be_locked_before", "restore_should_be_locked_before"):
            for entry in metadata[key]:
                assert set(entry) == {"job_name", "release"}
                assert entry["release"] == "bosh"
        names = {e["job_name"] for e in metadata["backup_should_be_locked_before"]}
        assert names == {e["job_name"] for e in metadata["restore_should_be_locked_before"]}
        before[job.name] = names
    # Kahn's algorithm, as bbr does it.
    levels: list[list[str]] = []
    remaining = dict(before)
    while remaining:
        blocked = {after for deps in remaining.values() for after in deps}
        level = sorted(job for job in remaining if job not in blocked)
        assert level, "cycle"
        levels.append(level)
        for job in level:
            del remaining[job]
    assert levels == BACKUP_LEVELS


# -- scripts ------------------------------------------------------------------------


def test_lock_backup_unlock_writes_artifact_and_logs_calls(
    director: SimDirector, instance: SimInstance
) -> None:
    run_ok(instance, "director", "pre-backup-lock")
    assert director.locked_jobs() == ["director"]
    lock_text = (director.root / "var/vcap/sys/run/bbr-sim/locks/director").read_text()
    assert lock_text.startswith("pre-backup-lock ")
    instance.make_artifact_directory("director")
    env = artifact_env(instance, "director")
    assert env["BBR_ARTIFACT_DIRECTORY"].endswith("/var/vcap/store/bbr-backup/director/")
    run_ok(instance, "director", "backup", **env)
    result = run_ok(
        instance, "director", "post-backup-unlock", BBR_AFTER_BACKUP_SCRIPTS_SUCCESSFUL="true"
    )
    assert "BBR_AFTER_BACKUP_SCRIPTS_SUCCESSFUL=true" in result.stdout
    assert director.locked_jobs() == []

    artifact = director.root / "var/vcap/store/bbr-backup/director"
    assert [p.name for p in artifact.iterdir()] == ["director.sql"]
    db = director.root / "var/vcap/store/director/bosh.sql"
    assert (artifact / "director.sql").read_bytes() == db.read_bytes()

    calls = director.calls()
    assert [(c.script, c.event) for c in calls] == [
        ("pre-backup-lock", "start"),
        ("pre-backup-lock", "exit"),
        ("backup", "start"),
        ("backup", "exit"),
        ("post-backup-unlock", "start"),
        ("post-backup-unlock", "exit"),
    ]
    assert all(c.job == "director" for c in calls)
    assert [c.rc for c in calls if c.event == "exit"] == [0, 0, 0]
    assert calls[2].extra == {"BBR_ARTIFACT_DIRECTORY": env["BBR_ARTIFACT_DIRECTORY"]}
    assert calls[4].extra == {"BBR_AFTER_BACKUP_SCRIPTS_SUCCESSFUL": "true"}
    assert calls[0].pid == calls[1].pid != calls[2].pid
    times = [c.time for c in calls]
    assert times == sorted(times)
    director.clear_calls()
    assert director.calls() == []


def test_backup_without_lock_refuses(director: SimDirector, instance: SimInstance) -> None:
    instance.make_artifact_directory("director")
    result = run(instance, "director", "backup", **artifact_env(instance, "director"))
    assert result.exit_code == 1
    assert "director is not locked: refusing to back up a live database" in result.stderr
    assert list((director.root / "var/vcap/store/bbr-backup/director").iterdir()) == []
    assert director.calls()[-1].rc == 1


def test_restore_without_lock_refuses(instance: SimInstance) -> None:
    instance.make_artifact_directory("bbr-credhubdb")
    result = run(instance, "bbr-credhubdb", "restore", **artifact_env(instance, "bbr-credhubdb"))
    assert result.exit_code == 1
    assert "bbr-credhubdb is not locked" in result.stderr


def test_backup_refuses_artifact_dir_without_trailing_slash(instance: SimInstance) -> None:
    run_ok(instance, "blobstore", "pre-backup-lock")
    instance.make_artifact_directory("blobstore")
    bad = instance.artifact_directory("blobstore").rstrip("/")
    result = run(instance, "blobstore", "backup", BBR_ARTIFACT_DIRECTORY=bad)
    assert result.exit_code == 1
    assert "must end with '/'" in result.stderr


def test_unlock_is_idempotent(director: SimDirector, instance: SimInstance) -> None:
    run_ok(instance, "uaa", "post-restore-unlock")
    run_ok(instance, "uaa", "pre-restore-lock")
    assert director.locked_jobs() == ["uaa"]
    run_ok(instance, "uaa", "post-restore-unlock")
    run_ok(instance, "uaa", "post-restore-unlock")
    assert director.locked_jobs() == []


def test_run_script_missing_is_a_transport_error(instance: SimInstance) -> None:
    with pytest.raises(TransportError, match="not found"):
        run(instance, "uaa", "backup")


def test_scripts_ignore_the_callers_cwd_and_env_paths(
    director: SimDirector, instance: SimInstance, tmp_path: Path
) -> None:
    # The scripts find the VM root from their own path, so a stray environment is harmless.
    result = run_ok(instance, "uaa", "pre-backup-lock", ROOT="/nonexistent", HOME=str(tmp_path))
    assert "locked" in result.stdout
    assert director.locked_jobs() == ["uaa"]


def test_scripts_work_through_symlinked_job_dirs(
    director: SimDirector, instance: SimInstance
) -> None:
    # On a real VM /var/vcap/jobs/<job> is a symlink into /var/vcap/data/jobs/; the scripts
    # must still find the VM root six levels above bin/bbr/ as the path spells it.
    jobs = director.root / "var/vcap/jobs"
    real = director.root / "var/vcap/data/jobs/uaa/0123abcd"
    real.parent.mkdir(parents=True)
    (jobs / "uaa").rename(real)
    (jobs / "uaa").symlink_to(real)
    run_ok(instance, "uaa", "pre-backup-lock")
    assert director.locked_jobs() == ["uaa"]
    assert [(c.job, c.script) for c in director.calls()] == [("uaa", "pre-backup-lock")] * 2


def test_parallel_scripts_share_the_call_log(director: SimDirector, instance: SimInstance) -> None:
    results: list[ScriptResult] = []
    threads = [
        threading.Thread(target=lambda job=job: results.append(run(instance, job, "metadata")))
        for job in ALL_JOBS * 3
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(results) == 12 and all(r.ok for r in results)
    calls = director.calls()
    assert len(calls) == 24
    for pid in {c.pid for c in calls}:
        assert [c.event for c in calls if c.pid == pid] == ["start", "exit"]


# -- faults -------------------------------------------------------------------------


def test_fail_fault_exits_with_code_and_message(
    director: SimDirector, instance: SimInstance
) -> None:
    director.set_fault("director", "pre-backup-lock", "fail 3 boom")
    result = run(instance, "director", "pre-backup-lock")
    assert result.exit_code == 3
    assert result.stderr.strip() == "boom"
    assert result.killed_by is None
    assert director.locked_jobs() == []  # the fault fires before the script's work
    assert [(c.event, c.rc) for c in director.calls()] == [("start", None), ("exit", 3)]
    assert director.faults() == {("director", "pre-backup-lock"): "fail 3 boom"}

    director.set_fault("director", "pre-backup-lock", "fail")
    result = run(instance, "director", "pre-backup-lock")
    assert (result.exit_code, result.stderr.strip()) == (1, "injected failure")

    director.clear_faults("director")
    run_ok(instance, "director", "pre-backup-lock")
    assert director.faults() == {}


def test_a_call_n_fault_acts_on_that_call_only(
    director: SimDirector, instance: SimInstance
) -> None:
    """`call 2 fail 4 second time`: the first call runs clean, the second fails, the third
    is clean again; setting the fault anew restarts the count. A copy counts the same way."""
    director.set_fault("director", "pre-backup-lock", "call  2   fail 4 second time")
    assert director.faults() == {("director", "pre-backup-lock"): "call 2 fail 4 second time"}
    run_ok(instance, "director", "pre-backup-lock")
    result = run(instance, "director", "pre-backup-lock")
    assert (result.exit_code, result.stderr.strip()) == (4, "second time")
    run_ok(instance, "director", "pre-backup-lock")
    director.set_fault("director", "pre-backup-lock", "call 1 fail 5")
    assert run(instance, "director", "pre-backup-lock").exit_code == 5
    run_ok(instance, "director", "pre-backup-lock")

    director.set_fault("blobstore", "transfer", "call 2 fail link down")
    backup_all(instance)  # the first copy
    run_ok(instance, "blobstore", "pre-backup-lock")
    instance.make_artifact_directory("blobstore")
    run_ok(instance, "blobstore", "backup", **artifact_env(instance, "blobstore"))
    for copy in (2, 3):
        if copy == 2:
            with (
                pytest.raises(TransportError, match="link down"),
                instance.stream_out("blobstore") as stream,
            ):
                while stream.read(1 << 16):
                    pass
        else:
            with instance.stream_out("blobstore") as stream:
                assert stream.read()
    assert director.faults() == {
        ("director", "pre-backup-lock"): "call 1 fail 5",
        ("blobstore", "transfer"): "call 2 fail link down",
    }


def test_an_after_fault_acts_once_its_delay_has_passed(
    director: SimDirector, instance: SimInstance
) -> None:
    """`after SECONDS SPEC`: calls before the delay is over run clean and are not counted
    (a `call N` after it counts from then); the delay runs from when the fault was set, its
    file's mtime (set back here rather than waited for)."""
    director.set_fault("director", "pre-backup-lock", "after  30 call 2 fail 6 late")
    assert director.faults() == {("director", "pre-backup-lock"): "after 30 call 2 fail 6 late"}
    fault_file = director.root / "var/vcap/sys/run/bbr-sim/faults/director/pre-backup-lock"
    run_ok(instance, "director", "pre-backup-lock")  # too early: clean, and not counted
    set_at = fault_file.stat().st_mtime
    os.utime(fault_file, (set_at - 31, set_at - 31))
    run_ok(instance, "director", "pre-backup-lock")  # the first call counted
    assert run(instance, "director", "pre-backup-lock").exit_code == 6
    run_ok(instance, "director", "pre-backup-lock")

    director.set_fault("blobstore", "transfer", "after 30 fail link down")
    _backed_up(instance, "blobstore")
    with instance.stream_out("blobstore") as stream:  # too early
        assert stream.read()
    fault_file = fault_file.parent.parent / "blobstore/transfer"
    os.utime(fault_file, (set_at - 31, set_at - 31))
    with (
        pytest.raises(TransportError, match="link down"),
        instance.stream_out("blobstore") as stream,
    ):
        while stream.read(1 << 16):
            pass


@pytest.mark.parametrize(
    "spec", ["call 1 after 2 fail", "after 2 after 3 fail", "after x fail", "after 2"]
)
def test_an_after_fault_comes_first_and_once(director: SimDirector, spec: str) -> None:
    with pytest.raises(TargetError, match="invalid fault"):
        director.set_fault("director", "backup", spec)


@pytest.mark.parametrize("spec", ["call 0 fail", "call 2", "call x fail", "call 1 explode"])
def test_a_call_fault_must_name_a_call_and_a_fault(director: SimDirector, spec: str) -> None:
    with pytest.raises(TargetError, match="invalid fault"):
        director.set_fault("director", "backup", spec)


def test_sleep_fault_delays_then_runs(director: SimDirector, instance: SimInstance) -> None:
    director.set_fault("uaa", "pre-backup-lock", "sleep 0.3")
    result = run_ok(instance, "uaa", "pre-backup-lock")
    assert result.duration >= 0.3
    assert director.locked_jobs() == ["uaa"]
    director.clear_faults()
    assert director.faults() == {}


@pytest.mark.parametrize(
    ("job", "script", "spec", "message"),
    [
        ("nope", "backup", "hang", "no job"),
        ("uaa", "backup", "hang", "has no 'backup' script"),
        ("uaa", "frobnicate", "hang", "has no 'frobnicate' script"),
        ("uaa", "metadata", "explode", "invalid fault"),
        ("uaa", "metadata", "fail x", "invalid fault"),
        ("uaa", "metadata", "fail 0", "1..255"),
        ("uaa", "metadata", "fail 256", "1..255"),
        ("uaa", "metadata", "sleep", "invalid fault"),
        ("uaa", "metadata", "hang\nfail", "invalid fault"),
        ("blobstore", "transfer", "corrupt-remote", "corrupt-local \\(a backup's copy changes"),
    ],
)
def test_set_fault_validates(
    director: SimDirector, job: str, script: str, spec: str, message: str
) -> None:
    with pytest.raises(TargetError, match=message):
        director.set_fault(job, script, spec)
    assert director.faults() == {}


def test_hang_is_ended_by_terminate_scripts(director: SimDirector, instance: SimInstance) -> None:
    director.set_fault("blobstore", "pre-backup-lock", "hang")
    results: list[ScriptResult] = []
    worker = threading.Thread(
        target=lambda: results.append(run(instance, "blobstore", "pre-backup-lock"))
    )
    worker.start()
    deadline = time.monotonic() + 5
    while not director.calls() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # let the script reach its sleep loop
    started = time.monotonic()
    instance.terminate_scripts()
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert time.monotonic() - started < 4
    [result] = results
    assert result.exit_code is None
    assert result.killed_by is not None and result.killed_by.startswith("SIGTERM")
    assert not result.ok
    assert director.locked_jobs() == []
    # bash runs the EXIT trap on a fatal signal too.
    assert [c.event for c in director.calls()] == ["start", "exit"]
    # The interruption does not poison later runs (the unlocks that follow it).
    director.clear_faults()
    run_ok(instance, "blobstore", "post-backup-unlock")


@pytest.mark.slow
def test_terminate_escalates_to_sigkill(director: SimDirector, instance: SimInstance) -> None:
    script = director.root / "var/vcap/jobs/stubborn/bin/bbr/pre-backup-lock"
    script.parent.mkdir(parents=True)
    ready = director.root / "ready"
    script.write_text(
        f"#!/usr/bin/env bash\ntrap '' TERM\ntouch {ready}\nwhile :; do sleep 0.1; done\n"
    )
    script.chmod(0o755)
    results: list[ScriptResult] = []
    worker = threading.Thread(
        target=lambda: results.append(run(instance, "stubborn", "pre-backup-lock"))
    )
    worker.start()
    deadline = time.monotonic() + 5
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    instance.terminate_scripts()
    worker.join(timeout=8)
    assert not worker.is_alive()
    assert 2.5 < time.monotonic() - started < 6
    [result] = results
    assert result.exit_code is None
    assert result.killed_by == "SIGKILL (run interrupted)"


def test_terminate_and_close_with_nothing_running(instance: SimInstance) -> None:
    instance.terminate_scripts()
    instance.close()
    instance.close()
    run_ok(instance, "uaa", "metadata")


# -- streams ------------------------------------------------------------------------


def test_stream_out_tar_matches_checksums(director: SimDirector, instance: SimInstance) -> None:
    run_ok(instance, "blobstore", "pre-backup-lock")
    instance.make_artifact_directory("blobstore")
    run_ok(instance, "blobstore", "backup", **artifact_env(instance, "blobstore"))
    checksums = instance.checksum_artifact_directory("blobstore")
    assert len(checksums) == 5
    assert all(name.startswith("./blobs/") for name in checksums)

    hashed: dict[str, str] = {}
    with instance.stream_out("blobstore") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            assert member.name == "." or member.name.startswith("./")
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                hashed[member.name] = hashlib.sha256(extracted.read()).hexdigest()
    assert hashed == checksums


def _backed_up(instance: SimInstance, job: str) -> None:
    run_ok(instance, job, "pre-backup-lock")
    instance.make_artifact_directory(job)
    run_ok(instance, job, "backup", **artifact_env(instance, job))


def test_stream_out_reports_the_vms_digest_of_what_it_sent(
    director: SimDirector, instance: SimInstance
) -> None:
    _backed_up(instance, "blobstore")
    with instance.stream_out("blobstore") as stream:
        assert stream.digest is None  # known once the copy has ended
        received = stream.read()
    assert stream.digest == SentDigest("tar", tar_digest(received))

    # corrupt: a byte changes after the VM hashed it, so the VM's digest is of the good tar.
    director.set_fault("blobstore", "transfer", "corrupt")
    with instance.stream_out("blobstore") as stream:
        corrupted = stream.read()
    assert stream.digest == SentDigest("tar", tar_digest(received))
    assert len(corrupted) == len(received) and corrupted != received
    assert [i for i in range(len(received)) if corrupted[i] != received[i]] == [600_000]


def tar_digest(data: bytes) -> str:
    digest = TarDigest()
    digest.feed(data)
    return digest.hexdigest()


def test_corrupt_local_changes_the_jump_box_copy_once_written(
    director: SimDirector, instance: SimInstance, tmp_path: Path
) -> None:
    _backed_up(instance, "blobstore")
    director.set_fault("blobstore", "transfer", "corrupt-local")
    copy = tmp_path / "demo_20261201T000000Z.incomplete" / "bosh-0-blobstore.tar"
    copy.parent.mkdir()
    with instance.stream_out("blobstore") as stream, open(copy, "xb", buffering=0) as sink:
        streamed = bytearray()
        while chunk := stream.read(1 << 20):
            streamed += chunk
            sink.write(chunk)
    # The stream itself was intact: the VM's digest is of what passed by.
    assert stream.digest == SentDigest("tar", tar_digest(streamed))
    on_disk = copy.read_bytes()
    assert [i for i in range(len(streamed)) if on_disk[i] != streamed[i]] == [600_000]


def test_corrupt_local_of_a_short_copy_waits_for_the_writer_to_finish(
    director: SimDirector, instance: SimInstance, tmp_path: Path
) -> None:
    """A copy the writer writes only at its end (shorter than one of its writes): the byte
    is changed once the stream is over, before the copy is read back: in its first file."""
    _backed_up(instance, "director")
    director.set_fault("director", "transfer", "corrupt-local")
    copy = tmp_path / "demo_20261201T000000Z.incomplete" / "bosh-0-director.tar"
    copy.parent.mkdir()
    with open(copy, "xb", buffering=0) as sink, instance.stream_out("director") as stream:
        streamed = stream.read()
        assert stream.read() == b"" and len(streamed) < 600_000
        sink.write(streamed)
        assert copy.read_bytes() == streamed  # not yet: the stream has not ended
    changed = [i for i, byte in enumerate(copy.read_bytes()) if byte != streamed[i]]
    with tarfile.open(fileobj=io.BytesIO(streamed)) as tar:
        first = next(m for m in tar.getmembers() if m.isfile() and m.size)
    assert changed == [first.offset_data + first.size // 2]


def test_stream_out_errors(instance: SimInstance) -> None:
    missing = "no artifact directory for job director on sim://demo"
    with pytest.raises(TransportError, match=missing), instance.stream_out("director"):
        pass
    instance.make_artifact_directory("director")
    with pytest.raises(ValueError, match="consumer broke"), instance.stream_out("director"):
        raise ValueError("consumer broke")


def tar_checksums(data: bytes) -> dict[str, str]:
    checksums = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            extracted = tar.extractfile(member) if member.isfile() else None
            if extracted is not None:
                checksums[member.name] = hashlib.sha256(extracted.read()).hexdigest()
    return checksums


def test_stream_in_round_trip(tmp_path: Path, instance: SimInstance) -> None:
    tars = backup_all(instance)
    other = SimDirector(tmp_path / "other")
    other.create(empty=True)
    target = SimInstance(other)
    try:
        for job in ARTIFACT_JOBS:
            target.stream_in(job, chunked(tars[job]))
            restored = target.checksum_artifact_directory(job)
            assert restored == tar_checksums(tars[job])
            with target.stream_out(job) as stream:
                assert tar_checksums(stream.read()) == restored
        assert len(target.checksum_artifact_directory("blobstore")) == 5
        with pytest.raises(TransportError, match="tar exited"):
            target.stream_in("director", iter([b"this is not a tar archive" * 100]))
    finally:
        target.close()


def test_work_dir_lifecycle(instance: SimInstance) -> None:
    assert not instance.work_dir_exists()
    instance.make_artifact_directory("director")
    assert instance.work_dir_exists()
    assert instance.checksum_artifact_directory("director") == {}
    instance.remove_work_dir()
    instance.remove_work_dir()
    assert not instance.work_dir_exists()


# -- the disaster -------------------------------------------------------------------


def test_backup_wipe_restore_makes_the_director_whole(
    director: SimDirector, instance: SimInstance
) -> None:
    before = director.data_digest()
    vms_before = director.render_vms()
    tars = backup_all(instance)
    assert director.locked_jobs() == []

    director.wipe()
    assert director.data_digest() == {}
    assert director.calls() == []
    assert director.render_vms() == "No deployments (the director database is empty)\n"
    assert [j.name for j in instance.discover()] == ALL_JOBS

    for job in ARTIFACT_JOBS:
        instance.stream_in(job, chunked(tars[job]))
    for level in BACKUP_LEVELS:
        for job in level:
            run_ok(instance, job, "pre-restore-lock")
    for job in ARTIFACT_JOBS:
        run_ok(instance, job, "restore", **artifact_env(instance, job))
    for level in reversed(BACKUP_LEVELS):
        for job in level:
            run_ok(instance, job, "post-restore-unlock")
    instance.remove_work_dir()

    assert director.data_digest() == before
    assert director.render_vms() == vms_before
    assert director.locked_jobs() == []
    restores = [c for c in director.calls() if c.script == "restore" and c.event == "exit"]
    assert sorted(c.job for c in restores) == ARTIFACT_JOBS
    assert all(c.rc == 0 for c in restores)


def test_blobstore_restore_replaces_what_is_there(
    director: SimDirector, instance: SimInstance
) -> None:
    before = director.data_digest()
    tars = backup_all(instance)
    store = director.root / "var/vcap/store/blobstore/store"
    (store / "zz").mkdir()
    (store / "zz/stray").write_bytes(b"not in the backup")
    next(store.glob("[0-9a-f][0-9a-f]/*")).write_bytes(b"corrupted")
    instance.stream_in("blobstore", chunked(tars["blobstore"]))
    run_ok(instance, "blobstore", "pre-restore-lock")
    run_ok(instance, "blobstore", "restore", **artifact_env(instance, "blobstore"))
    run_ok(instance, "blobstore", "post-restore-unlock")
    assert director.data_digest() == before


def test_locked_director_shows_in_render_vms(director: SimDirector, instance: SimInstance) -> None:
    result = run_ok(instance, "director", "pre-backup-lock")
    assert "locked" in result.stdout
    pid = director.calls()[0].pid
    text = director.render_vms()
    assert text == (
        f"director API is locked by pre-backup-lock (pid {pid}): deployments unavailable\n"
    )
    assert "Instance" not in text
    run_ok(instance, "director", "post-backup-unlock", BBR_AFTER_BACKUP_SCRIPTS_SUCCESSFUL="false")
    assert director.render_vms().startswith("Deployment 'cf'")
