"""The cleanup bit (16), alone and OR-ed with others, as bbr computes it."""

from __future__ import annotations

import subprocess

import pytest

pytestmark = pytest.mark.parametrize("target", ["sim"], indirect=True)


@pytest.fixture
def stuck_work_dir(target):
    """A work dir that cannot be removed: a filesystem is mounted inside it."""
    inner = target.work_dir() / "director"
    inner.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inner)]).returncode != 0:
        pytest.skip("needs root to mount a tmpfs")
    yield inner
    subprocess.run(["umount", str(inner)], check=True)


def test_cleanup_failure_exits_16(target, stuck_work_dir):
    result = target.director("backup-cleanup")
    assert result.code == 16, result
    assert "Error: could not remove /var/vcap/store/bbr-backup on sim://demo" in result.stderr
    assert set(target.scripts_run("post-backup-unlock")) == {
        "bbr-credhubdb", "blobstore", "director", "uaa",
    }  # fmt: skip
    states = [r["to_state"] for r in target.bbrx.audit_rows() if r["job"] is None]
    assert states[-2:] == ["cleaning", "failed"]


def test_unlock_and_cleanup_failures_or_together(target, stuck_work_dir):
    target.vm.set_fault("uaa", "post-backup-unlock", "fail 1 stuck")
    result = target.director("backup-cleanup")
    assert result.code == 8 | 16, result
    assert "post-backup-unlock script for job uaa" in result.stderr
    assert "could not remove /var/vcap/store/bbr-backup" in result.stderr
