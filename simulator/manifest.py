"""A BOSH v2 manifest, read as bbr reads it: groups, instance counts, jobs and releases.

Only that subset is read (and `vm_type`, for `bbrx sim vms`); everything else a manifest
holds is left alone. The reader refuses what it cannot simulate safely rather than
guessing: a name that is not one safe path component (names become directories of the
VM trees), a count that is not a small whole number, a duplicate group, YAML anchors and
aliases, a file over MANIFEST_CAP. Each refusal names the file and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from orchestrator.bbr.safeyaml import YamlRefused, describe_cap, load
from orchestrator.errors import UsageError

MANIFEST_CAP = 1 << 20
# Per instance group: enough for a large deployment (the scale benchmark deploys 100),
# small enough that a typo cannot fill the disk with VM trees.
MAX_INSTANCES = 200
MAX_VMS = 200  # per deployment
#: Deployment, group, job and release names: one path component, no dot-dot, no slash.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
NAME_RULE = "1-63 characters of a-z, 0-9, '_', '.' or '-', starting with a letter or digit"
_VM_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@dataclass(frozen=True)
class JobSpec:
    name: str
    release: str
    backup_one_restore_all: bool = False


@dataclass(frozen=True)
class GroupSpec:
    name: str
    instances: int
    jobs: tuple[JobSpec, ...]
    vm_type: str = "default"


@dataclass(frozen=True)
class Manifest:
    name: str
    groups: tuple[GroupSpec, ...]
    text: str  # as given: what the director stores and serves back

    def group(self, name: str) -> GroupSpec | None:
        return next((g for g in self.groups if g.name == name), None)


def read_manifest(path: Path) -> str:
    """The text of a manifest file, refused if missing, unreadable or over the cap."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MANIFEST_CAP + 1)
    except OSError as error:
        raise UsageError(f"cannot read the manifest {path}: {error.strerror or error}") from None
    if len(data) > MANIFEST_CAP:
        raise UsageError(
            f"{path}: the manifest is over the {describe_cap(MANIFEST_CAP)} cap",
            hint="A BOSH manifest is a few KiB; is this the right file?",
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: the manifest is not UTF-8 (byte {error.start})") from None


def parse_manifest(text: str, *, source: str, deployment: str) -> Manifest:
    """The manifest in `text` (from `source`, for messages), for deployment `deployment`."""
    try:
        document = load(text, cap=MANIFEST_CAP)
    except YamlRefused as error:
        raise UsageError(f"{source}: the manifest is refused: {error}") from None
    return _Reader(source).manifest(document, deployment, text)


class _Reader:
    """Walks the loaded document; each refusal names the file and the field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def refuse(self, field: str, problem: str, hint: str | None = None) -> UsageError:
        return UsageError(f"{self.source}: {field} {problem}", hint=hint)

    def manifest(self, document: object, deployment: str, text: str) -> Manifest:
        if not isinstance(document, dict):
            raise self.refuse("the manifest", f"must be a YAML mapping (it is {_kind(document)})")
        if "jobs" in document and "instance_groups" not in document:
            raise self.refuse(
                "jobs",
                "is a v1 manifest's list: the simulator reads v2 manifests only",
                hint="Give the groups as instance_groups[].name/instances/jobs[].",
            )
        name = self.name(document.get("name"), "name")
        if name != deployment:
            raise self.refuse(
                "name",
                f"is {name!r}, not the deployment {deployment!r}",
                hint=f"Deploy it as {name}, or set name: {deployment} in the manifest.",
            )
        releases = self.releases(document.get("releases"))
        groups = document.get("instance_groups")
        if not isinstance(groups, list):
            raise self.refuse("instance_groups", f"must be a list (it is {_kind(groups)})")
        parsed: list[GroupSpec] = []
        for number, group in enumerate(groups):
            spec = self.group(group, f"instance_groups[{number}]", releases)
            if any(g.name == spec.name for g in parsed):
                raise self.refuse(
                    f"instance_groups[{number}].name", f"{spec.name!r} is a duplicate"
                )
            parsed.append(spec)
        total = sum(g.instances for g in parsed)
        if total > MAX_VMS:
            raise self.refuse(
                "instance_groups", f"ask for {total} VMs; the simulator makes at most {MAX_VMS}"
            )
        return Manifest(name, tuple(parsed), text)

    def releases(self, value: object) -> set[str]:
        if not isinstance(value, list):
            raise self.refuse("releases", f"must be a list (it is {_kind(value)})")
        names = set()
        for number, release in enumerate(value):
            where = f"releases[{number}]"
            if not isinstance(release, dict):
                raise self.refuse(where, f"must be a mapping (it is {_kind(release)})")
            names.add(self.name(release.get("name"), f"{where}.name"))
        return names

    def group(self, value: object, where: str, releases: set[str]) -> GroupSpec:
        if not isinstance(value, dict):
            raise self.refuse(where, f"must be a mapping (it is {_kind(value)})")
        name = self.name(value.get("name"), f"{where}.name")
        instances = value.get("instances")
        if isinstance(instances, bool) or not isinstance(instances, int) or instances < 0:
            raise self.refuse(
                f"{where}.instances", f"must be a whole number ≥ 0 (it is {instances!r})"
            )
        if instances > MAX_INSTANCES:
            raise self.refuse(
                f"{where}.instances", f"is {instances}; the simulator makes at most {MAX_INSTANCES}"
            )
        jobs = value.get("jobs")
        if not isinstance(jobs, list):
            raise self.refuse(f"{where}.jobs", f"must be a list (it is {_kind(jobs)})")
        specs: list[JobSpec] = []
        for number, job in enumerate(jobs):
            spec = self.job(job, f"{where}.jobs[{number}]", releases)
            if any(s.name == spec.name for s in specs):
                raise self.refuse(f"{where}.jobs[{number}].name", f"{spec.name!r} is a duplicate")
            specs.append(spec)
        vm_type = value.get("vm_type")
        if not (isinstance(vm_type, str) and _VM_TYPE.fullmatch(vm_type)):
            vm_type = "default"  # not read by bbr; only shown by `sim vms`
        return GroupSpec(name, instances, tuple(specs), vm_type)

    def job(self, value: object, where: str, releases: set[str]) -> JobSpec:
        if not isinstance(value, dict):
            raise self.refuse(where, f"must be a mapping (it is {_kind(value)})")
        name = self.name(value.get("name"), f"{where}.name")
        release = self.name(value.get("release"), f"{where}.release")
        if release not in releases:
            raise self.refuse(
                f"{where}.release",
                f"{release!r} is not in releases",
                hint=f"Releases: {', '.join(sorted(releases)) or 'none'}",
            )
        properties = value.get("properties")
        if properties is None:
            return JobSpec(name, release)
        if not isinstance(properties, dict):
            raise self.refuse(
                f"{where}.properties", f"must be a mapping (it is {_kind(properties)})"
            )
        bbr = properties.get("bbr")
        if bbr is None:
            return JobSpec(name, release)
        if not isinstance(bbr, dict):
            raise self.refuse(f"{where}.properties.bbr", f"must be a mapping (it is {_kind(bbr)})")
        flag = bbr.get("backup_one_restore_all", False)
        if not isinstance(flag, bool):
            raise self.refuse(
                f"{where}.properties.bbr.backup_one_restore_all",
                f"must be true or false (it is {flag!r})",
            )
        return JobSpec(name, release, flag)

    def name(self, value: object, where: str) -> str:
        if not isinstance(value, str):
            raise self.refuse(
                where, f"must be a name (it is {_kind(value)})", hint=f"A name is {NAME_RULE}."
            )
        if not NAME_PATTERN.fullmatch(value):
            raise self.refuse(
                where, f"{value!r} is not a safe name", hint=f"A name is {NAME_RULE}."
            )
        return value


def _kind(value: object) -> str:
    if value is None:
        return "missing"
    return _KINDS.get(type(value), f"a {type(value).__name__}")


_KINDS = {
    dict: "a mapping",
    list: "a list",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
}
