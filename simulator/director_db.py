"""The simulated director database: a small SQL-dump-like text file, and `bosh vms` views of it.

The file is what the director job's backup script dumps and its restore script loads, so
it is plain text the bash scripts can copy byte for byte; Python only reads and writes it.
It holds three tables: `deployments`, `vms` and `manifests` (each deployment's manifest,
base64 so that any text fits on one line). Dumps written before the `manifests` table and
the `vms.index` column existed still load: a VM's index is then its place in its group.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

VM_COLUMNS = (
    "deployment",
    "instance",
    "index",
    "process_state",
    "az",
    "ips",
    "vm_cid",
    "vm_type",
)
MANIFEST_COLUMNS = ("deployment", "encoding", "text")

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
    index: int = 0  # within its instance group

    @property
    def group(self) -> str:
        return self.instance.partition("/")[0]

    @property
    def instance_id(self) -> str:
        return self.instance.partition("/")[2]


@dataclass(frozen=True)
class Deployment:
    name: str
    vms: list[Vm] = field(default_factory=list)
    manifest: str | None = None  # the manifest YAML text the director stores, if any


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
                str(vm.index),
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
    for deployment in deployments:
        if deployment.manifest is not None:
            encoded = base64.b64encode(deployment.manifest.encode("utf-8")).decode("ascii")
            row = (deployment.name, "base64", encoded)
            lines.append(
                f"INSERT INTO manifests ({', '.join(MANIFEST_COLUMNS)}) "
                f"VALUES ({', '.join(_quote(v) for v in row)});"
            )
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


def parse_dump(text: str) -> list[Deployment]:
    """Deployments in file order. Lines that are not INSERTs we know are skipped."""
    order: list[str] = []
    vms: dict[str, list[Vm]] = {}
    manifests: dict[str, str] = {}
    # Per (deployment, group): how many VMs seen so far, the index of a VM an old dump
    # (no index column) lists next.
    seen: dict[tuple[str, str], int] = {}
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
            group = row["instance"].partition("/")[0]
            position = seen.get((name, group), 0)
            seen[(name, group)] = position + 1
            index = row.get("index", str(position))
            if not index.isdigit():
                log.warning("director database line %d has index %r; skipped", number, index)
                continue
            vms[name].append(
                Vm(
                    instance=row["instance"],
                    process_state=row["process_state"],
                    az=row["az"],
                    ips=tuple(ip for ip in row["ips"].split(",") if ip),
                    vm_cid=row["vm_cid"],
                    vm_type=row["vm_type"],
                    index=int(index),
                )
            )
        elif table == "manifests":
            manifest = _decode_manifest(row, number)
            if manifest is not None:
                manifests[row.get("deployment", "")] = manifest
    return [Deployment(name, vms[name], manifests.get(name)) for name in order]


def _decode_manifest(row: dict[str, str], number: int) -> str | None:
    if row.get("encoding") != "base64":
        log.warning("director database line %d: unknown manifest encoding; skipped", number)
        return None
    try:
        return base64.b64decode(row["text"], validate=True).decode("utf-8")
    except (KeyError, binascii.Error, UnicodeDecodeError):
        log.warning("director database line %d: undecodable manifest; skipped", number)
        return None


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
