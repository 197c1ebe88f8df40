"""SimInstance: the `orchestrator.transport.instance.Instance` contract over a simulated VM.

The VM is the director (`SimDirector`: group `bosh`, index `0`, address `sim://demo`) or
one VM of a deployment (`fleet.DeploymentVm`: its group, index and instance id, address
`sim://demo/redis/redis/1`); everything below is relative to the VM's root either way.

Scripts run as real subprocesses in their own sessions, so a Ctrl-C at the terminal
reaches bbrx alone and bbrx decides what to stop.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, BinaryIO, Protocol, cast

from orchestrator.bbr.artifact import (
    INCOMPLETE_SUFFIX,
    ThreadedDigest,
    custom_tar_name,
    tar_name,
)
from orchestrator.bbr.tardigest import TarDigest
from orchestrator.errors import DiscoveryError, InterruptedRunError, TransportError
from orchestrator.transport.instance import (
    IGNORED_JOBS,
    INTERRUPTED_KILL,
    OWNER_MAX,
    SCRIPT_NAMES,
    WORK_DIR_OWNER,
    Job,
    ScriptCall,
    ScriptResult,
    SentDigest,
    VmStream,
)
from orchestrator.transport.scriptio import MARKER_VAR, ScriptOutput, warn_leftovers
from simulator.calllog import append_call
from simulator.faults import (
    CORRUPT,
    CORRUPT_LOCAL,
    DISK_FULL,
    RUNNER_PID_VAR,
    TRANSFER,
    fires_now,
    transfer_delay,
    transfer_failure_message,
)
from simulator.vm import FAULTS_DIR, JOBS_DIR, RUN_DIR, STORE_DIR, WORK_DIR, SimVm

log = logging.getLogger(__name__)

KILL_GRACE_SECONDS = 3.0
BORA_SUFFIX = "-backup-one-restore-all"
_CHUNK = 1 << 20


class SimInstance:
    """A simulated VM as bbrx sees it: the director, or one VM of a deployment."""

    mode = "sim"

    def __init__(self, vm: SimVm) -> None:
        self.vm = vm
        self.root = vm.root
        # The identity bbr gives the instance: artifact names use group and index.
        self.group: str = vm.group
        self.index: str = vm.index
        self.instance_id: str | None = vm.instance_id
        self.info: dict[str, str] = {}
        self.address = vm.address
        # Guards starting, registering and reaping scripts against terminate_scripts (which
        # runs in the run's signal watcher thread, never in a signal handler).
        self._lock = threading.Lock()
        self._running: dict[int, tuple[subprocess.Popen[bytes], str]] = {}
        self._terminated: set[int] = set()
        self._streams: dict[int, subprocess.Popen[bytes]] = {}
        self._aborted: set[int] = set()

    def __repr__(self) -> str:
        return f"SimInstance({self.address!r})"

    # -- scripts -------------------------------------------------------------------

    def discover(self) -> list[Job]:
        if not self.root.is_dir():
            raise DiscoveryError(
                f"cannot list the job scripts of {self.address}: {self.root} does not exist",
                host=self.address,
                hint=self.vm.missing_hint(),
            )
        jobs_dir = self.root / JOBS_DIR
        try:
            candidates = sorted(jobs_dir.iterdir()) if jobs_dir.is_dir() else []
            jobs = []
            for job_dir in candidates:
                if job_dir.name in IGNORED_JOBS or not job_dir.is_dir():
                    continue
                bbr_dir = job_dir / "bin/bbr"
                if not bbr_dir.is_dir():
                    continue
                scripts = frozenset(
                    p.name
                    for p in bbr_dir.iterdir()
                    if p.name in SCRIPT_NAMES and p.is_file() and os.access(p, os.X_OK)
                )
                if scripts:
                    jobs.append(Job(job_dir.name, scripts))
        except OSError as error:
            raise DiscoveryError(
                f"cannot list the job scripts of {self.address} under {jobs_dir}: {error}",
                host=self.address,
            ) from error
        return jobs

    def _script_path(self, job: str, script: str) -> Path:
        return self.root / JOBS_DIR / job / "bin/bbr" / script

    def run_script(self, call: ScriptCall) -> ScriptResult:
        path = self._script_path(call.job, call.script)
        if not path.is_file():
            raise TransportError(
                f"cannot run {call.script} of job {call.job} on {self.address}: {path} not found",
                host=self.address,
            )
        marker = call.marker
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": os.environ.get("HOME", "/"),
            **call.env,
            MARKER_VAR: marker,
            # Whom a `kill-bbrx` fault kills: this process, the script's parent.
            RUNNER_PID_VAR: str(os.getpid()),
        }
        started = time.monotonic()
        # Started and registered under the lock terminate_scripts takes: it either sees this
        # script, or this script sees (through may_start) that the run is being stopped.
        with self._lock:
            if call.may_start is not None and not call.may_start():
                return ScriptResult.not_started(call)
            proc = self._start(call, path, env)
            self._running[proc.pid] = (proc, marker)
        if call.on_start is not None:
            call.on_start(proc.pid)
        log.debug("started %s/%s on %s (pid %d)", call.job, call.script, self.address, proc.pid)
        output = ScriptOutput(cast(IO[bytes], proc.stdout), cast(IO[bytes], proc.stderr))
        deadline = None if call.timeout is None else started + call.timeout
        leftovers = ended = timed_out = False
        try:
            # The script's own exit ends the wait, not its pipes' EOF (a daemon it left may
            # hold them). Not reaped yet: its pid stays its group's id while we may signal it.
            timed_out = not output.pump_until(lambda: _exited(proc), deadline)
            if timed_out:
                self._end([(proc, marker)])
            if not output.drain():
                leftovers = True
                ended = call.end_leftovers or timed_out or proc.pid in self._terminated
                if ended:
                    self._end([(proc, marker)])
                    output.drain()
        finally:
            output.close()
            if not _exited(proc):  # an exception on the way: leave nothing running
                self._signal_script(proc, signal.SIGKILL)
            with self._lock:
                self._running.pop(proc.pid, None)
                returncode = proc.wait()  # reaped under the lock _signal_script checks
                interrupted = proc.pid in self._terminated
                self._terminated.discard(proc.pid)
            self._kill_if_asked(proc.pid, returncode == 0 and not interrupted and not timed_out)
        duration = time.monotonic() - started
        exit_code: int | None = returncode
        killed_by: str | None = None
        if timed_out:
            exit_code = None
            killed_by = f"timed out after {call.timeout:g} s"
        elif returncode < 0:
            exit_code = None
            killed_by = _signal_name(-returncode)
            if interrupted:
                killed_by += f" {INTERRUPTED_KILL}"
        elif interrupted and returncode != 0:
            # A script that traps SIGTERM and exits by itself was still stopped by us.
            exit_code = None
            killed_by = f"SIGTERM {INTERRUPTED_KILL}; it exited {returncode}"
        if leftovers:
            warn_leftovers(call, self.address, exit_code, killed_by, ended=ended)
        log.debug(
            "%s/%s on %s ended: exit %s%s in %.3fs",
            call.job,
            call.script,
            self.address,
            exit_code,
            f", killed by {killed_by}" if killed_by else "",
            duration,
        )
        return ScriptResult(
            job=call.job,
            script=call.script,
            exit_code=exit_code,
            stdout=output.stdout.decode("utf-8", errors="replace"),
            stderr=output.stderr.decode("utf-8", errors="replace"),
            duration=duration,
            killed_by=killed_by,
            stdout_truncated=output.stdout_truncated,
            stderr_dropped=output.stderr_bytes_dropped,
        )

    def _kill_if_asked(self, pid: int, completed: bool) -> None:
        """The `kill-bbrx` fault: a script that completed asked (by a file named after its
        pid) that the process running it die, as a jump box that crashes at that moment."""
        request = self.root / RUN_DIR / "kill-bbrx" / str(pid)
        try:
            request.unlink()
        except FileNotFoundError:
            return
        if completed:
            log.warning(
                "kill-bbrx fault on %s: this bbrx (pid %d) dies now", self.address, os.getpid()
            )
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    def _start(self, call: ScriptCall, path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        def popen(argv: list[str]) -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                argv,
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )

        try:
            try:
                return popen([str(path)])
            except OSError as error:
                if error.errno != errno.ENOEXEC:
                    raise
                # No #! line: sudo on a VM hands such a script to /bin/sh (execvp does), and
                # bbr's jobs rely on it.
                return popen(["/bin/sh", str(path)])
        except OSError as error:
            raise TransportError(
                f"cannot start {call.script} of job {call.job} on {self.address}: {error}",
                host=self.address,
            ) from error

    def terminate_scripts(self) -> None:
        # Copies are cut at once: their data is discarded either way.
        for proc in list(self._streams.copy().values()):
            self._aborted.add(proc.pid)
            if proc.returncode is None:  # unreaped: its pid is still its group's id
                self._signal_group(proc, signal.SIGKILL)
        with self._lock:
            running = list(self._running.values())
            self._terminated.update(proc.pid for proc, _ in running)
        self._end(running)

    def _end(self, scripts: list[tuple[subprocess.Popen[bytes], str]]) -> None:
        """End scripts and everything they started: TERM to their process groups and to
        every process carrying their marker, then KILL to what is left after 3 s.

        A process that scrubbed its environment and left the group escapes (see MARKER_VAR).
        """
        if not scripts:
            return
        markers = {marker for _, marker in scripts}
        groups = {proc.pid for proc, _ in scripts}

        def signal_all(sig: signal.Signals) -> None:
            for proc, _ in scripts:
                self._signal_script(proc, sig)
            for pid in _marked(markers):
                # Not twice to a group member: a second TERM would cut bash's EXIT trap.
                with suppress(ProcessLookupError, PermissionError):
                    if os.getpgid(pid) not in groups:
                        os.kill(pid, sig)

        def alive() -> bool:
            return any(not _exited(proc) for proc, _ in scripts) or bool(_marked(markers))

        signal_all(signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE_SECONDS
        while time.monotonic() < deadline and alive():
            time.sleep(0.05)
        if alive():
            log.warning(
                "script pid(s) %s ignored SIGTERM; sending SIGKILL",
                ", ".join(str(proc.pid) for proc, _ in scripts),
            )
            signal_all(signal.SIGKILL)

    def _signal_script(self, proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        # Only while the leader is unreaped (run_script reaps under this lock): then its pid
        # is still its group's id and cannot have been handed to an unrelated process.
        with self._lock:
            if proc.returncode is None:
                self._signal_group(proc, sig)

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def end_script(self, job: str, script: str, pid: int, marker: str | None = None) -> bool:
        ended = self._end_group_if_script(job, script, pid)
        # What carries the script run's marker is that run's, whatever its pid: the daemons
        # it started in sessions of their own among them.
        leftovers = _marked({marker}) if marker else set()
        if not marker or not leftovers:
            return ended
        for leftover in leftovers:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(leftover, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE_SECONDS
        while time.monotonic() < deadline and _marked({marker}):
            time.sleep(0.05)
        for leftover in _marked({marker}):
            with suppress(ProcessLookupError, PermissionError):
                os.kill(leftover, signal.SIGKILL)
        return True

    def _end_group_if_script(self, job: str, script: str, pid: int) -> bool:
        path = str(self._script_path(job, script))
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if os.getpgid(pid) != pid or path.encode() not in cmdline:
                return False
        except (FileNotFoundError, ProcessLookupError):
            return False
        with suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE_SECONDS
        while time.monotonic() < deadline and _group_alive(pid):
            time.sleep(0.05)
        with suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        return True

    # -- artifact directories ------------------------------------------------------

    def _artifact_path(self, job: str) -> Path:
        return self.root / WORK_DIR / job

    def artifact_directory(self, job: str) -> str:
        return f"{self._artifact_path(job)}/"

    def work_dir_exists(self) -> bool:
        return (self.root / WORK_DIR).exists()

    def claim_work_dir(self, owner: str) -> bool:
        work = self.root / WORK_DIR
        try:
            work.mkdir()  # atomic: exactly one of two racing runs creates it
        except FileExistsError:
            return False
        except OSError as error:
            raise TransportError(
                f"cannot create {work} on {self.address}: {error}", host=self.address
            ) from error
        try:
            (work / WORK_DIR_OWNER).write_text(owner + "\n", encoding="utf-8")
        except OSError as error:
            log.warning("could not write the owner of %s: %s", work, error)
        return True

    def work_dir_owner(self) -> str | None:
        try:
            with open(self.root / WORK_DIR / WORK_DIR_OWNER, "rb") as handle:
                return handle.read(OWNER_MAX).decode("utf-8", "replace").strip()
        except OSError:
            return None

    def make_artifact_directory(self, job: str) -> None:
        try:
            self._artifact_path(job).mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            raise TransportError(
                f"cannot create the artifact directory of job {job} on {self.address}: {error}",
                host=self.address,
            ) from error

    def remove_work_dir(self) -> None:
        try:
            shutil.rmtree(self.root / WORK_DIR)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise TransportError(
                f"cannot remove {self.root / WORK_DIR} on {self.address}: {error}",
                host=self.address,
            ) from error

    def _existing_artifact_path(self, job: str) -> Path:
        path = self._artifact_path(job)
        if not path.is_dir():
            raise TransportError(f"no artifact directory for job {job} on {self.address}")
        return path

    @contextmanager
    def stream_out(self, job: str) -> Iterator[VmStream]:
        path = self._existing_artifact_path(job)
        fault = self._transfer_fault(job)
        # stderr goes to a file: a pipe nobody reads while we stream could fill and block tar.
        with tempfile.TemporaryFile() as errors:
            proc = self._start_transfer(
                job, "out", ["tar", "-C", str(path), "-cf", "-", "."], fault, errors
            )
            stdout = proc.stdout
            assert stdout is not None
            # The VM's end: its SHA-256 of what its tar wrote, as it leaves the VM. Every
            # fault below acts after it, as the link, a pipe or the jump box would.
            sent = _VmSide(stdout)
            source: _Readable = sent
            if fault == CORRUPT:
                source = _CorruptingReader(sent)
            elif fault == CORRUPT_LOCAL:
                source = _LocalCorrupter(sent, self._local_copy_name(job))
            elif fault == DISK_FULL:
                source = _DiskFiller(sent, self._local_copy_name(job))
            elif fault is not None and transfer_delay(fault) is None:
                source = _DroppingReader(sent, self._dropped(job, fault))
            stream = VmStream(cast(BinaryIO, source))
            try:
                yield stream
            except BaseException as error:
                sent.close()
                self._signal_group(proc, signal.SIGKILL)
                stdout.close()
                proc.wait()
                self._end_transfer(proc, job, error)
                raise
            sent.drain()  # what the reader left unread was sent all the same
            if isinstance(source, _LocalCorrupter):
                source.finish()
            stdout.close()
            returncode = proc.wait()
            self._end_transfer(proc, job)
            if returncode != 0:
                sent.close()
                errors.seek(0)
                message = errors.read().decode("utf-8", errors="replace").strip()
                raise TransportError(
                    f"streaming the artifact of job {job} out of {self.address} failed: "
                    f"tar exited {returncode}: {message or 'no message'}",
                    host=self.address,
                )
            stream.digest = SentDigest("tar", sent.hexdigest())

    def _local_copy_name(self, job: str) -> str:
        """The name bbrx gives this artifact's tar on the jump box."""
        if job.endswith(BORA_SUFFIX):
            return custom_tar_name(job)
        return tar_name(self.group, self.index, job)

    def stream_in(self, job: str, chunks: Iterator[bytes]) -> str:
        self.make_artifact_directory(job)
        path = self._artifact_path(job)
        fault = self._transfer_fault(job)
        # The VM's digest of what its tar reads: taken after the `corrupt` fault, which
        # stands for the link between the jump box and the VM. Owners and set-id bits are
        # not kept (see orchestrator.transport.ssh._unpack_command for what each flag does).
        received = hashlib.sha256()
        tar = ["tar", "-C", str(path), "--no-same-owner", "--no-same-permissions", "-xf", "-"]
        with tempfile.TemporaryFile() as errors:
            proc = self._start_transfer(job, "in", tar, fault, errors)
            stdin = proc.stdin
            assert stdin is not None
            broken = False
            try:
                corrupt = fault == CORRUPT
                # (corrupt-local and disk-full are a backup's: a restore only reads locally)
                drops = (
                    fault not in (None, CORRUPT, CORRUPT_LOCAL, DISK_FULL)
                    and transfer_delay(fault) is None
                )
                for number, chunk in enumerate(_corrupted(chunks) if corrupt else chunks):
                    if drops and number == 1:
                        raise self._dropped(job, fault or "")
                    received.update(chunk)
                    try:
                        stdin.write(chunk)
                    except BrokenPipeError:
                        # tar gave up; its exit code and stderr below say why.
                        broken = True
                        break
            except BaseException as error:
                self._signal_group(proc, signal.SIGKILL)
                _close_quietly(stdin)
                proc.wait()
                self._end_transfer(proc, job, error)
                raise
            _close_quietly(stdin)
            returncode = proc.wait()
            self._end_transfer(proc, job)
            if returncode != 0 or broken:
                errors.seek(0)
                message = errors.read().decode("utf-8", errors="replace").strip()
                raise TransportError(
                    f"unpacking the artifact of job {job} into {self.address} failed: "
                    f"tar exited {returncode}: {message or 'no message'}",
                    host=self.address,
                )
            return received.hexdigest()

    def _start_transfer(
        self, job: str, direction: str, tar: list[str], fault: str | None, errors: IO[bytes]
    ) -> subprocess.Popen[bytes]:
        """tar in a session of its own (an interruption ends it), logged like a script."""
        delay = transfer_delay(fault)
        command = tar if delay is None else ["sh", "-c", 'sleep "$0" && exec "$@"', str(delay)]
        if delay is not None:
            command += tar
        proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE if direction == "in" else subprocess.DEVNULL,
            stdout=subprocess.PIPE if direction == "out" else subprocess.DEVNULL,
            stderr=errors,
            start_new_session=True,
        )
        self._streams[proc.pid] = proc
        try:
            append_call(self.root, job, TRANSFER, proc.pid, f"direction={direction}")
        except OSError:
            log.warning("could not log the copy of %s in the call log", job, exc_info=True)
        return proc

    def _end_transfer(
        self, proc: subprocess.Popen[bytes], job: str, error: BaseException | None = None
    ) -> None:
        self._streams.pop(proc.pid, None)
        if proc.pid in self._aborted:
            self._aborted.discard(proc.pid)
            raise InterruptedRunError(
                f"the copy of job {job}'s artifact was stopped by the interruption"
            ) from error

    def _transfer_fault(self, job: str) -> str | None:
        """The transfer fault that acts on this copy (a `call N` fault counts it)."""
        return fires_now(self.root / FAULTS_DIR / self._fault_job(job) / TRANSFER)

    def _fault_job(self, name: str) -> str:
        """The job whose faults apply to the copy of artifact `name`: the job itself, or
        for a backup_one_restore_all artifact (`<job>-<release>-backup-one-restore-all`)
        the job of this VM it is named after."""
        if not name.endswith(BORA_SUFFIX):
            return name
        jobs = [job for job in self.vm.jobs() if name.startswith(f"{job}-")]
        return max(jobs, key=len, default=name)

    def _dropped(self, job: str, fault: str) -> TransportError:
        return TransportError(
            f"connection to {self.address} lost while copying the artifact of job {job}: "
            f"{transfer_failure_message(fault)}",
            host=self.address,
        )

    def artifact_size(self, job: str) -> int:
        base = self._existing_artifact_path(job)
        return sum(p.stat().st_size for p in base.rglob("*") if p.is_file() and not p.is_symlink())

    def store_size(self) -> int:
        store = self.root / STORE_DIR
        work = store / "bbr-backup"
        return sum(
            p.stat().st_size
            for p in store.rglob("*")
            if p.is_file() and not p.is_symlink() and work not in p.parents
        )

    def checksum_artifact_directory(self, job: str) -> dict[str, str]:
        """SHA-256 of every regular file in the job's artifact directory, keyed `./path`.

        Not part of the instance contract (a restore checks the stream in `stream_in`):
        the simulator's tests use it to look at what landed on the VM.
        """
        base = self._existing_artifact_path(job)
        checksums: dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for filename in sorted(filenames):
                path = Path(dirpath) / filename
                if path.is_symlink() or not path.is_file():
                    continue
                digest = hashlib.sha256()
                with path.open("rb") as handle:
                    while chunk := handle.read(_CHUNK):
                        digest.update(chunk)
                checksums[f"./{path.relative_to(base).as_posix()}"] = digest.hexdigest()
        return checksums

    def close(self) -> None:
        with self._lock:
            running = list(self._running.values())
            self._terminated.update(proc.pid for proc, _ in running)
        for proc, marker in running:
            self._signal_script(proc, signal.SIGKILL)
            for pid in _marked({marker}):
                with suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _close_quietly(stream: IO[bytes]) -> None:
    with suppress(BrokenPipeError):
        stream.close()


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _VmSide:
    """The VM's end of a backup's copy: its tar's stream, with its tar digest taken as it
    leaves the VM (over SSH, python3 on the VM runs the same `TarDigest`; see
    transport.ssh._pack_command). In a thread of its own, as the VM's hash runs on the
    VM's CPU, not the jump box's."""

    def __init__(self, source: IO[bytes]) -> None:
        self._source = source
        self._digest = ThreadedDigest(TarDigest())

    def read(self, size: int = -1, /) -> bytes:
        data = self._source.read(size)
        if data:
            self._digest.update(data)
        return data

    def drain(self) -> None:
        while chunk := self._source.read(_CHUNK):
            self._digest.update(chunk)

    def close(self) -> None:
        self._digest.close()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


