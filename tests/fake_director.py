"""A fake BOSH Director and UAA for the tests: a stateful HTTPS server on 127.0.0.1.

It keeps deployments (manifest and VMs), tasks and SSH users as a Director does, and
serves bbr's routes by path (shared reference: bbr-deployment-mode.md §3): `/info`, UAA's
`/uaa/oauth/token` (client credentials, short-lived tokens), `/deployments`,
`/deployments/D`, `/deployments/D/vms?format=full` and `POST /deployments/D/ssh` (tasks),
`/tasks/N` and its outputs. A task stays `processing` for a few polls. Faults: any route
may answer a status instead (`fail`), a route's task may end in error (`task_error`), one
instance may fail SSH setup (`ssh_fails`). Its TLS certificate is signed by a CA the
fixture makes (trustme). Every request is logged, with which kind of credentials it had.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import secrets
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class FakeVm:
    group: str
    index: int
    id: str
    ip: str = "127.0.0.1"
    host_public_key: str = (
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeHostKeyOfTheFakeDirectorVm fake"
    )
    bootstrap: bool = False


@dataclass
class Task:
    id: int
    description: str
    result: str
    polls: int  # answers `processing` this many more times
    error: str | None = None  # ends in state error with this result
    seen: int = 0


@dataclass
class Request:
    method: str
    path: str
    auth: str  # "none", "basic", "bearer", "client" (UAA's client credentials), or "bad"
    body: Any = None


@dataclass
class FakeDirector:
    """The Director's state; `serve()` starts it, `stop()` ends it."""

    auth: str = "uaa"  # or "basic"
    client: str = "bbr_client"
    secret: str = "s3cret-not-for-logs"
    token_ttl: int = 3600
    task_polls: int = 2
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)
    fail: dict[tuple[str, str], int] = field(default_factory=dict)  # (METHOD, path) -> status
    task_error: dict[tuple[str, str], str] = field(default_factory=dict)
    ssh_fails: set[str] = field(default_factory=set)  # GROUP/INDEX that fail SSH setup
    requests: list[Request] = field(default_factory=list)
    ssh_users: dict[str, set[str]] = field(default_factory=dict)  # vm id -> users
    tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry (monotonic)
    # What the VMs' agents do on SSH setup (vm, user, public key) and cleanup (vm, regex).
    # A setup hook that returns False is an agent that does not respond: that VM fails.
    on_setup: Callable[[FakeVm, str, str], bool | None] | None = None
    on_cleanup: Callable[[FakeVm, str], None] | None = None
    # Where the deployments come from, if not from `deployments` as set: called before each
    # authorised Director request (tests/live_world.py serves a simulated director so).
    world: Callable[[], dict[str, dict[str, Any]]] | None = None

    def __post_init__(self) -> None:
        # Imported here: a suite that imports this module but serves no Director (CI's
        # dependency-floors run, which installs bbrx's floors only) needs no trustme.
        import trustme

        self.ca = trustme.CA()
        self._tasks: dict[int, Task] = {}
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- the world ---

    def add_deployment(self, name: str, groups: dict[str, int], manifest: str = "") -> None:
        vms = [
            FakeVm(group, index, f"{group}-{index}-{secrets.token_hex(4)}", bootstrap=index == 0)
            for group, count in groups.items()
            for index in range(count)
        ]
        text = manifest or f"name: {name}\ninstance_groups: []\n"
        self.deployments[name] = {"manifest": text, "vms": vms}

    def revoke_tokens(self) -> None:
        self.tokens.clear()

    @property
    def ca_pem(self) -> str:
        return self.ca.cert_pem.bytes().decode()

    # --- serving ---

    def serve(self) -> FakeDirector:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ca.issue_cert("127.0.0.1").configure_cert(context)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # --- what the routes do ---

    def new_task(self, route: tuple[str, str], description: str, result: str) -> int:
        with self._lock:
            number = next(self._numbers)
            error = self.task_error.get(route)
            self._tasks[number] = Task(number, description, result, self.task_polls, error)
        return number

    def task(self, number: int) -> Task | None:
        return self._tasks.get(number)

    def vms_result(self, name: str) -> str:
        return "".join(
            json.dumps(
                {
                    "job_name": vm.group,
                    "index": vm.index,
                    "id": vm.id,
                    "ips": [vm.ip],
                    "bootstrap": vm.bootstrap,
                    "vm_created_at": "2026-12-01T00:00:00Z",
                    "process_state": "running",
                }
            )
            + "\n"
            for vm in self.deployments[name]["vms"]
        )

    def ssh(self, name: str, body: dict[str, Any]) -> str:
        target = body.get("target") or {}
        group, ids = target.get("job"), target.get("ids") or []
        vms = [
            vm
            for vm in self.deployments[name]["vms"]
            if vm.group == group and (not ids or vm.id in ids or str(vm.index) in ids)
        ]
        params = body.get("params") or {}
        results = []
        for vm in vms:
            if body.get("command") == "setup":
                failed = f"{vm.group}/{vm.index}" in self.ssh_fails
                if not failed and self.on_setup is not None:
                    user, key = params.get("user", ""), params.get("public_key", "")
                    failed = self.on_setup(vm, user, key) is False
                if not failed:
                    self.ssh_users.setdefault(vm.id, set()).add(params.get("user", ""))
                results.append(
                    {
                        "command": "setup",
                        "status": "failure" if failed else "success",
                        "ip": vm.ip,
                        "host_public_key": vm.host_public_key,
                        "id": vm.id,
                        "index": vm.index,
                        "job": vm.group,
                    }
                )
            else:
                pattern = re.compile(params.get("user_regex", "^$"))
                users = self.ssh_users.get(vm.id, set())
                self.ssh_users[vm.id] = {u for u in users if not pattern.match(u)}
                if self.on_cleanup is not None:
                    self.on_cleanup(vm, params.get("user_regex", "^$"))
                results.append({"command": "cleanup", "status": "success", "id": vm.id})
        return json.dumps(results) + "\n"


