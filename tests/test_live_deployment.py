"""`bbrx deployment` against a live Director: the fake Director and UAA over HTTPS
(tests/fake_director.py) in front of real VMs, one real sshd each (tests/sshd.py) serving a
simulated deployment VM's tree as its /var/vcap. The Director's SSH setup adds the run's
user, key and sudo inside that VM's namespace only, and its cleanup removes them."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from simulator.deploy import find_deployment, manifest_of
from simulator.director import SimDirector
from tests import sshd
from tests.conftest import BBRX, Bbrx, wait_for
from tests.fake_director import FakeDirector, FakeVm

DEPLOYMENT = "redis"


@dataclass
class Live:
    fake: FakeDirector
    vms: dict[str, sshd.TestSshd]  # instance id -> its sshd
    trees: dict[str, SimDirector]  # instance id -> its VM tree (for its call log)
    ca: Path
    bbrx: Bbrx

    def deployment(self, *args: str):
        return self.bbrx(
            "deployment", "--target", self.fake.url, "--username", self.fake.client,
            "--password", self.fake.secret, "--ca-cert", str(self.ca),
            "--deployment", DEPLOYMENT, *args,
        )  # fmt: skip


@pytest.fixture
def live(request, ssh_keys, bbrx, tmp_path) -> Iterator[Live]:
    request.getfixturevalue("vcap_mount_point")  # skips where no sshd can start
    world = SimDirector(tmp_path / "world")
    world.create()
    found = find_deployment(world, DEPLOYMENT)
    fake = FakeDirector(auth="uaa", task_polls=1)
    servers: dict[str, sshd.TestSshd] = {}
    trees: dict[str, SimDirector] = {}
    host_key = Path(f"{ssh_keys.host_key}.pub").read_text().strip()
    try:
        vms = []
        for vm in found.vms:
            tree = world.deployment_vm(DEPLOYMENT, vm)
            server = sshd.TestSshd(
                ssh_keys, tree.root, tmp_path / f"sshd-{vm.group}-{vm.index}", accounts=True
            ).start()
            servers[vm.instance_id] = server
            trees[vm.instance_id] = SimDirector(tree.root)
            vms.append(
                FakeVm(vm.group, vm.index, vm.instance_id, f"127.0.0.1:{server.port}",
                       host_key, bootstrap=vm.index == 0)
            )  # fmt: skip
        fake.deployments[DEPLOYMENT] = {"manifest": manifest_of(found) or "", "vms": vms}
        fake.on_setup = lambda vm, user, key: servers[vm.id].add_user(user, key)
        fake.on_cleanup = lambda vm, pattern: servers[vm.id].remove_users(pattern)
        fake.serve()
        ca = tmp_path / "director-ca.pem"
        ca.write_text(fake.ca_pem)
        yield Live(fake, servers, trees, ca, bbrx)
    finally:
        fake.stop()
        for server in servers.values():
            with contextlib.suppress(Exception):
                server.stop()


def test_a_live_deployment_is_backed_up_through_the_director(live: Live, tmp_path) -> None:
    out = tmp_path / "backups"
    out.mkdir()
    checked = live.deployment("pre-backup-check")
    assert checked.code == 0, checked
    assert f"Deployment '{DEPLOYMENT}' can be backed up." in checked.stdout

    result = live.deployment("backup", "--artifact-path", str(out))
    assert result.code == 0, result
    [artifact] = list(out.iterdir())
    tars = sorted(p.name for p in artifact.glob("*.tar"))
    assert tars == [f"redis-{i}-redis-server.tar" for i in range(3)], tars
    for tree in live.trees.values():  # every VM locked, backed up and unlocked, by its log
        ran = [c.script for c in tree.calls() if c.event == "start"]
        assert ran[-4:] == ["pre-backup-lock", "backup", "post-backup-unlock", "transfer"], ran
    # The run's user was made on each VM and is gone from each; the secret went nowhere.
    assert all(server.users() == [] for server in live.vms.values())
    setups = [r.body for r in live.fake.requests if r.method == "POST" and r.path.endswith("/ssh")]
    users = {body["params"].get("user") for body in setups if body["command"] == "setup"}
    assert len(users) == 2  # a user a run: the check's and the backup's
    assert all(user.startswith("bosh_") and len(user) == 20 for user in users), users
    assert live.fake.secret not in result.stdout + result.stderr
    assert live.fake.secret not in live.bbrx.audit_db.read_bytes().decode(errors="replace")
    rows = live.bbrx.audit_rows()
    assert rows[0]["mode"] == "live" and rows[0]["target"] == f"{live.fake.url}/{DEPLOYMENT}"

    restored = live.deployment("restore", "--artifact-path", str(artifact))
    assert restored.code == 0, restored
    for tree in live.trees.values():
        ran = [c.script for c in tree.calls() if c.event == "start"]
        assert ran[-3:] == ["pre-restore-lock", "restore", "post-restore-unlock"], ran
    assert all(server.users() == [] for server in live.vms.values())


def test_a_wrong_host_key_is_refused_and_access_is_torn_down(live: Live, tmp_path) -> None:
    other = tmp_path / "other-key"
    sshd.Keys.make(other)
    [first, *_] = live.fake.deployments[DEPLOYMENT]["vms"]
    first.host_public_key = Path(other / "host_key.pub").read_text().strip()
    result = live.deployment("pre-backup-check")
    assert result.code != 0, result
    assert "redis/0" in result.stderr or first.ip in result.stderr, result
    assert "host key" in result.stderr.lower(), result
    assert all(server.users() == [] for server in live.vms.values())


def test_bosh_all_proxy_takes_the_api_and_every_instance_through_the_jump_host(
    live: Live, ssh_keys, tmp_path
) -> None:
    """BOSH_ALL_PROXY=ssh+socks5://USER@HOST:PORT?private-key=PATH: the Director API over
    an `ssh -D` tunnel, each instance's ssh over `ssh -W`; the jump sshd's own log shows
    it forwarded to the Director and to every instance. A run SIGKILLed through it takes
    its tunnel along, and the next cleanup removes the user it left. A bad proxy is
    refused by name."""
    (tmp_path / "jump-vm/var/vcap").mkdir(parents=True)
    jump = sshd.TestSshd(ssh_keys, tmp_path / "jump-vm", tmp_path / "jump", log_level="DEBUG1")
    jump.start()
    try:
        live.bbrx.env["BOSH_ALL_PROXY"] = (
            f"ssh+socks5://root@127.0.0.1:{jump.port}?private-key={ssh_keys.client_key}"
        )
        checked = live.deployment("pre-backup-check")
        assert checked.code == 0, checked
        assert f"Through root@127.0.0.1:{jump.port} (BOSH_ALL_PROXY)" in checked.stderr
        forwarded = set(_forwards(jump))
        director_port = live.fake.url.rsplit(":", 1)[1]
        assert forwarded == {director_port, *(str(s.port) for s in live.vms.values())}, forwarded
        # The jump host's key, recorded on first use (ssh may hash the name).
        host_key = Path(f"{ssh_keys.host_key}.pub").read_text().split()[1]
        assert host_key in (live.bbrx.home / "proxy_known_hosts").read_text()
        # A bbrx SIGKILLed mid-run takes its tunnel with it (the parent-death signal).
        first = next(iter(live.trees.values()))
        first.set_fault("redis-server", "pre-backup-lock", "hang")
        running = live.bbrx.start(
            "deployment", "--target", live.fake.url, "-u", live.fake.client,
            "-p", live.fake.secret, "--ca-cert", str(live.ca), "-d", DEPLOYMENT,
            "backup", "--artifact-path", str(tmp_path),
        )  # fmt: skip
        wait_for(lambda: any(c.script == "pre-backup-lock" for c in first.calls()), what="lock")
        [tunnel] = [pid for pid in _children(running.pid) if "-D" in _argv(pid)]
        running.kill()
        running.communicate(timeout=30)
        wait_for(lambda: not _alive(tunnel), what="the tunnel to end with its bbrx")
        # The killed run left its user (with sudo) on every instance: the next cleanup
        # reads it from the audit log and has the Director remove it, and unlocks.
        [killed_user] = {u for server in live.vms.values() for u in server.users()}
        first.clear_faults()
        cleaned = live.deployment("backup-cleanup")
        assert cleaned.code == 0, cleaned
        removed = f"Removed the killed run's user {killed_user} from {DEPLOYMENT}/redis"
        assert removed in cleaned.stderr, cleaned
        # ... and the key pair it left in the temporary directory.
        assert f"Removed the killed run's key pair {tempfile.gettempdir()}" in cleaned.stderr
        assert not list(Path(tempfile.gettempdir()).glob(f"bbrx-access-{killed_user}-*"))
        assert all(server.users() == [] for server in live.vms.values())
        discovered = next(r for r in live.bbrx.audit_rows() if r["trigger"] == "discovered")
        assert discovered["detail"]["revoked_access"] == killed_user
        assert all(tree.locked_jobs() == [] for tree in live.trees.values())
        # bbr's other form: a SOCKS5 proxy someone opened (here an `ssh -D` of the test's).
        socks_port = sshd.free_port()
        opened = subprocess.Popen(
            ["ssh", "-N", "-D", f"127.0.0.1:{socks_port}", "-p", str(jump.port),
             "-i", str(ssh_keys.client_key), "-o", f"UserKnownHostsFile={jump.known_hosts}",
             "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "root@127.0.0.1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for(lambda: _listening(socks_port), what="the test's SOCKS5 proxy")
            before = len(_forwards(jump))
            live.bbrx.env["BOSH_ALL_PROXY"] = f"socks5://127.0.0.1:{socks_port}"
            checked = live.deployment("pre-backup-check")
            assert checked.code == 0, checked
            assert f"Through the SOCKS5 proxy 127.0.0.1:{socks_port}" in checked.stderr
            assert set(_forwards(jump)[before:]) == forwarded  # the Director and every VM
        finally:
            opened.terminate()
            opened.wait(timeout=10)
        live.bbrx.env["BOSH_ALL_PROXY"] = "socks5://127.0.0.1"
        refused = live.deployment("pre-backup-check")
        assert refused.code == 1 and "a SOCKS5 proxy is socks5://HOST:PORT" in refused.stderr
    finally:
        jump.stop()


def _forwards(jump: sshd.TestSshd) -> list[str]:
    """The ports the jump sshd forwarded connections to, in order (its DEBUG1 log)."""
    log = (jump.workdir / "sshd.log").read_text()
    return re.findall(r"direct_tcpip: originator \S+ port \d+, target 127\.0\.0\.1 port (\d+)", log)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_a_ctrl_c_while_a_director_task_runs_stops_the_wait(live: Live) -> None:
    """A Director whose tasks never end (queued behind others): the first Ctrl-C stops the
    wait at once, naming the task, and nothing was set up to tear down."""
    live.fake.task_polls = 10**6
    running = live.bbrx.start(
        "deployment", "--target", live.fake.url, "-u", live.fake.client,
        "-p", live.fake.secret, "--ca-cert", str(live.ca), "-d", DEPLOYMENT, "pre-backup-check",
    )  # fmt: skip
    wait_for(lambda: any(r.path == "/tasks/1" for r in live.fake.requests), what="a task poll")
    os.killpg(running.pid, signal.SIGINT)
    _, stderr = running.communicate(timeout=20)
    assert running.returncode != 0
    assert "stopped waiting for Director task 1 (vms of redis)" in stderr, stderr
    assert "the run was interrupted" in stderr


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_no_ssh_config_changes_where_a_live_instance_is_reached(live: Live, tmp_path) -> None:
    """bbr reads no ssh_config, and a pinned live instance's ssh reads none either: here the
    machine's /etc/ssh/ssh_config (replaced in a private mount namespace of this bbrx only)
    sends every connection to a ProxyCommand that fails, and the check still passes."""
    config = tmp_path / "ssh_config"
    config.write_text("Host *\n  ProxyCommand /bin/false\n  KnownHostsCommand /bin/false\n")
    assert Path("/etc/ssh/ssh_config").is_file()
    command = [
        "unshare", "--mount", "--propagation", "private", "sh", "-c",
        'mount --bind "$0" /etc/ssh/ssh_config && exec "$@"', str(config),
        *BBRX, "deployment", "--target", live.fake.url, "-u", live.fake.client,
        "-p", live.fake.secret, "--ca-cert", str(live.ca), "-d", DEPLOYMENT, "pre-backup-check",
    ]  # fmt: skip
    checked = subprocess.run(
        command, capture_output=True, text=True, env=live.bbrx.environ(), timeout=120,
        cwd=live.bbrx.home, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert f"Deployment '{DEPLOYMENT}' can be backed up." in checked.stdout


def test_a_windows_instance_is_skipped_and_its_user_still_removed(
    live: Live, ssh_keys, tmp_path
) -> None:
    """bbr asks each instance for %OS% first and skips a Windows one. Here a fourth VM's
    sshd answers every command as cmd.exe answers `echo %OS%`: the backup takes the three
    redis VMs, says which it skipped, and the Director's cleanup still covers the fourth."""
    windows_root = tmp_path / "windows-vm"
    (windows_root / "var/vcap").mkdir(parents=True)
    server = sshd.TestSshd(
        ssh_keys, windows_root, tmp_path / "sshd-windows", accounts=True,
        force_command="echo Windows_NT",
    ).start()  # fmt: skip
    try:
        host_key = Path(f"{ssh_keys.host_key}.pub").read_text().strip()
        vm = FakeVm("iis", 0, "f00dcafe-0000-4000-8000-000000000001",
                    f"127.0.0.1:{server.port}", host_key, bootstrap=True)  # fmt: skip
        live.fake.deployments[DEPLOYMENT]["vms"].append(vm)
        live.vms[vm.id] = server
        out = tmp_path / "out"
        out.mkdir()
        result = live.deployment("backup", "--artifact-path", str(out))
        assert result.code == 0, result
        assert f"skipping Windows instance iis/{vm.id}" in result.stderr
        [artifact] = list(out.iterdir())
        assert sorted(p.name for p in artifact.glob("*.tar")) == [
            f"redis-{i}-redis-server.tar" for i in range(3)
        ]
        assert all(s.users() == [] for s in live.vms.values())
        cleanups = [
            r.body["target"]["job"]
            for r in live.fake.requests
            if r.path.endswith("/ssh") and r.body["command"] == "cleanup"
        ]
        assert "iis" in cleanups, cleanups
    finally:
        server.stop()
