"""The simulated director database: a small SQL-dump-like text file, and `bosh vms` views of it.

The file is what the director job's backup script dumps and its restore script loads, so
it is plain text the bash scripts can copy byte for byte; Python only reads and writes it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

VM_COLUMNS = ("deployment", "instance", "process_state", "az", "ips", "vm_cid", "vm_type")

_INSERT = re.compile(r"^INSERT INTO (\w+) \(([^)]*)\) VALUES \((.*)\);$")
_VALUE = re.compile(r"'((?:[^']|'')*)'")


@dataclass(frozen=True)
class Vm:
    """One row of `bosh vms`."""

    instance: str  # "name/uuid"
    process_state: str
    az: str
    ips: tuple[str, ...]
    vm_cid: str
    vm_type: str


@dataclass(frozen=True)
class Deployment:
    name: str
    vms: list[Vm] = field(default_factory=list)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def render_dump(deployments: Iterable[Deployment]) -> str:
    """The database file for these deployments."""
    lines = [
        "-- bbr-sim director database dump (simulated; not a real PostgreSQL dump)",
        "BEGIN;",
    ]
    deployments = list(deployments)
    for deployment in deployments:
        lines.append(f"INSERT INTO deployments (name) VALUES ({_quote(deployment.name)});")
    for deployment in deployments:
        for vm in deployment.vms:
            values = (
                deployment.name,
                vm.instance,
                vm.process_state,
                vm.az,
                ",".join(vm.ips),
                vm.vm_cid,
                vm.vm_type,
            )
            lines.append(
                f"INSERT INTO vms ({', '.join(VM_COLUMNS)}) "
                f"VALUES ({', '.join(_quote(v) for v in values)});"
            )
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


def parse_dump(text: str) -> list[Deployment]:
    """Deployments in file order. Lines that are not INSERTs we know are skipped."""
    order: list[str] = []
    vms: dict[str, list[Vm]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        match = _INSERT.match(line.strip())
        if not match:
            continue
        table = match.group(1)
        columns = [c.strip() for c in match.group(2).split(",")]
        values = [v.replace("''", "'") for v in _VALUE.findall(match.group(3))]
        if len(columns) != len(values):
            log.warning("director database line %d is malformed; skipped", number)
            continue
        row = dict(zip(columns, values, strict=True))
        if table == "deployments":
            if row["name"] not in vms:
                order.append(row["name"])
                vms[row["name"]] = []
        elif table == "vms":
            name = row["deployment"]
            if name not in vms:
                order.append(name)
                vms[name] = []
            vms[name].append(
                Vm(
                    instance=row["instance"],
                    process_state=row["process_state"],
                    az=row["az"],
                    ips=tuple(ip for ip in row["ips"].split(",") if ip),
                    vm_cid=row["vm_cid"],
                    vm_type=row["vm_type"],
                )
            )
    return [Deployment(name, vms[name]) for name in order]


def render_vms_table(deployments: Iterable[Deployment]) -> str:
    """`bosh vms`-like text: per deployment a heading, an aligned table and a count."""
    headers = ("Instance", "Process State", "AZ", "IPs", "VM CID", "VM Type")
    blocks: list[str] = []
    for deployment in deployments:
        rows = [
            (vm.instance, vm.process_state, vm.az, ",".join(vm.ips), vm.vm_cid, vm.vm_type)
            for vm in deployment.vms
        ]
        widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
        table = [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in [headers, *rows]
        ]
        count = len(rows)
        blocks.append(
            "\n".join(
                [
                    f"Deployment '{deployment.name}'",
                    "",
                    *table,
                    "",
                    f"{count} vm{'s' * (count != 1)}",
                ]
            )
        )
    return "\n\n".join(blocks) + "\n"
