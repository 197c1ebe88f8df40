"""Progress as the operator sees it: bars on a terminal, plain lines in logs, silence on --quiet."""

from __future__ import annotations

import os
import pty
import subprocess

import pytest

from tests.conftest import BBRX

pytestmark = pytest.mark.parametrize("target", ["sim"], indirect=True)


def test_plain_lines_when_not_a_terminal(target, tmp_path):
    result = target.director("backup", "--artifact-path", str(tmp_path))
    assert result.code == 0, result
    for job in ("director", "blobstore", "bbr-credhubdb"):
        assert f"INFO - bosh-0-{job}.tar: " in result.stderr
    assert "MiB/s)" in result.stderr or "KiB/s)" in result.stderr
    assert "\x1b[" not in result.stderr  # no terminal codes in a log


def test_quiet_prints_only_the_result(target, tmp_path):
    result = target.director("--quiet", "backup", "--artifact-path", str(tmp_path))
    assert result.code == 0, result
    assert result.stderr == ""
    assert result.stdout.startswith("Backup created: ")


def test_quiet_still_prints_errors(target, tmp_path):
    target.vm.set_fault("director", "backup", "fail 1 broken")
    result = target.director("--quiet", "backup", "--artifact-path", str(tmp_path))
    assert result.code == 1
    assert result.stderr.startswith("Error: backup script for job director")


def test_a_bar_per_artifact_on_a_terminal(target, tmp_path):
    main, secondary = pty.openpty()
    proc = subprocess.Popen(
        [*BBRX, "director", "--host", target.host, "backup", "--artifact-path", str(tmp_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=secondary,
        env={**target.bbrx.environ(), "COLUMNS": "120", "TERM": "xterm"},
        cwd=tmp_path,
    )
    os.close(secondary)
    screen = b""
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:
            break
        if not data:
            break
        screen += data
    proc.communicate(timeout=60)
    os.close(main)
    assert proc.returncode == 0
    text = screen.decode("utf-8", "replace")
    assert "━" in text  # rich's bar
    for job in ("director", "blobstore", "bbr-credhubdb"):
        assert f"bosh-0-{job}.tar" in text
    assert "1.7/1.7 MiB" in text
