"""The command line itself: bbr's grammar, exit codes for usage errors, version, diagrams,
the simulator commands a trainee uses."""

from __future__ import annotations

import importlib.metadata

import pytest

import orchestrator
from orchestrator.engine.machine import MACHINES


def test_version(bbrx):
    # One version: the package's, which the build puts in the installed metadata too.
    installed = importlib.metadata.version("bbrx")
    assert installed == orchestrator.__version__
    result = bbrx("version")
    assert result.code == 0
    assert result.stdout.strip() == f"bbrx version {installed}"


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


# --- what the CLI prints from the log is safe for a terminal ------------------------------

# An operator name that would retitle the terminal, clear it and reverse what follows.
EVIL = "ev\x1b]0;pwned\x07il\x1b[2J\u202egnp.exe"
EVIL_SHOWN = "ev\\x1b]0;pwned\\x07il\\x1b[2J\\u202egnp.exe"


@pytest.mark.parametrize(
    "raw, shown",
    [
        ("\x1b[31m", "\\x1b[31m"),  # C0
        ("\x7f", "\\x7f"),  # DEL
        ("\x9b2J", "\\x9b2J"),  # C1 (CSI)
        ("a\u202eb\u2066c\u200fd", "a\\u202eb\\u2066c\\u200fd"),  # bidi override, isolate, mark
        ("\u2028", "\\u2028"),  # line separator
        ("운영자 café", "운영자 café"),  # printable text stays as it is
    ],
)
def test_printable_escapes_controls(raw, shown):
    from audit.render import printable

    assert printable(raw) == shown
    assert printable(printable(raw)) == shown
    assert printable(f"one\n{raw}", keep_newlines=True) == f"one\n{shown}"
    assert printable("one\ntwo") == "one\\ntwo"


def _in_process(bbrx, monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from orchestrator.cli.app import main

    for name, value in bbrx.environ().items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out = capsys.readouterr()
    return int(exit_.value.code or 0), out.out, out.err


@pytest.mark.parametrize("target", ["sim"], indirect=True)
def test_audit_runs_and_show_escape_what_operators_and_scripts_wrote(
    target, tmp_path, monkeypatch, capsys
):
    bbrx = target.bbrx
    assert bbrx("sim", "fault", "demo", "director", "backup", "fail 3 x\x1b[2Jy").code == 0
    failed = bbrx("--operator", EVIL, "--reason", "CHG\x1b[8m hidden", "director",
                  "--host", "sim://demo", "backup", "-a", str(tmp_path))  # fmt: skip
    assert failed.code == 1
    # The error quotes the script's stderr: escaped there too.
    assert "stderr: x\\x1b[2Jy" in failed.stderr and "\x1b" not in failed.stderr
    [run] = bbrx.audit_runs()
    assert run.operator == EVIL  # the log keeps what was given; only the rendering escapes

    code, runs, _ = _in_process(bbrx, monkeypatch, capsys, "audit", "runs")
    assert code == 0
    assert EVIL_SHOWN in runs and "CHG\\x1b[8m hidden" in runs
    assert "\x1b" not in runs and "\u202e" not in runs and "\x07" not in runs

    code, shown, _ = _in_process(bbrx, monkeypatch, capsys, "audit", "show", run.run_id)
    assert code == 0
    assert "\x1b" not in shown
    assert len(shown.splitlines()) == len(bbrx.audit_rows(run.run_id)) + 1


def test_audit_show_escapes_job_names_and_details(bbrx, monkeypatch, capsys):
    from audit import AuditLog

    with AuditLog(bbrx.audit_db) as log:
        common = {"run_id": "run-evil", "operation": "backup", "target": "sim://demo",
                  "mode": "sim", "operator": EVIL, "origin_host": "h", "reason": None,
                  "tool_version": "0"}  # fmt: skip
        log.append(**common, from_state=None, to_state="discovering", trigger="start")
        log.append(**common, from_state="locking", to_state="lock_failed", trigger="lock_error",
                   job="job\x1b[2J", script="pre-backup-lock", outcome="error", exit_code=1,
                   detail={"stderr_tail": "\x1b]0;title\x07\u202eboom"})  # fmt: skip
    code, shown, _ = _in_process(bbrx, monkeypatch, capsys, "audit", "show", "run-evil")
    assert code == 0
    assert "job\\x1b[2J" in shown
    assert "stderr_tail: \\x1b]0;title\\x07\\u202eboom" in shown
    assert not any(ch in shown for ch in "\x1b\x07\u202e")
    code, runs, _ = _in_process(bbrx, monkeypatch, capsys, "audit", "runs")
    assert EVIL_SHOWN in runs and "\x1b" not in runs


@pytest.mark.parametrize("target", ["sim"], indirect=True)
def test_status_escapes_the_operator_of_a_run_that_needs_cleanup(target, tmp_path):
    bbrx = target.bbrx
    assert bbrx("sim", "fault", "demo", "director", "post-backup-unlock", "fail 1 stuck").code == 0
    failed = bbrx("--operator", EVIL, "director", "--host", "sim://demo", "b", "-a", str(tmp_path))
    assert failed.code == 8, failed
    status = bbrx("status", "--host", "sim://demo", "-u", "root", "--key", "k")
    assert status.code == 0, status
    assert "needs cleanup" in status.stdout and EVIL_SHOWN in status.stdout
    assert "\x1b" not in status.stdout and "\u202e" not in status.stdout


def test_the_command_line_loads_without_the_run_machinery():
    # A live director's SSH handshake starts when the target is opened, and the audit log,
    # the engine, the operations and YAML load while it runs (operations/procedures.py):
    # importing them with the command line would put them back before it. (Not rich:
    # typer before 0.2x imports it itself.)
    import subprocess
    import sys

    probe = (
        "import sys, orchestrator.cli; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('yaml', 'sqlite_utils', 'transitions', 'httpx', 'simulator') or m in "
        "('orchestrator.engine.run', 'orchestrator.operations.running', 'audit.journal', "
        "'orchestrator.bbr.artifact', 'orchestrator.state.review'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    assert loaded == []
