"""A live BOSH Director behind the director contract: the Director API for what it lists,
OpenSSH (the transport director mode uses) to each instance, with access the Director sets
up per instance group and tears down again.

One key pair and one user a run (bbr's way): the pair is made with ssh-keygen in a private
directory (0700) and removed with it at the end; the user is `bosh_` and 15 hex digits.
The directory is named for the user: a killed run's is removed by the cleanup after it.
Each instance's host key comes from the Director's SSH result and is pinned in a
known_hosts file of the run's own, so there is no prompt, and a different key is refused.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

from orchestrator.bosh.api import DirectorApi, SshHost
from orchestrator.bosh.director import VmInfo
from orchestrator.bosh.proxy import Proxy
from orchestrator.errors import TargetError
from orchestrator.transport.instance import Instance
from orchestrator.transport.ssh import SshInstance

log = logging.getLogger(__name__)

SSH_PORT = 22
KEYS_PREFIX = "bbrx-access-"  # a run's key pair's directory: this, its user, a random tail


class LiveDirector:
    """A Director reached over its API; thread-safe."""

    mode = "live"

    def __init__(
        self, api: DirectorApi, *, connect_timeout: int = 15, tunnel: Proxy | None = None
    ) -> None:
        self.api = api
        self._tunnel = tunnel  # BOSH_ALL_PROXY: the API's SOCKS tunnel, the instances' jump
        self.address = api.url
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._keys: Path | None = None
        self.user = "bosh_" + uuid.uuid4().hex[:15]
        self._opened: dict[tuple[str, str], list[SshInstance]] = {}
        # Groups whose SSH setup was asked for: each gets a cleanup, whatever came of it
        # (a setup that failed on one instance succeeded on the others).
        self._asked: set[tuple[str, str]] = set()
        self._pins = 0

    def __repr__(self) -> str:
        return f"LiveDirector({self.address!r})"

    def deployments(self) -> list[str]:
        return self.api.deployments()

    def vms(self, deployment: str) -> list[VmInfo]:
        return self.api.vms(deployment)

    def manifest(self, deployment: str) -> str:
        return self.api.manifest(deployment)

    # --- access ----------------------------------------------------------------------

    def _key_pair(self) -> tuple[Path, str]:
        with self._lock:
            if self._keys is None:
                # Mode 0700; named by the run's user, so that the cleanup after a killed
                # run, which knows the user from the audit log, finds the key it left.
                keys = Path(tempfile.mkdtemp(prefix=f"{KEYS_PREFIX}{self.user}-"))
                try:
                    subprocess.run(
                        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.user,
                         "-f", str(keys / "id")],
                        check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=30,
                    )  # fmt: skip
                except (OSError, subprocess.SubprocessError) as error:
                    shutil.rmtree(keys, ignore_errors=True)
                    raise TargetError(
                        f"cannot make a key pair for access to {self.address}: {error}",
                        hint="bbrx needs OpenSSH's ssh-keygen on this jump box.",
                    ) from error
                self._keys = keys
            return self._keys / "id", (self._keys / "id.pub").read_text().strip()

    def open_instances(self, deployment: str, group: str) -> Sequence[Instance]:
        """The Director adds the run's user and key to every instance of the group; one
        SshInstance per instance, in index order, each pinned to its host key."""
        private, public = self._key_pair()
        with self._lock:
            self._asked.add((deployment, group))
        instances = []
        try:
            hosts = self.api.ssh_setup(deployment, group, self.user, public)
            for host in sorted(hosts, key=lambda h: _index(h.index)):
                instances.append(self._instance(deployment, group, host, private))
        except BaseException:
            for instance in instances:
                instance.close()
            self.close_access(deployment, group)
            raise
        with self._lock:
            self._opened.setdefault((deployment, group), []).extend(instances)
        log.info("access set up to %s/%s on %s: %d instance(s) as %s", deployment, group,
                 self.address, len(instances), self.user)  # fmt: skip
        return instances

    def _instance(self, deployment: str, group: str, host: SshHost, private: Path) -> SshInstance:
        address, port = _address(host.address)
        name = f"{group}/{host.index}"
        assert self._keys is not None
        with self._lock:
            self._pins += 1  # a counter, not the Director's strings, names the file
            known_hosts = self._keys / f"known_hosts-{self._pins}"
        fields = host.host_public_key.split()
        if len(fields) < 2 or not fields[0].startswith(("ssh-", "ecdsa-", "sk-")):
            raise TargetError(
                f"the Director gave {deployment}/{name} a host key that is no public key: "
                f"{host.host_public_key[:80]!r}"
            )
        where = address if port == SSH_PORT else f"[{address}]:{port}"
        known_hosts.write_text(f"{where} {fields[0]} {fields[1]}\n")
        instance = SshInstance(
            address,
            port,
            self.user,
            private,
            known_hosts=known_hosts,
            connect_timeout=self._connect_timeout,
            pinned=True,
            proxy_command=self._tunnel.proxy_command() if self._tunnel else None,
        )
        # What the transport's own errors call it ("cannot reach ...", "copying ... from
        # ... failed"): the instance, as the operator knows it, and where it is.
        instance.label = f"{name} at {instance.address}"
        instance.group = group
        instance.index = host.index
        instance.instance_id = host.id or None
        return instance

    def close_access(self, deployment: str, group: str) -> None:
        """Remove the run's user from the group's instances (the Director's cleanup task,
        started and not waited for), if its setup was asked for. Idempotent."""
        with self._lock:
            instances = self._opened.pop((deployment, group), [])
            asked = (deployment, group) in self._asked
            self._asked.discard((deployment, group))
        for instance in instances:
            instance.close()
        if not asked:
            return
        try:
            self.api.ssh_cleanup(deployment, group, self.user, [])
        except TargetError as error:
            log.warning(
                "could not remove user %s from %s/%s: %s (it stays until the Director's own "
                "cleanup removes it)", self.user, deployment, group, error.message,
            )  # fmt: skip

    def interrupt(self) -> None:
        self.api.interrupt()

    @property
    def access_user(self) -> str:
        return self.user

    def revoke_access(self, deployment: str, groups: Sequence[str], user: str) -> None:
        """The Director's SSH cleanup of another run's user, group by group: what a killed
        run could not do. A group the Director refuses is logged, the others still go."""
        for group in groups:
            try:
                self.api.ssh_cleanup(deployment, group, user, [])
            except TargetError as error:
                log.warning("could not remove user %s from %s/%s: %s", user, deployment,
                            group, error.message)  # fmt: skip
            else:
                log.info("Removed the killed run's user %s from %s/%s", user, deployment, group)
        _remove_left_keys(user)

    def close(self) -> None:
        """Remove the key pair, tear down what is still open, close the API. Idempotent.

        The key goes first: a Ctrl-C during the cleanup calls must not leave a private key
        that the instances still accept. Every group is tried, whatever one raises."""
        with self._lock:
            keys, self._keys = self._keys, None
            groups = sorted(self._asked | set(self._opened))
        if keys is not None:
            shutil.rmtree(keys, ignore_errors=True)
        first: BaseException | None = None
        try:
            for deployment, group in groups:
                try:
                    self.close_access(deployment, group)
                except BaseException as error:  # a Ctrl-C here: the other groups still
                    first = first or error
        finally:
            self.api.close()
            if self._tunnel is not None:
                self._tunnel.stop()
        if first is not None:
            raise first


def _remove_left_keys(user: str) -> None:
    """The key pair a killed run left in the temporary directory: only directories of this
    process's own user (not links), named for that run's user."""
    for path in Path(tempfile.gettempdir()).glob(f"{KEYS_PREFIX}{user}-*"):
        try:
            found = path.lstat()
        except OSError:
            continue
        if stat.S_ISDIR(found.st_mode) and found.st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)
            log.info("Removed the killed run's key pair %s", path)


def _index(text: str) -> tuple[int, str]:
    return (int(text), "") if text.isdigit() else (1 << 30, text)


_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}))*")


def _address(text: str) -> tuple[str, int]:
    """The SSH result's `ip`: a host, or host:port (one colon: bbr's rule), or [v6]:port.

    It comes from the Director and becomes an ssh argument: only an IP address or a
    hostname passes (never something ssh would read as an option), with a port 1-65535."""
    host, port = text, str(SSH_PORT)
    if text.startswith("[") and "]:" in text:
        host, _, port = text[1:].partition("]:")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.fullmatch(host):
            raise TargetError(
                f"the Director gave an instance the address {text[:80]!r}, which is no IP "
                "address or host name: refusing to connect to it"
            ) from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise TargetError(f"the Director gave an instance the address {text[:80]!r}: bad port")
    return host, int(port)