class _LocalCorrupter:
    """The `corrupt-local` fault: the stream passes unchanged, and a byte of file data in
    the jump box's copy is flipped once the copy holds it, as a faulty disk, or another
    process writing there, would change it.

    The copy is the file this process has open under the artifact's name in a
    `.incomplete` backup directory. The byte is the one `corrupt` flips: offset 600,000,
    or in a shorter stream the middle of its first non-empty file. It is flipped at the
    first read after the copy on disk has grown past it, or else (a stream shorter than
    what the writer writes at once) by `finish`, once the writer has written it all.
    """

    def __init__(self, source: _Readable, copy_name: str) -> None:
        self._source = source
        self._copy_name = copy_name
        self._copy: Path | None = None
        self._head = bytearray()  # the stream up to the offset, to find a short one's
        self._done = False

    def read(self, size: int = -1, /) -> bytes:
        if self._copy is None:
            self._copy = _open_copy(self._copy_name)
        if not self._done and self._copy is not None and _size(self._copy) > CORRUPT_OFFSET:
            self._flip(CORRUPT_OFFSET)
        data = self._source.read(size)
        if len(self._head) <= CORRUPT_OFFSET:
            self._head += data[: CORRUPT_OFFSET + 1 - len(self._head)]
        return data

    def finish(self) -> None:
        """The stream has ended and the writer is done with the copy."""
        if self._done:
            return
        offset = CORRUPT_OFFSET if len(self._head) > CORRUPT_OFFSET else None
        offset = offset if offset is not None else _first_file_byte(self._head)
        if offset is None:
            log.warning("corrupt-local fault: the tar holds no file data; nothing changed")
            self._done = True
            return
        self._flip(offset)

    def _flip(self, offset: int) -> None:
        self._done = True
        if self._copy is None:
            log.warning("corrupt-local fault: no open copy named %s here", self._copy_name)
            return
        with open(self._copy, "r+b") as handle:
            handle.seek(offset)
            byte = handle.read(1)
            if not byte:
                log.warning("corrupt-local fault: %s holds no byte %d", self._copy, offset)
                return
            handle.seek(offset)
            handle.write(bytes([byte[0] ^ 0x01]))
        log.info("corrupt-local fault: flipped the byte at %d of %s", offset, self._copy)


