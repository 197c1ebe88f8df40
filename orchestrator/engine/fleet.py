"""The instances one run acts on: a director on its own, or the VMs of a deployment.

A director run has its one instance from the start. A deployment run finds its instances
while discovering, through the director contract (VMs, manifest, access group by group),
and tears that access down when the run ends, however it ends. Everything the rest of
the run needs to know about where a job lives (its instance, its release, whether it
backs up once and restores everywhere, how messages name it) is asked of the fleet.
"""

from __future__ import annotations

import logging
from typing import Any

from orchestrator.bosh.director import Director, VmInfo
from orchestrator.bosh.manifest import DeploymentManifest, parse_manifest
from orchestrator.errors import BbrxError, TargetError
from orchestrator.transport.instance import Instance, instance_name

log = logging.getLogger(__name__)

DIRECTOR = "director"
DEPLOYMENT = "deployment"

# The name bbr gives a backup_one_restore_all job's bootstrap artifact (and its directory).
BORA_SUFFIX = "backup-one-restore-all"


def job_label(job: str, group: str | None, index: str | None, target: str) -> str:
    """How messages, lock plans and audit verdicts name one job of one instance, given the
    audit log's target of its run: the job's name alone for a director (whose rows older
    bbrx wrote name no instance), else `job on group/index`."""
    if group is None or index is None or split_target(target)[1] is None:
        return job
    return f"{job} on {group}/{index}"


def custom_artifact_name(job: str, release: str | None) -> str:
    return f"{job}-{release or ''}-{BORA_SUFFIX}"


class DirectorFleet:
    """One director VM, reached directly (bbr's director mode)."""

    kind = DIRECTOR
    deployment: str | None = None

    def __init__(self, instance: Instance, target: str | None = None) -> None:
        self.instances = [instance]
        self.mode = instance.mode
        self.target = target or instance.address
        self.manifest: DeploymentManifest | None = None

    def open(self, unreachable: dict[str, str] | None = None) -> dict[str, Any]:
        return {}

    def label(self, instance: Instance, job: str) -> str:
        return job  # one instance: the job's name says it all, as in bbr's director mode

    def where(self, instance: Instance) -> str:
        return instance.address

    def release_of(self, instance: Instance, job: str) -> str | None:
        return None  # director mode matches lock constraints by job name alone

    def is_bootstrap(self, instance: Instance) -> bool:
        return True

    def backs_up_once(self, instance: Instance, job: str) -> bool:
        return False

    def command(self, subcommand: str) -> str:
        return f"bbrx director --host {self.target} {subcommand}"

    def status_command(self) -> str:
        return f"bbrx status --host {self.target}"

    @property
    def access_user(self) -> str | None:
        return None  # director mode logs in as the operator's own user

    def revoke_access(self, user: str) -> None:
        """Nothing to revoke: director mode makes no user."""

    def interrupt(self) -> None:
        """Nothing to stop waiting on: director mode asks no director."""

    def close(self) -> None:
        for instance in self.instances:
            instance.close()


