"""The BOSH Director's HTTP API, as bbr's deployment mode uses it.

Every call bbr makes (shared reference: bbr-deployment-mode.md §2 and §3): `GET /info`
without credentials decides basic auth or UAA; UAA tokens come from the client-credentials
grant; a call the Director answers with a redirect to `/tasks/ID` is a task, polled until
it ends, its result read from `/tasks/ID/output?type=result`. HTTPS only, verified
against the operator's CA certificate; errors name the Director, the call, the status
and the task, never a secret.

httpx carries the HTTP: its TLS goes through an `ssl.SSLContext` we build from the CA,
its timeouts are explicit, and it follows no redirect unless told, which the task
protocol needs.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from orchestrator.bosh.director import VmInfo
from orchestrator.errors import TargetError, UsageError

log = logging.getLogger(__name__)
# httpx logs every request at INFO: a run's output is ours, and --debug shows our own lines.
logging.getLogger("httpx").setLevel(logging.WARNING)

DEFAULT_PORT = 25555
# BOSH's instance group names (letters, digits, `-`, `_`, `.`), never `.` or `..` alone.
_GROUP = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9_.-]{1,128}")
OK_STATUSES = (200, 201, 204, 206, 302)
RUNNING_STATES = ("queued", "processing", "cancelling")
# A token is fetched anew this long before UAA said it expires (bbr ignores expiry and
# fetches before each POST and redirect instead; a long poll would outlive a short token).
EXPIRY_MARGIN = 30.0
BODY_TAIL = 500  # of an error response's body, in a message
NETWORK_TRIES = 5
NETWORK_PAUSE = 0.5


class DirectorApiError(TargetError):
    """The Director (or its UAA) answered, and not as a call needs."""


class TaskError(DirectorApiError):
    """A Director task ended in a state other than done."""

    def __init__(self, message: str, *, task: int, state: str, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.task = task
        self.state = state


@dataclass(frozen=True)
class SshHost:
    """One instance's SSH access, as the Director's `ssh` task result gives it."""

    id: str
    index: str
    address: str  # the `ip` field: host, or host:port
    host_public_key: str  # an authorized_keys line: the key the instance's sshd shows


def director_url(target: str) -> str:
    """bbr's reading of --target: the scheme is ignored (always https), port 25555 by default."""
    text = target.strip()
    parts = urlsplit(text if "://" in text else f"https://{text}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as error:
        raise UsageError(f"invalid BOSH Director URL {target!r}: {error}") from error
    if not host:
        raise UsageError(
            f"invalid BOSH Director URL {target!r}: it names no host",
            hint="Give --target as https://HOST[:PORT] (the port defaults to 25555).",
        )
    shown = f"[{host}]" if ":" in host else host
    return f"https://{shown}:{port or DEFAULT_PORT}"


def ssl_context(ca_cert: str | None) -> ssl.SSLContext:
    """The trust root from --ca-cert: the PEM itself (it contains BEGIN), or a path to it;
    without one, this machine's trust store (bbr refuses to run without a CA)."""
    if not ca_cert:
        return ssl.create_default_context()
    if "BEGIN" in ca_cert:
        pem, source = ca_cert, "--ca-cert"
    else:
        path = Path(ca_cert).expanduser()
        try:
            pem = path.read_text()
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or error
            raise UsageError(
                f"cannot read the CA certificate {path}: {reason}",
                hint="Give --ca-cert the Director's CA as PEM text or a path to a PEM file.",
            ) from error
        source = str(path)
    try:
        context = ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError) as error:
        raise UsageError(
            f"no usable PEM certificate in {source}: {error}",
            hint="Give --ca-cert the Director's CA certificate (-----BEGIN CERTIFICATE-----...).",
        ) from error
    return context


