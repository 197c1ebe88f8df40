"""The fault matrix: every phase of backup and restore, broken every way we know, on every
transport. Each case checks the same promises, from the VM's side and the operator's:

- every job whose lock script started had an unlock script start after it (read from the
  scripts' own call log, not from bbrx), and no job is left locked on the VM;
- no backup directory that `restore` would accept exists unless the backup itself was good;
- `bbrx audit verify` passes;
- bbrx exits with the code the README documents;
- the target ends idle (`bbrx status`), after the cleanup bbrx told the operator to run
  where it said one was needed;
- nothing bbrx started is left running on the VM: after a SIGKILL, the cleanup ends the
  scripts the killed run left behind, by the pids the audit log holds;
- every lock script that ran has its intent row in the audit log itself (not only in the
  fallback journal): no lock happens off the record, even when the log stops being
  writable mid-run (another process takes its write lock when the phase starts).

The size of the matrix and the leaked-lock count are printed at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from audit import AuditLog, read_journal
from orchestrator.bbr import artifact
from orchestrator.errors import BbrxError
from simulator.director import SimDirector, sim_root
from tests.conftest import MATRIX_RESULTS, Bbrx, Target, process_running, wait_for

SIGNALS = ("SIGINT", "SIGTERM", "SIGKILL")
# Another process takes the audit database's write lock when the phase starts, and holds
# it until bbrx exits; bbrx's busy timeout is cut short so the case stays quick.
LOG_FAULT = "log unwritable"
LOG_BUSY_TIMEOUT = "0.3"
SCRIPT_FAULTS = ("fails", "hangs", *SIGNALS, LOG_FAULT)
# A byte changed between the VM's digest and the jump box (the link, a pipe, the copy), and
# one changed in the jump box's copy once it is on disk: only a backup has such a copy.
IN_FLIGHT = "corrupted in flight"
ON_DISK = "corrupted on the jump box's disk"
CORRUPTIONS = {IN_FLIGHT: "corrupt", ON_DISK: "corrupt-local"}
TRANSFER_FAULTS = ("transfer fails", *SIGNALS, LOG_FAULT, IN_FLIGHT, ON_DISK)

# (operation, phase, script the fault is put on, timeout flag of that phase)
PHASES = [
    ("backup", "metadata", "metadata", "--metadata-timeout"),
    ("backup", "lock", "pre-backup-lock", "--lock-timeout"),
    ("backup", "backup", "backup", "--backup-timeout"),
    ("backup", "unlock", "post-backup-unlock", "--unlock-timeout"),
    ("backup", "drain", "transfer", None),
    ("restore", "metadata", "metadata", "--metadata-timeout"),
    ("restore", "copy", "transfer", None),
    ("restore", "lock", "pre-restore-lock", "--lock-timeout"),
    ("restore", "restore", "restore", "--restore-timeout"),
    ("restore", "unlock", "post-restore-unlock", "--unlock-timeout"),
]
HANG_TIMEOUT = "2"
ALL_JOBS = ("bbr-credhubdb", "blobstore", "director", "uaa")


@dataclass(frozen=True)
class Case:
    operation: str
    phase: str
    script: str
    timeout_flag: str | None
    fault: str

    @property
    def job(self) -> str:
        # director sits in the middle lock level, so some jobs are locked before it and some
        # after; blobstore holds the largest artifact.
        return "blobstore" if self.script == "transfer" else "director"

    @property
    def cleanup(self) -> str:
        return f"{self.operation}-cleanup"

    @property
    def unlock_script(self) -> str:
        return f"post-{self.operation}-unlock"

    @property
    def lock_script(self) -> str:
        return f"pre-{self.operation}-lock"

    @property
    def expected_exit(self) -> int:
        """The README's exit codes (bbr's bitmask)."""
        if self.fault == "SIGKILL":
            return -signal.SIGKILL
        if self.fault in ("fails", "hangs"):
            if self.phase == "unlock":
                return 8
            if self.phase == "lock" and self.operation == "backup":
                return 4
        return 1

    @property
    def leaves_a_good_backup(self) -> bool:
        # bbr's order: a backup whose scripts succeeded is drained even when an unlock
        # script then failed (exit 8); the data was taken while every job was locked.
        # So is one whose log stopped taking rows once every backup script had started:
        # its locks are all on the record, and the rest of its story is in the journal.
        if self.operation != "backup":
            return False
        if self.fault == LOG_FAULT:
            return self.phase in ("backup", "unlock", "drain")
        return self.phase == "unlock" and self.fault in ("fails", "hangs")

    @property
    def unlocks_after_good_backup(self) -> bool:
        return self.phase in ("unlock", "drain") or self.leaves_a_good_backup

    @property
    def needs_cleanup(self) -> bool:
        """Where bbrx tells the operator to run a cleanup: a kill, or an unlock that failed."""
        return self.fault == "SIGKILL" or (
            self.phase == "unlock" and self.fault in ("fails", "hangs")
        )

    def __str__(self) -> str:
        return f"{self.operation}-{self.phase}-{self.fault.replace(' ', '-')}"


CASES = [
    Case(operation, phase, script, flag, fault)
    for operation, phase, script, flag in PHASES
    for fault in (TRANSFER_FAULTS if script == "transfer" else SCRIPT_FAULTS)
    if not (fault == ON_DISK and operation == "restore")
]


@pytest.fixture(scope="session")
def good_backup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One good backup of a simulated director, restored by every restore case."""
    home = tmp_path_factory.mktemp("matrix-backup-home")
    SimDirector(sim_root(home, "demo")).create()
    out = home / "backups"
    out.mkdir()
    result = Bbrx(home)("director", "--host", "sim://demo", "backup", "--artifact-path", str(out))
    assert result.code == 0, result
    [backup] = list(out.iterdir())
    return backup


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fault(case: Case, target: Target, tmp_path: Path, request: pytest.FixtureRequest):
    result = {"transport": target.transport, "case": str(case), "passed": False}
    MATRIX_RESULTS.append(result)
    out = tmp_path / "backups"
    out.mkdir()
    if case.operation == "backup":
        args = ["backup", "--artifact-path", str(out)]
        backup = None
    else:
        backup = request.getfixturevalue("good_backup")
        args = ["restore", "--artifact-path", str(backup)]

    code, stderr = run_with_fault(case, target, args)

    assert code == case.expected_exit, f"{case}: exit {code}\n{stderr}"
    rows = target.bbrx.audit_rows()
    if case.fault == "hangs":
        assert f"(timed out after {HANG_TIMEOUT} s)" in stderr, stderr
        if case.phase == "metadata":  # discovery has no job rows yet: the run's row says it
            row = next(r for r in rows if r["trigger"] == "discovery_failed")
            assert f"timed out after {HANG_TIMEOUT} s" in row["detail"]["message"]
        else:
            row = next(r for r in rows if r["job"] == case.job and r["outcome"] == "error")
            assert row["script"] == case.script
            assert row["detail"]["killed_by"] == f"timed out after {HANG_TIMEOUT} s"
    if case.fault in ("SIGINT", "SIGTERM"):
        assert f"Error: {case.operation} was interrupted by {case.fault}" in stderr
        assert any(case.fault in (r["detail"] or {}).values() for r in rows if r["job"] is None), (
            "no audit row names the signal"
        )
        assert rows[-1]["to_state"] == "interrupted"
    if case.fault != "SIGKILL":
        # Nothing bbrx started on the VM is left running: hung scripts and copies were ended.
        # (Over SSH the VM's end of a cut copy ends when it next touches the closed channel;
        # the test's stalled copy touches nothing until its delay is up, so it is not counted.)
        wait_for(
            lambda: not running_on_the_vm(target, copies=target.transport == "sim"),
            timeout=15,
            what="the VM to be quiet",
        )
        stop_what_the_run_left(target)
        # A failed metadata script stops before the locks; an unwritable log does not
        # (the locks are refused one by one, and every job is unlocked as after any).
        if case.operation == "backup" and (case.phase != "metadata" or case.fault == LOG_FAULT):
            good = case.unlocks_after_good_backup
            assert set(target.unlock_env().values()) == {"true" if good else "false"}
    if case.fault == LOG_FAULT:
        check_journaled(case, target, stderr)
    if case.fault in CORRUPTIONS:
        check_corruption_named(case, target, stderr, rows, out)
    if case.needs_cleanup:
        told_to = f"bbrx director --host {target.address} {case.cleanup}"
        state = target.bbrx.read_only("status", "--host", target.host).stdout
        if case.fault == "SIGKILL":
            # Scripts the killed run left running are the cleanup's to end (the audit log
            # has their pids); discovery's metadata scripts and copies, which lock nothing,
            # are not: end those as the VM's reboot would.
            stop_what_the_run_left(target, only=("metadata", "transfer"))
            target.stop_orphaned_ssh_master()
            assert f"{target.address}: interrupted: run " in state, state
        else:
            assert told_to in stderr, stderr
            assert f"{target.address}: needs cleanup: run " in state, state
        assert told_to in state, state
        target.vm.clear_faults()
        cleanup = target.director(case.cleanup)
        assert cleanup.code == 0, cleanup
        assert running_on_the_vm(target) == [], "the cleanup left a script of the run running"

    assert locks_off_the_record(target, case) == {}, "a lock script ran with no intent row"
    leaked = leaked_locks(target, case)
    accepted = accepted_backups(out)
    result.update(leaked_locks=len(leaked), accepted_incomplete=0)
    assert leaked == [], f"{case}: locks leaked: {leaked}"
    if case.leaves_a_good_backup:
        assert len(accepted) == 1, accepted
    else:
        result["accepted_incomplete"] = len(accepted)
        assert accepted == [], f"{case}: a failed backup left a restorable directory"
    if backup is not None:
        artifact.validate(backup)  # the backup restored from is untouched
    assert not target.work_dir().exists()
    verify = target.bbrx.read_only("audit", "verify")
    assert verify.code == 0, verify
    state = target.bbrx.read_only("status", "--host", target.host)
    assert state.stdout.startswith(f"{target.address}: idle"), state
    result["passed"] = True


