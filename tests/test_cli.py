"""The command line itself: bbr's grammar, exit codes for usage errors, version, diagrams,
the simulator commands a trainee uses."""

from __future__ import annotations

import pytest

from orchestrator.machine import MACHINES


def test_version(bbrx):
    result = bbrx("version")
    assert result.code == 0
    assert result.stdout.startswith("bbrx version ")


@pytest.mark.parametrize(
    "args",
    [
        ["director", "backup"],  # --host missing
        ["director", "--host", "sim://demo", "explode"],
        ["director", "--host", "sim://demo", "backup", "--no-such-flag"],
    ],
)
def test_usage_errors_exit_1_like_bbr(bbrx, args):
    result = bbrx(*args)
    assert result.code == 1, result
    assert "Error" in result.stderr or "Usage" in result.stderr


def test_real_hosts_need_credentials(bbrx):
    # Refused while parsing the request: no connection is attempted.
    missing = bbrx("director", "--host", "127.0.0.1", "backup")
    assert missing.code == 1
    assert "--username and --private-key-path are required" in missing.stderr


@pytest.mark.parametrize(
    "host, message",
    [
        ("sim://", "name the simulated director"),
        ("sim://Bad Name", "sim"),
        ("ftp://x", "unknown scheme"),
        ("127.0.0.1:99999", "port must be a number"),
    ],
)
def test_bad_hosts_are_named(bbrx, host, message):
    result = bbrx("director", "--host", host, "pre-backup-check")
    assert result.code == 1, result
    assert message in result.stderr


@pytest.mark.parametrize("operation", [*MACHINES, "job"])
def test_diagram_is_mermaid_with_every_state(bbrx, operation):
    result = bbrx("diagram", operation)
    assert result.code == 0, result
    assert "stateDiagram-v2" in result.stdout
    states = MACHINES[operation]["states"] if operation != "job" else ["idle", "unlock_failed"]
    for state in states:
        assert f'state "{state}"' in result.stdout


def test_diagram_of_unknown_operation(bbrx):
    result = bbrx("diagram", "teleport")
    assert result.code == 1
    assert "Error: unknown operation teleport; choose one of: pre-backup-check, backup" in (
        result.stderr
    )


def test_sim_lifecycle(bbrx):
    assert "No simulated directors yet" in bbrx("sim", "list").stdout
    created = bbrx("sim", "create", "lab")
    assert created.code == 0, created
    assert "Created sim://lab" in created.stdout
    again = bbrx("sim", "create", "lab")
    assert again.code == 1 and "already exists" in again.stderr
    assert "Deployment 'cf'" in bbrx("sim", "vms", "lab").stdout
    assert "sim://lab" in bbrx("sim", "list").stdout

    wiped = bbrx("sim", "wipe", "lab")
    assert wiped.code == 0 and "recreated empty" in wiped.stdout
    assert "No deployments" in bbrx("sim", "vms", "lab").stdout

    assert bbrx("sim", "destroy", "lab").code == 0
    gone = bbrx("sim", "vms", "lab")
    assert gone.code == 1
    assert "there is no simulated director lab" in gone.stderr
    assert "bbrx sim create lab" in gone.stderr


@pytest.mark.parametrize("target", ["sim"], indirect=True)
def test_sim_faults_from_the_command_line(target, tmp_path):
    bbrx = target.bbrx
    assert bbrx("sim", "fault", "demo", "director", "backup", "fail 7 broken dump").code == 0
    result = target.director("backup", "--artifact-path", str(tmp_path))
    assert result.code == 1
    assert "stderr: broken dump" in result.stderr
    assert bbrx("sim", "fault", "demo", "director", "backup").code == 0
    assert target.director("backup", "--artifact-path", str(tmp_path)).code == 0
    bad = bbrx("sim", "fault", "demo", "director", "nosuchscript", "hang")
    assert bad.code == 1 and "has no 'nosuchscript' script" in bad.stderr


@pytest.mark.parametrize("target", ["sim"], indirect=True)
def test_locked_director_shows_in_sim_vms(target):
    target.vm.set_fault("director", "backup", "fail 1 x")
    # A lock taken by hand, as if a run had died: `sim vms` plays the director's API.
    script = target.vm.root / "var/vcap/jobs/director/bin/bbr/pre-backup-lock"
    import subprocess

    subprocess.run([str(script)], check=True, capture_output=True)
    shown = target.bbrx("sim", "vms", "demo")
    assert "director API is locked" in shown.stdout
    assert target.director("backup-cleanup").code == 0
    assert "Deployment 'cf'" in target.bbrx("sim", "vms", "demo").stdout