def _handler(director: FakeDirector) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self, status: int, body: Any = b"", headers: dict[str, str] | None = None):
            if isinstance(body, bytes):
                data = body
            elif isinstance(body, str):
                data = body.encode()
            else:
                data = json.dumps(body).encode()
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _auth_kind(self) -> str:
            header = self.headers.get("Authorization", "")
            if not header:
                return "none"
            kind, _, value = header.partition(" ")
            if kind == "Basic":
                expected = f"{director.client}:{director.secret}".encode()
                if base64.b64decode(value or "=") != expected:
                    return "bad"
                # UAA's clients authenticate so to UAA; the Director then wants a token.
                return "basic" if director.auth == "basic" else "client"
            if director.auth == "uaa" and kind.lower() == "bearer":
                expiry = director.tokens.get(value)
                return "bearer" if expiry is not None and time.monotonic() < expiry else "bad"
            return "bad"

        def _route(self, method: str) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body: Any = raw.decode(errors="replace")
            if self.headers.get("Content-Type") == "application/json" and raw:
                body = json.loads(raw)
            auth = self._auth_kind()
            director.requests.append(Request(method, self.path, auth, body))
            status = director.fail.get((method, parts.path))
            if status is not None:
                return self._answer(status, {"code": status, "description": "injected fault"})
            path = parts.path
            if (method, path) == ("GET", "/info"):
                return self._answer(200, self._info())
            if (method, path) == ("POST", "/uaa/oauth/token"):
                return self._token(raw, parts.query)
            if auth not in ("basic", "bearer"):
                return self._answer(401, {"code": 401, "description": "Not authorized"})
            if director.world is not None:
                try:
                    director.deployments = director.world()
                except Exception as error:  # the world's own refusal: the Director's 500
                    return self._answer(500, {"code": 100, "description": str(error)})
            return self._director(method, path, parts.query, body)

        def _info(self) -> dict[str, Any]:
            if director.auth == "uaa":
                options = {"url": f"{director.url}/uaa"}
                return {"name": "fake", "user_authentication": {"type": "uaa", "options": options}}
            return {"name": "fake", "user_authentication": {"type": "basic", "options": {}}}

        def _token(self, raw: bytes, query: str) -> None:
            header = self.headers.get("Authorization", "")
            kind, _, value = header.partition(" ")
            good = kind == "Basic" and base64.b64decode(value or "=") == (
                f"{director.client}:{director.secret}".encode()
            )
            form = parse_qs(raw.decode())
            if not good or form != {"grant_type": ["client_credentials"]} or query:
                return self._answer(
                    401, {"error": "unauthorized", "error_description": "Bad credentials"}
                )
            token = secrets.token_hex(16)
            director.tokens[token] = time.monotonic() + director.token_ttl
            answer = {
                "token_type": "bearer",
                "access_token": token,
                "expires_in": director.token_ttl,
            }
            return self._answer(200, answer)

        def _director(self, method: str, path: str, query: str, body: Any) -> None:
            segments = path.strip("/").split("/")
            if (method, path) == ("GET", "/deployments"):
                return self._answer(200, [{"name": n} for n in director.deployments])
            if segments[0] == "deployments" and len(segments) >= 2:
                name = segments[1]
                if name not in director.deployments:
                    return self._answer(
                        404, {"code": 70000, "description": f"Deployment '{name}' doesn't exist"}
                    )
                if len(segments) == 2 and method == "GET":
                    return self._answer(200, {"manifest": director.deployments[name]["manifest"]})
                if segments[2:] == ["vms"] and method == "GET" and query == "format=full":
                    number = director.new_task(
                        (method, path), "retrieve vm-stats", director.vms_result(name)
                    )
                    return self._answer(302, headers={"Location": f"/tasks/{number}"})
                if segments[2:] == ["ssh"] and method == "POST" and isinstance(body, dict):
                    number = director.new_task((method, path), "ssh", director.ssh(name, body))
                    return self._answer(302, headers={"Location": f"{director.url}/tasks/{number}"})
            if segments[0] == "tasks" and len(segments) >= 2 and segments[1].isdigit():
                task = director.task(int(segments[1]))
                if task is None:
                    return self._answer(404, {"code": 10001, "description": "Task not found"})
                if len(segments) == 2:
                    return self._answer(200, self._task_state(task))
                if segments[2:] == ["output"] and query == "type=result":
                    return self._answer(200, task.error or task.result)
                if segments[2:] == ["output"] and query == "type=event":
                    if self.headers.get("Range", "bytes=0-") != "bytes=0-":
                        return self._answer(416, b"")
                    return self._answer(206, json.dumps({"stage": task.description}) + "\n")
            return self._answer(404, {"code": 404, "description": f"no route {method} {path}"})

        def _task_state(self, task: Task) -> dict[str, Any]:
            task.seen += 1
            if task.seen <= task.polls:
                return {"id": task.id, "state": "processing", "description": task.description}
            if task.error is not None:
                return {
                    "id": task.id,
                    "state": "error",
                    "description": task.description,
                    "result": task.error,
                }
            return {"id": task.id, "state": "done", "description": task.description}

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

    return Handler