def run_with_fault(case: Case, target: Target, args: list[str]) -> tuple[int, str]:
    """Start the operation with the case's fault in place; signal it where the case says."""
    timeouts: list[str] = []
    if case.fault == "fails":
        target.vm.set_fault(case.job, case.script, "fail 3 injected by the fault matrix")
    elif case.fault == "transfer fails":
        target.vm.set_fault(case.job, case.script, "fail connection reset by peer")
    elif case.fault in CORRUPTIONS:
        target.vm.set_fault(case.job, case.script, CORRUPTIONS[case.fault])
    elif case.fault == "hangs":
        target.vm.set_fault(case.job, case.script, "hang")
        assert case.timeout_flag is not None
        timeouts = [case.timeout_flag, HANG_TIMEOUT]
    elif case.fault == LOG_FAULT:
        # Long enough for the test to take the write lock while the phase is under way.
        target.vm.set_fault(case.job, case.script, "sleep 1")
        target.bbrx.env["BBRX_AUDIT_BUSY_TIMEOUT"] = LOG_BUSY_TIMEOUT
    elif case.script == "transfer":
        target.vm.set_fault(case.job, case.script, "sleep 20")
    elif case.phase == "unlock":
        # Unlocking runs to its end whatever the signal: give it an end.
        target.vm.set_fault(case.job, case.script, "sleep 2")
    else:
        target.vm.set_fault(case.job, case.script, "hang")

    proc = target.start(*timeouts, *args)
    if case.fault == LOG_FAULT:
        wait_for(lambda: phase_started(target, case), timeout=60, what=f"{case.phase} to start")
        with write_lock_held(target.bbrx.audit_db):
            _stdout, stderr = proc.communicate(timeout=120)
        return proc.returncode, stderr
    if case.fault in SIGNALS:
        wait_for(
            lambda: started(target, case.job, case.script),
            timeout=60,
            what=f"{case.job} {case.script} to start",
        )
        if case.fault == "SIGKILL" and case.script not in ("metadata", "transfer"):
            # A kill lands after the pid row in the real world too, but for a few ms
            # around a script's start; the test waits it out to be deterministic.
            wait_for(lambda: target.pid_recorded(case.job, case.script), what="the pid row")
            time.sleep(0.3)  # and lets the script print its first line (see test_recovery)
        if case.fault == "SIGINT":
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
        else:
            proc.send_signal(signal.Signals[case.fault])  # kill(1): the process alone
    _stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