class DeploymentFleet:
    """The VMs of one deployment, reached through a director (bbr's deployment mode)."""

    kind = DEPLOYMENT

    def __init__(self, director: Director, deployment: str, target_spec: str) -> None:
        self.director = director
        self.deployment = deployment
        self.mode = director.mode
        # How the operator named the director (`--target`), for the commands we suggest.
        self.target_spec = target_spec
        self.target = deployment_target(director.address, deployment)
        self.instances: list[Instance] = []
        self.vms: list[VmInfo] = []
        self.manifest: DeploymentManifest | None = None
        self._bootstrap: dict[str, bool] = {}
        self._opened: list[str] = []

    def open(self, unreachable: dict[str, str] | None = None) -> dict[str, Any]:
        """Find the deployment's VMs and reach each one, group by group, in the order the
        director lists them (bbr's order: groups by first appearance).

        `unreachable` (a cleanup's): a group whose access cannot be set up is noted there,
        by instance, and the others are still reached; otherwise that fails the run."""
        self.vms = self.director.vms(self.deployment)
        if not self.vms:
            raise TargetError(
                f"deployment {self.deployment} on {self.director.address} has no VMs",
                hint="Deploy it first (`bosh deploy`), then run bbrx again.",
            )
        self.manifest = parse_manifest(self.deployment, self.director.manifest(self.deployment))
        groups: list[str] = []
        for vm in self.vms:
            if vm.group not in groups:
                groups.append(vm.group)
        by_name = {vm.name: vm for vm in self.vms}
        for group in groups:
            log.info("Setting up access to instance group %s of %s", group, self.deployment)
            self._opened.append(group)
            try:
                opened = list(self.director.open_instances(self.deployment, group))
            except BbrxError as error:
                if unreachable is None:
                    raise
                log.error("%s; its jobs are not unlocked by this cleanup", error.message)
                for vm in self.vms:
                    if vm.group == group:
                        unreachable[vm.name] = error.message
                continue
            # Kept before they are checked: whatever was opened is closed with the fleet.
            self.instances.extend(opened)
            for instance in opened:
                found = by_name.get(instance_name(instance))
                if found is None:
                    raise TargetError(
                        f"the director gave access to {instance_name(instance)} of "
                        f"{self.deployment}, which its VM list does not have",
                        hint="Check the deployment with `bosh vms`; run bbrx again once it is "
                        "stable.",
                    )
                self._bootstrap[instance_name(instance)] = found.bootstrap
        return {
            "deployment": self.deployment,
            "director": self.director.address,
            "instances": [
                {"name": vm.name, "id": vm.id, "bootstrap": vm.bootstrap} for vm in self.vms
            ],
        }

    def label(self, instance: Instance, job: str) -> str:
        return f"{job} on {instance_name(instance)}"  # a `bosh/0` instance included

    def where(self, instance: Instance) -> str:
        return f"{instance_name(instance)} ({instance.address})"

    def release_of(self, instance: Instance, job: str) -> str | None:
        return self.manifest.release_of(instance.group, job) if self.manifest else None

    def is_bootstrap(self, instance: Instance) -> bool:
        return self._bootstrap.get(instance_name(instance), False)

    def backs_up_once(self, instance: Instance, job: str) -> bool:
        return bool(self.manifest and self.manifest.is_backup_one_restore_all(instance.group, job))

    def command(self, subcommand: str) -> str:
        return (
            f"bbrx deployment --target {self.target_spec} --deployment {self.deployment} "
            f"{subcommand}"
        )

    def status_command(self) -> str:
        return f"bbrx status --target {self.target_spec} --deployment {self.deployment}"

    @property
    def access_user(self) -> str | None:
        return self.director.access_user

    def revoke_access(self, user: str) -> None:
        """Another run's access (a killed run's), from every group of the deployment."""
        groups = list(dict.fromkeys(vm.group for vm in self.vms))
        self.director.revoke_access(self.deployment, groups, user)

    def interrupt(self) -> None:
        """The run is being stopped: a director call that waits (a task) gives up."""
        self.director.interrupt()

    def close(self) -> None:
        """Close every instance, tear down every group's access, close the director: all of
        it, though one step fails or a Ctrl-C comes meanwhile (re-raised at the end)."""
        stopped: BaseException | None = None
        try:
            for instance in self.instances:
                try:
                    instance.close()
                except Exception:  # closing one must not keep the others open
                    log.warning("closing %s failed", instance.address, exc_info=True)
                except BaseException as signal_:
                    stopped = stopped or signal_
            for group in reversed(self._opened):
                try:
                    self.director.close_access(self.deployment, group)
                except Exception as exc:
                    log.warning("tearing down access to %s of %s failed: %s", group,
                                self.deployment, exc)  # fmt: skip
                except BaseException as signal_:
                    stopped = stopped or signal_
            self._opened.clear()
        finally:
            self.director.close()
        if stopped is not None:
            raise stopped


def deployment_target(director_address: str, deployment: str) -> str:
    """How the audit log and the lease name a deployment: `sim://demo/redis`,
    `https://10.0.0.6:25555/cf`. A director's own target never has a path."""
    return f"{director_address.rstrip('/')}/{deployment}"


def split_target(target: str) -> tuple[str, str | None]:
    """(director, deployment) from an audit log's target; deployment None for a director."""
    scheme, sep, rest = target.partition("://")
    if not sep:
        scheme, rest = "", target
    head, slash, deployment = rest.partition("/")
    if not slash or not deployment:
        return target, None
    return (f"{scheme}://{head}" if sep else head), deployment


def command_for(target: str, subcommand: str) -> str:
    """The bbrx command that runs `subcommand` on the target an audit log names."""
    director, deployment = split_target(target)
    if deployment is None:
        return f"bbrx director --host {target} {subcommand}"
    return f"bbrx deployment --target {director} --deployment {deployment} {subcommand}"


Fleet = DirectorFleet | DeploymentFleet

#: The audit detail key of a run's start row: the user its director set up access as.
ACCESS_USER_KEY = "access_user"