class _DiskFiller:
    """The `disk-full` fault: the jump box's disk is full by the time bbrx writes the copy.

    Once this process has the copy open (a file named like the artifact's tar in a
    `.incomplete` backup directory), each descriptor it writes the copy through is pointed
    at /dev/full, so the writer's next write fails with the kernel's own ENOSPC, as it
    would on a full disk; bbrx's code runs unchanged. What the copy already holds stays.
    """

    def __init__(self, source: _Readable, copy_name: str) -> None:
        self._source = source
        self._copy_name = copy_name
        self._filled = False

    def read(self, size: int = -1, /) -> bytes:
        if not self._filled:
            self._fill()
        return self._source.read(size)

    def _fill(self) -> None:
        writers = _writers_of(self._copy_name)
        if not writers:
            return  # not open yet: the writer opens it before its first write
        full = os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)
        try:
            for fd in writers:
                os.dup2(full, fd, inheritable=False)
        finally:
            os.close(full)
        self._filled = True
        log.info("disk-full fault: the jump box's copy %s can take no more bytes", self._copy_name)


def _writers_of(name: str) -> list[int]:
    """This process's descriptors open for writing on `name` in a `.incomplete` directory."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with suppress(OSError, ValueError):
            target = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if target.name != name or not target.parent.name.endswith(INCOMPLETE_SUFFIX):
                continue
            flags = Path(f"/proc/self/fdinfo/{fd}").read_text().split("flags:", 1)[1].split()[0]
            if int(flags, 8) & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                found.append(int(fd))
    return found


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _open_copy(name: str) -> Path | None:
    """The file named `name` in a `.incomplete` backup directory that this process has open."""
    for fd in os.listdir("/proc/self/fd"):
        with suppress(OSError):
            target = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if target.name == name and target.parent.name.endswith(INCOMPLETE_SUFFIX):
                return target
    return None


class _DroppingReader:
    """A tar stream that breaks after at most 64 KiB, and never reaches its end, as a
    connection dropped mid-copy would."""

    LIMIT = 64 * 1024

    def __init__(self, source: _Readable, error: TransportError) -> None:
        self._source = source
        self._error = error
        self._given = 0

    def read(self, size: int = -1) -> bytes:
        if self._given >= self.LIMIT:
            raise self._error
        want = self.LIMIT - self._given if size < 0 else min(size, self.LIMIT - self._given)
        data = self._source.read(want)
        if not data:
            raise self._error
        self._given += len(data)
        return data


def _corrupted(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """A tar stream with one bit flipped in file data, so the tar stays readable.

    At offset 600,000 (in blob content for the seed director's blobstore) when the stream
    is that long. A shorter one (a deployment job's few KiB) is held back until its end,
    then gets the bit flipped in the middle of its first non-empty file.
    """
    chunks = iter(chunks)
    held: list[bytes] = []
    seen = 0
    for chunk in chunks:
        held.append(chunk)
        seen += len(chunk)
        if seen > CORRUPT_OFFSET:
            data = bytearray(b"".join(held))
            data[CORRUPT_OFFSET] ^= 0x01
            yield bytes(data)
            yield from chunks
            return
    data = bytearray(b"".join(held))
    offset = _first_file_byte(data)
    if offset is None:
        log.warning("corrupt fault: the tar holds no file data; passed through unchanged")
    else:
        data[offset] ^= 0x01
    yield bytes(data)


CORRUPT_OFFSET = 600_000


def _first_file_byte(tar: bytearray) -> int | None:
    """The offset of the middle byte of the first non-empty regular file in a tar."""
    position = 0
    while position + 512 <= len(tar):
        header = tar[position : position + 512]
        if not any(header):
            return None  # the end-of-archive blocks
        try:
            size = int(bytes(header[124:136]).strip(b"\0 ") or b"0", 8)
        except ValueError:
            return None
        if header[156:157] in (b"0", b"\0") and size > 0:
            return position + 512 + size // 2
        position += 512 + (size + 511) // 512 * 512
    return None


class _CorruptingReader:
    def __init__(self, source: _Readable) -> None:
        self._chunks = _corrupted(iter(lambda: source.read(_CHUNK), b""))
        self._buffer = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        if size < 0:
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the script has exited, without reaping it (WNOWAIT)."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _marked(markers: set[str]) -> set[int]:
    """Live processes whose environment carries one of these script markers."""
    wanted = {f"{MARKER_VAR}={marker}".encode() for marker in markers}
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            # A zombie's environ reads empty: only live processes are found.
            variables = Path(entry.path, "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if wanted.intersection(variables):
            found.add(int(entry.name))
    return found


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
