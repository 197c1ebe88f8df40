"""The instance contract: everything bbrx asks of a director VM, whatever carries it.

The simulator (`simulator.instance.SimInstance`) and the SSH transport are peers behind
this Protocol. Procedures are written against it and never against a transport.
Paths in this contract are the paths the VM's scripts see (on a real VM,
`/var/vcap/...`; on the simulator, the same tree under the simulated VM's root).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol, runtime_checkable

# The names bbr knows. Any other executable in bin/bbr/ is ignored.
SCRIPT_NAMES = (
    "metadata",
    "pre-backup-lock",
    "backup",
    "post-backup-unlock",
    "pre-restore-lock",
    "restore",
    "post-restore-unlock",
)
# bbr ignores these jobs entirely (they are the legacy mysql backup jobs).
IGNORED_JOBS = frozenset({"mysql-backup", "mysql-restore"})

REMOTE_WORK_DIR = "/var/vcap/store/bbr-backup"
# Written by the run that claimed the work dir: who holds the VM. Outside every job's
# artifact directory, so it is never part of a backup.
WORK_DIR_OWNER = ".bbrx-owner"
OWNER_MAX = 1024


@dataclass(frozen=True)
class Job:
    """One job found on the instance: its name and the bbr scripts it ships."""

    name: str
    scripts: frozenset[str]

    def has(self, script: str) -> bool:
        return script in self.scripts


# Ends `killed_by` when the script was killed because the run was interrupted (not, say,
# because it ran past its timeout): the run reports the interruption, not the kill.
INTERRUPTED_KILL = "(run interrupted)"


@dataclass(frozen=True)
class ScriptResult:
    """What one script run produced. `exit_code` is None when the process was killed.

    `stdout` and `stderr` are bounded (orchestrator.transport.scriptio): the first bytes of stdout,
    with `stdout_truncated` set when the script printed more; the last bytes of stderr,
    with `stderr_dropped` counting the bytes before them that were not kept.
    """

    job: str
    script: str
    exit_code: int | None
    stdout: str
    stderr: str
    duration: float
    killed_by: str | None = None  # e.g. "SIGTERM (run interrupted)", "timed out after 5 s"
    stdout_truncated: bool = False
    stderr_dropped: int = 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def stderr_tail(self, lines: int = 10, max_bytes: int = 4096) -> str:
        """The last `lines` lines of stderr, and at most `max_bytes` of them: what error
        messages and audit rows carry. A cut inside a line is marked at its start."""
        tail = "\n".join(self.stderr.strip().splitlines()[-lines:])
        data = tail.encode("utf-8", "replace")
        if len(data) <= max_bytes:
            return tail
        kept = data[-max_bytes:].decode("utf-8", "ignore")
        return f"[{len(data) - max_bytes} bytes cut] {kept}"

    @classmethod
    def not_started(cls, call: ScriptCall) -> ScriptResult:
        """A script that `call.may_start` stopped at the last moment (the run was interrupted)."""
        return cls(call.job, call.script, None, "", "", 0.0, f"not started {INTERRUPTED_KILL}")


@dataclass
class ScriptCall:
    """A script to run: job, script name, and the extra environment bbr gives it."""

    job: str
    script: str
    env: Mapping[str, str] = field(default_factory=dict)
    #: Seconds the script may run; past that it is killed (on the VM, with everything it
    #: started) and reported with killed_by "timed out after N s". None: no limit.
    timeout: float | None = None
    #: Told the script's pid on the VM (its process group) once it is known, from the
    #: thread that called `run_script`, before the script's result.
    on_start: Callable[[int], None] | None = field(default=None, compare=False)
    #: Asked once more just before the process starts, under the lock `terminate_scripts`
    #: takes: False means do not start it (the result is `ScriptResult.not_started`). So a
    #: script either starts where `terminate_scripts` sees it, or not at all.
    may_start: Callable[[], bool] | None = field(default=None, compare=False)
    #: A script that has exited but left processes holding its output: end them too (True),
    #: or only stop reading and warn (False). See `Run.run_job_script` for who gets which.
    end_leftovers: bool = False
    #: This script run's own mark: its value of BBRX_SCRIPT_ID, which everything it starts
    #: inherits. Recorded with its pid, so that a cleanup after a killed bbrx can end what
    #: the script started in sessions of its own too. A random token, not a secret.
    marker: str = field(default_factory=lambda: secrets.token_hex(16), compare=False)


@dataclass(frozen=True)
class SentDigest:
    """What the VM says it sent, computed beside the stream as its tar wrote it.

    kind "tar": the tar digest (`orchestrator.bbr.tardigest`), what a VM with python3
    computes; "sha256": the SHA-256 of the stream's bytes, a VM's fallback without it
    (`tee` into `openssl dgst` or `sha256sum`).
    """

    kind: str
    hex: str

    @property
    def label(self) -> str:
        return "tar digest" if self.kind == "tar" else "SHA-256"


class VmStream:
    """What `Instance.stream_out` yields: a job's tar as it arrives from the VM (`read`),
    and, once the context has ended without an error, `digest`: the VM's own digest of
    every byte it sent (`SentDigest`)."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self.digest: SentDigest | None = None

    def read(self, size: int = -1, /) -> bytes:
        return self._source.read(size)

    def readinto(self, buffer: memoryview, /) -> int:
        """Straight into the caller's buffer where the source can (an ssh pipe can)."""
        readinto = getattr(self._source, "readinto", None)
        if readinto is not None:
            return int(readinto(buffer))
        data = self._source.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@runtime_checkable
