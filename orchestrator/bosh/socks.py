"""`BOSH_ALL_PROXY=socks5://HOST:PORT`: a SOCKS5 proxy, as bbr also accepts it.

The Director API goes through it with httpx's own SOCKS support. OpenSSH has no SOCKS
client of its own, so each instance's ssh gets this module as its ProxyCommand:
`python -m orchestrator.bosh.socks PROXY_HOST PROXY_PORT HOST PORT` asks the proxy to
CONNECT to HOST:PORT (socksio speaks the protocol) and then relays ssh's stdin and stdout
to that connection until either side closes. It imports nothing else of bbrx.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import sys
import threading
import time

from socksio import socks5

MODULE = "orchestrator.bosh.socks"  # what `python -m` runs (where __name__ is __main__)
CONNECT_TIMEOUT = 15.0
CHUNK = 1 << 16
DRAIN_TIMEOUT = 10.0  # seconds the connection may go on sending once ssh's side is closed


class SocksError(Exception):
    """The proxy refused or broke the CONNECT: what ssh then prints as the reason."""


def proxy_command(proxy_host: str, proxy_port: int) -> str:
    """An instance's ProxyCommand (ssh expands %h and %p, and runs it with /bin/sh)."""
    # -P: the working directory (bbrx's, which ssh passes on) is not put on sys.path, so
    # nothing there named like a module is imported in its place.
    words = [sys.executable, "-P", "-m", MODULE, proxy_host, str(proxy_port)]
    return " ".join(shlex.quote(w).replace("%", "%%") for w in words) + " %h %p"


def connect(proxy_host: str, proxy_port: int, host: str, port: int) -> socket.socket:
    """A connection to HOST:PORT through the proxy (no authentication, as bbr's form has
    none), ready to carry data."""
    where = f"the SOCKS5 proxy {proxy_host}:{proxy_port}"
    try:
        sock = socket.create_connection((proxy_host, proxy_port), timeout=CONNECT_TIMEOUT)
    except OSError as error:
        raise SocksError(f"cannot reach {where}: {error.strerror or error}") from error
    try:
        conn = socks5.SOCKS5Connection()
        conn.send(socks5.SOCKS5AuthMethodsRequest([socks5.SOCKS5AuthMethod.NO_AUTH_REQUIRED]))
        sock.sendall(conn.data_to_send())
        auth = conn.receive_data(_read(sock, 2, where))
        if getattr(auth, "method", None) != socks5.SOCKS5AuthMethod.NO_AUTH_REQUIRED:
            raise SocksError(f"{where} wants authentication, which bbr's socks5:// form has not")
        request = socks5.SOCKS5CommandRequest.from_address(
            socks5.SOCKS5Command.CONNECT, (host, port)
        )
        conn.send(request)
        sock.sendall(conn.data_to_send())
        reply = conn.receive_data(_reply(sock, where))
        code = getattr(reply, "reply_code", None)
        if code != socks5.SOCKS5ReplyCode.SUCCEEDED:
            name = getattr(code, "name", code)
            raise SocksError(f"{where} would not connect to {host}:{port}: {name}")
    except (OSError, socks5.ProtocolError) as error:
        sock.close()
        raise SocksError(f"{where} broke off the CONNECT to {host}:{port}: {error}") from error
    except SocksError:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


def _reply(sock: socket.socket, where: str) -> bytes:
    """A CONNECT reply, read to its exact end: what follows it is the tunnel's data."""
    head = _read(sock, 4, where)
    kind = head[3]
    if kind == 1:  # IPv4
        rest = 4
    elif kind == 4:  # IPv6
        rest = 16
    elif kind == 3:  # a name, its length first
        length = _read(sock, 1, where)
        head += length
        rest = length[0]
    else:
        raise SocksError(f"{where} answered with an unknown address type {kind}")
    return head + _read(sock, rest + 2, where)


def _read(sock: socket.socket, size: int, where: str) -> bytes:
    data = b""
    while len(data) < size:
        part = sock.recv(size - len(data))
        if not part:
            raise SocksError(f"{where} closed the connection during the SOCKS5 handshake")
        data += part
    return data


def relay(sock: socket.socket, stdin: int = 0, stdout: int = 1) -> None:
    """ssh's stdin to the connection and the connection to ssh's stdout, until the
    connection ends (ssh closing its side ends the sending half)."""

    def send() -> None:
        with contextlib.suppress(OSError):
            while data := os.read(stdin, CHUNK):
                sock.sendall(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        # ssh is done (or gone: a SIGKILLed ssh sends no hang-up). A proxy that does not
        # pass the half-close on would keep this relay open for ever: the rest of the
        # answer gets a while, then the connection is ended (which wakes the recv below).
        time.sleep(DRAIN_TIMEOUT)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    threading.Thread(target=send, daemon=True).start()
    with contextlib.suppress(OSError):
        while data := sock.recv(CHUNK):
            view = memoryview(data)
            while view:
                view = view[os.write(stdout, view) :]


def main(argv: list[str]) -> int:
    if len(argv) != 4 or not argv[1].isdigit() or not argv[3].isdigit():
        sys.stderr.write(f"usage: python -m {MODULE} PROXY_HOST PROXY_PORT HOST PORT\n")
        return 2
    try:
        sock = connect(argv[0], int(argv[1]), argv[2], int(argv[3]))
    except SocksError as error:
        sys.stderr.write(f"bbrx: {error}\n")
        return 1
    with sock:
        relay(sock)
    return 0


if __name__ == "__main__":  # a program of its own: ssh runs it as a ProxyCommand
    raise SystemExit(main(sys.argv[1:]))
