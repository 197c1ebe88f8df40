"""Backup behaviour, asserted through what a user sees: exit codes, error text, files on disk,
which scripts ran in what order (from the VM's own call log), and audit rows."""

from __future__ import annotations

import re
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from orchestrator.bbr.artifact import validate
from orchestrator.bbr.tardigest import TarDigest
from simulator.director import SimDirector, sim_root
from tests.conftest import wait_for

ALL_JOBS = {"bbr-credhubdb", "blobstore", "director", "uaa"}
BACKUP_JOBS = {"bbr-credhubdb", "blobstore", "director"}


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """The operator's --artifact-path on the jump box."""
    path = tmp_path / "generated-backup"
    path.mkdir()
    return path


def backups(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir())


def test_happy_backup(target, out):
    result = target.director("backup", "--artifact-path", str(out))
    assert result.code == 0, result

    [artifact] = backups(out)
    assert artifact.name.startswith(f"{target.name}_") and artifact.name.endswith("Z")
    assert stat.S_IMODE(artifact.stat().st_mode) == 0o700
    assert sorted(p.name for p in artifact.iterdir()) == [
        "bbrx-audit.yml",
        "bosh-0-bbr-credhubdb.tar",
        "bosh-0-blobstore.tar",
        "bosh-0-director.tar",
        "metadata",
    ]
    assert f"Backup created: {artifact}" in result.stdout
    manifest = validate(artifact)
    assert {a.name for _, a in manifest.jobs()} == BACKUP_JOBS
    assert "./director.sql" in dict((a.name, a.checksums) for _, a in manifest.jobs())["director"]

    # Every job locked, backed up, unlocked with SUCCESSFUL=true; nothing left on the VM.
    assert set(target.scripts_run("pre-backup-lock")) == ALL_JOBS
    assert set(target.scripts_run("backup")) == BACKUP_JOBS
    assert target.unlock_env() == {job: "true" for job in ALL_JOBS}
    assert target.vm.locked_jobs() == []
    assert not target.work_dir().exists()

    rows = target.bbrx.audit_rows()
    run_rows = [r for r in rows if r["job"] is None]
    assert [r["to_state"] for r in run_rows] == [
        "discovering",
        "checking",
        "locking",
        "backing_up",
        "unlocking",
        "draining",
        "cleaning",
        "succeeded",
    ]
    assert {r["operator"] for r in rows} == {"trainee@test"}
    assert {r["mode"] for r in rows} == {"sim" if target.transport == "sim" else "live"}
    assert {r["target"] for r in rows} == {f"{target.address}"}
    lock_rows = [r for r in rows if r["script"] == "pre-backup-lock" and r["to_state"] == "locked"]
    assert {r["job"] for r in lock_rows} == ALL_JOBS
    assert all(r["exit_code"] == 0 and r["duration"] >= 0 for r in lock_rows)

    head = yaml.safe_load((artifact / "bbrx-audit.yml").read_text())
    assert head["run_id"] == rows[0]["run_id"]
    assert any(r["seq"] == head["seq"] and r["hash"] == head["hash"] for r in rows)


def test_backup_defaults_to_the_current_directory(target, out):
    result = target.director("backup", cwd=out)
    assert result.code == 0, result
    assert [p.name[:5] for p in backups(out)] == [f"{target.name}_"[:5]]


def test_lock_levels_and_reverse_unlock(target, out):
    result = target.director("backup", "--artifact-path", str(out))
    assert result.code == 0, result
    calls = target.vm.calls()

    def first(job, script, event):
        return next(
            i for i, c in enumerate(calls) if (c.job, c.script, c.event) == (job, script, event)
        )

    # Level 0 {bbr-credhubdb, uaa} -> level 1 {director} -> level 2 {blobstore}.
    for job in ("bbr-credhubdb", "uaa"):
        assert first(job, "pre-backup-lock", "exit") < first("director", "pre-backup-lock", "start")
    assert first("director", "pre-backup-lock", "exit") < first(
        "blobstore", "pre-backup-lock", "start"
    )
    last_lock = max(i for i, c in enumerate(calls) if c.script == "pre-backup-lock")
    assert last_lock < min(i for i, c in enumerate(calls) if c.script == "backup")
    # Unlocks in reverse: blobstore, then director, then the first level.
    assert first("blobstore", "post-backup-unlock", "exit") < first(
        "director", "post-backup-unlock", "start"
    )
    for job in ("bbr-credhubdb", "uaa"):
        assert first("director", "post-backup-unlock", "exit") < first(
            job, "post-backup-unlock", "start"
        )
    assert "Lock level 0: bbr-credhubdb, uaa" in result.stderr
    assert "Lock level 2: blobstore" in result.stderr

    plan_row = next(r for r in target.bbrx.audit_rows() if r["trigger"] == "checks_passed")
    assert [level["jobs"] for level in plan_row["detail"]["lock_plan"]] == [
        ["bbr-credhubdb", "uaa"],
        ["director"],
        ["blobstore"],
    ]


