"""Job metadata and lock ordering: pure functions, no I/O.

A job's `metadata` script says which jobs it "should be locked before". The jobs form a
graph; Kahn's algorithm gives levels. Locks run level by level, unlocks in reverse.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from orchestrator.bbr import safeyaml
from orchestrator.errors import CyclicLockOrderError, MetadataError

_ORDER_KEYS = ("backup_should_be_locked_before", "restore_should_be_locked_before")
_DISCONTINUED = ("backup_name", "restore_name")


@dataclass(frozen=True)
class JobMetadata:
    """What one job's `metadata` script declared: the jobs it is locked before, each as
    (job name, release)."""

    backup_locked_before: tuple[tuple[str, str], ...] = ()
    restore_locked_before: tuple[tuple[str, str], ...] = ()
    skip_bbr_scripts: bool = False
    discontinued_keys: tuple[str, ...] = field(default=())

    def locked_before(self, operation: str) -> tuple[tuple[str, str], ...]:
        return self.restore_locked_before if operation == "restore" else self.backup_locked_before


def parse_metadata(job: str, text: str) -> JobMetadata:
    """Parse the YAML a `metadata` script printed, as strictly as bbr does."""
    hint = f"Fix the metadata script of job {job} (it must print a YAML mapping)."
    try:
        data = safeyaml.load(text, cap=safeyaml.SCRIPT_METADATA_CAP) if text.strip() else {}
    except safeyaml.YamlRefused as exc:
        what = "invalid YAML" if exc.invalid else "YAML that bbrx refuses"
        raise MetadataError(
            f"metadata script for job {job} printed {what}: {exc}", job=job, hint=hint
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MetadataError(
            f"metadata script for job {job} printed a {type(data).__name__}, not a mapping",
            job=job,
            hint=hint,
        )
    orders: dict[str, tuple[tuple[str, str], ...]] = {}
    for key in _ORDER_KEYS:
        entries = data.get(key) or []
        if not isinstance(entries, list):
            raise MetadataError(
                f"metadata of job {job}: {key} must be a list of {{job_name, release}}",
                job=job,
                hint=hint,
            )
        names = []
        for position, entry in enumerate(entries):
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("job_name"), str)
                or not isinstance(entry.get("release"), str)
                or not entry["job_name"]
                or not entry["release"]
            ):
                raise MetadataError(
                    f"metadata of job {job}: {key}[{position}] needs both job_name and release",
                    job=job,
                    hint=hint,
                )
            names.append((entry["job_name"], entry["release"]))
        orders[key] = tuple(names)
    skip = data.get("skip_bbr_scripts", False)
    if not isinstance(skip, bool):
        raise MetadataError(
            f"metadata of job {job}: skip_bbr_scripts must be true or false, not {skip!r}",
            job=job,
            hint=hint,
        )
    return JobMetadata(
        backup_locked_before=orders[_ORDER_KEYS[0]],
        restore_locked_before=orders[_ORDER_KEYS[1]],
        skip_bbr_scripts=skip,
        discontinued_keys=tuple(key for key in _DISCONTINUED if key in data),
    )


def lock_levels(
    jobs: Iterable[str],
    metadata: Mapping[str, JobMetadata],
    operation: str,
    *,
    identities: Mapping[str, tuple[str, str | None]] | None = None,
    match_release: bool = False,
) -> list[list[str]]:
    """Kahn levels of the "locked before" graph: level 0 locks first.

    `jobs` are the graph's nodes: job names (director mode), or labels when one run spans
    many instances, with `identities` giving each label's (job name, release); `metadata`
    is keyed the same.
    A constraint names a job; with `match_release` (deployment mode, as bbr) it must name
    its release too, so a job whose release is unknown matches no constraint. A constraint
    matches that job on every instance. Constraints naming absent jobs are ignored (bbr
    does the same). Raises `CyclicLockOrderError` naming a cycle when there is one.
    """
    known = identities or {}
    nodes = {name: known.get(name, (name, None)) for name in jobs}
    names = sorted(nodes)
    by_job: dict[str, list[str]] = {}
    for label in names:
        by_job.setdefault(nodes[label][0], []).append(label)
    successors: dict[str, set[str]] = {name: set() for name in names}
    for name in names:
        meta = metadata.get(name, JobMetadata())
        for later_job, release in meta.locked_before(operation):
            for later in by_job.get(later_job, []):
                if match_release and nodes[later][1] != release:
                    continue
                if later == name:
                    raise CyclicLockOrderError([name, name])
                successors[name].add(later)
    indegree = {name: 0 for name in names}
    for name in names:
        for later in successors[name]:
            indegree[later] += 1

    levels: list[list[str]] = []
    ready = sorted(name for name in names if indegree[name] == 0)
    placed = 0
    while ready:
        levels.append(ready)
        placed += len(ready)
        following = set()
        for name in ready:
            for later in successors[name]:
                indegree[later] -= 1
                if indegree[later] == 0:
                    following.add(later)
        ready = sorted(following)
    if placed != len(names):
        raise CyclicLockOrderError(_find_cycle({n for n in names if indegree[n] > 0}, successors))
    return levels


def _find_cycle(candidates: set[str], successors: Mapping[str, set[str]]) -> list[str]:
    """One cycle among the jobs Kahn could not place, for the error message.

    Every unplaced job still has an unplaced predecessor, so walking predecessors
    must revisit a job; the walk from there is the cycle.
    """
    predecessors = {n: sorted(p for p in candidates if n in successors[p]) for n in candidates}
    node = min(candidates)
    seen: dict[str, int] = {}
    walk: list[str] = []
    while node not in seen:
        seen[node] = len(walk)
        walk.append(node)
        node = predecessors[node][0]
    cycle = walk[seen[node] :]
    cycle.reverse()
    return [*cycle, cycle[0]]
