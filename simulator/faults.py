"""Fault specs: what a fault file may say (lib.sh `sim_apply_fault` is the interpreter)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.errors import TargetError

FAULT_GRAMMAR = (
    "[after SECONDS] [call N] fail [EXIT_CODE [MESSAGE...]] | hang | sleep SECONDS | kill-bbrx"
    " (the bbrx running the script is SIGKILLed once the script has done its work)"
)
# A fault that fires at one moment: `call N SPEC` acts on the Nth call of the script (or
# the Nth copy, for a transfer fault) after it was set, and lets every other call be.
# The count is kept beside the fault file (`.SCRIPT.calls`), and restarts when it is set.
_CALL = re.compile(r"^call (\d{1,4}) (\S.*)$")
# `after SECONDS SPEC`: SPEC only for calls that start SECONDS or more after the fault was
# set (its file's modification time); earlier calls are neither affected nor counted.
_AFTER = re.compile(r"^after (\d{1,6}(?:\.\d{1,3})?) (\S.*)$")
# A script fault of the simulator only: the script does its work, and as it exits asks
# (a file named after its pid) that the process running it die; the simulator, which ran
# it, SIGKILLs itself once it has reaped the script, as a jump box that crashes or an
# operator's `kill -9` would leave a run at that phase. A script that names no runner as
# its parent (BBR_SIM_RUNNER_PID) refuses the fault, and a script ended by a signal asks
# nothing.
KILL_BBRX = "kill-bbrx"
RUNNER_PID_VAR = "BBR_SIM_RUNNER_PID"

# Not a script: a fault on the copy of a job's artifact between the VM and the jump box
# (a dropped connection), applied by SimInstance.stream_out / stream_in.
TRANSFER = "transfer"
TRANSFER_GRAMMAR = (
    "[after SECONDS] [call N] fail [MESSAGE...] (the connection drops mid-copy)"
    " | corrupt (one byte changes in flight, after the VM hashed it)"
    " | corrupt-local (a backup's copy changes on the jump box's disk after bbrx wrote it)"
    " | disk-full (the jump box's disk is full by the time bbrx writes this copy: its"
    " writes fail with ENOSPC) | sleep SECONDS (the copy starts that much later: a slow link)"
)
_TRANSFER_FAIL = re.compile(r"^fail(?: (\S.*))?$")
# Between the VM's read (and digest) and the jump box: the link, a pipe, the copy.
CORRUPT = "corrupt"
# On the jump box, once the byte is in its file: a faulty disk, or another process writing
# there. A backup's copy only (a restore's local tar is checked against its metadata).
CORRUPT_LOCAL = "corrupt-local"
# On the jump box: its disk fills up once the backup's copy holds DISK_FULL_AT bytes (or
# all of a shorter one), and every later write of the copy fails with a real ENOSPC.
DISK_FULL = "disk-full"
_SLEEP = re.compile(r"^sleep (\d+(?:\.\d+)?)$")


def split_after(normalised: str) -> tuple[float | None, str]:
    """(SECONDS, SPEC) of an `after SECONDS SPEC` fault; (None, the spec) of any other."""
    match = _AFTER.match(normalised)
    return (float(match.group(1)), match.group(2)) if match else (None, normalised)


def split_call(normalised: str) -> tuple[int | None, str]:
    """(N, SPEC) of a `call N SPEC` fault; (None, the spec) of one that acts on every call."""
    match = _CALL.match(normalised)
    return (int(match.group(1)), match.group(2)) if match else (None, normalised)


def calls_file(fault_file: Path) -> Path:
    """Where the calls of a `call N` fault are counted."""
    return fault_file.with_name(f".{fault_file.name}.calls")


def fires_now(fault_file: Path) -> str | None:
    """The spec a fault file gives this call of its script or copy: None when there is no
    fault, or it is a `call N` fault and this is not the Nth call (which is counted)."""
    try:
        normalised = " ".join(fault_file.read_text().split())
    except FileNotFoundError:
        return None
    delay, normalised = split_after(normalised)
    if delay is not None:
        try:
            armed_at = fault_file.stat().st_mtime + delay
        except FileNotFoundError:
            return None
        if time.time() < armed_at:
            return None
    number, spec = split_call(normalised)
    if number is None:
        return spec or None
    counter = calls_file(fault_file)
    try:
        done = int(counter.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        done = 0
    counter.write_text(f"{done + 1}\n")
    return spec if done + 1 == number else None


def validate_transfer_fault(spec: str) -> str:
    return _prefixed(spec, "transfer fault", _transfer_body)


def _transfer_body(spec: str) -> str:
    if spec not in (CORRUPT, CORRUPT_LOCAL, DISK_FULL) and not (
        _TRANSFER_FAIL.match(spec) or _SLEEP.match(spec)
    ):
        raise TargetError(f"invalid transfer fault {spec!r}: expected {TRANSFER_GRAMMAR}")
    return spec


def transfer_delay(spec: str | None) -> float | None:
    """The seconds a `sleep` transfer fault holds the copy back, else None."""
    match = _SLEEP.match(spec or "")
    return float(match.group(1)) if match else None


def transfer_failure_message(spec: str) -> str:
    match = _TRANSFER_FAIL.match(spec.strip())
    return (match.group(1) if match and match.group(1) else None) or "connection reset by peer"


_FAIL = re.compile(r"^fail(?: (\d{1,3})(?: (\S.*))?)?$")


def validate_fault(spec: str) -> str:
    """The normalised spec (single spaces), or TargetError naming the grammar."""
    if "\n" in spec.strip() or not spec.split():
        raise TargetError(f"invalid fault {spec!r}: expected {FAULT_GRAMMAR}")
    return _prefixed(spec, "fault", _script_body)


def _script_body(spec: str) -> str:
    if spec in ("hang", KILL_BBRX) or _SLEEP.match(spec):
        return spec
    match = _FAIL.match(spec)
    if match:
        code = match.group(1)
        if code is not None and not 1 <= int(code) <= 255:
            raise TargetError(f"invalid fault {spec!r}: the exit code must be 1..255")
        return spec
    raise TargetError(f"invalid fault {spec!r}: expected {FAULT_GRAMMAR}")


def _prefixed(spec: str, label: str, body: Callable[[str], str]) -> str:
    """`[after SECONDS] [call N] BODY`, normalised: the prefixes checked here, the body by
    `body` (a script's grammar, or a copy's)."""
    normalised = " ".join(spec.split())
    delay, rest = split_after(normalised)
    if delay is not None:
        seconds = normalised.split()[1]
        return f"after {seconds} {_prefixed(_no_second_after(spec, rest), label, body)}"
    number, rest = split_call(rest)
    if number is not None:
        if number < 1:
            raise TargetError(f"invalid {label} {spec!r}: calls are counted from 1")
        return f"call {number} {body(_no_prefix(spec, rest))}"
    return body(rest)


def _no_second_after(spec: str, rest: str) -> str:
    if split_after(rest)[0] is not None:
        raise TargetError(f"invalid fault {spec!r}: `after` may be given once")
    return rest


def _no_prefix(spec: str, rest: str) -> str:
    """`after` comes before `call`, and each is given once."""
    if split_after(rest)[0] is not None or split_call(rest)[0] is not None:
        raise TargetError(
            f"invalid fault {spec!r}: give `after SECONDS` first, then `call N`, each once"
        )
    return rest
