"""Signed checkpoints of the audit log's chain head, kept in a file outside the database.

The hash chain catches an edited, deleted or reordered row, but not a truncated tail,
nor a log re-chained (every hash recomputed after an edit or a truncation): such a log
passes ``verify_log``. A checkpoint is the chain head signed with an SSH key, by
OpenSSH's own signatures (``ssh-keygen -Y sign``, namespace ``bbrx-audit``), and
appended to a file kept elsewhere; later, ``verify_checkpoints`` checks every signature
and that the log still holds each signed head. Run it together with ``verify_log``:
checkpoints vouch for the heads, the chain for every row below them.

File format (plain UTF-8 text, appended to, one file per log), each checkpoint being
one payload line, then the armored signature of exactly that line and its newline::

    bbrx-audit-checkpoint 1 log_id=<64 hex> seq=<N> hash=<64 hex> time=<UTC ISO 8601>
    -----BEGIN SSH SIGNATURE-----
    <base64 lines>
    -----END SSH SIGNATURE-----

``1`` is the format version; ``log_id`` is the hash of seq 1 (it identifies the chain);
``seq`` and ``hash`` are the head signed (the row's ``hash`` column); ``time`` is when
it was signed, spelled like the rows' ``ts`` (``2026-12-01T14:00:00.123456Z``). Nothing
else may be in the file: no blank lines, no comments, every line ended by a newline.
A reviewer can check it with nothing but a shell, awk, ``ssh-keygen -Y find-principals``
/ ``ssh-keygen -Y verify`` and ``sqlite3 -readonly``.

This module imports nothing of the orchestrator or the simulator.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from audit.errors import AuditError
from audit.log import AuditLog, utc_now
from audit.verify import verify_log

logger = logging.getLogger(__name__)

NAMESPACE = "bbrx-audit"
MAGIC = "bbrx-audit-checkpoint"
FORMAT_VERSION = "1"
BEGIN = "-----BEGIN SSH SIGNATURE-----"
END = "-----END SSH SIGNATURE-----"

SIGN_TIMEOUT = 60.0  # seconds: an agent may ask a hardware key for a touch
VERIFY_TIMEOUT = 30.0
_STDERR_LINES = 5

_HEX64 = re.compile(r"[0-9a-f]{64}")
_SEQ = re.compile(r"[1-9][0-9]*")
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")
_BASE64 = re.compile(r"[A-Za-z0-9+/=]+")
_FIELDS = ("log_id", "seq", "hash", "time")


@dataclass(frozen=True)
class Checkpoint:
    """One signed chain head, as read from (or appended to) a checkpoint file."""

    number: int  # 1-based position in the checkpoint file
    line: int  # line number where it starts in the file
    log_id: str  # the hash of seq 1: identifies the chain
    seq: int
    hash: str  # the hash of row `seq`
    time: str  # UTC signing time, ISO 8601 with microseconds and Z (like audit rows' ts)
    payload: str  # the exact signed text (one line, with its trailing newline)
    signature: str  # the armored "-----BEGIN SSH SIGNATURE-----" ... block


@dataclass(frozen=True)
class CheckpointReport:
    """The result of ``verify_checkpoints``.

    ``checked`` counts the checkpoints that passed every check before the first bad
    one (all of them when ``ok``). ``first_bad`` is the first checkpoint, in file order,
    whose signature fails or that the log contradicts, and ``problem`` says how (both
    None when ``ok``; ``problem`` alone is set for a file with no checkpoints).
    ``signers`` are the principals (from the allowed signers file) whose signatures
    verified, in order of first appearance; ``latest`` is the last good checkpoint in
    the file and ``latest_signer`` its principal; ``hint`` says what to do.
    """

    ok: bool
    checked: int
    first_bad: Checkpoint | None
    problem: str | None
    signers: tuple[str, ...]
    latest: Checkpoint | None = None
    latest_signer: str | None = None
    hint: str | None = None

    def lines(self) -> list[str]:
        """What to show a reviewer: one line when ok, else the problem and what to do."""
        if self.ok and self.latest is not None:
            noun = "checkpoint" if self.checked == 1 else "checkpoints"
            return [
                f"{self.checked} {noun} verified, latest seq {self.latest.seq} "
                f"signed by {self.latest_signer} at {self.latest.time}"
            ]
        lines = [self.problem or "checkpoints not verified"]
        if self.first_bad is not None and self.checked:
            noun = "checkpoint" if self.checked == 1 else "checkpoints"
            lines.append(f"{self.checked} {noun} before it verified")
        if self.hint:
            lines.append(f"what to do: {self.hint}")
        return lines


# -- reading -------------------------------------------------------------------------------


def read_checkpoints(path: Path) -> list[Checkpoint]:
    """Every checkpoint in the file at ``path``, in file order; [] for an empty file.

    Raises AuditError for a missing or unreadable file, and for malformed content,
    naming the file, the line and what is wrong with it. Signatures are not checked
    here (see ``verify_checkpoints``).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AuditError(
            f"no checkpoint file at {path}: give the file `bbrx audit checkpoint` wrote"
        ) from None
    except IsADirectoryError:
        raise AuditError(f"{path} is a directory, not a checkpoint file") from None
    except OSError as exc:
        raise AuditError(f"cannot read the checkpoint file {path}: {exc.strerror}") from exc
    return _parse(data, path)


