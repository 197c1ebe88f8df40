"""What only the SSH transport has: host keys, key permissions, unreachable hosts, a
connection killed mid-copy, and a large artifact through a real sshd."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import wait_for

pytestmark = pytest.mark.parametrize("target", ["ssh"], indirect=True)


def with_known_hosts(target, path: Path) -> list[str]:
    args = list(target.extra_args)
    args[args.index("--known-hosts") + 1] = str(path)
    return args


def fingerprint(public_key: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(public_key)], capture_output=True, text=True)
    return out.stdout.split()[1]


def test_unknown_host_key_is_refused(target, tmp_path):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    result = target.bbrx(
        "director", "--host", target.host, *with_known_hosts(target, empty), "pre-backup-check"
    )
    assert result.code == 1, result
    assert f"Error: the host key of {target.address} is not in {empty}: refusing to connect" in (
        result.stderr
    )
    assert "--accept-new-host-key" in result.stderr
    assert target.vm.calls() == []
    assert empty.read_text() == ""
    states = [r["to_state"] for r in target.bbrx.audit_rows()]
    assert states == ["discovering", "failed"]


def test_new_host_key_accepted_on_request_and_audited(target, tmp_path, ssh_server):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    result = target.bbrx(
        "director", "--host", target.host, *with_known_hosts(target, empty),
        "--accept-new-host-key", "pre-backup-check",
    )  # fmt: skip
    assert result.code == 0, result
    host_key = Path(f"{ssh_server.keys.host_key}.pub").read_text().split()[1]
    assert host_key in empty.read_text()  # trusted, under a hashed name (HashKnownHosts)
    lookup = ["ssh-keygen", "-F", f"[127.0.0.1]:{ssh_server.port}", "-f", str(empty)]
    assert subprocess.run(lookup, capture_output=True).returncode == 0
    discovered = next(r for r in target.bbrx.audit_rows() if r["trigger"] == "discovered")
    expected = fingerprint(Path(f"{ssh_server.keys.host_key}.pub"))
    assert discovered["detail"]["instance"]["host_key_fingerprint"] == expected
    assert discovered["detail"]["instance"]["host_key_trusted_on_first_use"] == "yes"


def test_changed_host_key_is_refused(target, tmp_path, ssh_server):
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, key = Path(f"{other}.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{ssh_server.port} {kind} {key}\n")
    result = target.bbrx(
        "director", "--host", target.host, *with_known_hosts(target, known),
        "--accept-new-host-key", "backup", "--artifact-path", str(tmp_path),
    )  # fmt: skip
    assert result.code == 1, result
    assert "has CHANGED since it was trusted" in result.stderr
    assert "ssh-keygen -R" in result.stderr
    assert target.vm.calls() == []


def test_private_key_readable_by_others_is_refused(target, tmp_path, ssh_server):
    loose = tmp_path / "loose_key"
    shutil.copy(ssh_server.keys.client_key, loose)
    loose.chmod(0o644)
    args = list(target.extra_args)
    args[args.index("--private-key-path") + 1] = str(loose)
    result = target.bbrx("director", "--host", target.host, *args, "pre-backup-check")
    assert result.code == 1, result
    assert f"private key {loose} is readable by group or others (mode 0644)" in result.stderr
    assert f"chmod 600 {loose}" in result.stderr
    assert target.vm.calls() == []


def test_unreachable_host_fails_before_anything_is_locked(target, tmp_path, ssh_server):
    ssh_server.stop()
    result = target.director("backup", "--artifact-path", str(tmp_path))
    assert result.code == 1, result
    assert f"Error: cannot reach {target.address}" in result.stderr
    assert target.vm.calls() == []
    assert [r["to_state"] for r in target.bbrx.audit_rows()] == ["discovering", "failed"]
    assert list(tmp_path.glob("127.0.0.1_*")) == []


def drop_connections(ssh_server) -> None:
    """Kill the sshd processes serving this run's connections (children of our test sshd)."""
    children = subprocess.run(
        ["pgrep", "-P", str(ssh_server.proc.pid)], capture_output=True, text=True
    ).stdout.split()
    assert children, "no connection to drop"
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)


