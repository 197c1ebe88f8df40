"""bbr's own spellings, as its runbooks and director-mode suite write them: the short flags
(`-u`, `--key`, `-a`), the command aliases (`c`, `b`, `r`, `h`, `v`), the `help` command, a
bare `bbrx`, and the director flags copied onto `status`. Each does what its long form does."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cli.app import main
from tests.conftest import Bbrx, Result


@pytest.fixture
def cli(bbrx: Bbrx, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """`bbrx ARGS` through `main` in this process: the same exit-code mapping as the real
    command, without a start-up (for the commands that only parse and print)."""
    for name, value in bbrx.environ().items():
        monkeypatch.setenv(name, value)

    def run(*args: str) -> Result:
        with pytest.raises(SystemExit) as exit_:
            main(list(args))
        out = capsys.readouterr()
        code = exit_.value.code
        return Result(list(args), code if isinstance(code, int) else 1, out.out, out.err)

    return run


def _backups(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.is_dir()]


@pytest.fixture
def backups(tmp_path: Path) -> Path:
    directory = tmp_path / "backups"
    directory.mkdir()
    return directory


# --- the aliases and -a do what the long forms do, on both transports --------------------


def test_c_b_r_and_a_check_back_up_and_restore(target, backups):
    checked = target.director("c")
    assert checked.code == 0, checked
    assert "can be backed up" in checked.stdout

    backed_up = target.director("b", "-a", str(backups))
    assert backed_up.code == 0, backed_up
    [backup] = _backups(backups)
    assert f"Backup created: {backup}" in backed_up.stdout
    assert (backup / "metadata").is_file()

    restored = target.director("r", "-a", str(backup))
    assert restored.code == 0, restored
    assert f"Restored {backup}" in restored.stdout
    # The audit log names the operations by their full names, whatever was typed.
    assert [run.operation for run in target.bbrx.audit_runs()] == [
        "pre-backup-check",
        "backup",
        "restore",
    ]


def test_u_and_key_reach_a_real_sshd(ssh_server, bbrx, backups):
    common = [
        "director", "--host", f"127.0.0.1:{ssh_server.port}",
        "-u", "root", "--key", str(ssh_server.keys.client_key),
        "--known-hosts", str(ssh_server.known_hosts),
    ]  # fmt: skip
    checked = bbrx(*common, "pre-backup-check")
    assert checked.code == 0, checked
    backed_up = bbrx(*common, "backup", "--artifact-path", str(backups))
    assert backed_up.code == 0, backed_up
    assert len(_backups(backups)) == 1


def test_pre_backup_check_takes_a_for_the_space_check(target, backups):
    result = target.director("pre-backup-check", "-a", str(backups))
    assert result.code == 0, result
    assert str(backups) in result.stderr  # the space line names where the backup would go


# --- help, h, a bare bbrx ----------------------------------------------------------------


def test_bare_bbrx_prints_help_and_exits_0(bbrx):
    result = bbrx()
    assert result.code == 0, result
    assert "Usage: bbrx" in result.stdout and "director" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("args", [["help"], ["h"], ["--help"]])
def test_top_level_help(cli, args):
    result = cli(*args)
    assert result.code == 0, result
    assert "Usage: bbrx [OPTIONS] COMMAND" in result.stdout
    for command in ("director", "status", "audit", "version"):
        assert command in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["director", "help"],
        ["director", "h"],
        ["director", "--host", "sim://demo", "help"],
        ["director", "--help"],
        ["help", "director"],
    ],
)
def test_director_help_lists_subcommands_and_aliases(cli, args):
    result = cli(*args)
    assert result.code == 0, result
    assert "Usage: bbrx director [OPTIONS] COMMAND" in result.stdout
    for alias in ("(alias: c)", "(alias: b)", "(alias: r)", "(alias: h)"):
        assert alias in result.stdout
    for flag in ("-u", "--key", "--username", "--private-key-path"):
        assert flag in result.stdout


@pytest.mark.parametrize(
    "args", [["director", "help", "b"], ["director", "h", "backup"], ["h", "director", "b"]]
)
def test_help_of_one_subcommand(cli, args):
    result = cli(*args)
    assert result.code == 0, result
    assert "Usage: bbrx director backup" in result.stdout
    assert "--artifact-path" in result.stdout and "-a" in result.stdout


def test_help_of_an_unknown_command_is_a_usage_error(cli):
    result = cli("help", "teleport")
    assert result.code == 1
    assert "No such command 'teleport'" in result.stderr


def test_v_is_version(cli):
    result = cli("v")
    assert result.code == 0 and result.stdout.startswith("bbrx version ")


@pytest.mark.parametrize("group", ["audit", "sim"])
def test_bare_groups_print_their_help(cli, group):
    result = cli(group)
    assert result.code == 0, result
    assert f"Usage: bbrx {group}" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["director"], "Missing option '--host'"),
        (["director", "b"], "Missing option '--host'"),
        (["director", "--host", "sim://demo"], "Missing command"),
        (["director", "--host", "sim://demo", "x"], "No such command 'x'"),
        # An alias lives only where its command does.
        (["b"], "No such command 'b'"),
    ],
)
def test_usage_errors_still_exit_1(cli, args, message):
    result = cli(*args)
    assert result.code == 1, result
    assert message in result.stderr


# --- status takes the director line as copied ---------------------------------------------


def test_status_accepts_the_copied_director_flags(cli, target):
    assert target.director("backup-cleanup").code == 0
    copied = [
        "--host", target.host,
        "--username", "root", "--private-key-path", "/no/such/key",
        "-u", "root", "--key", "/no/such/key",
        "--known-hosts", "/no/such/known_hosts", "--accept-new-host-key", "--debug",
    ]  # fmt: skip
    result = cli("status", *copied)
    assert result.code == 0, result
    assert result.stdout.startswith(f"{target.address}: idle (last run ")
    assert result.stdout == cli("status", "--host", target.host).stdout


def test_status_help_says_the_connection_flags_are_ignored(cli):
    result = cli("status", "--help")
    assert result.code == 0
    assert "never connects" in result.stdout
    assert "--private-key-path" in result.stdout and "-u" in result.stdout
