"""Restore behaviour: the seed runbook's round trip, and everything restore must refuse
before it touches the target."""

from __future__ import annotations

import shutil

ALL_JOBS = {"bbr-credhubdb", "blobstore", "director", "uaa"}
RESTORE_JOBS = {"bbr-credhubdb", "blobstore", "director"}


def test_round_trip_onto_a_wiped_director(target, backup):
    before = target.vm.data_digest()
    vms_before = target.vm.render_vms()
    assert "Deployment 'cf'" in vms_before

    target.vm.wipe()
    assert target.vm.data_digest() == {}
    assert "No deployments" in target.vm.render_vms()

    result = target.director("restore", "--artifact-path", str(backup))
    assert result.code == 0, result
    assert f"Restored {backup} to {target.address}" in result.stdout
    cleanup = target.director("restore-cleanup")
    assert cleanup.code == 0, cleanup

    assert target.vm.data_digest() == before
    assert target.vm.render_vms() == vms_before
    assert target.vm.locked_jobs() == []
    assert not target.work_dir().exists()

    # Serial locks in lock order, restores, then unlocks in reverse order.
    calls = [(c.job, c.script) for c in target.vm.calls() if c.event == "start"]
    restore_run = calls[: calls.index(("blobstore", "post-restore-unlock")) + 4]
    locks = [job for job, script in restore_run if script == "pre-restore-lock"]
    assert locks[:2] in (["bbr-credhubdb", "uaa"], ["uaa", "bbr-credhubdb"])
    assert locks[2:] == ["director", "blobstore"]
    unlocks = [job for job, script in restore_run if script == "post-restore-unlock"]
    assert unlocks == list(reversed(locks))
    assert {job for job, script in calls if script == "restore"} == RESTORE_JOBS

    rows = target.bbrx.audit_rows(
        next(r for r in target.bbrx.audit_runs() if r.operation == "restore").run_id
    )
    states = [r["to_state"] for r in rows if r["job"] is None]
    assert states == [
        "validating",
        "discovering",
        "checking",
        "copying",
        "locking",
        "restoring",
        "unlocking",
        "cleaning",
        "succeeded",
    ]
    copies = [r for r in rows if r["trigger"] == "copy_ok"]
    assert {r["job"] for r in copies} == RESTORE_JOBS


def test_the_seed_runbook_end_to_end(target, tmp_path):
    """backup-cleanup, pre-backup-check, backup, backup-cleanup; wipe; restore, restore-cleanup."""
    out = tmp_path / "generated-backup"
    out.mkdir()
    before = target.vm.data_digest()
    for step in (
        ["backup-cleanup"],
        ["pre-backup-check"],
        ["backup", "--artifact-path", str(out)],
        ["backup-cleanup"],
    ):
        result = target.director(*step)
        assert result.code == 0, result
    [artifact] = list(out.iterdir())
    target.vm.wipe()
    for step in (["restore", "--artifact-path", str(artifact)], ["restore-cleanup"]):
        result = target.director(*step)
        assert result.code == 0, result
    assert target.vm.data_digest() == before

    runs = target.bbrx.audit_runs()
    assert [(r.operation, r.outcome) for r in runs] == [
        ("backup-cleanup", "succeeded"),
        ("pre-backup-check", "succeeded"),
        ("backup", "succeeded"),
        ("backup-cleanup", "succeeded"),
        ("restore", "succeeded"),
        ("restore-cleanup", "succeeded"),
    ]
    verify = target.bbrx("audit", "verify", "--artifact", str(artifact))
    assert verify.code == 0, verify
    assert "intact" in verify.stdout
    assert f"is tied to run {runs[2].run_id}" in verify.stdout


def test_corrupted_artifact_is_refused_and_nothing_is_locked(target, backup):
    tar = backup / "bosh-0-director.tar"
    data = bytearray(tar.read_bytes())
    data[data.index(b"INSERT")] ^= 0x20  # one byte of the dump, inside the tar
    tar.write_bytes(bytes(data))
    before = target.vm.data_digest()

    result = target.director("restore", "--artifact-path", str(backup))
    assert result.code == 1, result
    assert (
        "Error: Backup is corrupted: bosh-0-director.tar: ./director.sql has SHA-256"
        in result.stderr
    )
    assert "Nothing was locked or restored" in result.stderr
    # Checked in the pass that copies it, which precedes every lock: nothing locked or
    # restored, and what was copied is gone from the VM.
    assert target.scripts_run("pre-restore-lock") == []
    assert target.scripts_run("restore") == []
    assert target.vm.data_digest() == before
    assert not target.work_dir().exists()
    rows = target.bbrx.audit_rows()
    states = [r["to_state"] for r in rows if r["job"] is None]
    assert states[-3:] == ["copying", "cleaning", "failed"]
    assert [r["job"] for r in rows if r["trigger"] == "copy_error"] == ["director"]