def _parse(data: bytes, path: Path) -> list[Checkpoint]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _malformed(path, line, "it is not UTF-8 text") from None
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] != "":
        raise _malformed(
            path, len(lines), "the file ends in the middle of this line (no newline after it)"
        )
    lines.pop()
    checkpoints: list[Checkpoint] = []
    i = 0
    while i < len(lines):
        start = i + 1
        fields = _payload_fields(lines[i], path, start)
        i += 1
        if i >= len(lines) or lines[i] != BEGIN:
            found = "the end of the file" if i >= len(lines) else repr(_clip(lines[i]))
            raise _malformed(
                path, i + 1, f"expected {BEGIN!r} after the checkpoint line {start}, found {found}"
            )
        block = [BEGIN]
        i += 1
        while i < len(lines) and lines[i] != END:
            if not _BASE64.fullmatch(lines[i]):
                raise _malformed(
                    path,
                    i + 1,
                    f"expected base64 signature text or {END!r} (the signature of the "
                    f"checkpoint at line {start}), found {_clip(lines[i])!r}",
                )
            block.append(lines[i])
            i += 1
        if i >= len(lines):
            raise _malformed(
                path,
                start,
                f"the signature of this checkpoint has no {END!r} line before the end of "
                "the file (a write cut short, or an edit)",
            )
        if len(block) == 1:
            raise _malformed(path, i + 1, "the signature block is empty")
        block.append(END)
        i += 1
        checkpoints.append(
            Checkpoint(
                number=len(checkpoints) + 1,
                line=start,
                log_id=fields["log_id"],
                seq=int(fields["seq"]),
                hash=fields["hash"],
                time=fields["time"],
                payload=lines[start - 1] + "\n",
                signature="\n".join(block) + "\n",
            )
        )
    return checkpoints


