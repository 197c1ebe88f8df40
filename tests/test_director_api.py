"""The Director API client against a fake Director and UAA over real HTTPS on loopback
(tests/fake_director.py): auth schemes, tokens, the task protocol, errors that name what
failed and never the secret."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from collections.abc import Iterator

import pytest

from orchestrator.bosh import proxy, socks
from orchestrator.bosh.api import DirectorApi, DirectorApiError, TaskError, director_url
from orchestrator.errors import TargetError, UsageError
from tests import sshd
from tests.fake_director import FakeDirector


@pytest.fixture(params=["uaa", "basic"])
def fake(request: pytest.FixtureRequest) -> Iterator[FakeDirector]:
    director = FakeDirector(auth=request.param, task_polls=2)
    director.add_deployment("redis", {"redis": 3, "sentinel": 1}, manifest="name: redis\n")
    director.add_deployment("cf", {"api": 1})
    director.serve()
    yield director
    director.stop()


def client(fake: FakeDirector, **kwargs) -> DirectorApi:
    options = {"poll_interval": 0.01, **kwargs}
    return DirectorApi(fake.url, fake.client, fake.secret, fake.ca_pem, **options)


def test_deployments_vms_and_manifest(fake: FakeDirector) -> None:
    api = client(fake)
    assert api.deployments() == ["redis", "cf"]
    vms = api.vms("redis")
    assert [vm.name for vm in vms] == ["redis/0", "redis/1", "redis/2", "sentinel/0"]
    assert [vm.bootstrap for vm in vms] == [True, False, False, True]
    assert all(vm.ips == ("127.0.0.1",) and vm.id for vm in vms)
    assert api.manifest("redis") == "name: redis\n"
    # /info without credentials first; the task polled while it was processing.
    assert (fake.requests[0].path, fake.requests[0].auth) == ("/info", "none")
    polls = [r.path for r in fake.requests if r.path.startswith("/tasks/1")]
    assert polls.count("/tasks/1") == 3 and polls[-1] == "/tasks/1/output?type=result"
    others = [r for r in fake.requests if r.path not in ("/info", "/uaa/oauth/token")]
    assert {r.auth for r in others} == {"bearer" if fake.auth == "uaa" else "basic"}
    api.close()


def test_a_uaa_token_is_fetched_again_after_a_401_and_before_it_expires() -> None:
    fake = FakeDirector(auth="uaa", task_polls=0).serve()
    fake.add_deployment("redis", {"redis": 1})
    try:
        api = client(fake)
        api.deployments()
        api.deployments()  # the token is reused while it is good
        fake.revoke_tokens()  # the Director forgets it: a 401, one new token, one retry
        assert api.deployments() == ["redis"]
        calls = [(r.path, r.auth) for r in fake.requests if r.path != "/info"]
        token = ("/uaa/oauth/token", "client")
        ok, refused = ("/deployments", "bearer"), ("/deployments", "bad")
        assert calls == [token, ok, ok, refused, token, ok]
        # The form is exactly the client-credentials grant, in the body.
        tokens = [r for r in fake.requests if r.path == "/uaa/oauth/token"]
        assert {r.body for r in tokens} == {"grant_type=client_credentials"}

        # A token UAA says lasts no longer than the margin is fetched anew before each
        # use: no request goes out with one about to expire.
        fake.token_ttl = 30
        fake.revoke_tokens()
        del fake.requests[:]
        api.deployments()
        api.deployments()
        calls = [(r.path, r.auth) for r in fake.requests]
        assert calls == [refused, token, ok, token, ok]
    finally:
        fake.stop()


def test_wrong_credentials_name_the_client_never_the_secret(
    fake: FakeDirector, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    api = DirectorApi(fake.url, fake.client, "wrong-" + fake.secret, fake.ca_pem)
    with pytest.raises(DirectorApiError) as caught:
        api.deployments()
    message = caught.value.message + (caught.value.hint or "")
    if fake.auth == "uaa":
        assert "UAA at" in message and "refused a token for client 'bbr_client'" in message
        assert "status 401" in message
    else:
        assert f"the Director at {fake.url} answered GET /deployments with status 401" in message
    assert "--username" in message
    assert fake.secret not in message and fake.secret not in caplog.text


def test_the_ca_is_pem_text_or_a_path_and_a_wrong_one_is_refused(
    fake: FakeDirector, tmp_path
) -> None:
    path = tmp_path / "ca.pem"
    path.write_text(fake.ca_pem)
    assert DirectorApi(fake.url, fake.client, fake.secret, str(path)).deployments()
    other = FakeDirector()  # a CA of its own, never served
    with pytest.raises(DirectorApiError, match=r"TLS certificate is not trusted.*--ca-cert"):
        DirectorApi(fake.url, fake.client, fake.secret, other.ca_pem).deployments()
    with pytest.raises(UsageError, match=r"cannot read the CA certificate .*nope\.pem"):
        DirectorApi(fake.url, fake.client, fake.secret, str(tmp_path / "nope.pem"))
    with pytest.raises(UsageError, match="no usable PEM certificate"):
        DirectorApi(fake.url, fake.client, fake.secret, "-----BEGIN CERTIFICATE-----\nxx\n")


def test_a_task_that_ends_in_error_names_the_task_and_its_error(fake: FakeDirector) -> None:
    fake.task_error[("GET", "/deployments/redis/vms")] = "Timed out pinging VMs"
    with pytest.raises(TaskError) as caught:
        client(fake).vms("redis")
    assert caught.value.state == "error"
    assert caught.value.message == (
        f"Director task {caught.value.task} (vms of redis) on {fake.url} ended error: "
        "Timed out pinging VMs"
    )


def test_a_failing_route_and_a_missing_deployment_say_what_and_where(fake: FakeDirector) -> None:
    fake.fail[("GET", "/deployments")] = 500
    api = client(fake)
    with pytest.raises(DirectorApiError, match=r"answered GET /deployments with status 500"):
        api.deployments()
    with pytest.raises(DirectorApiError) as caught:
        api.manifest("nosuch")
    assert "status 404" in caught.value.message and "Deployment 'nosuch'" in caught.value.message
    with pytest.raises(UsageError, match="invalid deployment name"):
        api.manifest("../info")


def test_ssh_setup_returns_each_host_and_cleanup_removes_the_user(fake: FakeDirector) -> None:
    api = client(fake)
    hosts = api.ssh_setup("redis", "redis", "bosh_0123456789abcde", "ssh-ed25519 AAAA key")
    assert [h.index for h in hosts] == ["0", "1", "2"]
    assert all(h.address == "127.0.0.1" and h.host_public_key.startswith("ssh-") for h in hosts)
    assert all(fake.ssh_users[h.id] == {"bosh_0123456789abcde"} for h in hosts)
    [setup] = [r.body for r in fake.requests if r.path == "/deployments/redis/ssh"]
    assert setup["target"] == {"job": "redis", "indexes": [], "ids": []}
    api.ssh_cleanup("redis", "redis", "bosh_0123456789abcde", [hosts[0].id])
    assert fake.ssh_users[hosts[0].id] == set()
    assert fake.ssh_users[hosts[1].id] == {"bosh_0123456789abcde"}


def test_one_instance_failing_ssh_setup_is_named(fake: FakeDirector) -> None:
    fake.ssh_fails.add("redis/1")
    with pytest.raises(
        DirectorApiError, match=r"SSH setup of redis/redis: instance redis/\S+ failed"
    ):
        client(fake).ssh_setup("redis", "redis", "bosh_x", "ssh-ed25519 AAAA key")


def test_an_unreachable_director_is_named() -> None:
    fake = FakeDirector()
    pauses: list[float] = []
    with pytest.raises(DirectorApiError, match=r"https://127\.0\.0\.1:9 is unreachable"):
        DirectorApi(
            "127.0.0.1:9", "c", "s", fake.ca_pem, timeout=2, sleep=pauses.append
        ).deployments()
    assert pauses == [0.5] * 4  # tried five times, as bbr does


@pytest.mark.parametrize(
    ("target", "url"),
    [
        ("10.0.0.6", "https://10.0.0.6:25555"),
        ("http://10.0.0.6", "https://10.0.0.6:25555"),
        ("https://director.example:443/", "https://director.example:443"),
        ("https://[fd00::6]:25555", "https://[fd00::6]:25555"),
    ],
)
def test_the_target_is_always_https_on_25555_by_default(target: str, url: str) -> None:
    assert director_url(target) == url


@pytest.mark.parametrize("target", ["https://:25555", "https://h:99999", ""])
def test_a_target_without_a_host_is_refused(target: str) -> None:
    with pytest.raises(UsageError, match="invalid BOSH Director URL"):
        director_url(target)


def test_a_setup_that_fails_on_one_instance_is_cleaned_up_on_all(fake: FakeDirector) -> None:
    """The Director added the run's user to the instances whose setup worked: a failed
    group setup still gets its cleanup, and the run's key pair is gone after close."""
    from orchestrator.bosh.live import LiveDirector

    fake.ssh_fails.add("redis/1")
    director = LiveDirector(client(fake))
    with pytest.raises(DirectorApiError, match=r"instance redis/\S+ failed"):
        director.open_instances("redis", "redis")
    assert all(users == set() for users in fake.ssh_users.values()), fake.ssh_users
    cleanups = [r.body for r in fake.requests if r.path == "/deployments/redis/ssh"]
    assert [b["command"] for b in cleanups] == ["setup", "cleanup"]
    assert cleanups[1]["params"] == {"user_regex": f"^{director.user}"}
    keys = director._keys
    assert keys is not None and (keys / "id").exists()
    director.close()
    assert not keys.exists()


