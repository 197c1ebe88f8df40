"""Shared fixtures: an isolated BBRX_HOME, the `bbrx` command run as a real process, and a
director target behind each transport (the behaviour suite is parametrised over them)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from audit import AuditError, AuditLog
from orchestrator.cli.app import app
from simulator.director import SimDirector, sim_root
from tests import sshd
from tests.sshd import Keys

BBRX = [sys.executable, "-m", "orchestrator"]

# One entry per fault-matrix case (tests/test_fault_matrix.py), summarised at the end.
MATRIX_RESULTS: list[dict] = []


@dataclass
class Result:
    args: list[str]
    code: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"bbrx {' '.join(self.args)} -> {self.code}\n{self.stdout}\n{self.stderr}"


@dataclass
class Bbrx:
    """Runs `bbrx` as a separate process, as an operator would."""

    home: Path
    env: dict[str, str] = field(default_factory=dict)

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BBRX_")}
        env.update({"BBRX_HOME": str(self.home), "BBRX_OPERATOR": "trainee@test"}, **self.env)
        return env

    def __call__(self, *args: str, cwd: Path | None = None, timeout: float = 120) -> Result:
        proc = subprocess.run(
            [*BBRX, *args],
            capture_output=True,
            text=True,
            env=self.environ(),
            cwd=cwd or self.home,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        return Result(list(args), proc.returncode, proc.stdout, proc.stderr)

    def read_only(self, *args: str) -> Result:
        """A read-only command (status, audit ...) run in this process, to spare a start-up.

        The same typer app and environment as a real `bbrx`; the fault matrix uses it for
        its many status and verify checks, which other tests run as real processes.
        """
        result = CliRunner().invoke(app, list(args), env=self.environ())
        stderr = result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            stderr += f"Error: {result.exception}"
        return Result(list(args), result.exit_code, result.stdout, stderr)

    def start(self, *args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*BBRX, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.environ(),
            cwd=cwd or self.home,
            stdin=subprocess.DEVNULL,
            # A process group of its own, as a shell gives a job: a test can then signal
            # the whole group, as a terminal's Ctrl-C does.
            start_new_session=True,
        )

    @property
    def audit_db(self) -> Path:
        return self.home / "audit.db"

    def audit_runs(self) -> list:
        """The operators' runs (the reviewers' reads, mode review, left out)."""
        with AuditLog(self.audit_db, readonly=True) as audit:
            return [run for run in audit.runs() if run.mode != "review"]

    def audit_rows(self, run_id: str | None = None) -> list[dict]:
        """A run's rows; by default, the latest operator's run's."""
        with AuditLog(self.audit_db, readonly=True) as audit:
            if run_id is None:
                run_id = [run for run in audit.runs() if run.mode != "review"][-1].run_id
            return audit.timeline(run_id)


@pytest.fixture
def bbrx(tmp_path: Path) -> Bbrx:
    home = tmp_path / "bbrx-home"
    home.mkdir()
    return Bbrx(home)