def _payload_fields(line: str, path: Path, number: int) -> dict[str, str]:
    """The fields of a payload line, or AuditError saying which one is wrong."""
    words = line.split(" ")
    if words[0] != MAGIC:
        raise _malformed(
            path,
            number,
            f"expected a checkpoint line starting {MAGIC!r}, found {_clip(line)!r}",
        )
    if len(words) < 2 or words[1] != FORMAT_VERSION:
        version = words[1] if len(words) > 1 else ""
        raise _malformed(
            path,
            number,
            f"checkpoint format version {version!r} is not one this bbrx knows "
            f"({FORMAT_VERSION}): upgrade bbrx, or the line was edited",
        )
    expected = " ".join(f"{name}=..." for name in _FIELDS)
    keys = [word.partition("=")[0] for word in words[2:]]
    if keys != list(_FIELDS) or not all("=" in word for word in words[2:]):
        raise _malformed(
            path,
            number,
            f"expected '{MAGIC} {FORMAT_VERSION} {expected}' (single spaces), "
            f"found {_clip(line)!r}",
        )
    fields = {key: word.partition("=")[2] for key, word in zip(keys, words[2:], strict=True)}
    checks = {
        "log_id": (_HEX64, "64 lowercase hex digits"),
        "hash": (_HEX64, "64 lowercase hex digits"),
        "seq": (_SEQ, "a sequence number (1 or more, no leading zeros)"),
        "time": (_TIME, "a UTC time like 2026-12-01T14:00:00.123456Z"),
    }
    for name in _FIELDS:
        pattern, what = checks[name]
        if not pattern.fullmatch(fields[name]):
            raise _malformed(path, number, f"{name} must be {what}, found {fields[name]!r}")
    try:
        datetime.strptime(fields["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        raise _malformed(path, number, f"time {fields['time']!r} is not a valid date") from None
    return fields


def _malformed(path: Path, line: int, what: str) -> AuditError:
    return AuditError(f"checkpoint file {path}, line {line}: {what}").with_hint(
        "A checkpoint file holds only what `bbrx audit checkpoint` appends to it; "
        "restore it from another copy, or start a new file (the old one may have been "
        "tampered with: keep it)."
    )


def _clip(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


# -- ssh-keygen ----------------------------------------------------------------------------


def _ssh_keygen(
    args: Sequence[str], *, stdin: Path | None, timeout: float, doing: str
) -> subprocess.CompletedProcess[str]:
    """Run ssh-keygen with ``args``: no shell, no terminal (a new session, so it cannot
    open /dev/tty), no askpass, stdin a file or /dev/null, within ``timeout``."""
    exe = shutil.which("ssh-keygen")
    if exe is None:
        raise _no_ssh_keygen()
    env = dict(os.environ)
    env["SSH_ASKPASS_REQUIRE"] = "never"  # never a GUI prompt, whatever DISPLAY says
    try:
        with open(stdin, "rb") if stdin is not None else open(os.devnull, "rb") as source:
            return subprocess.run(
                [exe, *args],
                stdin=source,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                start_new_session=True,
                env=env,
                check=False,
            )
    except FileNotFoundError:
        raise _no_ssh_keygen() from None
    except subprocess.TimeoutExpired:
        raise AuditError(
            f"ssh-keygen did not finish {doing} within {timeout:g} s and was stopped"
        ) from None
    except OSError as exc:
        raise AuditError(f"cannot run ssh-keygen ({doing}): {exc}") from exc


def _no_ssh_keygen() -> AuditError:
    return AuditError("ssh-keygen is not on PATH: checkpoints are OpenSSH signatures").with_hint(
        "Install openssh-client (its ssh-keygen signs and verifies with -Y)."
    )


def _stderr_tail(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return " / ".join(lines[-_STDERR_LINES:]) or "no message"


# -- signing -------------------------------------------------------------------------------


def sign_checkpoint(db: Path, key: Path, output: Path) -> Checkpoint:
    """Sign the chain head of the audit log ``db`` with ``key`` and append it to ``output``.

    The log is opened read-only. An empty log is refused (nothing to sign), and so is a
    log ``verify_log`` finds broken: a broken head is never signed. ``key`` is a private
    key file, or a public key whose private half ssh-agent holds (``SSH_AUTH_SOCK``);
    ssh-keygen never prompts: a passphrase-protected key not in the agent is refused.

    ``output`` is created (mode 0644) if missing, but not its directory. It must be a
    regular file holding only checkpoints of this log (one file per log). The block is
    appended in one write under an exclusive ``flock``, then fsync'd (and the directory
    too when the file was created). Returns the checkpoint appended.
    """
    db, key, output = Path(db), Path(key), Path(output)
    if not key.is_file():
        raise AuditError(f"no key file at {key}").with_hint(
            "Give a private key file, or the public key (.pub) of a key ssh-agent holds."
        )
    _check_output(output)
    seq, head_hash, log_id = _verified_head(db)
    if output.exists():
        # Refuse before signing; checked again under the lock when appending.
        _check_same_log(read_checkpoints(output), log_id, output)
    payload = (
        f"{MAGIC} {FORMAT_VERSION} log_id={log_id} seq={seq} hash={head_hash} time={utc_now()}\n"
    )
    signature = _sign(payload, key)
    number, line = _append(output, payload + signature, log_id)
    parsed = _parse((payload + signature).encode(), output)[0]
    checkpoint = replace(parsed, number=number, line=line)
    logger.info(
        "audit log %s: checkpoint %d (seq %d) signed with %s, appended to %s",
        db,
        number,
        seq,
        key,
        output,
    )
    return checkpoint


def _check_output(output: Path) -> None:
    if not output.parent.is_dir():
        raise AuditError(
            f"cannot write the checkpoint file {output}: the directory {output.parent} "
            "does not exist"
        ).with_hint("Create it first (bbrx does not), or give another output file.")
    try:
        mode = output.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise AuditError(f"cannot use the checkpoint file {output}: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        raise AuditError(
            f"cannot write checkpoints to {output}: it is not a regular file"
        ).with_hint("Give the path of a checkpoint file (it is created if missing).")


def _check_same_log(existing: list[Checkpoint], log_id: str, output: Path) -> None:
    for checkpoint in existing:
        if checkpoint.log_id != log_id:
            raise AuditError(
                f"the checkpoint file {output} holds checkpoints of another log: checkpoint "
                f"{checkpoint.number} (line {checkpoint.line}) has log_id {checkpoint.log_id}, "
                f"this log's is {log_id} (the hash of its seq 1)"
            ).with_hint(
                "Keep one checkpoint file per audit log: give another output file (if the "
                "log was rewritten from seq 1, verify it against the file instead)."
            )


def _verified_head(db: Path) -> tuple[int, str, str]:
    """(seq, hash, log_id) of the head, after verify_log found the chain up to it intact."""
    with AuditLog(db, readonly=True) as log:
        head = log.head()
        first = log.event(1)
    if head is None or first is None:
        raise AuditError(f"the audit log {db} has no rows: there is no head to sign")
    report = verify_log(db)
    if not report.ok:
        raise AuditError(
            f"refusing to sign a checkpoint of the audit log {db}: it is broken ({report.problem})"
        ).with_hint(
            "A broken head is never signed. Keep the file as evidence and investigate "
            "(`bbrx audit verify`)."
        )
    with AuditLog(db, readonly=True) as log:
        # verify_log walked at least to the head read above; make sure it is unchanged.
        again = log.event(head.seq)
        first_again = log.event(1)
    if (
        report.count < head.seq
        or again is None
        or again["hash"] != head.hash
        or first_again is None
        or first_again["hash"] != first["hash"]
    ):
        raise AuditError(
            f"the audit log {db} changed under the checkpoint (seq {head.seq}): try again"
        )
    return head.seq, head.hash, str(first["hash"])


def _sign(payload: str, key: Path) -> str:
    """The armored signature of ``payload`` by ``key`` (namespace ``NAMESPACE``).

    The payload is signed from a file in a private temporary directory, stdin being
    /dev/null: had ssh-keygen a passphrase to ask for, it could read one neither from a
    terminal (there is none) nor from the payload.
    """
    with tempfile.TemporaryDirectory(prefix="bbrx-checkpoint-") as tmp:
        message = Path(tmp) / "payload"
        message.write_text(payload, encoding="utf-8")
        result = _ssh_keygen(
            ["-Y", "sign", "-f", str(key), "-n", NAMESPACE, str(message)],
            stdin=None,
            timeout=SIGN_TIMEOUT,
            doing=f"signing with {key}",
        )
        sig = message.with_name("payload.sig")
        if result.returncode != 0 or not sig.is_file():
            raise _sign_failed(key, result)
        signature = sig.read_text(encoding="utf-8", errors="replace")
    if not (signature.startswith(BEGIN + "\n") and signature.endswith(END + "\n")):
        raise AuditError(
            f"ssh-keygen signed with {key} but wrote no armored SSH signature: {_clip(signature)!r}"
        )
    return signature


def _sign_failed(key: Path, result: subprocess.CompletedProcess[str]) -> AuditError:
    tail = _stderr_tail(result.stderr)
    if "passphrase" in result.stderr.lower():
        return AuditError(
            f"cannot sign with {key}: the key is protected by a passphrase and ssh-agent "
            f"does not hold it, and a checkpoint is never signed at a prompt (ssh-keygen: {tail})"
        ).with_hint(
            f"Add it to ssh-agent (`ssh-add {key}`, SSH_AUTH_SOCK set) and give its public "
            "key, or use an unencrypted key kept only for signing checkpoints."
        )
    return AuditError(
        f"ssh-keygen could not sign with {key} (exit {result.returncode}): {tail}"
    ).with_hint(
        "Give a private key file, or the public key (.pub) of a key ssh-agent holds; "
        "a private key must be readable only by you."
    )


def _append(output: Path, block: str, log_id: str) -> tuple[int, int]:
    """Append ``block`` to ``output`` under an exclusive flock; (number, line) it got."""
    created = False
    try:
        try:
            flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOCTTY
            fd = os.open(output, flags | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        except FileExistsError:
            fd = os.open(output, flags | os.O_NONBLOCK)
    except OSError as exc:
        raise AuditError(
            f"cannot open the checkpoint file {output} to append: {exc.strerror}"
        ) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AuditError(f"cannot write checkpoints to {output}: it is not a regular file")
        if created:
            os.fchmod(fd, 0o644)  # whatever the umask: checkpoints are for reviewers
        fcntl.flock(fd, fcntl.LOCK_EX)
        existing_bytes = _read_all(fd)
        # Another signer may have appended meanwhile: parse what is there now.
        existing = _parse(existing_bytes, output)
        _check_same_log(existing, log_id, output)
        data = block.encode("utf-8")
        written = os.write(fd, data)
        while written < len(data):  # a regular file takes it in one write; just in case
            written += os.write(fd, data[written:])
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        if created:
            output.unlink(missing_ok=True)
        raise AuditError(f"cannot append the checkpoint to {output}: {exc.strerror}").with_hint(
            "Check the disk and the file's permissions, then sign again."
        ) from exc
    except BaseException:
        os.close(fd)
        if created:
            output.unlink(missing_ok=True)
        raise
    os.close(fd)  # releases the flock
    if created:
        _fsync_directory(output.parent)
    return len(existing) + 1, existing_bytes.count(b"\n") + 1


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 16, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        logger.warning("cannot fsync the directory %s: %s", directory, exc.strerror)
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        logger.warning("cannot fsync the directory %s: %s", directory, exc.strerror)
    finally:
        os.close(fd)


# -- verifying -----------------------------------------------------------------------------


def verify_checkpoints(db: Path, checkpoints: Path, allowed_signers: Path) -> CheckpointReport:
    """Check every checkpoint in ``checkpoints``, in file order, against the log ``db``.

    For each: (1) its signature, by ``ssh-keygen -Y find-principals`` then ``-Y verify``
    (namespace ``bbrx-audit``) against ``allowed_signers``; (2) its ``log_id`` is the
    hash of the log's seq 1; (3) the log's row ``seq`` exists and has the hash signed.
    The first checkpoint that fails is reported and checking stops. This vouches for
    the signed heads only: run ``verify_log`` too for the rows below them.

    Raises AuditError if the log, the checkpoint file or the allowed signers file is
    missing or unreadable, or the checkpoint file is malformed.
    """
    db, checkpoints, allowed_signers = Path(db), Path(checkpoints), Path(allowed_signers)
    try:
        allowed_signers.read_bytes()
    except OSError as exc:
        raise AuditError(
            f"cannot read the allowed signers file {allowed_signers}: "
            f"{exc.strerror or exc.__class__.__name__}"
        ).with_hint(
            "It lists the keys allowed to sign checkpoints, one a line: "
            '`reviewer@example.com namespaces="bbrx-audit" ssh-ed25519 AAAA...`.'
        ) from exc
    listed = read_checkpoints(checkpoints)
    with AuditLog(db, readonly=True) as log:
        if not listed:
            return CheckpointReport(
                ok=False,
                checked=0,
                first_bad=None,
                problem=f"no checkpoints in {checkpoints}",
                signers=(),
                hint="sign one with `bbrx audit checkpoint --key KEY --output FILE`",
            )
        signers: list[str] = []
        latest: tuple[Checkpoint, str] | None = None
        with tempfile.TemporaryDirectory(prefix="bbrx-checkpoint-") as tmp:
            for checked, checkpoint in enumerate(listed):
                principal, problem, hint = _verify_signature(
                    checkpoint, checkpoints, allowed_signers, Path(tmp)
                )
                if principal is not None:
                    problem, hint = _contradiction(log, checkpoint, checkpoints, db)
                if problem is not None or principal is None:
                    logger.warning("checkpoints %s: %s", checkpoints, problem)
                    return CheckpointReport(
                        ok=False,
                        checked=checked,
                        first_bad=checkpoint,
                        problem=problem,
                        signers=tuple(signers),
                        latest=latest[0] if latest else None,
                        latest_signer=latest[1] if latest else None,
                        hint=hint,
                    )
                if principal not in signers:
                    signers.append(principal)
                latest = (checkpoint, principal)
    assert latest is not None
    logger.debug("checkpoints %s: %d verified against %s", checkpoints, len(listed), db)
    return CheckpointReport(
        ok=True,
        checked=len(listed),
        first_bad=None,
        problem=None,
        signers=tuple(signers),
        latest=latest[0],
        latest_signer=latest[1],
    )


def _where(checkpoint: Checkpoint, path: Path) -> str:
    return f"checkpoint {checkpoint.number} (line {checkpoint.line} of {path})"


def _verify_signature(
    checkpoint: Checkpoint, path: Path, allowed_signers: Path, tmp: Path
) -> tuple[str | None, str | None, str | None]:
    """(principal, None, None) when the signature verifies, else (None, problem, hint)."""
    sig = tmp / f"{checkpoint.number}.sig"
    message = tmp / f"{checkpoint.number}.payload"
    sig.write_text(checkpoint.signature, encoding="utf-8")
    message.write_text(checkpoint.payload, encoding="utf-8")
    where = _where(checkpoint, path)
    hint = (
        f"the checkpoint was signed by a key not in {allowed_signers}, or its line was "
        "edited after signing: treat the checkpoint file as tampered with and compare it "
        "with another copy (if the signer is legitimate, add their key to the allowed "
        "signers file)"
    )
    found = _ssh_keygen(
        ["-Y", "find-principals", "-s", str(sig), "-f", str(allowed_signers)],
        stdin=None,
        timeout=VERIFY_TIMEOUT,
        doing=f"finding the signer of {where}",
    )
    principals = [p.strip() for p in found.stdout.splitlines() if p.strip()]
    if found.returncode != 0 or not principals:
        reason = _stderr_tail(found.stderr)
        return None, f"{where}: its signer is not in {allowed_signers} ({reason})", hint
    reasons = []
    for principal in principals:
        verified = _ssh_keygen(
            [
                *("-Y", "verify", "-f", str(allowed_signers)),
                *("-I", principal, "-n", NAMESPACE, "-s", str(sig)),
            ],
            stdin=message,
            timeout=VERIFY_TIMEOUT,
            doing=f"verifying {where}",
        )
        if verified.returncode == 0:
            return principal, None, None
        reasons.append(f"{principal}: {_stderr_tail(verified.stderr)}")
    return None, f"{where}: signature not valid ({'; '.join(reasons)})", hint


def _contradiction(
    log: AuditLog, checkpoint: Checkpoint, path: Path, db: Path
) -> tuple[str | None, str | None]:
    """(problem, hint) if the log contradicts the (validly signed) checkpoint."""
    where = _where(checkpoint, path)
    rewritten = (
        f"the audit log {db} was tampered with after {where} was signed: keep the log and "
        "the checkpoint file as evidence, and compare the log with a copy (a backup's "
        "bbrx-audit.yml records the head too)"
    )
    head = log.head()
    first = log.event(1)
    if head is None or first is None:
        return (
            f"{where} signed seq {checkpoint.seq}, but the log ends at seq 0: its tail was "
            "truncated after the checkpoint was signed"
        ), rewritten
    if first["hash"] != checkpoint.log_id:
        return (
            f"{where} is of log {checkpoint.log_id}, but seq 1's hash in {db} is "
            f"{first['hash']}: the log was rewritten from seq 1, or the checkpoints are of "
            "another log"
        ), f"check that {path} is the checkpoint file of {db}; if it is, {rewritten}"
    row = log.event(checkpoint.seq)
    if row is None:
        if head.seq < checkpoint.seq:
            return (
                f"{where} signed seq {checkpoint.seq}, but the log ends at seq {head.seq}: "
                "its tail was truncated after the checkpoint was signed"
            ), rewritten
        return (
            f"{where} signed seq {checkpoint.seq}, which is not in the log (row deleted)"
        ), rewritten
    if row["hash"] != checkpoint.hash:
        return (
            f"seq {checkpoint.seq}'s hash is {row['hash']} but checkpoint {checkpoint.number} "
            f"(line {checkpoint.line} of {path}) signed {checkpoint.hash}: the log was "
            "rewritten (re-chained) since"
        ), rewritten
    return None, None
