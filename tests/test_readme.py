"""The README is a contract: its schema, exit codes, diagram and commands match the code."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from audit import EVENT_COLUMNS
from orchestrator import errors, settings
from orchestrator.bbr import artifact
from orchestrator.cli.app import app
from orchestrator.engine.machine import mermaid
from orchestrator.engine.run import Timeouts

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    start = README.index(title)
    following = re.search(r"\n#{2,3} ", README[start + len(title) :])
    return README[start : start + len(title) + (following.start() if following else len(README))]


def test_audit_schema_table_matches_the_code():
    rows = re.findall(r"^\| `(\w+)` \| (\w+) \| (.+) \|$", section("### Audit schema"), re.M)
    assert [(name, kind) for name, kind, _ in rows] == [(n, t) for n, t, _ in EVENT_COLUMNS]


def test_exit_code_table_matches_the_code():
    codes = dict(re.findall(r"^\| (\d+) \| (.+) \|$", section("### Exit codes"), re.M))
    assert set(codes) == {"0", "1", "4", "8", "16"}
    assert int(next(k for k, v in codes.items() if "pre-backup-lock" in v)) == errors.EXIT_LOCK
    assert int(next(k for k, v in codes.items() if "unlock script" in v)) == errors.EXIT_UNLOCK
    assert int(next(k for k, v in codes.items() if "cleanup" in v)) == errors.EXIT_CLEANUP
    assert errors.LockError.exit_bit == errors.EXIT_LOCK
    assert errors.UnlockError.exit_bit == errors.EXIT_UNLOCK
    assert errors.CleanupError.exit_bit == errors.EXIT_CLEANUP


def test_backup_diagram_is_the_machine():
    block = re.search(r"```mermaid\n(.*?)```", README, re.S)
    assert block is not None
    assert block.group(1).strip() == mermaid("backup").strip()


def test_artifact_section_names_the_files_the_code_writes():
    text = section("## The artifact")
    for name in (artifact.METADATA_FILE, artifact.AUDIT_HEAD_FILE, artifact.INCOMPLETE_MARKER):
        assert f"`{name}`" in text or f" {name} " in text
    assert artifact.INCOMPLETE_SUFFIX in text
    assert artifact.tar_name("bosh", "0", "director") in text


def test_quick_start_commands_are_what_ci_runs():
    blocks = re.findall(r"```sh\n(.*?)\n```", section("## Quick start"), re.S)
    assert len(blocks) == 2, "exactly two set-up commands"
    run, test = blocks
    assert "bbrx director --host sim://demo backup" in run
    ci = (ROOT / ".ci" / "run").read_text()
    for part in test.split(" && "):
        words = shlex.split(part)
        if words[0] == ".venv/bin/pytest":
            assert re.search(r"^\.venv/bin/pytest$", ci, re.M)
        elif "pip" in words[0]:
            assert "-e '.[dev]'" in ci
        else:
            assert part in ci


PLACEHOLDER = re.compile(r"\b(HOST|SUBCOMMAND|OPERATION|NAME|RUN|DIR|PATH|KEY|USER|TEXT|SPEC)\b|\[")


def _commands_in_readme() -> list[list[str]]:
    found = []
    for block in re.findall(r"```(?:text|sh)?\n(.*?)```", README, re.S):
        for line in block.splitlines():
            match = re.match(r"^(?:\$ |.*\.venv/bin/)?bbrx (.*)$", line.split("  #")[0].strip())
            if match and not PLACEHOLDER.search(match.group(1)):
                found.append(shlex.split(match.group(1)))
    return found


COMMANDS = _commands_in_readme()


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(w)[:60] for w in COMMANDS])
def test_every_command_in_the_readme_parses(words, capsys):
    """Each command the README shows resolves to a real command with valid options."""
    command = typer.main.get_command(app)
    try:
        command.main(args=[*words, "--help"], prog_name="bbrx", standalone_mode=False)
    except Exception as error:  # a usage error: unknown command or option
        pytest.fail(f"README command does not parse: bbrx {' '.join(words)}: {error}")
    assert "Usage:" in capsys.readouterr().out


def test_readme_mentions_enough_commands():
    assert len(COMMANDS) >= 10


def test_config_example_is_the_defaults(tmp_path):
    text = section("**Script timeouts.**")
    [example] = re.findall(r"```yaml\n(.*?)```", text, re.S)
    config = tmp_path / "config.yml"
    config.write_text(example)
    assert settings.configured_timeouts(config) == Timeouts()


def test_what_goes_wrong_counts_the_fault_matrix():
    from tests.conftest import TRANSPORTS
    from tests.test_fault_matrix import CASES

    text = section("## What happens when things go wrong")
    assert f"({len(CASES) * len(TRANSPORTS)} cases)" in text
    from tests.test_deployments import INSTANCE_FAULTS

    assert f"{len(INSTANCE_FAULTS)} cases" in text


def _attack_rows() -> list[tuple[str, str]]:
    """(attack, test node) for each row of the README's attack table."""
    text = section("### What a crafted backup or a broken environment gets")
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[3].startswith("`tests/"):
            rows.append((cells[0], cells[3].strip("`")))
    return rows


def test_attack_table_names_tests_that_exist():
    import ast

    rows = _attack_rows()
    assert len(rows) >= 20
    for attack, node in rows:
        path, _, name = node.partition("::")
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name in names, f"README attack row {attack!r} names {node}, which does not exist"


def test_every_attack_test_is_in_the_table():
    import ast

    listed = {node for _, node in _attack_rows()}
    path = "tests/test_attacks.py"
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    tests = {
        f"{path}::{n.name}"
        for n in tree.body
        if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
    }
    assert tests - listed == set(), "attack tests missing from the README's attack table"


def test_reviewer_section_holds_the_pci_mapping_and_the_views():
    from audit.fields import REQUIRED_FIELDS
    from audit.schema import VIEWS

    text = section("## For compliance reviewers")
    mapped = re.findall(r"^\| ([a-z ,]+) \| (.+) \| `(\w+)` \|$", text, re.M)
    assert [(field, column) for field, _, column in mapped] == [
        (field, column) for field, _, column, _ in REQUIRED_FIELDS
    ]
    for (_, columns, _), (_, code_columns, _, _) in zip(mapped, REQUIRED_FIELDS, strict=True):
        assert re.findall(r"\w+", columns.replace("UTC, with Z", "")) == re.findall(
            r"\w+", code_columns.replace("UTC, with Z", "")
        )
    views = re.findall(r"^\| `(\w+)` \| ", text, re.M)
    assert views == list(VIEWS)
    for option in ("--since", "--until", "--target", "--operator", "--operation", "--outcome"):
        assert option in text


def checkpoint_recipe() -> str:
    """The shell recipe the README gives reviewers (tests/test_checkpoints.py runs it)."""
    [recipe] = re.findall(r"```bash\n(.*?)```", section("## For compliance reviewers"), re.S)
    return recipe