def phase_started(target: Target, case: Case) -> bool:
    if case.phase == "backup":
        # The backup scripts start in parallel: wait for all of them, so that the case
        # is the same every time (the log fails after every backup script started).
        return all(started(target, job, "backup") for job in ("bbr-credhubdb", "blobstore"))
    return started(target, case.job, case.script)


@contextlib.contextmanager
def write_lock_held(db: Path) -> Iterator[None]:
    """Another process holds the audit database's write lock (readers still read: WAL)."""
    connection = sqlite3.connect(db, timeout=10, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        yield
        connection.execute("ROLLBACK")
    finally:
        connection.close()


def check_journaled(case: Case, target: Target, stderr: str) -> None:
    """The run says the log failed and where its journal is, and the journal has its end."""
    db = target.bbrx.audit_db
    journal = read_journal(db)
    assert f"Error: could not write the audit log: cannot write to the audit log {db}" in stderr
    assert f"the journal {journal.path}" in stderr, stderr
    [run_id] = journal.run_ids()
    ends = [r for r in journal.of(run_id) if r["job"] is None and r["to_state"] == "failed"]
    assert len(ends) == 1 and ends[0]["detail"]["jobs_left_locked"] == [], journal.rows
    assert journal.bad_lines == []
    verify = target.bbrx.read_only("audit", "verify")
    assert f"{len(journal.rows)} events of 1 run(s) ({run_id})" in verify.stdout, verify


def check_corruption_named(
    case: Case, target: Target, stderr: str, rows: list[dict], out: Path
) -> None:
    """The error names the tar, the job, the instance and both digests; the audit row has
    them; a backup publishes nothing and leaves no `.incomplete` directory behind."""
    if case.operation == "restore":
        assert (
            f"the copy of bosh-0-{case.job}.tar to {target.address} is corrupted: the VM's tar "
            "read a stream with SHA-256 " in stderr
        ), stderr
        return
    found = re.search(
        rf"Error: the copy of bosh-0-{case.job}\.tar \(job {case.job} on bosh/0, "
        rf"{re.escape(target.address)}\) is corrupted: the VM sent a tar stream with tar digest "
        r"([0-9a-f]{64}), the jump box's copy on disk has tar digest ([0-9a-f]{64})\n"
        r"Nothing was published: the partial backup is removed",
        stderr,
    )
    assert found, stderr
    vm, local = found.groups()
    assert vm != local
    [row] = [r for r in rows if r["job"] == case.job and r["trigger"] == "drain_error"]
    assert (row["detail"]["vm_sha256"], row["detail"]["local_sha256"]) == (vm, local)
    assert row["detail"]["error"] == "CopyCorruptError"
    assert list(out.iterdir()) == []  # nothing published, nothing incomplete left


def locks_off_the_record(target: Target, case: Case) -> dict[str, int]:
    """Lock-script starts in the VM's call log beyond the intent rows the chain holds."""
    ran = Counter(c.job for c in target.vm.calls() if c.script == case.lock_script
                  and c.event == "start")  # fmt: skip
    recorded: Counter[str] = Counter()
    with AuditLog(target.bbrx.audit_db, readonly=True) as audit:
        for run in audit.runs():
            for row in audit.timeline(run.run_id):
                if (row["trigger"], row["script"]) == ("lock", case.lock_script):
                    recorded[row["job"]] += 1
    return {job: n - recorded[job] for job, n in ran.items() if n > recorded[job]}


def started(target: Target, job: str, script: str) -> bool:
    return any((c.job, c.script, c.event) == (job, script, "start") for c in target.vm.calls())


def running_on_the_vm(target: Target, *, copies: bool = True) -> list[int]:
    """Pids of scripts (and copies) the call log shows started and not yet gone."""
    return [
        c.pid
        for c in target.vm.calls()
        if c.event == "start" and (copies or c.script != "transfer") and process_running(c.pid)
    ]


def stop_what_the_run_left(target: Target, only: tuple[str, ...] | None = None) -> None:
    """End what a run started on the VM and could not stop, as the VM's reboot would.

    After a SIGKILL, a hung lock script could otherwise lock again after the cleanup's
    unlock (bbr has the same race). Only processes started for this test, found by the
    pids they logged.
    """
    calls = target.vm.calls()
    exited = {c.pid for c in calls if c.event == "exit"}
    for call in calls:
        if call.event != "start" or call.pid in exited or not _started_at(call.pid, call.time):
            continue
        if only is not None and call.script not in only:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            group = os.getpgid(call.pid)
            if group != os.getpgrp():
                os.killpg(group, signal.SIGKILL)


def _started_at(pid: int, when: float) -> bool:
    """Whether `pid` is still the process that logged a start at `when` (not a reused pid)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (FileNotFoundError, IndexError, StopIteration):
        return False
    started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return abs(started - when) < 5


def leaked_locks(target: Target, case: Case) -> list[str]:
    """Jobs whose lock script started with no unlock script after it, or locked on the VM."""
    pending: set[str] = set()
    for call in target.vm.calls():
        if call.event != "start":
            continue
        if call.script == case.lock_script:
            pending.add(call.job)
        elif call.script == case.unlock_script:
            pending.discard(call.job)
    return sorted(pending | set(target.vm.locked_jobs()))


def accepted_backups(out: Path) -> list[Path]:
    """The directories under `out` that restore's own validation accepts."""
    accepted = []
    for entry in sorted(out.iterdir()):
        try:
            artifact.validate(entry)
        except BbrxError:
            continue
        accepted.append(entry)
    return accepted


def test_two_processes_started_at_once_exactly_one_runs(target: Target, tmp_path: Path):
    """Both start before either has an audit log: exactly one takes the lease and runs."""
    target.vm.set_fault("director", "pre-backup-lock", "sleep 2")
    outs = [tmp_path / "first", tmp_path / "second"]
    for out in outs:
        out.mkdir()
    procs = [target.start("backup", "--artifact-path", str(out)) for out in outs]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        results.append((proc.returncode, stdout, stderr))

    codes = sorted(code for code, _out, _err in results)
    MATRIX_RESULTS.append(
        {"transport": target.transport, "case": "two-at-once", "passed": codes == [0, 1]}
    )
    assert codes == [0, 1], results
    loser = next(err for code, _out, err in results if code == 1)
    assert f"Error: {target.address} is busy: run " in loser
    assert sorted(target.scripts_run("pre-backup-lock")) == sorted(ALL_JOBS)  # locked once
    assert sum(len(accepted_backups(out)) for out in outs) == 1
    assert leaked_locks(target, CASES[0]) == []
    assert target.bbrx.read_only("audit", "verify").code == 0
