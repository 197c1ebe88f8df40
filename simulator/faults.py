"""Fault specs: what a fault file may say (lib.sh `sim_apply_fault` is the interpreter)."""

from __future__ import annotations

import re

from orchestrator.errors import TargetError

FAULT_GRAMMAR = "fail [EXIT_CODE [MESSAGE...]] | hang | sleep SECONDS"

_FAIL = re.compile(r"^fail(?: (\d{1,3})(?: (\S.*))?)?$")
_SLEEP = re.compile(r"^sleep (\d+(?:\.\d+)?)$")


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
