"""Changing a simulated director's deployments: deploy, delete, wipe, and finding a VM.

Each change checks everything first and then acts, so a refusal leaves the director and
its VMs as they were. The director's database, what `bosh vms` and bbr read, is written
last, so it never lists a new VM before that VM's tree is built.
"""

from __future__ import annotations

import logging
import re
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from orchestrator.errors import TargetError, UsageError
from simulator.director import SimDirector
from simulator.director_db import Deployment, Vm
from simulator.fleet import (
    DEPLOYMENTS_DIR,
    DeploymentVm,
    build_vm,
    read_identity,
    reinstall_jobs,
    remove_tree,
    trees_on_disk,
    vm_root,
)
from simulator.manifest import NAME_PATTERN, Manifest, parse_manifest
from simulator.seed_data import AZS, seed_manifest_for
from simulator.vm import SimVm

log = logging.getLogger(__name__)

JobList = list[tuple[str, str]]  # (release, job) of one instance group
_IP = re.compile(r"10\.0\.(\d{1,3})\.(\d{1,3})")
_FIRST_HOST = 10


@dataclass(frozen=True)
class DeployResult:
    created: int  # new instances
    kept: int  # instances that stay (their ids and data kept)
    recreated: int  # of those, the ones whose VM was gone and has been rebuilt
    removed: int  # instances scaled away


def manifest_of(deployment: Deployment) -> str | None:
    """The manifest the director holds for `deployment` (or the seed's, for a database
    dumped before manifests were kept)."""
    return deployment.manifest or seed_manifest_for(deployment.name)


def find_deployment(director: SimDirector, name: str) -> Deployment:
    deployments = director.deployments()
    for deployment in deployments:
        if deployment.name == name:
            return deployment
    raise TargetError(
        f"{director.address} has no deployment {name!r}",
        hint=f"Deployments: {', '.join(d.name for d in deployments)}"
        if deployments
        else "The director's database lists no deployments (wiped? restore the director).",
    )


def deploy(director: SimDirector, manifest: Manifest) -> DeployResult:
    """Add the deployment `manifest` names, or make the existing one what it now says."""
    with director.editing():
        _refuse_if_api_locked(director, "deploy")
        deployments = director.deployments()
        current = next((d for d in deployments if d.name == manifest.name), None)
        listed = {(vm.group, vm.index): vm for vm in current.vms} if current else {}
        _refuse_orphans(director, manifest.name, listed)
        _refuse_busy(director, manifest.name)
        rows, fresh = _plan(manifest, listed, deployments)
        jobs = {g.name: [(j.release, j.name) for j in g.jobs] for g in manifest.groups}
        recreated = 0
        for vm in rows:
            tree = director.deployment_vm(manifest.name, vm)
            if (vm.group, vm.index) in fresh:
                build_vm(tree.root, tree.identity, jobs[vm.group], seed=True)
            elif tree.exists():
                reinstall_jobs(tree.root, jobs[vm.group])
            else:  # listed but its VM is gone: rebuilt with the id the director knows
                build_vm(tree.root, tree.identity, jobs[vm.group], seed=True)
                recreated += 1
        kept_keys = {(vm.group, vm.index) for vm in rows}
        removed = [vm for key, vm in listed.items() if key not in kept_keys]
        for vm in removed:
            remove_tree(director.deployment_vm(manifest.name, vm).root)
        updated = Deployment(manifest.name, rows, manifest.text)
        if current is None:
            deployments.append(updated)
        else:
            deployments = [updated if d.name == manifest.name else d for d in deployments]
        director.write_deployments(deployments)
    result = DeployResult(len(fresh), len(rows) - len(fresh), recreated, len(removed))
    log.info("deployed %s on %s: %s", manifest.name, director.address, result)
    return result


def deploy_text(director: SimDirector, deployment: str, text: str, *, source: str) -> DeployResult:
    return deploy(director, parse_manifest(text, source=source, deployment=deployment))


def delete_deployment(director: SimDirector, name: str) -> int:
    """Remove the deployment's VMs and its rows; the number of VMs removed."""
    with director.editing():
        _refuse_if_api_locked(director, "delete a deployment")
        deployments = director.deployments()
        trees = trees_on_disk(director.root, name)
        if not any(d.name == name for d in deployments) and not trees:
            find_deployment(director, name)  # raises, listing what there is
        _refuse_busy(director, name)
        # The deployment's directory holds its VM trees and nothing else.
        shutil.rmtree(director.root / DEPLOYMENTS_DIR / name, ignore_errors=True)
        director.write_deployments([d for d in deployments if d.name != name])
    log.info("deleted deployment %s on %s (%d VMs)", name, director.address, len(trees))
    return len(trees)


def wipe_deployment(director: SimDirector, name: str) -> int:
    """The deployment's disaster: every VM recreated empty (jobs there, data gone). The
    director's database is left alone. The number of VMs wiped."""
    with director.editing():
        deployment = find_deployment(director, name)
        jobs = _jobs_by_group(deployment)
        for vm in deployment.vms:
            tree = director.deployment_vm(name, vm)
            if tree.exists():
                tree.wipe_data()
            elif vm.group in jobs:
                remove_tree(tree.root)
                build_vm(tree.root, tree.identity, jobs[vm.group], seed=False)
            else:
                log.warning("%s is gone and its jobs are unknown; not recreated", tree.address)
    log.info("wiped deployment %s on %s", name, director.address)
    return len(deployment.vms)


