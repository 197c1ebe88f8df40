"""`bbrx deployment` as an operator runs it: a real process, bbr's grammar, flags and
environment variables, exit codes, --all-deployments' summary, and recovery after a
killed deployment run."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from audit import AuditLog
from simulator.calllog import CALL_LOG, parse_call_log
from tests import live_world
from tests.conftest import Bbrx, process_running, wait_for

pytestmark = pytest.mark.slow


def vm(bbrx: Bbrx, deployment: str, name: str) -> Path:
    group, index = name.split("/")
    return bbrx.home / "sim/demo/deployments" / deployment / group / index


def deployment(bbrx: Bbrx, *args: str, **kwargs):  # type: ignore[no-untyped-def]
    return bbrx("deployment", "--target", "sim://demo", *args, **kwargs)


def test_a_redis_backup_and_restore_as_the_runbook_spells_them(bbrx: Bbrx, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    checked = deployment(bbrx, "--deployment", "redis", "pre-backup-check")
    assert checked.code == 0, checked
    assert "Deployment 'redis' can be backed up." in checked.stdout

    made = deployment(bbrx, "-d", "redis", "backup", "-a", str(out))
    assert made.code == 0, made
    [published] = out.iterdir()
    assert f"Backup created: {published}" in made.stdout
    # Per-instance progress in the log lines.
    assert "redis-server on redis/2" in made.stderr

    wiped = bbrx("sim", "wipe", "demo", "--deployment", "redis")
    assert wiped.code == 0, wiped
    restored = deployment(bbrx, "-d", "redis", "restore", "--artifact-path", str(published))
    assert restored.code == 0, restored
    assert f"Restored {published} to deployment 'redis'" in restored.stdout

    shown = bbrx("audit", "show", bbrx.audit_runs()[-1].run_id)
    assert shown.code == 0, shown
    assert "instance redis/0 (id " in shown.stdout and "instance redis/2 (id " in shown.stdout
    status = bbrx("status", "--target", "sim://demo", "--deployment", "redis")
    assert status.code == 0 and "sim://demo/redis: idle" in status.stdout, status
    verified = bbrx("audit", "verify")
    assert verified.code == 0, verified


def test_bbrs_environment_variables_name_the_director_and_the_deployment(bbrx: Bbrx):
    bbrx.env.update({"BOSH_ENVIRONMENT": "sim://demo", "BOSH_DEPLOYMENT": "concourse"})
    checked = bbrx("deployment", "c")
    assert checked.code == 0, checked
    assert "Deployment 'concourse' can be backed up." in checked.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["backup"], "--target flag is required."),
        (["--target", "sim://demo", "backup"], "provide one of '--deployment'"),
        (
            ["--target", "sim://demo", "-d", "redis", "--all-deployments", "backup"],
            "provide one of '--deployment' or '--all-deployments'",
        ),
        (["--target", "sim://demo", "-d", "redis", "restore"], "--artifact-path flag is required."),
        (["--target", "10.0.0.6", "-d", "cf", "backup"], "--username flag is required."),
        (  # a live Director that is not there (loopback, a closed port)
            ["--target", "127.0.0.1:9", "-u", "admin", "-p", "x", "-d", "cf", "backup"],
            "the BOSH Director at https://127.0.0.1:9 is unreachable or unhealthy",
        ),
        (
            ["--target", "sim://demo", "--all-deployments", "backup", "--unsafe-lock-free"],
            "Cannot use the --unsafe-lock-free flag in conjunction with the --all-deployments flag",
        ),
        (
            ["--target", "sim://demo", "--all-deployments", "restore", "-a", "x"],
            "restore does not take --all-deployments",
        ),
        (["--target", "sim://demo", "-d", "nope", "backup"], "nope"),
    ],
)
def test_bbrs_usage_errors_exit_1_and_say_what_is_missing(bbrx: Bbrx, args, message):
    result = bbrx("deployment", *args)
    assert result.code == 1, result
    assert message in result.stderr + result.stdout


def test_all_deployments_backs_up_each_one_and_prints_bbrs_summary(bbrx: Bbrx, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    result = deployment(bbrx, "--all-deployments", "backup", "-a", str(out))
    assert result.code == 0, result
    assert "Pending: cf, redis, concourse" in result.stdout
    assert "Successfully backed up: cf, redis, concourse" in result.stdout
    assert sorted(p.name.split("_")[0] for p in out.iterdir()) == ["cf", "concourse", "redis"]
    runs = bbrx.audit_runs()
    assert sorted(r.target for r in runs) == [
        "sim://demo/cf",
        "sim://demo/concourse",
        "sim://demo/redis",
    ]
    with AuditLog(bbrx.audit_db, readonly=True) as audit:
        batches = {audit.timeline(r.run_id)[0]["detail"]["batch_id"] for r in runs}
    assert len(batches) == 1


@pytest.fixture
def reached(request: pytest.FixtureRequest, bbrx: Bbrx, tmp_path: Path) -> Iterator[list[str]]:
    """The simulated director `demo` (created), and how `bbrx deployment` reaches it: as
    `--target sim://demo`, or as a live Director (tests/live_world.py)."""
    assert bbrx("sim", "create", "demo").code == 0
    if request.param == "sim":
        yield ["--target", "sim://demo"]
        return
    with live_world.serving(request, bbrx.home, tmp_path) as world:
        yield world.cli_args()


@pytest.mark.parametrize("reached", ["sim", "live"], indirect=True)
def test_all_deployments_exits_1_when_one_fails_and_the_others_are_backed_up(
    bbrx: Bbrx, tmp_path: Path, reached: list[str]
):
    out = tmp_path / "out"
    out.mkdir()
    broken = bbrx(
        "sim",
        "fault",
        "demo",
        "bbr-atcdb",
        "backup",
        "fail 3 disk on fire",
        "--deployment",
        "concourse",
        "--instance",
        "web/0",
    )
    assert broken.code == 0, broken
    result = bbrx("deployment", *reached, "--all-deployments", "backup", "-a", str(out))
    assert result.code == 1, result
    assert "Successfully backed up: cf, redis" in result.stdout
    assert "FAILED: concourse" in result.stdout
    assert "1 out of 3 deployments cannot be backed up:" in result.stderr
    assert "Deployment 'concourse':" in result.stderr and "disk on fire" in result.stderr
    assert sorted(p.name.split("_")[0] for p in out.iterdir()) == ["cf", "redis"]
    director = reached[1]
    assert sorted(r.target for r in bbrx.audit_runs()) == [
        f"{director}/{name}" for name in ("cf", "concourse", "redis")
    ]


@pytest.mark.parametrize("reached", ["sim", "live"], indirect=True)
def test_a_killed_deployment_run_is_seen_and_recovered_per_deployment(
    bbrx: Bbrx, tmp_path: Path, reached: list[str]
):
    director = reached[1]
    hang = bbrx(
        "sim",
        "fault",
        "demo",
        "redis-server",
        "pre-backup-lock",
        "hang",
        "--deployment",
        "redis",
        "--instance",
        "redis/2",
    )
    assert hang.code == 0, hang
    out = tmp_path / "out"
    out.mkdir()
    proc = bbrx.start("deployment", *reached, "-d", "redis", "backup", "-a", str(out))
    log = vm(bbrx, "redis", "redis/2") / CALL_LOG
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if log.is_file() and any(
            c.script == "pre-backup-lock" and c.event == "start"
            for c in parse_call_log(log.read_text())
        ):
            break
        time.sleep(0.1)
    time.sleep(0.5)  # its pid row
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()

    status = bbrx("status", "--target", director, "-d", "redis")
    assert "interrupted" in status.stdout, status
    assert "redis-server on redis/2" in status.stdout
    assert f"bbrx deployment --target {director} --deployment redis backup-cleanup" in status.stdout
    refused = bbrx("deployment", *reached, "-d", "redis", "backup", "-a", str(out))
    assert refused.code == 1 and "did not finish" in refused.stderr, refused

    assert (
        bbrx(
            "sim",
            "fault",
            "demo",
            "redis-server",
            "pre-backup-lock",
            "--deployment",
            "redis",
            "--instance",
            "redis/2",
        ).code
        == 0
    )
    killed = bbrx.audit_runs()[0]
    killed_user = bbrx.audit_rows(killed.run_id)[0]["detail"].get("access_user")
    left_keys = Path(tempfile.gettempdir()).glob(f"bbrx-access-{killed_user}-*")
    assert (killed_user is not None) == (director != "sim://demo")
    assert len(list(left_keys)) == (director != "sim://demo")  # live: the killed run's keys
    cleaned = bbrx("deployment", *reached, "-d", "redis", "backup-cleanup")
    assert cleaned.code == 0, cleaned
    # ... removed by the cleanup, with its user.
    assert not list(Path(tempfile.gettempdir()).glob(f"bbrx-access-{killed_user}-*"))
    for name in ("redis/0", "redis/1", "redis/2"):
        locks = vm(bbrx, "redis", name) / "var/vcap/sys/run/bbr-sim/locks"
        assert not locks.is_dir() or not any(locks.iterdir()), name
    status = bbrx("status", "--target", director, "-d", "redis")
    assert "idle" in status.stdout, status


def test_a_log_an_older_bbrx_wrote_verifies_and_takes_deployment_runs(bbrx: Bbrx, tmp_path: Path):
    import sqlite3
    from contextlib import closing

    v1 = Path(__file__).resolve().parent / "data" / "audit-v1.sql"
    with closing(sqlite3.connect(bbrx.audit_db, isolation_level=None)) as conn:
        conn.executescript(v1.read_text(encoding="utf-8"))
    before = bbrx("audit", "verify")
    assert before.code == 0, before
    assert "intact: 186 events" in before.stdout

    out = tmp_path / "out"
    out.mkdir()
    made = deployment(bbrx, "-d", "redis", "backup", "-a", str(out))
    assert made.code == 0, made
    after = bbrx("audit", "verify")
    assert after.code == 0, after
    with AuditLog(bbrx.audit_db, readonly=True) as audit:
        runs = [run for run in audit.runs() if run.mode != "review"]  # not the verifies
        old, new = audit.timeline(runs[0].run_id), audit.timeline(runs[-1].run_id)
    assert all(row["instance_group"] is None for row in old)
    assert {row["instance_group"] for row in new if row["job"]} == {"redis"}


def test_all_deployments_pre_backup_check_gives_bbrs_verdict_for_each(bbrx: Bbrx):
    assert bbrx("sim", "create", "demo").code == 0
    broken = bbrx(
        "sim",
        "fault",
        "demo",
        "cloud_controller_ng",
        "metadata",
        "fail 2 no config",
        "--deployment",
        "cf",
        "--instance",
        "api/1",
    )
    assert broken.code == 0, broken
    result = deployment(bbrx, "--all-deployments", "pre-backup-check")
    assert result.code == 1, result
    assert "Deployment 'redis' can be backed up." in result.stdout
    assert "Deployment 'cf' cannot be backed up." in result.stdout
    assert "  metadata script for job cloud_controller_ng on api/1" in result.stdout
    assert "Successfully can be backed up: redis, concourse" in result.stdout
    assert "1 out of 3 deployments cannot be backed up:" in result.stderr


@pytest.mark.parametrize("reached", ["sim", "live"], indirect=True)
def test_a_ctrl_c_mid_deployment_backup_unlocks_every_instance(
    bbrx: Bbrx, tmp_path: Path, reached: list[str]
):
    """bbr leaves a deployment locked on Ctrl-C; bbrx ends the hung lock script, unlocks
    every instance that locked, publishes nothing and (live) has the Director remove the
    run's user: the `reached` fixture checks no user is left on any VM."""
    hang = bbrx(
        "sim", "fault", "demo", "redis-server", "pre-backup-lock", "hang",
        "--deployment", "redis", "--instance", "redis/1",
    )  # fmt: skip
    assert hang.code == 0, hang
    out = tmp_path / "out"
    out.mkdir()
    proc = bbrx.start("deployment", *reached, "-d", "redis", "backup", "-a", str(out))
    log = vm(bbrx, "redis", "redis/1") / CALL_LOG

    def hung() -> list[int]:
        ran = parse_call_log(log.read_text()) if log.is_file() else []
        return [c.pid for c in ran if (c.script, c.event) == ("pre-backup-lock", "start")]

    try:
        wait_for(hung, timeout=60, what="redis/1's lock script to start")
        os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C, to bbrx's process group
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert "interrupted by SIGINT" in stderr, stderr
    # The hung lock script itself was ended by bbrx (its pid, from the VM's own call log).
    [pid] = hung()
    wait_for(lambda: not process_running(pid), timeout=10, what="the hung lock script to end")
    for name in ("redis/0", "redis/1", "redis/2"):
        ran = parse_call_log((vm(bbrx, "redis", name) / CALL_LOG).read_text())
        locked = any((c.script, c.event) == ("pre-backup-lock", "start") for c in ran)
        unlocked = any((c.script, c.event) == ("post-backup-unlock", "start") for c in ran)
        assert unlocked or not locked, name
        locks = vm(bbrx, "redis", name) / "var/vcap/sys/run/bbr-sim/locks"
        assert not locks.is_dir() or not any(locks.iterdir()), name
    assert list(out.iterdir()) == []
    status = bbrx("status", "--target", reached[1], "-d", "redis")
    assert "idle (last run " in status.stdout, status
