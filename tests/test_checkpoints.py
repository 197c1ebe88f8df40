"""Signed checkpoints of the audit log (audit/checkpoint.py), with real parts only: real
ssh-keygen keys and signatures, the real six-run log of tests/reviewlog.py, and attacks
made with the plain sqlite3 command-line tool."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from audit import AuditError, AuditLog, verify_log
from audit.checkpoint import (
    NAMESPACE,
    Checkpoint,
    read_checkpoints,
    sign_checkpoint,
    verify_checkpoints,
)
from audit.schema import GENESIS_HASH, TRIGGERS, row_hash
from tests import reviewlog
from tests.reviewlog import ReviewLog
from tests.test_readme import checkpoint_recipe

# The shared real log (built once a session), as fixtures of this module.
_review_log_master = reviewlog._review_log_master
review_log = reviewlog.review_log

SQLITE = "/usr/bin/sqlite3"
PRINCIPAL = "reviewer@example.com"
EVENT_TRIGGERS = [name for name in TRIGGERS if not name.startswith("events_meta_")]
# What a writer supplies to AuditLog.append; the rest (seq, ts, hashes) append makes.
NOT_APPENDED = {"seq", "ts", "prev_hash", "hash"}

# The reviewer's procedure, as the README gives it: nothing but bash, awk, ssh-keygen, sqlite3.
RECIPE = checkpoint_recipe()


@dataclass(frozen=True)
class Keys:
    good: Path  # an unencrypted ed25519 key listed in `allowed`
    other: Path  # an unencrypted key listed nowhere
    locked: Path  # a key with passphrase "secret", listed in `allowed` too
    allowed: Path  # allowed signers: PRINCIPAL for good, locked@example.com for locked

    def allowed_with(self, tmp: Path, options: str) -> Path:
        """An allowed signers file listing the good key with ``options``."""
        path = tmp / f"allowed-{len(options)}"
        path.write_text(f"{PRINCIPAL} {options} {self.good.with_suffix('.pub').read_text()}")
        return path


def _keygen(path: Path, passphrase: str = "") -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", path.name, "-f", str(path)],
        check=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    return path


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    tmp = tmp_path_factory.mktemp("checkpoint-keys")
    good, other = _keygen(tmp / "good"), _keygen(tmp / "other")
    locked = _keygen(tmp / "locked", "secret")
    allowed = tmp / "allowed_signers"
    allowed.write_text(
        f"{PRINCIPAL} {good.with_suffix('.pub').read_text()}"
        f"locked@example.com {locked.with_suffix('.pub').read_text()}"
    )
    return Keys(good, other, locked, allowed)


def head(db: Path) -> tuple[int, str]:
    with AuditLog(db, readonly=True) as log:
        event = log.head()
    assert event is not None
    return event.seq, event.hash


def append_copies(db: Path, count: int, like_seq: int = 5) -> None:
    """Append ``count`` rows with the columns of row ``like_seq``, as a run would."""
    with AuditLog(db) as log:
        row = log.event(like_seq)
        assert row is not None
        for _ in range(count):
            log.append(**{k: v for k, v in row.items() if k not in NOT_APPENDED})


def sqlite_cli(db: Path, sql: str) -> None:
    """Run ``sql`` with the plain sqlite3 command-line tool, as an attacker would."""
    subprocess.run([SQLITE, str(db)], input=sql, text=True, check=True, timeout=30)


def tamper(db: Path, sql: str) -> None:
    """``sql`` run with the append-only triggers dropped, then recreated exactly as bbrx
    wrote them (so verify_log judges the chain alone)."""
    drop = "".join(f"DROP TRIGGER {name};\n" for name in EVENT_TRIGGERS)
    create = "".join(f"{TRIGGERS[name]};\n" for name in EVENT_TRIGGERS)
    sqlite_cli(db, f"{drop}{sql}\n{create}")


def rechain(db: Path, from_seq: int) -> None:
    """Recompute every hash from ``from_seq`` on, as a forger would (Python's sqlite3)."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        with conn:
            for name in EVENT_TRIGGERS:
                conn.execute(f"DROP TRIGGER {name}")
            before = conn.execute("SELECT hash FROM events WHERE seq = ?", [from_seq - 1])
            found = before.fetchone()
            prev = found[0] if found else GENESIS_HASH
            rows = conn.execute("SELECT * FROM events WHERE seq >= ? ORDER BY seq", [from_seq])
            for row in [dict(r) for r in rows]:
                row["prev_hash"] = prev
                prev = row_hash(row)
                conn.execute(
                    "UPDATE events SET prev_hash = ?, hash = ? WHERE seq = ?",
                    [row["prev_hash"], prev, row["seq"]],
                )
            for name in EVENT_TRIGGERS:
                conn.execute(TRIGGERS[name])
    finally:
        conn.close()


def run_recipe(
    tmp: Path, checkpoints: Path, allowed: Path, db: Path
) -> subprocess.CompletedProcess[str]:
    script = tmp / "check-checkpoints.sh"
    script.write_text(RECIPE)
    return subprocess.run(
        ["bash", str(script), str(checkpoints), str(allowed), str(db)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


# -- signing and verifying -----------------------------------------------------------------


def test_sign_then_verify(review_log: ReviewLog, keys: Keys, tmp_path: Path) -> None:
    db, out = review_log.path, tmp_path / "checkpoints"
    seq, hash_ = head(db)
    old_umask = os.umask(0o077)
    try:
        checkpoint = sign_checkpoint(db, keys.good, out)
    finally:
        os.umask(old_umask)
    with AuditLog(db, readonly=True) as log:
        first = log.event(1)
    assert first is not None
    assert (checkpoint.number, checkpoint.line, checkpoint.seq) == (1, 1, seq)
    assert checkpoint.hash == hash_ and checkpoint.log_id == first["hash"]
    assert checkpoint.payload == (
        f"bbrx-audit-checkpoint 1 log_id={first['hash']} seq={seq} hash={hash_} "
        f"time={checkpoint.time}\n"
    )
    assert datetime.strptime(checkpoint.time, "%Y-%m-%dT%H:%M:%S.%fZ")
    assert checkpoint.signature.startswith("-----BEGIN SSH SIGNATURE-----\n")
    assert checkpoint.signature.endswith("-----END SSH SIGNATURE-----\n")
    assert out.read_text() == checkpoint.payload + checkpoint.signature
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # whatever the umask
    assert read_checkpoints(out) == [checkpoint]

    report = verify_checkpoints(db, out, keys.allowed)
    assert report.ok, report.lines()
    assert (report.checked, report.first_bad, report.problem) == (1, None, None)
    assert report.signers == (PRINCIPAL,)
    assert report.lines() == [
        f"1 checkpoint verified, latest seq {seq} signed by {PRINCIPAL} at {checkpoint.time}"
    ]


def test_second_checkpoint_after_more_rows(
    review_log: ReviewLog, keys: Keys, tmp_path: Path
) -> None:
    db, out = review_log.path, tmp_path / "checkpoints"
    first = sign_checkpoint(db, keys.good, out)
    append_copies(db, 3)
    second = sign_checkpoint(db, keys.good, out)
    assert second.number == 2 and second.seq == first.seq + 3
    assert second.line == 1 + len(first.payload.splitlines() + first.signature.splitlines())
    assert second.log_id == first.log_id
    assert out.read_text().splitlines()[second.line - 1] == second.payload.rstrip("\n")
    assert read_checkpoints(out) == [first, second]
    report = verify_checkpoints(db, out, keys.allowed)
    assert report.ok and report.checked == 2, report.lines()
    assert report.lines() == [
        f"2 checkpoints verified, latest seq {second.seq} signed by {PRINCIPAL} at {second.time}"
    ]


def test_namespaces_option(review_log: ReviewLog, keys: Keys, tmp_path: Path) -> None:
    out = tmp_path / "checkpoints"
    sign_checkpoint(review_log.path, keys.good, out)
    allowed = keys.allowed_with(tmp_path, f'namespaces="{NAMESPACE}"')
    assert verify_checkpoints(review_log.path, out, allowed).ok
    git_only = keys.allowed_with(tmp_path, 'namespaces="git"')
    report = verify_checkpoints(review_log.path, out, git_only)
    assert not report.ok and report.first_bad is not None and report.first_bad.number == 1
    assert report.problem is not None
    assert "signature not valid" in report.problem
    assert 'not permitted for use in signature namespace "bbrx-audit"' in report.problem


def test_signed_by_a_key_not_allowed(review_log: ReviewLog, keys: Keys, tmp_path: Path) -> None:
    db, out = review_log.path, tmp_path / "checkpoints"
    sign_checkpoint(db, keys.good, out)
    append_copies(db, 1)
    intruder = sign_checkpoint(db, keys.other, out)
    report = verify_checkpoints(db, out, keys.allowed)
    assert not report.ok and report.checked == 1
    assert report.first_bad == intruder
    assert report.problem == (
        f"checkpoint 2 (line {intruder.line} of {out}): its signer is not in {keys.allowed} "
        "(No principal matched.)"
    )
    lines = report.lines()
    assert lines[0] == report.problem and lines[1] == "1 checkpoint before it verified"
    assert lines[2].startswith("what to do: the checkpoint was signed by a key not in")


@pytest.mark.parametrize("field", ["seq", "hash"])
def test_forged_payload(review_log: ReviewLog, keys: Keys, tmp_path: Path, field: str) -> None:
    """The payload line edited after signing, to an older head the log really holds: only
    the signature can tell, and it does."""
    db, out = review_log.path, tmp_path / "checkpoints"
    real = sign_checkpoint(db, keys.good, out)
    with AuditLog(db, readonly=True) as log:
        older = log.event(real.seq - 1)
    assert older is not None
    if field == "seq":
        forged = real.payload.replace(f"seq={real.seq} ", f"seq={real.seq - 1} ")
        forged = forged.replace(f"hash={real.hash}", f"hash={older['hash']}")
    else:
        forged = real.payload.replace(f"hash={real.hash}", f"hash={'0' * 64}")
    assert forged != real.payload
    out.write_text(forged + real.signature)
    report = verify_checkpoints(db, out, keys.allowed)
    assert not report.ok and report.first_bad is not None
    assert report.first_bad.number == 1 and report.first_bad.payload == forged
    assert report.problem == (
        f"checkpoint 1 (line 1 of {out}): signature not valid "
        f"({PRINCIPAL}: Signature verification failed: incorrect signature)"
    )


# -- refusals ------------------------------------------------------------------------------


# Each case: how to spoil a file of one checkpoint (N lines), the line the error names
# (given N), and words it must say.
MALFORMED: dict[str, tuple[Callable[[str], str], Callable[[int], int], str]] = {
    "garbage": (lambda t: "hello\n" + t, lambda n: 1, "expected a checkpoint line starting"),
    "no signature": (
        lambda t: t.splitlines(keepends=True)[0],
        lambda n: 2,
        "found the end of the file",
    ),
    "no end line": (
        lambda t: "".join(t.splitlines(keepends=True)[:-1]),
        lambda n: 1,
        "has no '-----END SSH SIGNATURE-----' line before the end of the file",
    ),
    "uppercase hex": (
        lambda t: t.replace("log_id=", "log_id=A", 1),
        lambda n: 1,
        "log_id must be 64 lowercase hex digits",
    ),
    "leading zero": (
        lambda t: t.replace(" seq=", " seq=0", 1),
        lambda n: 1,
        "seq must be a sequence number",
    ),
    "version 2": (
        lambda t: t.replace("checkpoint 1 ", "checkpoint 2 ", 1),
        lambda n: 1,
        "checkpoint format version '2' is not one this bbrx knows",
    ),
    "field order": (
        lambda t: t.replace(" seq=", " sequence=", 1),
        lambda n: 1,
        "expected 'bbrx-audit-checkpoint 1 log_id=... seq=... hash=... time=...'",
    ),
    "bad date": (
        lambda t: re.sub(r"time=\S+", "time=2026-02-30T00:00:00.000000Z", t, count=1),
        lambda n: 1,
        "time '2026-02-30T00:00:00.000000Z' is not a valid date",
    ),
    "not base64": (
        lambda t: t.replace("SIGNATURE-----\n", "SIGNATURE-----\nnot base64\n", 1),
        lambda n: 3,
        "expected base64 signature text",
    ),
    "blank line": (lambda t: t + "\n" + t, lambda n: n + 1, "expected a checkpoint line"),
    "no newline at end": (lambda t: t.rstrip("\n"), lambda n: n, "no newline after it"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_file(review_log: ReviewLog, keys: Keys, tmp_path: Path, case: str) -> None:
    out = tmp_path / "checkpoints"
    sign_checkpoint(review_log.path, keys.good, out)
    text = out.read_text()
    change, line_of, words = MALFORMED[case]
    line = line_of(len(text.splitlines()))
    out.write_text(change(text))
    with pytest.raises(AuditError) as raised:
        read_checkpoints(out)
    assert raised.value.message.startswith(f"checkpoint file {out}, line {line}: "), raised.value
    assert words in raised.value.message
    with pytest.raises(AuditError, match=f"line {line}: "):
        verify_checkpoints(review_log.path, out, keys.allowed)
    before = out.read_bytes()
    with pytest.raises(AuditError, match=f"line {line}: "):
        sign_checkpoint(review_log.path, keys.good, out)  # nothing appended to a bad file
    assert out.read_bytes() == before


def test_checkpoints_of_another_log(review_log: ReviewLog, keys: Keys, tmp_path: Path) -> None:
    out = tmp_path / "checkpoints"
    ours = sign_checkpoint(review_log.path, keys.good, out)
    other = tmp_path / "other.db"
    with AuditLog(review_log.path, readonly=True) as log:
        row = log.event(1)
    assert row is not None
    with AuditLog(other) as log:
        log.append(**{k: v for k, v in row.items() if k not in NOT_APPENDED})
    with AuditLog(other, readonly=True) as log:
        other_first = log.event(1)
    assert other_first is not None and other_first["hash"] != ours.log_id
    before = out.read_bytes()
    with pytest.raises(AuditError) as raised:
        sign_checkpoint(other, keys.good, out)
    assert f"{out} holds checkpoints of another log" in raised.value.message
    assert ours.log_id in raised.value.message and other_first["hash"] in raised.value.message
    assert out.read_bytes() == before

    report = verify_checkpoints(other, out, keys.allowed)
    assert not report.ok and report.first_bad == ours
    assert report.problem == (
        f"checkpoint 1 (line 1 of {out}) is of log {ours.log_id}, but seq 1's hash in "
        f"{other} is {other_first['hash']}: the log was rewritten from seq 1, or the "
        "checkpoints are of another log"
    )


def test_empty_log_refused(keys: Keys, tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    AuditLog(db).close()
    with pytest.raises(AuditError, match=f"the audit log {db} has no rows: there is no head"):
        sign_checkpoint(db, keys.good, tmp_path / "checkpoints")
    assert not (tmp_path / "checkpoints").exists()


def test_broken_log_refused(review_log: ReviewLog, keys: Keys, tmp_path: Path) -> None:
    tamper(review_log.path, "UPDATE events SET operator = 'mallory' WHERE seq = 10;")
    with pytest.raises(AuditError) as raised:
        sign_checkpoint(review_log.path, keys.good, tmp_path / "checkpoints")
    assert "refusing to sign" in raised.value.message
    assert "seq 10: hash does not match its content (row edited)" in raised.value.message
    assert not (tmp_path / "checkpoints").exists()


def test_passphrase_key_without_agent(
    review_log: ReviewLog, keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No agent, no terminal: refused at once, without asking anyone (not even an askpass
    program a desktop session would offer)."""
    marker = tmp_path / "askpass-ran"
    askpass = tmp_path / "askpass"
    askpass.write_text(f"#!/bin/sh\ntouch {marker}\necho secret\n")
    askpass.chmod(0o755)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.setenv("DISPLAY", ":99")
    monkeypatch.setenv("SSH_ASKPASS", str(askpass))
    out = tmp_path / "checkpoints"
    started = time.monotonic()
    with pytest.raises(AuditError) as raised:
        sign_checkpoint(review_log.path, keys.locked, out)
    assert time.monotonic() - started < 10
    message = str(raised.value)
    assert f"cannot sign with {keys.locked}: the key is protected by a passphrase" in message
    assert "incorrect passphrase supplied to decrypt private key" in message  # ssh-keygen's
    assert "ssh-agent" in message and "unencrypted key" in message
    assert not marker.exists()
    assert not out.exists()


def test_passphrase_key_in_agent(review_log: ReviewLog, keys: Keys, tmp_path: Path) -> None:
    """The documented way to use a protected key: ssh-agent holds it, --key is its .pub."""
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(
        ["ssh-agent", "-D", "-a", str(sock)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        askpass = tmp_path / "askpass"
        askpass.write_text("#!/bin/sh\necho secret\n")
        askpass.chmod(0o755)
        env = {
            **os.environ,
            "SSH_AUTH_SOCK": str(sock),
            "SSH_ASKPASS": str(askpass),
            "SSH_ASKPASS_REQUIRE": "force",
        }
        subprocess.run(
            ["ssh-add", "-q", str(keys.locked)],
            env=env,
            check=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out = tmp_path / "checkpoints"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SSH_AUTH_SOCK", str(sock))
            checkpoint = sign_checkpoint(review_log.path, keys.locked.with_suffix(".pub"), out)
        report = verify_checkpoints(review_log.path, out, keys.allowed)
        assert report.ok and report.signers == ("locked@example.com",), report.lines()
        assert report.latest == checkpoint
    finally:
        agent.terminate()
        agent.wait(timeout=10)


def test_output_and_key_refused(
    review_log: ReviewLog, keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = review_log.path
    missing_dir = tmp_path / "nowhere"
    with pytest.raises(AuditError, match=f"the directory {missing_dir} does not exist"):
        sign_checkpoint(db, keys.good, missing_dir / "checkpoints")
    assert not missing_dir.exists()
    with pytest.raises(AuditError, match=f"{tmp_path}: it is not a regular file"):
        sign_checkpoint(db, keys.good, tmp_path)
    with pytest.raises(AuditError, match=f"no key file at {tmp_path / 'nokey'}"):
        sign_checkpoint(db, tmp_path / "nokey", tmp_path / "checkpoints")
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    with pytest.raises(AuditError) as raised:
        sign_checkpoint(db, keys.good, tmp_path / "checkpoints")
    assert "ssh-keygen is not on PATH" in str(raised.value)
    assert "Install openssh-client" in str(raised.value)
    assert not (tmp_path / "checkpoints").exists()


def test_verify_refuses_missing_files(review_log: ReviewLog, keys: Keys, tmp_path: Path) -> None:
    db, out = review_log.path, tmp_path / "checkpoints"
    with pytest.raises(AuditError, match=f"no checkpoint file at {out}"):
        verify_checkpoints(db, out, keys.allowed)
    out.write_text("")
    report = verify_checkpoints(db, out, keys.allowed)
    assert not report.ok and report.checked == 0 and report.first_bad is None
    assert report.problem == f"no checkpoints in {out}"
    assert report.lines()[0] == report.problem
    sign_checkpoint(db, keys.good, out)
    missing = tmp_path / "allowed_signers"
    with pytest.raises(AuditError, match=f"cannot read the allowed signers file {missing}"):
        verify_checkpoints(db, out, missing)


def test_concurrent_signers_append_whole_blocks(
    review_log: ReviewLog, keys: Keys, tmp_path: Path
) -> None:
    out = tmp_path / "checkpoints"
    errors: list[BaseException] = []

    def sign() -> None:
        try:
            sign_checkpoint(review_log.path, keys.good, out)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=sign) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    listed = read_checkpoints(out)
    assert [c.number for c in listed] == [1, 2, 3, 4]
    report = verify_checkpoints(review_log.path, out, keys.allowed)
    assert report.ok and report.checked == 4, report.lines()


# -- the six attacks -----------------------------------------------------------------------


@dataclass(frozen=True)
class Signed:
    db: Path
    checkpoints: Path
    first: Checkpoint  # at the review log's head
    second: Checkpoint  # four rows later


@pytest.fixture
def signed(review_log: ReviewLog, keys: Keys, tmp_path: Path) -> Signed:
    out = tmp_path / "checkpoints"
    first = sign_checkpoint(review_log.path, keys.good, out)
    append_copies(review_log.path, 4)
    second = sign_checkpoint(review_log.path, keys.good, out)
    return Signed(review_log.path, out, first, second)


def edit(s: Signed) -> None:
    tamper(s.db, "UPDATE events SET operator = 'mallory' WHERE seq = 10;")


def delete(s: Signed) -> None:
    tamper(s.db, "DELETE FROM events WHERE seq = 10;")


def reorder(s: Signed) -> None:
    tamper(
        s.db,
        "UPDATE events SET seq = -1 WHERE seq = 10;"
        "UPDATE events SET seq = 10 WHERE seq = 11;"
        "UPDATE events SET seq = 11 WHERE seq = -1;",
    )


def truncate(s: Signed) -> None:
    tamper(s.db, f"DELETE FROM events WHERE seq > {s.second.seq - 2};")


def rechain_edit(s: Signed) -> None:
    tamper(s.db, "UPDATE events SET reason = 'nothing to see' WHERE seq = 100;")
    rechain(s.db, 100)


def rechain_truncate(s: Signed) -> None:
    truncate(s)
    append_copies(s.db, 5)  # a valid chain past the second checkpoint's seq


@dataclass(frozen=True)
class Caught:
    chain_bad_seq: int | None  # what verify_log names (None: the chain verifies)
    chain_words: str
    checkpoint: int | None  # the checkpoint verify_checkpoints names (None: all verify)
    problem: Callable[[Signed], str]


ATTACKS: dict[str, tuple[Callable[[Signed], None], Caught]] = {
    "edit a row": (edit, Caught(10, "seq 10: hash does not match", None, lambda s: "")),
    "delete a row": (delete, Caught(10, "(row 10 deleted)", None, lambda s: "")),
    "reorder two rows": (reorder, Caught(10, "(rows reordered or removed)", None, lambda s: "")),
    "truncate the tail": (
        truncate,
        Caught(
            None,
            "",
            2,
            lambda s: (
                f"checkpoint 2 (line {s.second.line} of {s.checkpoints}) signed seq "
                f"{s.second.seq}, but the log ends at seq {s.second.seq - 2}: its tail was "
                "truncated after the checkpoint was signed"
            ),
        ),
    ),
    "re-chain after an edit": (
        rechain_edit,
        Caught(
            None,
            "",
            1,
            lambda s: (
                f"seq {s.first.seq}'s hash is {_hash_at(s.db, s.first.seq)} but checkpoint 1 "
                f"(line 1 of {s.checkpoints}) signed {s.first.hash}: the log was rewritten "
                "(re-chained) since"
            ),
        ),
    ),
    "re-chain after a truncation": (
        rechain_truncate,
        Caught(
            None,
            "",
            2,
            lambda s: (
                f"seq {s.second.seq}'s hash is {_hash_at(s.db, s.second.seq)} but checkpoint 2 "
                f"(line {s.second.line} of {s.checkpoints}) signed {s.second.hash}: the log "
                "was rewritten (re-chained) since"
            ),
        ),
    ),
}


def _hash_at(db: Path, seq: int) -> Any:
    with AuditLog(db, readonly=True) as log:
        row = log.event(seq)
    assert row is not None
    return row["hash"]


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_caught(signed: Signed, keys: Keys, tmp_path: Path, attack: str) -> None:
    make, caught = ATTACKS[attack]
    assert (
        verify_log(signed.db).ok
        and verify_checkpoints(signed.db, signed.checkpoints, keys.allowed).ok
    )
    make(signed)

    chain = verify_log(signed.db)
    if caught.chain_bad_seq is None:
        assert chain.ok, chain.problem  # the chain alone cannot tell
    else:
        assert not chain.ok and chain.first_bad_seq == caught.chain_bad_seq
        assert chain.problem is not None and caught.chain_words in chain.problem

    report = verify_checkpoints(signed.db, signed.checkpoints, keys.allowed)
    if caught.checkpoint is None:
        # The signed heads are intact; the chain below them is what caught it.
        assert report.ok, report.lines()
        return
    assert not report.ok and report.first_bad is not None
    assert report.first_bad.number == caught.checkpoint
    assert report.checked == caught.checkpoint - 1
    assert report.problem == caught.problem(signed)
    assert report.lines()[-1].startswith("what to do: the audit log")

    recipe = run_recipe(tmp_path, signed.checkpoints, keys.allowed, signed.db)
    assert recipe.returncode == 1, recipe
    assert f"checkpoint {caught.checkpoint}: MISMATCH" in recipe.stdout


# -- the reviewer's shell recipe -----------------------------------------------------------


def test_shell_recipe(signed: Signed, keys: Keys, tmp_path: Path) -> None:
    ok = run_recipe(tmp_path, signed.checkpoints, keys.allowed, signed.db)
    assert ok.returncode == 0, ok
    good = f'Good "bbrx-audit" signature for {PRINCIPAL} with ED25519 key SHA256:'
    lines = ok.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith(good) for line in lines[::2]), lines
    assert lines[1::2] == [
        f"checkpoint {c.number}: OK: seq {c.seq} hash {c.hash} signed by {PRINCIPAL} at {c.time}"
        for c in (signed.first, signed.second)
    ]
    # A forged payload: the signature no longer verifies.
    text = signed.checkpoints.read_text()
    forged = text.replace(f"seq={signed.second.seq} ", f"seq={signed.first.seq} ")
    forged = forged.replace(f"hash={signed.second.hash}", f"hash={signed.first.hash}")
    signed.checkpoints.write_text(forged)
    bad = run_recipe(tmp_path, signed.checkpoints, keys.allowed, signed.db)
    assert bad.returncode == 1, bad
    assert bad.stdout.splitlines()[-1] == "checkpoint 2: BAD SIGNATURE"
    # A checkpoint by a key that is not allowed.
    signed.checkpoints.write_text(text)
    sign_checkpoint(signed.db, keys.other, signed.checkpoints)
    stranger = run_recipe(tmp_path, signed.checkpoints, keys.allowed, signed.db)
    assert stranger.returncode == 1, stranger
    assert stranger.stdout.splitlines()[-1] == (
        f"checkpoint 3: NOT SIGNED by a key in {keys.allowed}"
    )


def test_imports_nothing_of_the_orchestrator() -> None:
    """The audit package stands alone: a reviewer verifies checkpoints without the rest."""
    probe = (
        "import sys, audit.checkpoint; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('orchestrator', 'simulator')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