def big_blob(target, size: int) -> tuple[Path, str]:
    """An incompressible blob in the director's blobstore, and its SHA-256."""
    path = target.vm.root / "var/vcap/store/blobstore/store/ff/big-release"
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        for _ in range(size // (1 << 20)):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            handle.write(chunk)
    return path, digest.hexdigest()


def test_200_mb_round_trip(target, tmp_path):
    _, expected = big_blob(target, 200 << 20)
    out = tmp_path / "backups"
    out.mkdir()
    result = target.director("backup", "--artifact-path", str(out))
    assert result.code == 0, result
    [artifact] = list(out.iterdir())
    metadata = yaml.safe_load((artifact / "metadata").read_text())
    blobstore = next(a for a in metadata["instances"][0]["artifacts"] if a["name"] == "blobstore")
    assert blobstore["checksums"]["./blobs/ff/big-release"] == expected
    before = target.vm.data_digest()

    target.vm.wipe()
    restored = target.director("restore", "--artifact-path", str(artifact))
    assert restored.code == 0, restored
    assert target.vm.data_digest() == before


@pytest.mark.parametrize("ssh_server", [("python3",), ("python3", "openssl")], indirect=True)
def test_a_vm_without_python3_is_checked_by_the_streams_sha256(target, tmp_path, ssh_server):
    """No python3 on the VM (nor openssl): its shell filter reports the SHA-256 of what its
    tar sent, which the jump box checks against its copy's, read back once more for it."""
    out = tmp_path / "backups"
    out.mkdir()
    result = target.director("backup", "--artifact-path", str(out))
    assert result.code == 0, result
    [artifact] = list(out.iterdir())
    rows = [r for r in target.bbrx.audit_rows() if r["trigger"] == "drain_ok"]
    assert {r["detail"]["artifact"]: r["detail"]["sha256"] for r in rows} == {
        tar.name: hashlib.sha256(tar.read_bytes()).hexdigest() for tar in artifact.glob("*.tar")
    }
    assert all("tar_digest" not in r["detail"] for r in rows)

    target.vm.set_fault("blobstore", "transfer", "corrupt")
    again = tmp_path / "again"
    again.mkdir()
    failed = target.director("backup", "--artifact-path", str(again))
    assert failed.code == 1, failed
    assert "is corrupted: the VM sent a tar stream with SHA-256 " in failed.stderr
    assert ", the jump box's copy on disk has SHA-256 " in failed.stderr
    assert list(again.iterdir()) == []
    [error] = [r for r in target.bbrx.audit_rows() if r["trigger"] == "drain_error"]
    assert error["detail"]["digest"] == "sha256"


def test_connection_killed_mid_drain(target, tmp_path, ssh_server):
    big_blob(target, 300 << 20)
    out = tmp_path / "backups"
    out.mkdir()
    proc = target.start("backup", "--artifact-path", str(out))

    def tar_growing() -> bool:
        return any(
            p.stat().st_size > (20 << 20) for p in out.glob("*.incomplete/bosh-0-blobstore.tar")
        )

    wait_for(tar_growing, timeout=60, what="the blobstore drain to be under way")
    drop_connections(ssh_server)
    _stdout, stderr = proc.communicate(timeout=120)

    assert proc.returncode == 1, stderr
    assert "copying the artifact of job blobstore from" in stderr
    assert list(out.iterdir()) == []  # nothing published, no .incomplete left
    # Unlocks ran before the drain (bbr's order) and every lock is released.
    assert target.vm.locked_jobs() == []
    # The remote cleanup after the failure went over a fresh connection.
    assert "reconnecting" in stderr
    assert not target.work_dir().exists()
    rows = target.bbrx.audit_rows()
    assert any(r["trigger"] == "drain_error" and r["job"] == "blobstore" for r in rows)
    assert rows[-1]["to_state"] == "failed"


def test_connection_killed_while_locked_still_unlocks_everything(target, tmp_path, ssh_server):
    """The connection drops during the backup scripts: the unlocks go over a fresh one."""
    target.vm.set_fault("director", "backup", "sleep 3")
    proc = target.start("backup", "--artifact-path", str(tmp_path))
    wait_for(lambda: "director" in target.scripts_run("backup"), what="the director backup")
    drop_connections(ssh_server)
    _stdout, stderr = proc.communicate(timeout=120)

    assert proc.returncode == 1, stderr
    assert "backup script for job director" in stderr
    assert "reconnecting" in stderr
    assert set(target.scripts_run("post-backup-unlock")) == {
        "bbr-credhubdb", "blobstore", "director", "uaa",
    }  # fmt: skip
    assert set(target.unlock_env().values()) == {"false"}
    wait_for(lambda: not target.vm.locked_jobs(), timeout=10, what="the locks to be released")
    assert list(tmp_path.glob("127.0.0.1_*")) == []


def test_connection_killed_during_a_lock_script_leaves_nothing_locked(target, tmp_path, ssh_server):
    """Without a pty, a lock script outlives a dropped connection; bbrx ends it on the VM."""
    target.vm.set_fault("director", "pre-backup-lock", "sleep 4")
    proc = target.start("backup", "--artifact-path", str(tmp_path))
    wait_for(lambda: "director" in target.scripts_run("pre-backup-lock"), what="the lock")
    drop_connections(ssh_server)
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 4, stderr
    assert "connection lost; ended on the VM after reconnecting" in stderr
    time.sleep(6)  # longer than the lock script would have slept
    assert target.vm.locked_jobs() == []
    assert set(target.scripts_run("post-backup-unlock")) == {
        "bbr-credhubdb", "blobstore", "director", "uaa",
    }  # fmt: skip


def ssh_masters(port: int) -> list[int]:
    """The pids of the SSH master connections to the test sshd on `port` (bbrx's own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"ControlMaster=yes" in argv and str(port).encode() in argv:
            found.append(int(entry.name))
    return found


@contextlib.contextmanager
def audit_log_held(target, busy_timeout: str) -> Iterator[None]:
    """After one good run (so the log exists), its write lock held by another process for as
    long as the block lasts, and bbrx told to wait `busy_timeout` seconds for it."""
    first = target.director("pre-backup-check")
    assert first.code == 0, first
    target.vm.clear_calls()
    holder = sqlite3.connect(target.bbrx.audit_db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    target.bbrx.env["BBRX_AUDIT_BUSY_TIMEOUT"] = busy_timeout
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_run_refused_before_it_reaches_the_director_leaves_no_connection(
    target, tmp_path, ssh_server
):
    # The master connection opens while bbrx starts up (it overlaps the imports, the
    # audit log, the lease): a run refused before its discovery must close it anyway.
    # Here the audit log's write lock is held for longer than the run waits for it (1 s),
    # so the master is up by the time the run is refused.
    with audit_log_held(target, "1"):
        result = target.director("backup", "--artifact-path", str(tmp_path))
    assert result.code == 1, result
    assert "another process has held its write lock" in result.stderr
    assert target.vm.calls() == []
    wait_for(lambda: not ssh_masters(ssh_server.port), timeout=3, what="the SSH master to end")


def test_a_new_host_key_is_trusted_only_inside_the_run_that_records_it(
    target, tmp_path, ssh_server
):
    # --accept-new-host-key writes known_hosts when the connection opens: it must not open
    # ahead of a run that is then refused, and so records nothing.
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    result = target.bbrx(
        "director", "--host", target.host, *with_known_hosts(target, empty),
        "--accept-new-host-key", "--audit-db", str(not_a_directory / "audit.db"),
        "pre-backup-check",
    )  # fmt: skip
    assert result.code == 1, result
    assert f"{not_a_directory} is a file, not a directory" in result.stderr
    assert empty.read_text() == ""
    assert not ssh_masters(ssh_server.port)


def test_a_sigterm_before_the_run_begins_leaves_no_connection(target, tmp_path, ssh_server):
    # Between the connection opened ahead and the run's own signal handling (the audit log,
    # the lease), a SIGTERM must not kill bbrx outright and leave its master logged in.
    with audit_log_held(target, "3"):
        proc = target.bbrx.start(
            "director", "--host", target.host, *target.extra_args,
            "backup", "--artifact-path", str(tmp_path),
        )  # fmt: skip
        wait_for(lambda: ssh_masters(ssh_server.port), timeout=10, what="the SSH master")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode not in (0, -signal.SIGTERM), stderr
    assert "SIGTERM" in stderr, stderr
    assert target.vm.calls() == []
    wait_for(lambda: not ssh_masters(ssh_server.port), timeout=3, what="the SSH master to end")


def test_a_connection_opened_ahead_and_gone_since_is_opened_again(target, ssh_server):
    from orchestrator.transport.ssh import SshInstance

    instance = SshInstance(
        "127.0.0.1",
        ssh_server.port,
        "root",
        ssh_server.keys.client_key,
        known_hosts=ssh_server.known_hosts,
        connect_ahead=True,
    )
    try:
        wait_for(lambda: ssh_masters(ssh_server.port), timeout=10, what="the SSH master")
        wait_for(lambda: instance._opening.poll() is not None, timeout=10, what="ssh -f")
        [first] = ssh_masters(ssh_server.port)
        os.kill(first, signal.SIGTERM)  # the master is gone before the run reaches it
        wait_for(lambda: not ssh_masters(ssh_server.port), timeout=5, what="it to end")
        assert [job.name for job in instance.discover()]  # reconnected, not a bare ssh
        [second] = ssh_masters(ssh_server.port)
        assert second != first and instance._master_pid == second
    finally:
        instance.close()
    wait_for(lambda: not ssh_masters(ssh_server.port), timeout=5, what="the master to end")