def test_restore_onto_a_director_lacking_a_job(target, backup):
    shutil.rmtree(target.vm.root / "var/vcap/jobs/blobstore")
    result = target.director("restore", "--artifact-path", str(backup))
    assert result.code == 1, result
    assert (
        f"Error: the backup holds job blobstore, but {target.address} has no blobstore job with a "
        "restore script" in result.stderr
    )
    scripts = {c.script for c in target.vm.calls()}
    assert scripts <= {"metadata"}  # discovery only: nothing locked, copied or restored
    assert not target.work_dir().exists()


def test_restore_refuses_an_incomplete_or_missing_backup(target, backup, tmp_path):
    (backup / "metadata").unlink()
    result = target.director("restore", "--artifact-path", str(backup))
    assert result.code == 1, result
    assert "has no metadata file: it is not a finished bbr/bbrx backup" in result.stderr
    missing = target.director("restore", "--artifact-path", str(tmp_path / "nowhere"))
    assert missing.code == 1
    assert "does not exist" in missing.stderr
    assert target.vm.calls() == []


def test_restore_needs_an_artifact_path(target):
    result = target.director("restore")
    assert result.code == 1, result
    assert "--artifact-path" in result.stderr


def test_restore_script_failure_still_unlocks_and_cleans(target, backup):
    target.vm.set_fault("director", "restore", "fail 5 cannot load dump")
    result = target.director("restore", "--artifact-path", str(backup))
    assert result.code == 1, result
    assert (
        f"restore script for job director on {target.address} failed: it exited 5" in result.stderr
    )
    assert set(target.scripts_run("post-restore-unlock")) == ALL_JOBS
    assert target.vm.locked_jobs() == []
    assert not target.work_dir().exists()


def test_pre_restore_lock_failure_unlocks_and_exits_1(target, backup):
    target.vm.set_fault("director", "pre-restore-lock", "fail 1 busy")
    result = target.director("restore", "--artifact-path", str(backup))
    assert result.code == 1, result
    assert target.scripts_run("restore") == []
    assert set(target.scripts_run("post-restore-unlock")) == ALL_JOBS
    assert target.vm.locked_jobs() == []


def test_restore_refuses_a_leftover_work_dir(target, backup):
    target.work_dir().mkdir(parents=True)
    result = target.director("restore", "--artifact-path", str(backup))
    assert result.code == 1, result
    assert "already exists" in result.stderr
    assert target.scripts_run("pre-restore-lock") == []


def test_transfer_failure_during_copy_locks_nothing(target, backup):
    target.vm.wipe()
    target.vm.set_fault("blobstore", "transfer", "fail broken pipe")
    result = target.director("restore", "--artifact-path", str(backup))
    assert result.code == 1, result
    assert target.copy_failure("blobstore", "to", "broken pipe") in result.stderr
    assert target.scripts_run("pre-restore-lock") == []
    assert target.scripts_run("restore") == []
    assert not target.work_dir().exists()
    states = [r["to_state"] for r in target.bbrx.audit_rows() if r["job"] is None]
    assert states[-3:] == ["copying", "cleaning", "failed"]


def test_a_copy_that_differs_on_the_vm_is_not_restored(target, backup):
    target.vm.wipe()
    target.vm.set_fault("blobstore", "transfer", "corrupt")
    result = target.director("restore", "--artifact-path", str(backup))
    assert result.code == 1, result
    assert (
        f"the copy of bosh-0-blobstore.tar to {target.address} is corrupted: the VM's tar read "
        "a stream with SHA-256 " in result.stderr
    ), result
    assert "The tar itself is intact" in result.stderr
    assert target.scripts_run("pre-restore-lock") == []
    assert target.scripts_run("restore") == []
    assert not target.work_dir().exists()


def test_hard_linked_blobs_round_trip(target, tmp_path):
    store = target.vm.root / "var/vcap/store/blobstore/store"
    first = next(p for p in store.rglob("*") if p.is_file())
    (first.parent / "hard-linked-copy").hardlink_to(first)
    out = tmp_path / "backups"
    out.mkdir()
    assert target.director("backup", "--artifact-path", str(out)).code == 0
    [artifact] = list(out.iterdir())
    before = target.vm.data_digest()
    target.vm.wipe()
    result = target.director("restore", "--artifact-path", str(artifact))
    assert result.code == 0, result
    assert target.vm.data_digest() == before