def test_cycle_is_refused_before_anything_is_locked(target, out):
    target.set_metadata(
        "blobstore",
        "backup_should_be_locked_before:\n- job_name: uaa\n  release: uaa\n",
    )
    result = target.director("backup", "--artifact-path", str(out))
    assert result.code == 1, result
    assert "Error: job locking dependency graph is cyclic: " in result.stderr
    assert target.scripts_run("pre-backup-lock") == []
    assert target.scripts_run("post-backup-unlock") == []
    assert backups(out) == []
    assert target.bbrx.audit_rows()[-1]["to_state"] == "failed"


def test_pre_backup_lock_failure(target, out):
    target.vm.set_fault("director", "pre-backup-lock", "fail 3 database is busy")
    result = target.director("backup", "--artifact-path", str(out))
    assert result.code == 4, result
    assert (
        f"Error: pre-backup-lock script for job director on {target.address} failed: it exited 3"
        in result.stderr
    )
    assert "stderr: database is busy" in result.stderr
    assert target.scripts_run("backup") == []
    # Blobstore (the level after director) was never locked, yet every job is unlocked.
    assert "blobstore" not in target.scripts_run("pre-backup-lock")
    assert target.unlock_env() == {job: "false" for job in ALL_JOBS}
    assert target.vm.locked_jobs() == []
    assert not target.work_dir().exists()
    assert backups(out) == []

    rows = target.bbrx.audit_rows()
    failed = next(r for r in rows if r["trigger"] == "lock_error")
    assert (failed["job"], failed["script"], failed["exit_code"]) == (
        "director",
        "pre-backup-lock",
        3,
    )
    assert failed["outcome"] == "error"
    assert failed["detail"]["stderr_tail"] == "database is busy"
    run_states = [r["to_state"] for r in rows if r["job"] is None]
    assert run_states[-4:] == ["locking", "unlocking", "cleaning", "failed"]


def test_backup_script_failure(target, out):
    target.vm.set_fault("blobstore", "backup", "fail 1 disk full")
    result = target.director("backup", "--artifact-path", str(out))
    assert result.code == 1, result
    assert (
        f"Error: backup script for job blobstore on {target.address} failed: it exited 1"
        in result.stderr
    )
    assert target.unlock_env() == {job: "false" for job in ALL_JOBS}
    assert target.vm.locked_jobs() == []
    assert not target.work_dir().exists()
    assert backups(out) == []  # not even an incomplete one
    states = [r["to_state"] for r in target.bbrx.audit_rows() if r["job"] is None]
    assert states[-4:] == ["backing_up", "unlocking", "cleaning", "failed"]


def test_unlock_failure_after_a_good_backup_still_transfers(target, out):
    target.vm.set_fault("director", "post-backup-unlock", "fail 2 cannot restart workers")
    result = target.director("backup", "--artifact-path", str(out))
    assert result.code == 8, result
    assert (
        f"post-backup-unlock script for job director on {target.address} failed: it exited 2"
        in result.stderr
    )
    assert target.unlock_env() == {job: "true" for job in ALL_JOBS}
    [artifact] = backups(out)
    assert {a.name for _, a in validate(artifact).jobs()} == BACKUP_JOBS
    assert not target.work_dir().exists()
    states = [r["to_state"] for r in target.bbrx.audit_rows() if r["job"] is None]
    assert states[-4:] == ["unlocking", "draining", "cleaning", "failed"]


