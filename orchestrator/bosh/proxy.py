"""`BOSH_ALL_PROXY`: reach the Director and every instance through a jump host.

bbr accepts `ssh+socks5://USER@HOST:PORT?private-key=PATH` (it opens the SSH tunnel
itself) and `socks5://HOST:PORT`, and so does bbrx.

- `ssh+socks5://`: OpenSSH does the tunnelling. One `ssh -N -D` to the jump host gives the
  Director API a SOCKS5 proxy on a loopback port of this machine, and each instance's ssh
  goes through `ssh -W` to the same jump host (its ProxyCommand). The jump host's key is
  checked against `$BBRX_HOME/proxy_known_hosts`: recorded on first use, refused if it
  changes.
- `socks5://`: the Director API uses the proxy as it is, and each instance's ssh reaches it
  through `orchestrator.bosh.socks`, a SOCKS5 CONNECT relay, as its ProxyCommand.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from orchestrator.bosh import socks
from orchestrator.errors import TargetError, UsageError

log = logging.getLogger(__name__)

SCHEME = "ssh+socks5"
PLAIN = "socks5"
START_TIMEOUT = 20.0


@dataclass(frozen=True)
class JumpHost:
    user: str
    host: str
    port: int
    private_key: Path
    known_hosts: Path

    def ssh_options(self) -> list[str]:
        return [
            # No ssh_config, as for the instances (orchestrator/transport/ssh.py).
            "-F", "/dev/null",
            "-p", str(self.port), "-l", self.user, "-i", str(self.private_key),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
        ]  # fmt: skip

    def proxy_command(self) -> str:
        """An instance's ProxyCommand: OpenSSH's own `-W` through the jump host (ssh runs
        it with /bin/sh, after expanding %h and %p)."""
        words = [shlex.quote(w).replace("%", "%%") for w in ("ssh", *self.ssh_options())]
        return " ".join([*words, "-W", "%h:%p", shlex.quote(self.host)])


class Proxy(Protocol):
    """What a live run needs of BOSH_ALL_PROXY: a proxy URL for the Director API, a
    ProxyCommand for each instance's ssh, and its end."""

    @property
    def url(self) -> str: ...

    def proxy_command(self) -> str: ...

    def stop(self) -> None: ...


def open_proxy(value: str, home: Path) -> Proxy:
    """The proxy a `BOSH_ALL_PROXY` value names, ready (a jump host's tunnel open)."""
    try:
        plain = urlsplit(value.strip()).scheme == PLAIN
        proxy = parse_socks(value) if plain else parse(value, home)
    except ValueError as error:  # urlsplit's own refusal, e.g. an unclosed [IPv6
        raise UsageError(f"BOSH_ALL_PROXY={_shown(value)} is not a URL: {error}") from error
    return proxy.start() if isinstance(proxy, SocksProxy) else Tunnel(proxy).start()


@dataclass(frozen=True)
class SocksProxy:
    """`socks5://HOST:PORT`: a SOCKS5 proxy someone else runs."""

    host: str
    port: int

    @property
    def url(self) -> str:
        return f"socks5://{_bracketed(self.host)}:{self.port}"

    def proxy_command(self) -> str:
        return socks.proxy_command(self.host, self.port)

    def start(self) -> SocksProxy:
        log.info("Through the SOCKS5 proxy %s:%d (BOSH_ALL_PROXY)", self.host, self.port)
        return self

    def stop(self) -> None:
        """Nothing of this run's to end."""


def parse_socks(value: str) -> SocksProxy:
    parts = urlsplit(value.strip())
    try:
        port = parts.port
    except ValueError as error:
        raise UsageError(f"BOSH_ALL_PROXY={_shown(value)}: its port is not a number") from error
    if not parts.hostname or port is None or parts.path not in ("", "/") or parts.query:
        raise UsageError(
            f"BOSH_ALL_PROXY={_shown(value)}: a SOCKS5 proxy is socks5://HOST:PORT",
            hint="For example socks5://127.0.0.1:1080 (an `ssh -D 1080` to the jump box), or "
            "ssh+socks5://USER@HOST:PORT?private-key=PATH for bbrx to open the tunnel itself.",
        )
    if parts.username or parts.password:
        raise UsageError(
            f"BOSH_ALL_PROXY: a user or password in a socks5:// proxy is not supported "
            f"(bbr's form has none): {parts.hostname}:{port}"
        )
    return SocksProxy(parts.hostname, port)