@dataclass
class Target:
    """A director to run against, and the VM tree behind it for inspection."""

    transport: str
    host: str
    vm: SimDirector
    bbrx: Bbrx
    extra_args: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        """How bbrx names the target in messages and the audit log."""
        return self.host

    @property
    def name(self) -> str:
        """What backups are named after: the host without scheme or port."""
        return self.host.removeprefix("sim://").rsplit(":", 1)[0]

    def stop_orphaned_ssh_master(self) -> None:
        """A SIGKILLed bbrx's ssh master outlives it (until idle): stop it by its PID, and
        remove the private directory its socket was in (the killed bbrx could not).

        Found by this test's own known_hosts path, which only our processes carry.
        """
        if self.transport != "ssh":
            return
        known_hosts = self.extra_args[self.extra_args.index("--known-hosts") + 1]
        masters = subprocess.run(
            ["pgrep", "-f", f"ControlMaster=yes.*{known_hosts}|{known_hosts}.*ControlMaster=yes"],
            capture_output=True,
            text=True,
        ).stdout.split()
        for pid in masters:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                os.kill(int(pid), signal.SIGTERM)
                for arg in args:
                    if arg.startswith("ControlPath=/tmp/bbrx-ssh-"):
                        shutil.rmtree(Path(arg.removeprefix("ControlPath=")).parent)

    def copy_failure(self, job: str, way: str, message: str) -> str:
        """How a dropped copy is reported: the simulator names it, ssh relays the VM's stderr."""
        if self.transport == "sim":
            return (
                f"connection to {self.address} lost while copying the artifact of job {job}: "
                f"{message}"
            )
        return f"copying the artifact of job {job} {way} {self.address} failed (exit 2): {message}"

    def director(self, *args: str, **kwargs) -> Result:
        return self.bbrx("director", "--host", self.host, *self.extra_args, *args, **kwargs)

    def start(self, *args: str, **kwargs) -> subprocess.Popen[str]:
        return self.bbrx.start("director", "--host", self.host, *self.extra_args, *args, **kwargs)

    # --- what the VM's scripts say happened (their own call log, not bbrx's say-so) ---

    def calls(self) -> list[tuple[str, str, str]]:
        return [(c.job, c.script, c.event) for c in self.vm.calls()]

    def scripts_run(self, script: str) -> list[str]:
        return [c.job for c in self.vm.calls() if c.script == script and c.event == "start"]

    def unlock_env(self) -> dict[str, str]:
        return {
            c.job: c.extra.get("BBR_AFTER_BACKUP_SCRIPTS_SUCCESSFUL", "")
            for c in self.vm.calls()
            if c.script == "post-backup-unlock" and c.event == "start"
        }

    def pid_recorded(self, job: str, script: str) -> bool:
        """Whether the latest run's audit log has the pid row of this script yet."""
        try:
            rows = self.bbrx.audit_rows()
        except (AuditError, IndexError):  # not there yet, or still being created
            return False
        return any(
            (r["trigger"], r["job"], r["script"]) == ("script_started", job, script) for r in rows
        )

    def work_dir(self) -> Path:
        return self.vm.root / "var/vcap/store/bbr-backup"

    def set_metadata(self, job: str, text: str) -> None:
        (self.vm.root / "var/vcap/jobs" / job / "config/metadata.yml").write_text(text)


TRANSPORTS = ["sim", "ssh"]


@pytest.fixture(scope="session")
def ssh_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    keys = Keys.make(tmp_path_factory.mktemp("ssh-keys"))
    os.chmod(keys.client_key, 0o600)
    return keys


@pytest.fixture(scope="session")
def vcap_mount_point() -> None:
    """What every test sshd needs: the machine can start one (else the test is skipped,
    saying why), and /var/vcap exists as its mount point (created empty if missing; see
    below)."""
    reason = sshd.available()
    if reason:
        pytest.skip(reason)
    sshd.VCAP.mkdir(parents=True, exist_ok=True)


