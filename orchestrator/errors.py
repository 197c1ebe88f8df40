"""One exception tree for bbrx. Each error carries its context and its bbr exit-code bit.

bbr's exit code is a bitmask OR-ed over every error of a run:
1 general, 4 a pre-backup-lock script failed, 8 an unlock script failed, 16 cleanup failed.
Only `cli.py` turns these into a process exit code.
"""

from __future__ import annotations

from collections.abc import Iterable

EXIT_GENERAL = 1
EXIT_LOCK = 4
EXIT_UNLOCK = 8
EXIT_CLEANUP = 16


class BbrxError(Exception):
    """Base of every error bbrx reports to the operator."""

    exit_bit = EXIT_GENERAL

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"

    def detail(self) -> dict[str, object]:
        """What the audit log records about this error (no secrets)."""
        return {"error": type(self).__name__, "message": self.message}


class UsageError(BbrxError):
    """The command line asks for something that cannot be done as written."""


class NotSupportedError(BbrxError):
    """A feature that this version of bbrx does not provide yet."""


class TargetError(BbrxError):
    """The --host value or the target it names is unusable."""


class TransportError(BbrxError):
    """The instance could not be reached, or a transfer to or from it broke."""

    def __init__(self, message: str, *, host: str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.host = host


class CopyCorruptError(TransportError):
    """A job's tar on the jump box is not what the VM sent: the digest the VM computed of
    the stream, as its tar wrote it (`digest_kind`: "tar" for the tar digest, "sha256"),
    differs from the same digest of the copy on the jump box's disk (read back after it
    was synced). A transfer failure: exit bit 1."""

    def __init__(
        self,
        message: str,
        *,
        job: str,
        host: str,
        digest_kind: str,
        vm_sha256: str,
        local_sha256: str,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, host=host, hint=hint)
        self.job = job
        self.digest_kind = digest_kind
        self.vm_sha256 = vm_sha256
        self.local_sha256 = local_sha256

    def detail(self) -> dict[str, object]:
        return {
            **super().detail(),
            "job": self.job,
            "host": self.host,
            "digest": self.digest_kind,
            "vm_sha256": self.vm_sha256,
            "local_sha256": self.local_sha256,
        }


class DiscoveryError(TransportError):
    """The job scripts on the instance could not be listed."""


class MetadataError(BbrxError):
    """A job's `metadata` script failed or printed something bbr would reject."""

    def __init__(
        self, message: str, *, job: str, hint: str | None = None, killed_by: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.job = job
        self.killed_by = killed_by


class CheckError(BbrxError):
    """The target is not in a state to be backed up or restored."""


class CyclicLockOrderError(CheckError):
    """The jobs' metadata asks for a lock order with a cycle."""

    def __init__(self, cycle: Iterable[str]) -> None:
        self.cycle = list(cycle)
        super().__init__(
            "job locking dependency graph is cyclic: " + " -> ".join(self.cycle),
            hint="Fix the backup_should_be_locked_before / restore_should_be_locked_before "
            "entries of these jobs' metadata scripts. Nothing was locked.",
        )


class ArtifactError(BbrxError):
    """The local artifact cannot be written, read or trusted."""


class ArtifactCorruptError(ArtifactError):
    """A file of the artifact does not match the checksum its metadata records."""


class ScriptError(BbrxError):
    """A job script failed. Carries the job, the script, its exit code and its stderr tail."""

    def __init__(
        self,
        *,
        job: str,
        script: str,
        host: str,
        exit_code: int | None,
        stderr_tail: str,
        killed_by: str | None = None,
    ) -> None:
        self.job = job
        self.script = script
        self.host = host
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail
        self.killed_by = killed_by
        if killed_by:
            message = f"{script} script for job {job} on {host} failed: it was killed ({killed_by})"
        elif exit_code is None:
            # Never ran: what stands in the stderr tail is the reason, not the script's output.
            message = f"{script} script for job {job} on {host} could not be started: " + (
                " ".join(stderr_tail.split()) or "no reason given"
            )
            stderr_tail = ""
        else:
            message = f"{script} script for job {job} on {host} failed: it exited {exit_code}"
        if stderr_tail:
            message += "\n  stderr: " + "\n          ".join(stderr_tail.splitlines())
        super().__init__(message)

    def detail(self) -> dict[str, object]:
        return {
            **super().detail(),
            "job": self.job,
            "script": self.script,
            "exit_code": self.exit_code,
            "stderr_tail": self.stderr_tail,
            "killed_by": self.killed_by,
        }


class LockError(ScriptError):
    """A pre-backup-lock (or pre-restore-lock) script failed."""

    exit_bit = EXIT_LOCK


class PreRestoreLockError(ScriptError):
    """A pre-restore-lock script failed. bbr counts this as a general failure."""


class BackupScriptError(ScriptError):
    """A backup script failed."""


class RestoreScriptError(ScriptError):
    """A restore script failed."""


class UnlockError(ScriptError):
    """A post-backup-unlock or post-restore-unlock script failed."""

    exit_bit = EXIT_UNLOCK


class LocksLeftError(BbrxError):
    """A run ended with jobs whose unlock did not succeed: the director may be locked."""

    exit_bit = EXIT_UNLOCK


class CleanupError(BbrxError):
    """The remote work directory could not be removed."""

    exit_bit = EXIT_CLEANUP


class AuditBrokenError(BbrxError):
    """The audit log, or a backup's tie to it, failed verification."""


class AuditUnwritableError(BbrxError):
    """The audit log could not be written mid-run: no lock, backup or restore script starts
    after this; unlocks still run, their rows going to the fallback journal."""


class ScriptNotStartedError(ScriptError):
    """A lock, backup or restore script bbrx refused to start, because its intent row could
    not be written to the audit log. Nothing ran, so it is no script failure (exit 1)."""

    exit_bit = EXIT_GENERAL

    def __init__(self, *, job: str, script: str, host: str, why: str) -> None:
        super().__init__(job=job, script=script, host=host, exit_code=None, stderr_tail="")
        self.message = f"{script} script for job {job} on {host} was not started: {why}"
        self.args = (self.message,)


class InterruptedRunError(BbrxError):
    """The run was stopped by a signal. Every job that was locked has been unlocked."""


class RunFailed(BbrxError):
    """A run ended with one or more errors; its exit code ORs their bits."""

    def __init__(
        self, operation: str, errors: list[BbrxError], run_id: str, outcome: object = None
    ) -> None:
        self.operation = operation
        self.errors = errors
        self.run_id = run_id
        self.outcome = outcome
        super().__init__(f"{operation} failed ({len(errors)} error(s)); audit run {run_id}")

    @property
    def exit_code(self) -> int:
        code = 0
        for error in self.errors:
            code |= error.exit_bit
        return code or EXIT_GENERAL