def test_names_and_addresses_from_the_director_are_checked_before_use(fake: FakeDirector) -> None:
    """A group name becomes the artifact's file names and an address an ssh argument: a
    Director that answers `../x` or `-oProxyCommand=...` is refused, and the access it set
    up is cleaned up."""
    from orchestrator.bosh.live import LiveDirector

    fake.add_deployment("odd", {"../x": 1})
    with pytest.raises(DirectorApiError, match=r"names an instance '\.\./x'/'0'"):
        client(fake).vms("odd")
    [vm] = fake.deployments["cf"]["vms"]
    vm.ip = "-oProxyCommand=touch /tmp/bbrx-pwned"
    director = LiveDirector(client(fake))
    with pytest.raises(TargetError, match="which is no IP address or host name"):
        director.open_instances("cf", "api")
    assert fake.ssh_users[vm.id] == set()  # the setup was cleaned up
    director.close()


# --- BOSH_ALL_PROXY=socks5://: the instances' SOCKS5 relay (orchestrator/bosh/socks.py) ---


def _one_answer(*answers: bytes) -> tuple[int, threading.Thread]:
    """A loopback server that takes one connection and answers each message with the next
    of `answers` (a proxy that misbehaves in one known way)."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with server, server.accept()[0] as conn:
            for answer in answers:
                conn.recv(512)
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server.getsockname()[1], thread


def test_the_socks5_relay_names_a_proxy_that_refuses() -> None:
    closed = sshd.free_port()
    unreachable = re.escape(f"cannot reach the SOCKS5 proxy 127.0.0.1:{closed}")
    with pytest.raises(socks.SocksError, match=unreachable):
        socks.connect("127.0.0.1", closed, "10.0.0.5", 22)
    port, thread = _one_answer(b"\x05\x02")  # wants a user and password
    with pytest.raises(socks.SocksError, match="wants authentication"):
        socks.connect("127.0.0.1", port, "10.0.0.5", 22)
    thread.join(5)
    refused = b"\x05\x05\x00\x01" + bytes(6)  # CONNECT answered "connection refused"
    port, thread = _one_answer(b"\x05\x00", refused)
    refusal = re.escape("would not connect to 10.0.0.5:22: CONNECTION_REFUSED")
    with pytest.raises(socks.SocksError, match=refusal):
        socks.connect("127.0.0.1", port, "10.0.0.5", 22)
    thread.join(5)
    assert socks.main(["127.0.0.1", "x", "10.0.0.5", "22"]) == 2


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("socks5://127.0.0.1", "a SOCKS5 proxy is socks5://HOST:PORT"),
        ("socks5://me:pw@127.0.0.1:1080", "a user or password in a socks5:// proxy"),
        ("http://me:s3cret@127.0.0.1:3128", "'http://me:***@127.0.0.1:3128': bbrx takes"),
        ("socks5://me:s3cret@127.0.0.1", "'socks5://me:***@127.0.0.1': a SOCKS5 proxy is"),
        # A password with a / ends a URL's netloc early: it is still not shown.
        ("socks5://me:s3cret/x@127.0.0.1:1080", "'socks5://me:***@127.0.0.1:1080': its port"),
        ("ssh+socks5://me:123/s3cret@h?private-key=k", "'ssh+socks5://me:***@h?private-key=k'"),
        ("me:s3cret@127.0.0.1:1080", "'me:***@127.0.0.1:1080': bbrx takes"),
        ("socks5://[::1", "'socks5://[::1' is not a URL"),
    ],
)
def test_a_bosh_all_proxy_bbrx_cannot_use_is_named(value: str, message: str, tmp_path) -> None:
    with pytest.raises(UsageError, match=re.escape(message)) as refused:
        proxy.open_proxy(value, tmp_path)
    assert "s3cret" not in f"{refused.value} {refused.value.hint}"


@pytest.mark.parametrize(
    "bound",
    [b"\x03\x09localhost\x04\x38", b"\x04" + bytes(15) + b"\x01\x04\x38"],  # a name, IPv6
    ids=["name", "ipv6"],
)
def test_the_socks5_relay_carries_both_ways_past_any_reply_address(bound: bytes) -> None:
    """A proxy's CONNECT reply ends where its address says (a name, or IPv6); what follows
    is the tunnel: data from the far side reaches ssh's stdout, ssh's stdin reaches it."""
    server = socket.create_server(("127.0.0.1", 0))

    def proxy_then_echo() -> None:
        with server, server.accept()[0] as conn:
            conn.recv(3)
            conn.sendall(b"\x05\x00")
            conn.recv(512)
            conn.sendall(b"\x05\x00\x00" + bound + b"hello ")  # the far side speaks first
            while data := conn.recv(512):
                conn.sendall(data.upper())

    thread = threading.Thread(target=proxy_then_echo, daemon=True)
    thread.start()
    sock = socks.connect("127.0.0.1", server.getsockname()[1], "10.0.0.5", 22)
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    relaying = threading.Thread(target=socks.relay, args=(sock, stdin_r, stdout_w), daemon=True)
    relaying.start()
    os.write(stdin_w, b"ssh-2.0")
    os.close(stdin_w)  # ssh is done: the proxy sees the end, and closes its side
    relaying.join(10)
    assert not relaying.is_alive()
    sock.close()
    os.close(stdout_w)
    received = b""
    while data := os.read(stdout_r, 512):
        received += data
    assert received == b"hello SSH-2.0"
    for fd in (stdin_r, stdout_r):
        os.close(fd)