def test_leftover_remote_work_dir_is_refused(target, out):
    target.work_dir().mkdir(parents=True)
    (target.work_dir() / "director").mkdir()
    result = target.director("backup", "--artifact-path", str(out))
    assert result.code == 1, result
    assert "Directory /var/vcap/store/bbr-backup already exists on instance bosh/0" in result.stderr
    assert "backup-cleanup" in result.stderr
    assert target.scripts_run("pre-backup-lock") == []
    assert target.work_dir().exists()  # the earlier run's trace is the operator's to clear
    assert backups(out) == []

    cleanup = target.director("backup-cleanup")
    assert cleanup.code == 0, cleanup
    assert not target.work_dir().exists()
    again = target.director("backup", "--artifact-path", str(out))
    assert again.code == 0, again


def test_backup_cleanup_unlocks_everything_in_reverse_order(target):
    target.vm.clear_calls()
    target.work_dir().mkdir(parents=True)
    result = target.director("backup-cleanup")
    assert result.code == 0, result
    assert f"Backup cleanup of {target.address} done" in result.stdout
    order = target.scripts_run("post-backup-unlock")
    assert (
        order.index("blobstore")
        < order.index("director")
        < min(order.index("uaa"), order.index("bbr-credhubdb"))
    )
    assert target.unlock_env() == {job: "false" for job in ALL_JOBS}
    assert target.scripts_run("pre-backup-lock") == []
    assert not target.work_dir().exists()
    states = [r["to_state"] for r in target.bbrx.audit_rows() if r["job"] is None]
    assert states == ["discovering", "unlocking", "cleaning", "succeeded"]


def test_restore_cleanup_runs_post_restore_unlock(target):
    target.work_dir().mkdir(parents=True)
    result = target.director("restore-cleanup")
    assert result.code == 0, result
    assert set(target.scripts_run("post-restore-unlock")) == ALL_JOBS
    assert target.scripts_run("post-backup-unlock") == []
    assert not target.work_dir().exists()


def test_invalid_metadata_yaml(target, out):
    target.set_metadata("uaa", "backup_should_be_locked_before: [job_name: director\n")
    result = target.director("backup", "--artifact-path", str(out))
    assert result.code == 1, result
    assert "Error: metadata script for job uaa printed invalid YAML" in result.stderr
    assert target.scripts_run("pre-backup-lock") == []
    assert backups(out) == []


def test_skip_bbr_scripts_removes_the_job(target, out):
    target.set_metadata("uaa", "skip_bbr_scripts: true\n")
    result = target.director("backup", "--artifact-path", str(out))
    assert result.code == 0, result
    assert "uaa" not in target.scripts_run("pre-backup-lock")
    assert "uaa" not in target.scripts_run("post-backup-unlock")
    assert set(target.scripts_run("pre-backup-lock")) == ALL_JOBS - {"uaa"}
    discovered = next(r for r in target.bbrx.audit_rows() if r["trigger"] == "discovered")
    assert discovered["detail"]["skipped"] == ["uaa"]


def test_pre_backup_check(target):
    ok = target.director("pre-backup-check")
    assert ok.code == 0, ok
    assert f"Director {target.address} can be backed up." in ok.stdout
    assert target.scripts_run("pre-backup-lock") == []

    target.work_dir().mkdir(parents=True)
    bad = target.director("pre-backup-check")
    assert bad.code == 1, bad
    assert f"Director {target.address} cannot be backed up." in bad.stderr
    assert "already exists" in bad.stderr
    assert target.work_dir().exists()


def test_artifact_path_must_exist(target, out):
    result = target.director("backup", "--artifact-path", str(out / "missing"))
    assert result.code == 1, result
    assert "does not exist" in result.stderr
    assert target.scripts_run("pre-backup-lock") == []


def test_transfer_failure_publishes_nothing_and_leaves_no_lock(target, out):
    target.vm.set_fault("blobstore", "transfer", "fail connection reset by peer")
    result = target.director("backup", "--artifact-path", str(out))
    assert result.code == 1, result
    assert target.copy_failure("blobstore", "from", "connection reset by peer") in result.stderr
    # Locks were released before the drain (bbr's order), with a good backup behind them.
    assert target.unlock_env() == {job: "true" for job in ALL_JOBS}
    assert target.vm.locked_jobs() == []
    assert backups(out) == []  # neither a published nor an .incomplete directory
    assert not target.work_dir().exists()
    rows = target.bbrx.audit_rows()
    drain_error = next(r for r in rows if r["trigger"] == "drain_error")
    assert drain_error["job"] == "blobstore"
    assert "connection reset by peer" in drain_error["detail"]["message"]
    states = [r["to_state"] for r in rows if r["job"] is None]
    assert states[-3:] == ["draining", "cleaning", "failed"]