class Instance(Protocol):
    """A VM as bbrx sees it: a director, or one instance of a deployment.

    Implementations must be safe to call from several threads at once (locks of one
    level and drains of different jobs run in parallel).
    """

    #: Instance group and index used in artifact names (`bosh`, `0` in director mode).
    group: str
    index: str
    #: The instance's UUID where the director knows one (a deployment's VMs); None for a
    #: director reached on its own.
    instance_id: str | None
    #: Human name of the target for messages ("sim://demo", "10.0.0.6:22").
    address: str
    #: "sim" or "live": recorded in the audit log.
    mode: str
    #: Facts worth auditing once known (e.g. the host key fingerprint); never secrets.
    info: dict[str, str]

    def discover(self) -> list[Job]:
        """Every job with at least one known bbr script, sorted by name.

        Raises `errors.DiscoveryError` when the instance cannot be reached or read.
        """
        ...

    def run_script(self, call: ScriptCall) -> ScriptResult:
        """Run one job script as root with bbr's environment plus `call.env`.

        Never raises for a script that fails or times out: the result says so. Raises
        `errors.TransportError` only when the script could not be started at all.
        """
        ...

    def terminate_scripts(self) -> None:
        """Kill every script this instance is running now (the run is being interrupted),
        and every process those scripts started (sessions of their own included).

        Their `run_script` calls then return with `killed_by` set. Copies under way are cut
        too: their `stream_out` / `stream_in` raise InterruptedRunError. Called from an
        ordinary thread (the run's signal watcher), never from a signal handler: it may
        block until the scripts are gone (a few seconds: TERM, then KILL), and a script
        whose `run_script` is starting at the same moment is either seen and killed or
        asks its `may_start` after this has begun.
        """
        ...

    # The `job` of the artifact methods below names the job's directory under the work dir:
    # the job's name, or, for the bootstrap copy of a `backup_one_restore_all` job, its
    # custom artifact name (`<job>-<release>-backup-one-restore-all`).

    def artifact_directory(self, job: str) -> str:
        """The job's `BBR_ARTIFACT_DIRECTORY` as its scripts see it, with a trailing slash."""
        ...

    def work_dir_exists(self) -> bool:
        """Whether `/var/vcap/store/bbr-backup` exists (the trace of an earlier run)."""
        ...

    def claim_work_dir(self, owner: str) -> bool:
        """Create `/var/vcap/store/bbr-backup` atomically and write `owner` into its
        `WORK_DIR_OWNER` file; False if it already exists (another run holds the VM).

        This is the VM's own "one run at a time" lock: it holds whatever jump box or
        audit log the other run uses, and bbr itself refuses a VM that has this directory.
        """
        ...

    def work_dir_owner(self) -> str | None:
        """What the run that created the work dir wrote in its owner file (at most
        OWNER_MAX bytes, as text), or None if there is no such file."""
        ...

    def make_artifact_directory(self, job: str) -> None:
        """Create the job's artifact directory (and the work dir) before backup or restore."""
        ...

    def artifact_size(self, job: str) -> int:
        """Bytes in the job's artifact directory (what a drain will move, before tar's framing)."""
        ...

    def store_size(self) -> int:
        """Bytes under /var/vcap/store, bbr's work dir aside: an upper bound for a backup."""
        ...

    def stream_out(self, job: str) -> AbstractContextManager[VmStream]:
        """A readable stream of an uncompressed tar of the job's artifact directory.

        Members are named `./file`, `./dir/file`. Leaving the context closes the stream
        and raises `errors.TransportError` if the remote side failed, or did not report
        its digest. Left without an error, the stream's `digest` is the VM's digest of the
        tar stream as it sent it (`SentDigest`), computed on the VM in the same pass. The
        transport only reports it: the caller compares it with its own copy.
        """
        ...

    def stream_in(self, job: str, chunks: Iterator[bytes]) -> str:
        """Unpack a tar, given as chunks, into the job's artifact directory; return the
        SHA-256 (hex) of the stream the VM's tar read, computed on the VM as it read it.

        The caller compares it with the digest of what it sent: that one comparison stands
        for re-hashing the unpacked files. Extraction keeps neither the archive's owners
        nor its set-id bits (GNU tar --no-same-owner --no-same-permissions, as root).
        An exception raised by `chunks` ends the copy and is re-raised; raises
        `errors.TransportError` if the VM's side failed.
        """
        ...

    def remove_work_dir(self) -> None:
        """Remove `/var/vcap/store/bbr-backup` and everything in it (no error if absent)."""
        ...

    def end_script(self, job: str, script: str, pid: int, marker: str | None = None) -> bool:
        """End a script a killed bbrx left running: process group `pid`, if that group is
        still this job's script (a pid reused since, after a reboot say, is left alone), and
        every process carrying its `marker` (what it started, daemons included).
        True if anything was running and has been ended."""
        ...

    def close(self) -> None:
        """Release connections and helpers. Idempotent."""
        ...


def instance_name(instance: Instance) -> str:
    """`group/index`, as bbr names an instance in artifacts and messages (`redis/1`)."""
    return f"{instance.group}/{instance.index}"
