"""A real audit log for the reviewers' tools, made once a session by real runs on the
simulator (in-process, real scripts as real processes), then copied for each test.

What the log holds, in order (each a run of its own, with its real rows):
  1. backup of sim://demo by alice, reason "CHG-1 weekly", succeeded
  2. backup-cleanup of sim://demo by alice, succeeded
  3. backup of sim://demo by bob, reason "CHG-2", failed (blobstore's backup script fails)
  4. backup-cleanup of sim://demo by bob, succeeded
  5. backup of the deployment sim://demo/redis (three instances) by carol, succeeded
  6. restore of sim://demo from run 1's backup by alice, reason "DR drill", succeeded
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from orchestrator.engine.run import Identity, Timeouts
from orchestrator.errors import RunFailed
from orchestrator.operations.procedures import Request, run_deployment, run_director
from orchestrator.transport.targets import parse_director, parse_host
from simulator.director import SimDirector, sim_root

TIMEOUTS = Timeouts(metadata=20, lock=20, backup=60, unlock=20, restore=60)


@dataclass(frozen=True)
class ReviewLog:
    """A copy of the session's real log, for one test to read or tamper with."""

    path: Path  # the audit.db
    home: Path  # BBRX_HOME the runs used (sim://demo lives under it)
    run_ids: tuple[str, ...]  # the six runs, in the order above
    backup: Path  # the director backup run 1 made


def _request(home: Path, operation: str, operator: str, reason: str | None, **more) -> Request:
    base = Request(
        operation=operation,
        target=parse_host("sim://demo"),
        identity=Identity(operator, reason),
        audit_db=home / "audit.db",
        home=home,
        timeouts=TIMEOUTS,
    )
    return replace(base, **more)


def build(home: Path) -> ReviewLog:
    """Run the six runs above into ``home/audit.db``."""
    director = SimDirector(sim_root(home, "demo"))
    director.create()
    out = home / "backups"
    out.mkdir()
    ids = []
    first = run_director(_request(home, "backup", "alice", "CHG-1 weekly", artifact_path=out))
    ids.append(first.run_id)
    assert first.artifact is not None
    ids.append(run_director(_request(home, "backup-cleanup", "alice", None)).run_id)
    director.set_fault("blobstore", "backup", "fail 3 disk on fire")
    with pytest.raises(RunFailed) as failed:
        run_director(_request(home, "backup", "bob", "CHG-2", artifact_path=out))
    ids.append(failed.value.run_id)
    director.clear_faults("blobstore", "backup")
    ids.append(run_director(_request(home, "backup-cleanup", "bob", None)).run_id)
    redis = _request(
        home,
        "backup",
        "carol",
        "CHG-3 redis",
        artifact_path=out,
        target=parse_director("sim://demo"),
        deployment="redis",
    )
    ids.append(run_deployment(redis).run_id)
    restore = _request(home, "restore", "alice", "DR drill", artifact_path=first.artifact)
    ids.append(run_director(restore).run_id)
    return ReviewLog(home / "audit.db", home, tuple(ids), first.artifact)


@pytest.fixture(scope="session")
def _review_log_master(tmp_path_factory: pytest.TempPathFactory) -> ReviewLog:
    return build(tmp_path_factory.mktemp("review-log"))


@pytest.fixture
def review_log(_review_log_master: ReviewLog, tmp_path: Path) -> ReviewLog:
    """A private copy of the real log (and the home its runs used)."""
    home = tmp_path / "home"
    shutil.copytree(_review_log_master.home, home, symlinks=True)
    backup = home / _review_log_master.backup.relative_to(_review_log_master.home)
    return ReviewLog(home / "audit.db", home, _review_log_master.run_ids, backup)