@pytest.mark.parametrize(
    "fault",
    ["corrupt", "corrupt-local"],
    ids=["a-byte-changed-in-flight", "a-byte-changed-on-the-jump-box-disk"],
)
def test_a_corrupted_copy_fails_the_backup_and_publishes_nothing(target, out, fault):
    """Changed after the VM hashed what it sent (on the link), or in the jump box's copy
    once written there: either way the two digests differ, and the backup says so."""
    target.vm.set_fault("blobstore", "transfer", fault)
    result = target.director("backup", "--artifact-path", str(out))
    assert result.code == 1, result
    found = re.search(
        rf"Error: the copy of bosh-0-blobstore\.tar \(job blobstore on bosh/0, "
        rf"{re.escape(target.address)}\) is corrupted: the VM sent a tar stream with tar digest "
        r"([0-9a-f]{64}), the jump box's copy on disk has tar digest ([0-9a-f]{64})\n"
        r"Nothing was published: the partial backup is removed \(the copy comes after the "
        r"unlocks\)\. The bytes changed between the VM's tar and the jump box's disk: check "
        r"the network, and the jump box's disk and memory, then back up again\.",
        result.stderr,
    )
    assert found, result
    vm_digest, local_digest = found.groups()
    assert vm_digest != local_digest
    assert backups(out) == []  # neither a published nor an .incomplete directory
    assert target.unlock_env() == {job: "true" for job in ALL_JOBS}
    assert target.vm.locked_jobs() == []
    assert not target.work_dir().exists()
    rows = target.bbrx.audit_rows()
    [error] = [r for r in rows if r["trigger"] == "drain_error"]
    assert error["job"] == "blobstore"
    assert error["detail"]["error"] == "CopyCorruptError"
    assert (error["detail"]["vm_sha256"], error["detail"]["local_sha256"]) == (
        vm_digest,
        local_digest,
    )
    # The other jobs' copies were good, and the run ends failed, after cleaning.
    assert {r["job"] for r in rows if r["trigger"] == "drain_ok"} == {"bbr-credhubdb", "director"}
    states = [r["to_state"] for r in rows if r["job"] is None]
    assert states[-3:] == ["draining", "cleaning", "failed"]

    # Once the fault is gone, the next backup is good and restores.
    target.vm.clear_faults()
    assert target.director("backup", "--artifact-path", str(out)).code == 0
    [artifact] = backups(out)
    validate(artifact)


def test_a_jump_box_disk_that_fills_fails_the_drain_and_publishes_nothing(bbrx, out):
    """The simulator's `disk-full` fault: the jump box's writes of one copy fail with the
    kernel's own ENOSPC. The error names the file and says what to do; nothing is left."""
    vm = SimDirector(sim_root(bbrx.home, "demo"))
    vm.create()
    vm.set_fault("blobstore", "transfer", "disk-full")
    result = bbrx("director", "--host", "sim://demo", "backup", "--artifact-path", str(out))
    assert result.code == 1, result
    assert re.search(
        r"Error: cannot write \S+/demo_\w+\.incomplete/bosh-0-blobstore\.tar: No space left on "
        r"device\nThe jump box's disk \(or this user's quota\) is full: free some space or pick "
        r"another --artifact-path, then run backup again\. The copy to the jump box comes "
        r"after the unlocks, and this partial backup is removed\.",
        result.stderr,
    ), result
    assert backups(out) == []
    assert vm.locked_jobs() == []
    [error] = [r for r in bbrx.audit_rows() if r["trigger"] == "drain_error"]
    assert error["job"] == "blobstore"


def test_each_tar_published_is_what_the_vm_says_it_sent(target, out):
    """The VM's tar digest of each stream (the drain_ok row) is that of the tar on disk."""
    assert target.director("backup", "--artifact-path", str(out)).code == 0
    [artifact] = backups(out)
    rows = target.bbrx.audit_rows()
    sent = {
        r["detail"]["artifact"]: r["detail"]["tar_digest"]
        for r in rows
        if r["trigger"] == "drain_ok"
    }
    on_disk = {}
    for tar in artifact.glob("*.tar"):
        digest = TarDigest()
        digest.feed(tar.read_bytes())
        on_disk[tar.name] = digest.hexdigest()
    assert sent == on_disk and len(on_disk) == 3