def find_vm(director: SimDirector, deployment: str, instance: str) -> DeploymentVm:
    """The VM `GROUP/INDEX` of `deployment`, which must be listed and exist."""
    group, slash, index = instance.partition("/")
    if not (slash and NAME_PATTERN.fullmatch(group) and index.isdigit()):
        raise UsageError(
            f"--instance {instance!r}: expected GROUP/INDEX, e.g. redis/0",
        )
    found = find_deployment(director, deployment)
    for vm in found.vms:
        if vm.group == group and vm.index == int(index):
            tree = director.deployment_vm(deployment, vm)
            if not tree.exists():
                raise TargetError(f"{tree.address} is gone", hint=tree.missing_hint())
            return tree
    raise TargetError(
        f"deployment {deployment!r} on {director.address} has no instance {instance}",
        hint=f"Instances: {', '.join(f'{vm.group}/{vm.index}' for vm in found.vms) or 'none'}",
    )


def _jobs_by_group(deployment: Deployment) -> dict[str, JobList]:
    text = manifest_of(deployment)
    if text is None:
        return {}
    try:
        manifest = parse_manifest(text, source="the stored manifest", deployment=deployment.name)
    except UsageError as error:
        log.warning("the stored manifest of %s is unreadable: %s", deployment.name, error)
        return {}
    return {g.name: [(j.release, j.name) for j in g.jobs] for g in manifest.groups}


def _plan(
    manifest: Manifest, listed: dict[tuple[str, int], Vm], deployments: list[Deployment]
) -> tuple[list[Vm], set[tuple[str, int]]]:
    """The deployment's rows after the deploy, and which of them are new instances."""
    wanted = {(g.name, index) for g in manifest.groups for index in range(g.instances)}
    subnet = _subnet(manifest.name, listed, deployments)
    staying = _hosts(vm for key, vm in listed.items() if key in wanted)
    going = _hosts(vm for key, vm in listed.items() if key not in wanted)
    rows: list[Vm] = []
    fresh: set[tuple[str, int]] = set()
    for group in manifest.groups:
        for index in range(group.instances):
            old = listed.get((group.name, index))
            if old is not None:
                rows.append(old)
                continue
            # Not the address of a VM going away in this deploy, unless none other is free
            # (at most MAX_VMS stay or come, so one always is).
            free = [h for h in range(_FIRST_HOST, 255) if h not in staying]
            host = next((h for h in free if h not in going), free[0])
            staying.add(host)
            rows.append(
                Vm(
                    instance=f"{group.name}/{uuid.uuid4()}",
                    process_state="running",
                    az=AZS[index % len(AZS)],
                    ips=(f"10.0.{subnet}.{host}",),
                    vm_cid=f"vm-{uuid.uuid4()}",
                    vm_type=group.vm_type,
                    index=index,
                )
            )
            fresh.add((group.name, index))
    return rows, fresh


def _hosts(vms: Iterable[Vm]) -> set[int]:
    return {int(m.group(2)) for vm in vms for ip in vm.ips if (m := _IP.fullmatch(ip))}


def _subnet(name: str, listed: dict[tuple[str, int], Vm], deployments: list[Deployment]) -> int:
    """The deployment's subnet (10.0.N.0/24): the one its VMs are on, or the next free."""
    for vm in listed.values():
        for ip in vm.ips:
            if match := _IP.fullmatch(ip):
                return int(match.group(1))
    taken = [
        int(m.group(1))
        for d in deployments
        if d.name != name
        for vm in d.vms
        for ip in vm.ips
        if (m := _IP.fullmatch(ip))
    ]
    subnet = max(taken, default=0) + 1
    if subnet > 254:
        raise TargetError("the simulator has no free 10.0.N.0/24 subnet left for a deployment")
    return subnet


def _refuse_if_api_locked(director: SimDirector, what: str) -> None:
    locked = director.api_locked()
    if locked is not None:
        raise TargetError(
            f"cannot {what} on {director.address}: {locked}",
            hint="A director backup or restore holds it; wait for it to end (or clean up "
            f"after it: bbrx director --host {director.address} backup-cleanup).",
        )


def _refuse_orphans(director: SimDirector, name: str, listed: dict[tuple[str, int], Vm]) -> None:
    """VM trees the database does not list (as those ids) are VMs the director lost."""
    orphans = []
    for group, index in trees_on_disk(director.root, name):
        found = read_identity(vm_root(director.root, name, group, index))
        vm = listed.get((group, index))
        if vm is None or found is None or found.id != vm.instance_id:
            orphans.append(f"{group}/{index}")
    if orphans:
        raise TargetError(
            f"cannot deploy {name} on {director.address}: its VMs {', '.join(orphans)} are "
            "not the ones the director's database lists (the director lost track of them)",
            hint="Restore the director from a backup that lists them, or remove them with "
            f"`bbrx sim delete-deployment {director.name} {name}`.",
        )


def _refuse_busy(director: SimDirector, name: str) -> None:
    """A lock held or bbr's work dir on any VM of the deployment: a run is using it."""
    for group, index in trees_on_disk(director.root, name):
        tree = SimVm(
            vm_root(director.root, name, group, index),
            f"{director.address}/{name}/{group}/{index}",
        )
        reason = tree.run_in_progress()
        if reason is not None:
            raise TargetError(
                f"a bbr run is in progress on {tree.address} ({reason}): refusing to change "
                f"deployment {name}",
                hint="Let the run finish, or clean up after it (the deployment's "
                "backup-cleanup or restore-cleanup).",
            )
