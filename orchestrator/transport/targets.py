"""From a --host value to an Instance: the simulator for sim://NAME, SSH otherwise."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.bosh.director import Director
from orchestrator.errors import UsageError
from orchestrator.transport.instance import Instance

SIM_SCHEME = "sim://"


@dataclass(frozen=True)
class Target:
    """A parsed --host: what the artifact is named after and how to reach it."""

    host: str
    name: str  # bbr: the host without scheme or port
    simulated: bool
    port: int = 22

    @property
    def address(self) -> str:
        if self.simulated:
            return self.host
        return f"[{self.name}]:{self.port}" if ":" in self.name else f"{self.name}:{self.port}"


def parse_host(host: str) -> Target:
    if not host:
        raise UsageError("--host is required", hint="Use --host sim://NAME for the simulator.")
    if host.startswith(SIM_SCHEME):
        name = host[len(SIM_SCHEME) :]
        if not name:
            raise UsageError(f"--host {host}: name the simulated director, e.g. sim://demo")
        return Target(host=host, name=name, simulated=True)
    if "://" in host:
        raise UsageError(
            f"--host {host}: unknown scheme",
            hint="Give HOST[:PORT] for a real director or sim://NAME for the simulator.",
        )
    if host.startswith("["):  # [IPv6]:PORT or [IPv6]
        name, _, rest = host[1:].partition("]")
        port = rest.removeprefix(":") if rest else "22"
        if rest and not rest.startswith(":"):
            raise UsageError(f"--host {host}: expected [ADDRESS]:PORT")
    elif host.count(":") > 1:  # a bare IPv6 address
        name, port = host, "22"
    else:
        name, _, port = host.partition(":")
        port = port or "22"
    if not name:
        raise UsageError(f"--host {host}: the host name is empty")
    try:
        number = int(port)
        if not 0 < number < 65536:
            raise ValueError
    except ValueError:
        raise UsageError(f"--host {host}: port must be a number from 1 to 65535") from None
    return Target(host=host, name=name, simulated=False, port=number)


def open_instance(
    target: Target,
    *,
    home: Path,
    username: str | None,
    private_key_path: Path | None,
    accept_new_host_key: bool = False,
    known_hosts: Path | None = None,
) -> Instance:
    if target.simulated:
        from simulator.director import SimDirector, sim_root
        from simulator.instance import SimInstance

        director = SimDirector(sim_root(home, target.name))
        director.ensure()
        return SimInstance(director)
    if not username or private_key_path is None:
        raise UsageError(
            f"--host {target.host} is a real director: --username and --private-key-path "
            "are required"
        )
    from orchestrator.transport.ssh import SshInstance

    return SshInstance(
        target.name,
        target.port,
        username,
        private_key_path,
        accept_new_host_key=accept_new_host_key,
        known_hosts=known_hosts,
        connect_ahead=True,
    )


DIRECTOR_PORT = 25555


def parse_director(spec: str) -> Target:
    """A deployment run's --target: sim://NAME, or a BOSH Director's URL (bbr ignores the
    scheme and speaks https; the port defaults to 25555)."""
    if not spec:
        raise UsageError(
            "--target flag is required.",
            hint="Use --target sim://NAME for the simulator (or set BOSH_ENVIRONMENT).",
        )
    if spec.startswith(SIM_SCHEME):
        return parse_host(spec)
    _, sep, rest = spec.partition("://")
    bare = rest if sep else spec
    bare = bare.split("/", 1)[0]
    if not bare or bare.startswith(":"):
        raise UsageError(f"invalid bosh URL - {spec}: it names no host")
    host = parse_host(bare if ":" in bare else f"{bare}:{DIRECTOR_PORT}")
    return Target(host=spec, name=host.name, simulated=False, port=host.port)


def director_address(target: Target) -> str:
    """How a deployment's audit target names its director: `sim://demo`, or the URL bbr
    would call (`https://10.0.0.6:25555`)."""
    if target.simulated:
        return target.host
    name = f"[{target.name}]" if ":" in target.name else target.name
    return f"https://{name}:{target.port}"


def open_director(
    target: Target,
    *,
    home: Path,
    username: str | None = None,
    password: str | None = None,
    ca_cert: str | None = None,
) -> Director:
    """The director a deployment run goes through: the simulator's for sim://NAME, else a
    live BOSH Director over its API (credentials: a UAA client or basic auth)."""
    if target.simulated:
        from simulator.deployments import SimBosh
        from simulator.director import SimDirector, sim_root

        SimDirector(sim_root(home, target.name)).ensure()
        return SimBosh(home, target.name)
    from orchestrator.bosh import proxy  # a live director's only
    from orchestrator.bosh.api import DirectorApi
    from orchestrator.bosh.live import LiveDirector

    through = os.environ.get("BOSH_ALL_PROXY", "").strip()
    tunnel = proxy.open_proxy(through, home) if through else None
    try:
        api = DirectorApi(
            target.host,
            username or "",
            password or "",
            ca_cert,
            proxy=tunnel.url if tunnel else None,
        )
    except BaseException:
        if tunnel is not None:
            tunnel.stop()
        raise
    return LiveDirector(api, tunnel=tunnel)