class DirectorApi:
    """A client of one Director: thread-safe (a run asks from many threads at once)."""

    def __init__(
        self,
        target: str,
        username: str,
        password: str,
        ca_cert: str | None,
        *,
        timeout: float = 30.0,
        poll_interval: float = 0.5,
        task_timeout: float = 3600.0,
        proxy: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not username or not password:
            raise UsageError(
                "a live Director needs --username and --password (or BOSH_CLIENT and "
                "BOSH_CLIENT_SECRET): a UAA client, or basic-auth credentials"
            )
        self.url = director_url(target)
        self._username = username
        self._password = password
        self._poll_interval = poll_interval
        self._task_timeout = task_timeout
        self._sleep = sleep
        self._http = httpx.Client(
            verify=ssl_context(ca_cert),
            timeout=timeout,
            follow_redirects=False,
            proxy=proxy,
            trust_env=False,  # only the proxy the caller gives: no HTTPS_PROXY surprise
        )
        self._lock = threading.Lock()
        self._stopped = threading.Event()  # the run is being stopped: no more waiting
        self._token: str | None = None
        self._token_expires = 0.0
        self._uaa: str | None = None
        self._auth_checked = False

    def close(self) -> None:
        self._http.close()

    def interrupt(self) -> None:
        """Stop waiting on tasks (from another thread): a poll under way raises TaskError."""
        self._stopped.set()

    # --- authentication --------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """`GET /info`, without credentials: the Director's name, version and auth scheme."""
        response = self._send("GET", f"{self.url}/info", authorized=False)
        document = _json(response, f"GET {self.url}/info")
        if not isinstance(document, dict):
            raise DirectorApiError(f"the Director at {self.url} answered /info with no object")
        return document

    def _discover_auth(self) -> None:
        if self._auth_checked:
            return
        auth = self.info().get("user_authentication") or {}
        if isinstance(auth, dict) and auth.get("type") == "uaa":
            url = (auth.get("options") or {}).get("url")
            if not isinstance(url, str):
                raise DirectorApiError(
                    f"the Director at {self.url} names UAA for authentication, but its URL "
                    f"{url!r} is not a string"
                )
            parts = urlsplit(url)
            if not parts.hostname:
                raise DirectorApiError(
                    f"the Director at {self.url} names an invalid UAA URL {url!r}"
                )
            # Always https, port 443 by default (bosh-cli's UAA client).
            port = parts.port or 443
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            self._uaa = f"https://{host}:{port}{parts.path.rstrip('/')}"
        self._auth_checked = True

    def _authorization(self, fresh: bool = False) -> str:
        with self._lock:
            self._discover_auth()
            if self._uaa is None:
                credentials = f"{self._username}:{self._password}".encode()
                return "Basic " + base64.b64encode(credentials).decode()
            if fresh or self._token is None or time.monotonic() >= self._token_expires:
                self._token, self._token_expires = self._fetch_token()
            return self._token

    def _fetch_token(self) -> tuple[str, float]:
        assert self._uaa is not None
        url = f"{self._uaa}/oauth/token"
        credentials = f"{self._username}:{self._password}".encode()
        try:
            response = self._http.post(
                url,
                content=b"grant_type=client_credentials",
                headers={
                    "Accept": "application/json",
                    "Content-Type": "application/x-www-form-urlencoded",
                    "Authorization": "Basic " + base64.b64encode(credentials).decode(),
                },
            )
        except httpx.HTTPError as error:
            raise DirectorApiError(
                f"cannot reach the Director's UAA at {self._uaa}: {_reason(error)}"
            ) from error
        if response.status_code != 200:
            raise DirectorApiError(
                f"UAA at {self._uaa} refused a token for client {self._username!r}: status "
                f"{response.status_code}: {_tail(response)}",
                hint="Check --username/--password: a UAA client (client credentials grant) "
                "with bosh.admin, or a team-scoped client.",
            )
        document = _json(response, f"POST {url}")
        kind, token = document.get("token_type"), document.get("access_token")
        if not isinstance(kind, str) or not isinstance(token, str) or not token:
            raise DirectorApiError(f"UAA at {self._uaa} answered a token request with no token")
        lifetime = document.get("expires_in")
        seconds = float(lifetime) if isinstance(lifetime, int | float) else 3600.0
        return f"{kind} {token}", time.monotonic() + max(0.0, seconds - EXPIRY_MARGIN)

    # --- requests --------------------------------------------------------------------

    def _send(
        self, method: str, url: str, *, authorized: bool = True, body: Any = None
    ) -> httpx.Response:
        """One request, retried once with a new token after a 401."""
        for attempt in (1, 2):
            headers = {}
            if authorized:
                # bbr fetches a token before every request with a body; we also do when
                # the last one was refused, and when it nears its expiry.
                headers["Authorization"] = self._authorization(fresh=attempt == 2)
            if body is not None:
                headers["Content-Type"] = "application/json"
            try:
                response = self._request(method, url, headers, body)
            except httpx.HTTPError as error:
                raise DirectorApiError(
                    f"the BOSH Director at {self.url} is unreachable or unhealthy: "
                    f"{method} {_path(url)}: {_reason(error)}",
                    hint="Check --target, the network path to it (BOSH_ALL_PROXY), and --ca-cert.",
                ) from error
            if response.status_code == 401 and authorized and attempt == 1:
                log.debug("%s %s: 401; fetching a new token and trying once more", method, url)
                continue
            break
        if response.status_code not in OK_STATUSES:
            raise DirectorApiError(
                f"the Director at {self.url} answered {method} {_path(url)} with status "
                f"{response.status_code}: {_tail(response)}",
                hint=_hint(response.status_code),
            )
        return response

    def _request(self, method: str, url: str, headers: dict[str, str], body: Any) -> httpx.Response:
        """One request, tried again up to NETWORK_TRIES times, NETWORK_PAUSE apart, when
        the network failed it (bbr's rule); a POST only when it never left (no connection),
        so that the Director is never asked for one task twice."""
        content = None if body is None else json.dumps(body).encode()
        for attempt in range(1, NETWORK_TRIES + 1):
            try:
                return self._http.request(method, url, headers=headers, content=content)
            except httpx.TransportError as error:
                again = method == "GET" or isinstance(error, httpx.ConnectError)
                if not again or attempt == NETWORK_TRIES:
                    raise
                log.debug("%s %s: %s; trying again", method, _path(url), _reason(error))
                self._sleep(NETWORK_PAUSE)
        raise AssertionError("unreachable")

    def _get_json(self, path: str) -> Any:
        return _json(self._send("GET", f"{self.url}{path}"), f"GET {self.url}{path}")

    def _task(self, method: str, path: str, body: Any = None, *, what: str) -> str:
        """A call the Director runs as a task: followed, polled to its end; its result."""
        response = self._send(method, f"{self.url}{path}", body=body)
        task = self._task_id(response, method, path)
        deadline = time.monotonic() + self._task_timeout
        offset = 0
        while True:
            state = self._get_json(f"/tasks/{task}")
            status = state.get("state") if isinstance(state, dict) else None
            # The event output, as bbr reads it (a long task's progress, for the debug log).
            events = self._send_range(f"/tasks/{task}/output?type=event", offset)
            offset += len(events)
            if status == "done":
                break
            if status not in RUNNING_STATES:
                result = state.get("result") if isinstance(state, dict) else None
                raise TaskError(
                    f"Director task {task} ({what}) on {self.url} ended {status}"
                    + (f": {result}" if result else ""),
                    task=task,
                    state=str(status),
                    hint=f"See it on the Director: bosh task {task} --debug",
                )
            if self._stopped.is_set():
                raise TaskError(
                    f"stopped waiting for Director task {task} ({what}) on {self.url}: the run "
                    "was interrupted (the task goes on on the Director)",
                    task=task,
                    state=str(status),
                )
            if time.monotonic() > deadline:
                raise TaskError(
                    f"Director task {task} ({what}) on {self.url} is still {status} after "
                    f"{self._task_timeout:g} s",
                    task=task,
                    state=str(status),
                )
            if self._sleep is time.sleep:
                self._stopped.wait(self._poll_interval)
            else:
                self._sleep(self._poll_interval)
        return self._send("GET", f"{self.url}/tasks/{task}/output?type=result").text

    def _send_range(self, path: str, offset: int) -> bytes:
        try:
            response = self._http.get(
                f"{self.url}{path}",
                headers={"Authorization": self._authorization(), "Range": f"bytes={offset}-"},
            )
        except httpx.HTTPError as error:  # progress only: the task's state decides
            log.debug("task events %s: %s", path, _reason(error))
            return b""
        if response.status_code == 416:  # nothing new since the offset
            return b""
        if response.status_code not in OK_STATUSES:
            log.debug("task events %s: status %d", path, response.status_code)
            return b""
        for line in response.text.splitlines():
            log.debug("task event: %s", line)
        return response.content

    def _task_id(self, response: httpx.Response, method: str, path: str) -> int:
        location = response.headers.get("location", "")
        tail = urlsplit(location).path
        if response.status_code != 302 or not tail.startswith("/tasks/"):
            raise DirectorApiError(
                f"the Director at {self.url} answered {method} {path} with status "
                f"{response.status_code} and no task to follow (Location {location!r})"
            )
        try:
            # bbr follows to the configured host:port, whatever host Location names.
            return int(tail.removeprefix("/tasks/").strip("/"))
        except ValueError as error:
            raise DirectorApiError(
                f"the Director at {self.url} redirected {method} {path} to {location!r}, "
                "which is no task"
            ) from error

    # --- the calls -------------------------------------------------------------------

    def deployments(self) -> list[str]:
        document = self._get_json("/deployments")
        if not isinstance(document, list):
            raise DirectorApiError(f"the Director at {self.url} listed deployments as no list")
        return [str(d["name"]) for d in document if isinstance(d, dict) and "name" in d]

    def vms(self, deployment: str) -> list[VmInfo]:
        text = self._task(
            "GET", f"/deployments/{_name(deployment)}/vms?format=full", what=f"vms of {deployment}"
        )
        found = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                vm = json.loads(line)
                info = VmInfo(
                    group=str(vm["job_name"]),
                    index=str(vm["index"]),
                    id=str(vm["id"]),
                    ips=tuple(str(ip) for ip in vm.get("ips") or ()),
                    bootstrap=bool(vm.get("bootstrap")),
                    az=vm.get("az"),
                )
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise DirectorApiError(
                    f"the Director's VM list of {deployment} has a bad line {number}: {error}"
                ) from error
            # The group and index name the artifact's files: nothing that is not a name.
            if not _GROUP.fullmatch(info.group) or not info.index.isdigit():
                raise DirectorApiError(
                    f"the Director's VM list of {deployment} names an instance "
                    f"{info.group[:60]!r}/{info.index[:20]!r} (line {number}), which is no "
                    "instance group name and index"
                )
            found.append(info)
        return found

    def manifest(self, deployment: str) -> str:
        document = self._get_json(f"/deployments/{_name(deployment)}")
        manifest = document.get("manifest") if isinstance(document, dict) else None
        if not isinstance(manifest, str):
            raise DirectorApiError(f"the Director at {self.url} gave no manifest of {deployment}")
        return manifest

    def ssh_setup(self, deployment: str, group: str, user: str, public_key: str) -> list[SshHost]:
        """Create `user` with `public_key` on every instance of `group` (one task)."""
        body = {
            "command": "setup",
            "deployment_name": deployment,
            "target": {"job": group, "indexes": [], "ids": []},
            "params": {"user": user, "public_key": public_key},
        }
        what = f"SSH setup of {deployment}/{group}"
        text = self._task("POST", f"/deployments/{_name(deployment)}/ssh", body, what=what)
        try:
            results = json.loads(text)
        except ValueError as error:
            raise DirectorApiError(f"{what}: the task's result is not JSON: {error}") from error
        if not isinstance(results, list) or not results:
            raise DirectorApiError(f"{what}: the Director created no SSH session")
        hosts = []
        for result in results:
            if not isinstance(result, dict):
                raise DirectorApiError(f"{what}: the task's result holds a non-object")
            name = f"{group}/{result.get('id') or result.get('index')}"
            if result.get("status") != "success":
                raise DirectorApiError(
                    f"{what}: instance {name} failed: status {result.get('status')!r}",
                    hint="The instance's agent could not add the SSH user; see the task with "
                    "bosh task --debug.",
                )
            key, address = result.get("host_public_key"), result.get("ip")
            if not isinstance(key, str) or not key.strip() or not isinstance(address, str):
                raise DirectorApiError(f"{what}: instance {name} came with no host key or address")
            index = str(result.get("index"))
            if not index.isdigit():
                raise DirectorApiError(f"{what}: instance {name[:80]!r} came with no index")
            hosts.append(SshHost(str(result.get("id") or ""), index, address, key.strip()))
        return hosts

    def ssh_cleanup(self, deployment: str, group: str, user: str, ids: list[str]) -> None:
        """Remove the SSH user from instances of `group` (all of them if `ids` is empty).
        The task is started, not waited for, as bbr does."""
        body = {
            "command": "cleanup",
            "deployment_name": deployment,
            "target": {"job": group, "indexes": list(ids), "ids": list(ids)},
            "params": {"user_regex": f"^{user}"},
        }
        path = f"/deployments/{_name(deployment)}/ssh"
        response = self._send("POST", f"{self.url}{path}", body=body)
        self._task_id(response, "POST", path)


def _name(deployment: str) -> str:
    """A deployment name as a path segment: BOSH names need no quoting; refuse one that would."""
    if not deployment or any(c in deployment for c in "/?#%") or deployment in (".", ".."):
        raise UsageError(f"invalid deployment name {deployment!r}")
    return deployment


def _json(response: httpx.Response, call: str) -> Any:
    try:
        return response.json()
    except ValueError as error:
        raise DirectorApiError(f"{call} answered with no JSON: {_tail(response)}") from error


def _tail(response: httpx.Response) -> str:
    text = response.text.strip()
    return (text[-BODY_TAIL:] if len(text) > BODY_TAIL else text) or "(no body)"


def _path(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def _reason(error: httpx.HTTPError) -> str:
    cause: BaseException | None = error
    for _ in range(10):  # httpx wraps httpcore, which wraps ssl
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"its TLS certificate is not trusted ({cause.verify_message}): check --ca-cert"
        if cause is None:
            break
        cause = cause.__cause__ or cause.__context__
    return str(error) or type(error).__name__


def _hint(status: int) -> str | None:
    if status in (401, 403):
        return "The Director refused these credentials: check --username and --password."
    if status == 404:
        return "Check the deployment's name, and that this client may see it."
    return None