def _shown(value: str) -> str:
    """The value as an error may quote it: no password it may hold is shown (a user is).

    Read from the text itself, not as a URL: a password with a `/` in it (base64's) ends a
    URL's netloc early, and would not be seen as one. Everything between the scheme and the
    last `@` is taken for USER:PASSWORD; too much may be hidden, never too little."""
    text = value.strip()
    scheme, separator, rest = text.partition("://")
    if not separator:
        scheme, rest = "", text
    userinfo, at, where = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.split(':', 1)[0]}:***@{where}"
    return repr(f"{scheme}{separator}{rest}")


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse(value: str, home: Path) -> JumpHost:
    """The jump host of a `BOSH_ALL_PROXY` value; UsageError naming what is wrong."""
    parts = urlsplit(value.strip())
    if parts.scheme != SCHEME:
        raise UsageError(
            f"BOSH_ALL_PROXY={_shown(value)}: bbrx takes "
            "ssh+socks5://USER@HOST:PORT?private-key=PATH or socks5://HOST:PORT",
            hint="bbr's two forms: a jump host for bbrx to tunnel through, or a SOCKS5 proxy.",
        )
    try:
        port = parts.port or 22
    except ValueError as error:
        raise UsageError(f"BOSH_ALL_PROXY={_shown(value)}: its port is not a number") from error
    keys = parse_qs(parts.query).get("private-key") or []
    if not parts.hostname or not parts.username or len(keys) != 1:
        raise UsageError(
            f"BOSH_ALL_PROXY={_shown(value)}: it needs a user, a host and one private-key",
            hint="For example ssh+socks5://jumpbox@10.0.0.5:22?private-key=/home/me/jumpbox.pem",
        )
    key = Path(unquote(keys[0])).expanduser()
    if not key.is_file():
        raise UsageError(f"BOSH_ALL_PROXY: the private key {key} does not exist")
    return JumpHost(unquote(parts.username), parts.hostname, port, key, home / "proxy_known_hosts")


class Tunnel:
    """`ssh -N -D 127.0.0.1:PORT` to the jump host: a SOCKS5 proxy for the Director API."""

    def __init__(self, jump: JumpHost) -> None:
        self.jump = jump
        self.port = _free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"socks5://127.0.0.1:{self.port}"

    def proxy_command(self) -> str:
        return self.jump.proxy_command()

    def start(self) -> Tunnel:
        self.jump.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        argv = ["ssh", *self.jump.ssh_options(), "-N", "-o", "ExitOnForwardFailure=yes",
                "-D", f"127.0.0.1:{self.port}", self.jump.host]  # fmt: skip
        # The tunnel dies with this process, even a SIGKILLed one, where util-linux can
        # see to it (the kernel's parent-death signal).
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                assert self._proc.stderr is not None
                said = self._proc.stderr.read().decode(errors="replace").strip()
                raise TargetError(
                    f"cannot open the BOSH_ALL_PROXY tunnel to {self.jump.user}@"
                    f"{self.jump.host}:{self.jump.port}: {said or 'ssh exited'}",
                    hint=f"Check the jump host, its user and key; its host key is pinned in "
                    f"{self.jump.known_hosts}.",
                )
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    log.info("Through %s@%s:%d (BOSH_ALL_PROXY)", self.jump.user,
                             self.jump.host, self.jump.port)  # fmt: skip
                    return self
            time.sleep(0.05)
        self.stop()
        raise TargetError(f"the BOSH_ALL_PROXY tunnel to {self.jump.host} did not open in time")

    def stop(self) -> None:
        """Idempotent: the tunnel is this run's own process, stopped by its pid."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