# /var/vcap, if this test session created it, is removed when the session ends, by its main
# process, once every worker is done, and only if no other test session (another clone's,
# say) is running: removing it detaches the VM trees every running sshd has mounted there.
# Each session holds a shared lock on this file while it runs; the last one out gets it
# exclusively.
_SESSIONS_LOCK = Path("/run/lock/bbrx-tests-var-vcap.lock")
_VCAP_EXISTED = pytest.StashKey[bool]()
_SESSION_LOCK = pytest.StashKey[int]()


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    if _is_worker(config) or sshd.available() is not None:
        return  # a worker, or a session that starts no sshd (it is not root, say)
    try:
        lock = os.open(_SESSIONS_LOCK, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        fcntl.flock(lock, fcntl.LOCK_SH)
    except OSError:
        return  # no lock, so /var/vcap is never removed by this session
    config.stash[_SESSION_LOCK] = lock
    config.stash[_VCAP_EXISTED] = sshd.VCAP.exists()


def pytest_unconfigure(config: pytest.Config) -> None:
    lock = config.stash.get(_SESSION_LOCK, None)
    if lock is None:
        return
    try:
        if not config.stash.get(_VCAP_EXISTED, True):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while others run
            sshd.VCAP.rmdir()
    except OSError:
        pass  # another session still runs, or /var/vcap is gone or not empty: leave it
    finally:
        os.close(lock)


@pytest.fixture
def ssh_server(request, ssh_keys, tmp_path) -> Iterator[sshd.TestSshd]:
    request.getfixturevalue("vcap_mount_point")
    vm = SimDirector(tmp_path / "vm")
    vm.create()
    # Parametrized indirectly with the commands the VM lacks, e.g. ("python3",).
    without = getattr(request, "param", ())
    server = sshd.TestSshd(ssh_keys, vm.root, tmp_path / "sshd", without=without).start()
    yield server
    server.stop()


@pytest.fixture(params=TRANSPORTS)
def target(request: pytest.FixtureRequest, bbrx: Bbrx) -> Iterator[Target]:
    """The same director, reached through each transport bbrx has."""
    if request.param == "sim":
        vm = SimDirector(sim_root(bbrx.home, "demo"))
        vm.create()
        yield Target("sim", "sim://demo", vm, bbrx)
    else:
        server = request.getfixturevalue("ssh_server")
        yield Target(
            "ssh",
            f"127.0.0.1:{server.port}",
            SimDirector(server.vm_root),
            bbrx,
            extra_args=[
                "--username", "root",
                "--private-key-path", str(server.keys.client_key),
                "--known-hosts", str(server.known_hosts),
            ],
        )  # fmt: skip


@pytest.fixture
def backup(target, tmp_path) -> Path:
    """A good backup of the target, and the target's call log cleared after it."""
    out = tmp_path / "generated-backup"
    out.mkdir()
    result = target.director("backup", "--artifact-path", str(out))
    assert result.code == 0, result
    [artifact] = list(out.iterdir())
    target.vm.clear_calls()
    return artifact


def process_running(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def interrupt(proc: subprocess.Popen[str], sig: signal.Signals) -> tuple[int, str, str]:
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return proc.returncode, stdout, stderr


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    """A test's captured output may quote a name that is not UTF-8 (bbrx logs it as Python
    decoded it, with surrogates); pytest-xdist must send the report as UTF-8, so such
    characters are spelled as backslash escapes in the report's sections."""
    outcome = yield
    report = outcome.get_result()
    report.sections = [(title, _utf8(text)) for title, text in report.sections]
    if report.longrepr is not None:
        text = str(report.longrepr)
        if _utf8(text) != text:  # a failure that quotes such a name: sent as its text
            report.longrepr = _utf8(text)


def _utf8(text: str) -> str:
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no decoding made: escaped as it is
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A worker hands its fault-matrix results to the main process, which prints them."""
    if _is_worker(session.config):
        session.config.workeroutput["matrix_results"] = MATRIX_RESULTS  # type: ignore[attr-defined]


@pytest.hookimpl(optionalhook=True)  # defined only where pytest-xdist is loaded
def pytest_testnodedown(node, error) -> None:
    """The main process's side of the hand-over (pytest-xdist's hook)."""
    # A worker that crashed has no output (pytest-xdist replaces it and reports the test).
    MATRIX_RESULTS.extend(getattr(node, "workeroutput", {}).get("matrix_results", []))


def pytest_terminal_summary(terminalreporter) -> None:
    if not MATRIX_RESULTS:
        return
    write = terminalreporter.write_line
    cases = [r for r in MATRIX_RESULTS if r["case"] != "two-at-once"]
    both = [r for r in MATRIX_RESULTS if r["case"] == "two-at-once"]
    write("")
    write(f"fault matrix: {len(cases)} cases")
    for transport in sorted({r["transport"] for r in cases}):
        results = [r for r in cases if r["transport"] == transport]
        passed = sum(r["passed"] for r in results)
        leaked = sum(r.get("leaked_locks", 0) for r in results)
        accepted = sum(r.get("accepted_incomplete", 0) for r in results)
        write(
            f"  {transport}: {len(results)} cases, {passed} passed, {len(results) - passed} "
            f"failed; locks leaked = {leaked}; incomplete backups restore accepted = {accepted}"
        )
    if both:
        ok = sum(r["passed"] for r in both)
        write(f"two processes started at once: {ok} of {len(both)} runs had exactly one run")
    for result in MATRIX_RESULTS:
        if not result["passed"]:
            write(f"  FAILED {result['transport']} {result['case']}")
