"""Per-phase script timeouts: bbr waits forever on a hung script, with the director locked.

A hung script in every phase, killed at its timeout, is in the fault matrix
(test_fault_matrix.py); here is what a timeout of 0 means."""

from __future__ import annotations

import pytest


def test_zero_means_no_limit(target, tmp_path):
    target.vm.set_fault("director", "backup", "sleep 2")
    result = target.director("--backup-timeout", "0", "backup", "--artifact-path", str(tmp_path))
    assert result.code == 0, result


@pytest.mark.parametrize("target", ["sim"], indirect=True)
def test_the_config_file_sets_timeouts_and_an_option_beats_it(target, tmp_path):
    (target.bbrx.home / "config.yml").write_text("timeouts:\n  lock: 1\n  backup: 0\n")
    target.vm.set_fault("director", "pre-backup-lock", "hang")

    by_config = target.director("backup", "--artifact-path", str(tmp_path))
    assert by_config.code == 4, by_config
    assert "(timed out after 1 s)" in by_config.stderr
    start = target.bbrx.audit_rows()[0]
    assert start["trigger"] == "start"
    assert start["detail"]["timeouts"] == {
        "metadata": 60, "lock": 1, "backup": None, "unlock": 600, "restore": 21600,
    }  # fmt: skip

    by_option = target.director("--lock-timeout", "2", "backup", "--artifact-path", str(tmp_path))
    assert by_option.code == 4, by_option
    assert "(timed out after 2 s)" in by_option.stderr


@pytest.mark.parametrize(
    "text, message",
    [
        ("timeouts:\n  lok: 5\n", "unknown timeout 'lok'"),
        ("timeouts:\n  lock: soon\n", "seconds (0: no limit), not 'soon'"),
        ("timeouts:\n  lock: -1\n", "timeouts.lock must be a number of seconds"),
        ("timeout:\n  lock: 5\n", "unknown key(s) timeout"),
        ("timeouts: [lock]\n", "timeouts must be a mapping"),
        ("timeouts:\n  lock: 5\n bad: [\n", "is not valid YAML at line 3"),
    ],
)  # fmt: skip
def test_a_bad_config_file_is_named_and_nothing_runs(bbrx, text, message):
    config = bbrx.home / "elsewhere.yml"
    config.write_text(text)
    bbrx.env["BBRX_CONFIG"] = str(config)
    result = bbrx("director", "--host", "sim://demo", "backup")
    assert result.code == 1, result
    assert f"Error: the config file {config}" in result.stderr
    assert message in result.stderr
    assert not bbrx.audit_db.exists()  # refused before any run began
    # ... but never in the way of an unlock.
    cleanup = bbrx("director", "--host", "sim://demo", "backup-cleanup")
    assert cleanup.code == 0, cleanup
    assert "this cleanup uses the built-in timeouts" in cleanup.stderr