def test_metadata_follows_bbrs_schema(target, out):
    """Checked as bbr's Go structs read it: field names, types, the quoted index, time format."""
    assert target.director("backup", "--artifact-path", str(out)).code == 0
    [artifact] = backups(out)
    text = (artifact / "metadata").read_text()
    document = yaml.safe_load(text)
    assert set(document) == {"instances", "custom_artifacts", "backup_activity"}
    assert document["custom_artifacts"] == []
    [instance] = document["instances"]
    assert set(instance) == {"name", "index", "artifacts"}
    assert instance["name"] == "bosh" and instance["index"] == "0"
    assert '  index: "0"\n' in text  # a YAML string, as Go's yaml writes it
    for entry in instance["artifacts"]:
        assert set(entry) == {"name", "checksums"}
        assert (artifact / f"bosh-0-{entry['name']}.tar").is_file()
        for member, digest in entry["checksums"].items():
            assert member.startswith("./")
            assert re.fullmatch(r"[0-9a-f]{64}", digest)
    activity = document["backup_activity"]
    for key in ("start_time", "finish_time"):
        assert re.fullmatch(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d UTC", activity[key])
    assert activity["start_time"] <= activity["finish_time"]
    assert artifact.name == f"{target.name}_" + activity["start_time"].replace("/", "").replace(
        " UTC", "Z"
    ).replace(" ", "T").replace(":", "")


def test_an_unlock_script_that_cannot_start_is_an_unlock_failure(target, out):
    target.vm.set_fault("director", "backup", "sleep 2")
    proc = target.start("backup", "--artifact-path", str(out))
    wait_for(lambda: "director" in target.scripts_run("backup"), what="the director backup")
    (target.vm.root / "var/vcap/jobs/uaa/bin/bbr/post-backup-unlock").unlink()
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 8, stderr
    assert "post-backup-unlock script for job uaa" in stderr
    assert set(target.scripts_run("post-backup-unlock")) == ALL_JOBS - {"uaa"}
    rows = target.bbrx.audit_rows()
    failed = next(r for r in rows if r["trigger"] == "unlock_error")
    assert (failed["job"], failed["to_state"]) == ("uaa", "unlock_failed")
    assert len(backups(out)) == 1  # the backup itself was good and is published


def test_backup_cleanup_unlocks_even_when_metadata_is_broken(target):
    target.vm.set_fault("uaa", "metadata", "fail 1 metadata exploded")
    target.work_dir().mkdir(parents=True)
    result = target.director("backup-cleanup")
    assert result.code == 0, result
    assert "unlocking job uaa anyway" in result.stderr
    assert set(target.scripts_run("post-backup-unlock")) == ALL_JOBS
    assert not target.work_dir().exists()
    discovered = next(r for r in target.bbrx.audit_rows() if r["trigger"] == "discovered")
    assert "uaa" in discovered["detail"]["metadata_errors"]


def test_pre_backup_check_estimates_the_space_needed(target, out):
    result = target.director("pre-backup-check", "--artifact-path", str(out))
    assert result.code == 0, result
    assert "has " in result.stderr and "MiB free" in result.stderr
    checked = next(r for r in target.bbrx.audit_rows() if r["trigger"] == "checks_passed")
    assert checked["detail"]["store_bytes"] >= sum(
        p.stat().st_size
        for p in (target.vm.root / "var/vcap/store/blobstore").rglob("*")
        if p.is_file()
    )
    assert checked["detail"]["free_bytes"] > 0


def test_a_drain_that_cannot_fit_is_refused_after_unlocking(target, tmp_path):
    """A tiny filesystem at the artifact path: refused before a byte is copied."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)])
    if mounted.returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        result = target.director("backup", "--artifact-path", str(small))
        assert result.code == 1, result
        assert "Error: not enough space for the backup in" in result.stderr
        assert target.vm.locked_jobs() == []
        assert set(target.unlock_env().values()) == {"true"}
        assert list(small.iterdir()) == []
        assert not target.work_dir().exists()
    finally:
        subprocess.run(["umount", str(small)], check=True)
