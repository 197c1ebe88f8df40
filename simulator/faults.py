"""Fault specs: what a fault file may say (lib.sh `sim_apply_fault` is the interpreter)."""

from __future__ import annotations

import re

from orchestrator.errors import TargetError

FAULT_GRAMMAR = "fail [EXIT_CODE [MESSAGE...]] | hang | sleep SECONDS"

# Not a script: a fault on the copy of a job's artifact between the VM and the jump box
# (a dropped connection), applied by SimInstance.stream_out / stream_in.
TRANSFER = "transfer"
TRANSFER_GRAMMAR = (
    "fail [MESSAGE...] (the connection drops mid-copy) | corrupt (one byte changes in flight,"
    " after the VM hashed it) | corrupt-local (a backup's copy changes on the jump box's disk"
    " after bbrx wrote it) | sleep SECONDS (the copy starts that much later: a slow link)"
)
_TRANSFER_FAIL = re.compile(r"^fail(?: (\S.*))?$")
# Between the VM's read (and digest) and the jump box: the link, a pipe, the copy.
CORRUPT = "corrupt"
# On the jump box, once the byte is in its file: a faulty disk, or another process writing
# there. A backup's copy only (a restore's local tar is checked against its metadata).
CORRUPT_LOCAL = "corrupt-local"
_SLEEP = re.compile(r"^sleep (\d+(?:\.\d+)?)$")


def validate_transfer_fault(spec: str) -> str:
    normalised = " ".join(spec.split())
    if normalised not in (CORRUPT, CORRUPT_LOCAL) and not (
        _TRANSFER_FAIL.match(normalised) or _SLEEP.match(normalised)
    ):
        raise TargetError(f"invalid transfer fault {spec!r}: expected {TRANSFER_GRAMMAR}")
    return normalised


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
    normalised = " ".join(spec.split())
    if "\n" in spec.strip() or not normalised:
        raise TargetError(f"invalid fault {spec!r}: expected {FAULT_GRAMMAR}")
    if normalised == "hang" or _SLEEP.match(normalised):
        return normalised
    match = _FAIL.match(normalised)
    if match:
        code = match.group(1)
        if code is not None and not 1 <= int(code) <= 255:
            raise TargetError(f"invalid fault {spec!r}: the exit code must be 1..255")
        return normalised
    raise TargetError(f"invalid fault {spec!r}: expected {FAULT_GRAMMAR}")
