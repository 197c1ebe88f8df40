"""The live transport: a real director VM over SSH, with the OpenSSH client as the engine.

The `ssh` binary (not a Python SSH library) honours the operator's ~/.ssh/config, bastions
(ProxyJump), known_hosts with hashed entries and CA lines, agents and every key type, and
is what operators debug with `ssh -v`. bbrx drives it without a shell in between and keeps
one multiplexed master connection per run (ControlMaster in a private directory), so each
remote command costs a channel, not a handshake. Host keys are verified against
known_hosts unless the operator asks to trust a new key on first use.

Every ssh process runs in a session of its own (BatchMode: it never prompts), so a Ctrl-C
at the terminal reaches bbrx alone; bbrx then decides what to stop, and an unlock under
way is not cut by the operator's keystroke.

Remote side, as bbr does it: scripts under /var/vcap/jobs/*/bin/bbr/ run with `sudo` and
bbr's environment; each job's artifact directory travels as an uncompressed tar.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, BinaryIO, cast

from orchestrator.bbr import tardigest
from orchestrator.errors import (
    DiscoveryError,
    InterruptedRunError,
    TargetError,
    TransportError,
)
from orchestrator.transport.instance import (
    IGNORED_JOBS,
    INTERRUPTED_KILL,
    OWNER_MAX,
    REMOTE_WORK_DIR,
    SCRIPT_NAMES,
    WORK_DIR_OWNER,
    Job,
    ScriptCall,
    ScriptResult,
    SentDigest,
    VmStream,
)
from orchestrator.transport.scriptio import (
    MARKER_VAR,
    OUTPUT_GRACE_SECONDS,
    ScriptOutput,
    warn_leftovers,
)

log = logging.getLogger(__name__)

JOBS_GLOB = "/var/vcap/jobs/*/bin/bbr/*"
PIPE_SIZE = 1 << 20  # F_SETPIPE_SZ: a 1 MiB pipe measured 1.4x faster than the 64 KiB default
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# Preferred first, the rest of OpenSSH's defaults after it: AES-GCM uses the CPU's AES
# instructions and measured 1.2x faster than chacha20 here.
CIPHERS = "^aes128-gcm@openssh.com"
_SSH_FAILURE = 255
WINDOWS = "Windows_NT"  # what cmd.exe says %OS% is


class SshInstance:
    """A director VM reached with the OpenSSH client. Thread-safe."""

    group = "bosh"
    index = "0"
    instance_id: str | None = None
    mode = "live"

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        private_key_path: Path,
        *,
        accept_new_host_key: bool = False,
        known_hosts: Path | None = None,
        connect_timeout: int = 15,
        pinned: bool = False,
        proxy_command: str | None = None,
        connect_ahead: bool = False,
    ) -> None:
        self.proxy_command = proxy_command  # BOSH_ALL_PROXY's jump host, for a live deployment
        # pinned: `known_hosts` holds the one key this host may show (a live deployment's
        # instance, as the Director reported it): the machine's global known hosts,
        # which may hold a stale key for a reused IP, are not consulted.
        self.pinned = pinned
        self.host = host
        self.port = port
        self.username = username
        self.key = private_key_path.expanduser()
        self.address = f"{host}:{port}"
        # How its own messages name it: a live deployment's instance adds its name
        # (`redis/2 at 10.0.0.5:22`), which its address alone does not tell.
        self.label = self.address
        self.accept_new_host_key = accept_new_host_key
        self.known_hosts = known_hosts.expanduser() if known_hosts else None
        self.connect_timeout = connect_timeout
        self.info: dict[str, str] = {}
        self._check_key()
        self._control_dir = Path(tempfile.mkdtemp(prefix="bbrx-ssh-"))  # mode 0700
        self._connected = False
        self._master_pid: int | None = None
        self._connect_lock = threading.Lock()
        # The master connection being opened in the background (connect_ahead): `connect`
        # takes its outcome, `close` ends it if nothing did.
        self._opening: subprocess.Popen[bytes] | None = None
        if connect_ahead and not accept_new_host_key:
            # The handshake (about 0.25 s) then overlaps the rest of bbrx's start: its
            # imports, the audit log, the lease. Not when trusting a new host key on first
            # use: that writes known_hosts, and must happen inside the run that records it.
            try:
                self._opening = self._start_master(ahead=True)
            except OSError as exc:  # no ssh, no fork: connect() meets it again, in the run
                log.debug("could not open the connection to %s ahead: %s", self.label, exc)
        # Guards starting and registering scripts against terminate_scripts (which runs in
        # the run's signal watcher thread, never in a signal handler).
        self._lock = threading.Lock()
        self._running: dict[subprocess.Popen[bytes], int | None] = {}
        self._markers: dict[subprocess.Popen[bytes], str] = {}
        # Scripts running when the run was interrupted: their failure is the kill's doing.
        self._killed: set[subprocess.Popen[bytes]] = set()
        self._streams: set[subprocess.Popen[bytes]] = set()
        self._aborted: set[subprocess.Popen[bytes]] = set()

    # --- connection ------------------------------------------------------------------------

    def _check_key(self) -> None:
        try:
            mode = self.key.stat().st_mode
        except FileNotFoundError:
            raise TargetError(
                f"private key {self.key} does not exist",
                hint="Pass --private-key-path the key the director's bbr user accepts.",
            ) from None
        if stat.S_IMODE(mode) & 0o077:
            raise TargetError(
                f"private key {self.key} is readable by group or others "
                f"(mode {stat.S_IMODE(mode):04o}): refusing to use it, as ssh does",
                hint=f"Make it private: chmod 600 {self.key}",
            )
        self._parse_key()

    def _parse_key(self) -> None:
        """Read the key before connecting, as bbr does: a file that is not a private key
        would otherwise surface as a vague "cannot reach host"."""
        try:
            proc = subprocess.run(
                ["ssh-keygen", "-y", "-P", "", "-f", str(self.key)],
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=30,
                start_new_session=True,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.debug("could not check the private key with ssh-keygen: %s", exc)
            return  # ssh itself will say what is wrong
        if proc.returncode == 0:
            return
        why = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = why[-1] if why else f"ssh-keygen exited {proc.returncode}"
        if "passphrase" in reason:
            # ssh may still get it from an agent; bbrx itself can never type a passphrase.
            log.warning(
                "private key %s is protected by a passphrase: bbrx cannot ask for it, so the "
                "connection works only if ssh-agent holds this key",
                self.key,
            )
            return
        raise TargetError(
            f"private key {self.key} cannot be read as a private key: {reason[-200:]}",
            hint="Pass --private-key-path the private key (OpenSSH or PEM format) of the "
            "director's bbr user. Nothing was touched on the director.",
        )

    def _options(self) -> list[str]:
        options = [
            "-p", str(self.port),
            "-l", self.username,
            "-i", str(self.key),
            "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={self.connect_timeout}",
            "-o", "ServerAliveInterval=15",
            "-o", "ServerAliveCountMax=4",
            "-o", f"Ciphers={CIPHERS}",
            "-o", f"ControlPath={self._control_dir}/master",
            "-o", "StrictHostKeyChecking=" + ("accept-new" if self.accept_new_host_key else "yes"),
        ]  # fmt: skip
        if self.known_hosts is not None:
            options += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        if self.pinned:
            # No ssh_config is read either (the operator's or the machine's), as bbr reads
            # none: a KnownHostsCommand, a HostKeyAlias or a ProxyCommand there would
            # change which key is accepted or where the connection goes.
            options += ["-F", "/dev/null", "-o", "GlobalKnownHostsFile=/dev/null"]
        if self.proxy_command is not None:
            options += ["-o", f"ProxyCommand={self.proxy_command}"]
        return options

    def _ssh(self, remote: str) -> list[str]:
        # ControlMaster=no: every command rides the master, none may become one itself.
        return ["ssh", *self._options(), "-o", "ControlMaster=no", self.host, "--", remote]

    def connect(self) -> None:
        """Make sure the master connection is up, verifying the host key when opening it.

        A master that died (the connection dropped) is replaced by a fresh one, so the
        unlock and cleanup after a failure still reach the VM.
        """
        with self._connect_lock:
            if self._connected:
                if self._master_running():
                    return
                log.warning("The connection to %s dropped; reconnecting", self.label)
                self._connected = False
                (self._control_dir / "master").unlink(missing_ok=True)
            opening, self._opening = self._opening, None
            ahead = opening is not None
            stderr = self._take_master(opening or self._start_master())
            if ahead and self._master_pid is None:
                # Opened ahead, and gone since (dropped, or idle past ControlPersist before
                # the run reached it): open it again now, as a reconnection would.
                log.debug("The connection to %s opened ahead is gone; opening it again", self.label)
                (self._control_dir / "master").unlink(missing_ok=True)
                stderr = self._take_master(self._start_master())
            if "Permanently added" in stderr:
                log.warning("Trusted the new host key of %s on first use", self.label)
                self.info["host_key_trusted_on_first_use"] = "yes"
            fingerprint = self._fingerprint()
            if fingerprint:
                self.info["host_key_fingerprint"] = fingerprint
            log.info("Connected to %s as %s", self.label, self.username)

    def _start_master(self, *, ahead: bool = False) -> subprocess.Popen[bytes]:
        command = [
            "ssh",
            *self._options(),
            "-o", "ControlMaster=yes",
            "-o", "ControlPersist=300",  # outlives a gap, not a crash
            "-f", "-N",
            self.host,
        ]  # fmt: skip
        if ahead:
            # Opened before its run is recorded (and maybe for a run then refused): it must
            # write nothing, so not even the server's other host keys into known_hosts.
            command[1:1] = ["-o", "UpdateHostKeys=no"]
        # ssh -f forks the master once authenticated and exits: the master's own stdio is
        # /dev/null, so this pipe reaches its end then.
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

    def _take_master(self, opening: subprocess.Popen[bytes]) -> str:
        """The master `opening` starts, up and known by its pid, or the connect error; its
        handshake's stderr."""
        stderr = self._await_master(opening)
        if opening.returncode != 0:
            self._connected = False
            raise self._connect_error(stderr)
        self._connected = True
        self._master_pid = self._master_check()
        return stderr

    def _await_master(self, opening: subprocess.Popen[bytes]) -> str:
        """Wait for `ssh -f` to return (once authenticated); its stderr. Interrupted (a
        Ctrl-C, say), the handshake is ended and a master that got up is let go of by close."""
        try:
            _, raw = opening.communicate()
        except BaseException:
            self._end_handshake(opening)
            self._connected = (self._control_dir / "master").exists()
            raise
        return raw.decode("utf-8", "replace")

    @staticmethod
    def _end_handshake(opening: subprocess.Popen[bytes]) -> None:
        """End an `ssh -f` still authenticating, with what its ProxyCommand or ProxyJump
        started: its process group, which the master leaves when it forks to the
        background."""
        if opening.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(opening.pid, signal.SIGTERM)
            try:
                opening.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(opening.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired, OSError, ValueError):
            opening.communicate(timeout=5)

    def _connect_error(self, stderr: str) -> DiscoveryError:
        known = str(self.known_hosts or "~/.ssh/known_hosts")
        spec = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
            return DiscoveryError(
                f"the host key of {self.label} has CHANGED since it was trusted: refusing to "
                "connect (this is what a man-in-the-middle looks like)",
                host=self.address,
                hint=f"If the director VM was rebuilt, check its new key's fingerprint, then "
                f"forget the old one with: ssh-keygen -R '{spec}' -f {known}",
            )
        if "Host key verification failed" in stderr:
            return DiscoveryError(
                f"the host key of {self.label} is not in {known}: refusing to connect",
                host=self.address,
                hint=f"Check its fingerprint (ssh-keyscan -p {self.port} {self.host} | "
                f"ssh-keygen -lf -) with whoever runs the director, then trust it with "
                f"ssh-keyscan -p {self.port} {self.host} >> {known}, or run once with "
                "--accept-new-host-key.",
            )
        if "Permission denied" in stderr:
            return DiscoveryError(
                f"{self.label} refused the key {self.key} for user {self.username}",
                host=self.address,
                hint="Check --username and --private-key-path (the director's bbr user and key).",
            )
        detail = " ".join(line for line in stderr.strip().splitlines() if line)[-400:]
        return DiscoveryError(
            f"cannot reach {self.label}: {detail or 'ssh failed'}",
            host=self.address,
            hint=(
                "Check that this jump box can reach the instance's address. bbrx reads no "
                "ssh_config for a deployment's instances (bbr reads none): if they are reached "
                "through a jump host, give it as BOSH_ALL_PROXY."
            )
            if self.pinned
            else "Check the address, the port and that this jump box can reach the director.",
        )

    def _master_alive(self) -> bool:
        """Whether the master answers on its control socket (it exits when its connection
        to the VM ends)."""
        return self._master_check() is not None

    def _master_check(self) -> int | None:
        """The master's pid when it answers `ssh -O check`, else None."""
        check = ["ssh", *self._options(), "-O", "check", self.host]
        proc = subprocess.run(
            check, capture_output=True, stdin=subprocess.DEVNULL, start_new_session=True
        )
        if proc.returncode != 0:
            return None
        found = re.search(rb"pid=(\d+)", proc.stderr + proc.stdout)
        return int(found.group(1)) if found else 0

    def _master_running(self) -> bool:
        """Whether the master is still there, as cheaply as can be told before each
        command: its process and its control socket (ssh -O check, a process of its own,
        cost 15 ms a command). It exits once its connection to the VM has ended."""
        if not self._master_pid:
            return self._master_alive()
        try:
            os.kill(self._master_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a pid reused by someone else's process
            return False
        return (self._control_dir / "master").exists()

    def _fingerprint(self) -> str | None:
        spec = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        command = ["ssh-keygen", "-l", "-F", spec]
        if self.known_hosts is not None:
            command += ["-f", str(self.known_hosts)]
        proc = subprocess.run(
            command,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        prints = [line.split()[-1] for line in proc.stdout.splitlines() if "SHA256:" in line]
        return ", ".join(sorted(set(prints))) or None

    def close(self) -> None:
        with self._connect_lock:
            opening, self._opening = self._opening, None
        if opening is not None:
            # Opened ahead and never used (the run was refused before it reached the VM):
            # end the handshake if it is still going, and the master if it got that far.
            self._end_handshake(opening)
            self._connected = (self._control_dir / "master").exists()
        if self._connected:
            # Best effort: the run's own outcome matters more than a slow goodbye, and an
            # abandoned master exits by itself once idle (ControlPersist).
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                subprocess.run(
                    ["ssh", *self._options(), "-O", "exit", self.host],
                    capture_output=True,
                    stdin=subprocess.DEVNULL,
                    timeout=30,
                    start_new_session=True,
                )
            self._connected = False
        shutil.rmtree(self._control_dir, ignore_errors=True)

    # --- small remote commands -------------------------------------------------------------

    def _run(self, remote: str, *, what: str, ok_codes: tuple[int, ...] = (0,)) -> bytes:
        self.connect()
        proc = subprocess.run(
            self._ssh(remote), capture_output=True, stdin=subprocess.DEVNULL, start_new_session=True
        )
        if proc.returncode not in ok_codes:
            message = proc.stderr.decode("utf-8", "replace").strip()[-400:]
            raise TransportError(
                f"{what} on {self.label} failed (exit {proc.returncode}): {message}",
                host=self.address,
            )
        return proc.stdout

    def discover(self) -> list[Job]:
        if self.pinned and self._is_windows():
            # bbr's rule: its first command on a deployment's instance asks cmd.exe for %OS%
            # (sh echoes it as it is). A Windows VM has no bbr scripts: it takes no part.
            name = f"{self.group}/{self.instance_id or self.index}"
            log.warning("skipping Windows instance %s", name)
            self.info["os"] = WINDOWS
            return []
        listing = self._run(
            "sudo -n sh -c "
            + shlex.quote(
                f'for f in {JOBS_GLOB}; do [ -f "$f" ] && [ -x "$f" ] && echo "$f"; done; true'
            ),
            what="listing the job scripts",
        ).decode("utf-8", "replace")
        scripts: dict[str, set[str]] = {}
        for line in listing.splitlines():
            parts = line.split("/")
            if len(parts) != 8:
                continue
            job, script = parts[4], parts[7]
            if job in IGNORED_JOBS or script not in SCRIPT_NAMES:
                continue
            scripts.setdefault(job, set()).add(script)
        return [Job(name, frozenset(found)) for name, found in sorted(scripts.items())]

    def _is_windows(self) -> bool:
        return self._run("echo %OS%", what="asking for the OS").strip() == WINDOWS.encode()

    def artifact_directory(self, job: str) -> str:
        return f"{REMOTE_WORK_DIR}/{job}/"

    def work_dir_exists(self) -> bool:
        code = self._returncode(f"sudo -n test -e {REMOTE_WORK_DIR}")
        return code == 0

    def claim_work_dir(self, owner: str) -> bool:
        # mkdir without -p is atomic on the VM: of two runs from anywhere, one creates it.
        script = (
            f'if mkdir {REMOTE_WORK_DIR}; then printf "%s\\n" "$1" > '
            f"{REMOTE_WORK_DIR}/{WORK_DIR_OWNER}; exit 0; fi; [ -e {REMOTE_WORK_DIR} ] && exit 3; "
            "exit 4"
        )
        remote = f"sudo -n sh -c {shlex.quote(script)} sh {shlex.quote(owner)}"
        self.connect()
        proc = subprocess.run(
            self._ssh(remote), capture_output=True, stdin=subprocess.DEVNULL, start_new_session=True
        )
        if proc.returncode == 3:
            return False
        if proc.returncode != 0:
            message = proc.stderr.decode("utf-8", "replace").strip()[-400:]
            raise TransportError(
                f"creating {REMOTE_WORK_DIR} on {self.label} failed "
                f"(exit {proc.returncode}): {message}",
                host=self.address,
            )
        return True

    def work_dir_owner(self) -> str | None:
        path = f"{REMOTE_WORK_DIR}/{WORK_DIR_OWNER}"
        try:
            output = self._run(
                f"sudo -n sh -c {shlex.quote(f'head -c {OWNER_MAX} {path} 2>/dev/null; true')}",
                what=f"reading {path}",
            )
        except TransportError:
            return None
        return output.decode("utf-8", "replace").strip() or None

    def _returncode(self, remote: str) -> int:
        self.connect()
        proc = subprocess.run(
            self._ssh(remote), capture_output=True, stdin=subprocess.DEVNULL, start_new_session=True
        )
        if proc.returncode == _SSH_FAILURE:
            raise TransportError(
                f"lost the connection to {self.label}: "
                + proc.stderr.decode("utf-8", "replace").strip()[-400:],
                host=self.address,
            )
        return proc.returncode

    def artifact_size(self, job: str) -> int:
        directory = shlex.quote(self.artifact_directory(job))
        output = self._run(f"sudo -n du -sb {directory}", what=f"sizing the artifact of job {job}")
        return int(output.split()[0])

    def store_size(self) -> int:
        output = self._run(
            f"sudo -n du -sb --exclude={REMOTE_WORK_DIR} /var/vcap/store",
            what="sizing /var/vcap/store",
        )
        return int(output.split()[0])

    def make_artifact_directory(self, job: str) -> None:
        self._run(
            f"sudo -n mkdir -p {shlex.quote(self.artifact_directory(job))}",
            what=f"creating the artifact directory of job {job}",
        )

    def remove_work_dir(self) -> None:
        self._run(f"sudo -n rm -rf {REMOTE_WORK_DIR}", what=f"removing {REMOTE_WORK_DIR}")

    # --- scripts ---------------------------------------------------------------------------

    def run_script(self, call: ScriptCall) -> ScriptResult:
        path = f"/var/vcap/jobs/{call.job}/bin/bbr/{call.script}"
        marker = call.marker
        env = [f"{MARKER_VAR}={marker}", *(f"{key}={value}" for key, value in call.env.items())]
        # setsid gives the script a session and process group of its own on the VM, whose id
        # is the script's pid (a background job of a non-interactive sh leads no group, so
        # setsid execs without forking); that pid (printed on stderr) lets an interruption
        # kill the group there, not just our ssh, and a cleanup find it again by its path
        # (end_script). The wrapper stays outside that group and waits for the script, so
        # it can say when the script ended, even while a process the script left behind
        # keeps the channel open. Both lines carry a nonce of this call: no script output
        # can fake them.
        nonce = secrets.token_hex(8)
        wrapper = (
            f'setsid -w "$0" "$@" & pid=$!; echo "bbrx-pid {nonce} $pid" >&2; '
            f'wait "$pid"; rc=$?; echo "bbrx-exit {nonce} $rc" >&2; exit "$rc"'
        )
        remote = " ".join(
            ["sudo", "-n", "sh", "-c", shlex.quote(wrapper), "env"]
            + [shlex.quote(part) for part in (*env, path)]
        )
        self.connect()
        started = time.monotonic()
        # Started and registered under the lock terminate_scripts takes: it either sees this
        # script (and kills it by its marker, pid known or not), or this script sees
        # (through may_start) that the run is being stopped.
        with self._lock:
            if call.may_start is not None and not call.may_start():
                return ScriptResult.not_started(call)
            try:
                proc = subprocess.Popen(
                    self._ssh(remote),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
            except OSError as error:  # no fork, no fds: this jump box is out of resources
                raise TransportError(
                    f"cannot start ssh for the {call.script} script of job {call.job}: {error}",
                    host=self.address,
                ) from error
            self._running[proc] = None
            self._markers[proc] = marker
        script = _RemoteScript(nonce.encode())

        def on_line(line: bytes) -> None:
            pid = script.take(line)
            if pid is not None:
                self._pid_known(proc, call, pid)

        output = ScriptOutput(cast(IO[bytes], proc.stdout), cast(IO[bytes], proc.stderr), on_line)
        deadline = None if call.timeout is None else started + call.timeout
        timed_out = leftovers = ended = False
        try:
            # The script's end (its exit line) or the ssh client's exit ends the wait, not the
            # pipes' EOF: a daemon the script left, or the master connection, may hold them.
            timed_out = not output.pump_until(
                lambda: script.exit_code is not None or proc.poll() is not None, deadline
            )
            if timed_out:
                self._kill_remote(_kill_groups(self._pids(proc), [marker]), [proc])
            if not output.pump_until(
                lambda: proc.poll() is not None and output.at_eof,
                time.monotonic() + OUTPUT_GRACE_SECONDS,
            ):
                leftovers = proc.poll() is None or not output.at_eof
                ended = call.end_leftovers or timed_out or proc in self._killed
                if ended:
                    self._kill_remote(_kill_groups(self._pids(proc), [marker]), [])
                    output.drain()
        finally:
            output.close()
            if proc.poll() is None:
                proc.kill()  # only our ssh client: what ran on the VM has been dealt with
            returncode = proc.wait()
        with self._lock:
            remote_pid = self._running.pop(proc, None)
            self._markers.pop(proc, None)
            killed = proc in self._killed
            self._killed.discard(proc)
        stderr = script.strip(output.stderr).decode("utf-8", "replace")
        duration = time.monotonic() - started
        if remote_pid is None and not killed and not timed_out:
            raise TransportError(
                f"could not start the {call.script} script of job {call.job} on {self.label}: "
                + (stderr.strip()[-400:] or f"ssh exited {returncode}"),
                host=self.address,
            )
        killed_by: str | None = None
        exit_code: int | None = script.exit_code if script.exit_code is not None else returncode
        if timed_out:
            killed_by, exit_code = f"timed out after {call.timeout:g} s", None
        elif killed and exit_code != 0:
            killed_by, exit_code = f"SIGTERM {INTERRUPTED_KILL}", None
        elif (
            script.exit_code is None
            and returncode == _SSH_FAILURE
            and remote_pid
            and not self._master_alive()
        ):
            # The connection dropped, not the script: without a pty the script goes on
            # running on the VM (a lock script would lock after we unlocked). End it there.
            killed_by, exit_code = self._kill_orphan(remote_pid, marker), None
        if leftovers:
            warn_leftovers(call, self.label, exit_code, killed_by, ended=ended)
        return ScriptResult(
            job=call.job,
            script=call.script,
            exit_code=exit_code,
            stdout=output.stdout.decode("utf-8", "replace"),
            stderr=stderr,
            duration=duration,
            killed_by=killed_by,
            stdout_truncated=output.stdout_truncated,
            stderr_dropped=output.stderr_bytes_dropped,
        )

    def _pid_known(self, proc: subprocess.Popen[bytes], call: ScriptCall, pid: int) -> None:
        """The script's pid on the VM has arrived (in the caller's thread)."""
        with self._lock:
            self._running[proc] = pid
            killed = proc in self._killed
        if killed:
            # Interrupted before its pid was known, and maybe before it ran at all (then
            # the marker scan found nothing): end it now that it is known.
            self._kill_remote(_kill_groups([pid], [self._markers.get(proc, "")]), [])
        elif call.on_start is not None:
            call.on_start(pid)

    def _pids(self, proc: subprocess.Popen[bytes]) -> list[int]:
        with self._lock:
            pid = self._running.get(proc)
        return [pid] if pid else []

    def end_script(self, job: str, script: str, pid: int, marker: str | None = None) -> bool:
        path = f"/var/vcap/jobs/{job}/bin/bbr/{script}"
        # The group only if it is still running this job's script: pids are reused. What
        # carries the script run's marker is that run's, whatever its pid.
        check = f"pgrep -g {pid} -f {shlex.quote(path)} >/dev/null"
        shell = f"if {check}; then {_term_then_kill(str(pid))}; echo ended; fi; "
        if marker:
            marked = f"grep -lsxz -e {shlex.quote(f'{MARKER_VAR}={marker}')} /proc/[0-9]*/environ"
            shell += (
                f'if [ -n "$({marked})" ]; then {_term_then_kill("", [marker])}; echo ended; fi; '
            )
        remote = "sudo -n sh -c " + shlex.quote(shell + "true")
        self.connect()
        output = self._run(remote, what=f"ending the {script} script of job {job} (pid {pid})")
        return b"ended" in output

    def _kill_orphan(self, pid: int, marker: str) -> str:
        try:
            self.connect()
            self._run(_kill_groups([pid], [marker]), what=f"ending process group {pid}")
        except TransportError as error:
            log.error("could not end the orphaned script (process group %d): %s", pid, error)
            return "connection lost; it may still be running on the VM"
        return "connection lost; ended on the VM after reconnecting"

    def terminate_scripts(self) -> None:
        """Kill the running scripts on the VM, and everything they started, by their
        process groups and their markers; returns once that command has run (or failed).

        Copies are cut by ending their local ssh client: the VM's tar then dies of a
        broken pipe, and whatever it left is in the work dir that cleaning removes.
        """
        for stream in list(self._streams):
            self._aborted.add(stream)
            with contextlib.suppress(ProcessLookupError):
                stream.kill()
        with self._lock:
            running = dict(self._running)
            markers = [self._markers[proc] for proc in running if proc in self._markers]
            self._killed.update(running)
        if running:
            pids = [pid for pid in running.values() if pid]
            # A script whose pid has not arrived may not have started on the VM when the
            # marker scan ran: its ssh client is left alone, so the pid still arrives and
            # run_script ends it then (_pid_known).
            known = [proc for proc, pid in running.items() if pid]
            self._kill_remote(_kill_groups(pids, markers), known)

    def _kill_remote(self, remote: str, procs: list[subprocess.Popen[bytes]]) -> None:
        with contextlib.suppress(Exception):
            subprocess.run(
                self._ssh(remote),
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=60,
                start_new_session=True,
            )
        # If the connection itself is gone, the local ssh clients are all that is left.
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    # --- streams ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def stream_out(self, job: str) -> Iterator[VmStream]:
        directory = shlex.quote(self.artifact_directory(job))
        self.connect()
        with tempfile.TemporaryFile() as errors:
            proc = self._start_stream(_pack_command(directory), "out", errors)
            stdout = cast(IO[bytes], proc.stdout)
            _enlarge_pipe(stdout)
            stream = VmStream(cast(BinaryIO, stdout))
            try:
                yield stream
            except Exception as error:
                # A stream cut short looks like a broken tar to the reader; when ssh itself
                # failed, that failure is the news.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2)
                failed = proc.returncode not in (None, 0)
                proc.kill()
                stdout.close()
                proc.wait()
                self._end_stream(proc, job, error)
                if failed:
                    raise self._copy_failed(job, "from", proc.returncode, errors) from error
                raise
            except BaseException:
                proc.kill()
                stdout.close()
                proc.wait()
                self._end_stream(proc, job)
                raise
            stdout.close()
            returncode = proc.wait()
            self._end_stream(proc, job)
            if returncode != 0:
                raise self._copy_failed(job, "from", returncode, errors)
            stream.digest = self._sent_digest(job, errors)

    def stream_in(self, job: str, chunks: Iterator[bytes]) -> str:
        directory = shlex.quote(self.artifact_directory(job))
        self.connect()
        with tempfile.TemporaryFile() as errors:
            proc = self._start_stream(_unpack_command(directory), "in", errors)
            stdin = cast(IO[bytes], proc.stdin)
            _enlarge_pipe(stdin)
            try:
                for chunk in chunks:
                    stdin.write(chunk)
                stdin.close()
            except BrokenPipeError:
                pass  # the far side gave up: its exit code and stderr say why
            except BaseException as error:
                proc.kill()
                proc.wait()
                self._end_stream(proc, job, error)
                raise
            returncode = proc.wait()
            self._end_stream(proc, job)
            if returncode != 0:
                raise self._copy_failed(job, "to", returncode, errors)
            return self._vm_digest(job, "to", errors, "read")

    def _sent_digest(self, job: str, errors: IO[bytes]) -> SentDigest:
        """What the VM's filter reported of the stream it sent: the tar digest (python3),
        or, from its shell fallback, the stream's SHA-256."""
        errors.seek(0)
        reported = errors.read()
        if digests := _TAR_DIGEST_LINE.findall(reported):
            return SentDigest("tar", digests[-1].decode())
        return SentDigest("sha256", self._vm_digest(job, "from", errors, "wrote"))

    def _vm_digest(self, job: str, way: str, errors: IO[bytes], did: str) -> str:
        """The SHA-256 the VM's hash filter reported on stderr (its last line of the kind:
        a script's output cannot come after it)."""
        errors.seek(0)
        digests = _DIGEST_LINE.findall(errors.read())
        if not digests:
            raise TransportError(
                f"copying the artifact of job {job} {way} {self.label}: the VM did not "
                f"report the SHA-256 of what its tar {did}",
                host=self.address,
                hint="Check that the director VM has GNU tar, and python3, or tee with openssl "
                "or sha256sum.",
            )
        return str(digests[-1].decode())

    def _start_stream(
        self, remote: str, direction: str, errors: IO[bytes]
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            self._ssh(remote),
            stdin=subprocess.PIPE if direction == "in" else subprocess.DEVNULL,
            stdout=subprocess.PIPE if direction == "out" else subprocess.DEVNULL,
            stderr=errors,
            start_new_session=True,
        )
        self._streams.add(proc)
        return proc

    def _end_stream(
        self, proc: subprocess.Popen[bytes], job: str, error: BaseException | None = None
    ) -> None:
        self._streams.discard(proc)
        if proc in self._aborted:
            self._aborted.discard(proc)
            raise InterruptedRunError(
                f"the copy of job {job}'s artifact was stopped by the interruption"
            ) from error

    def _copy_failed(
        self, job: str, way: str, returncode: int, errors: IO[bytes]
    ) -> TransportError:
        return TransportError(
            f"copying the artifact of job {job} {way} {self.label} failed "
            f"(exit {returncode}): {_tail(errors)}",
            host=self.address,
        )


def _kill_groups(pids: list[int], markers: list[str] | None = None) -> str:
    """The remote command that ends these process groups and every process carrying one of
    these markers: TERM, then KILL if still there after 3 s (it returns once they are gone)."""
    groups = ",".join(str(pid) for pid in pids)
    return "sudo -n sh -c " + shlex.quote(f"{_term_then_kill(groups, markers)}; true")


def _term_then_kill(groups: str, markers: list[str] | None = None) -> str:
    """Shell that sends TERM to process groups and marked processes, waits up to 3 s for
    them to go, then KILL."""
    # pkill -g: dash's kill builtin cannot signal a process group portably.
    signal_, alive = [], []
    if groups:
        signal_.append("pkill -$s -g " + groups)
        alive.append(f"pgrep -g {groups} >/dev/null")
    patterns = " ".join(f"-e {shlex.quote(f'{MARKER_VAR}={m}')}" for m in markers or [] if m)
    if patterns:
        # One grep over every process's environment (NUL-separated; a zombie's is empty):
        # finds what the scripts started in sessions of their own too. Not a process that
        # scrubbed its environment: that one escapes.
        marked = f"grep -lsxz {patterns} /proc/[0-9]*/environ | cut -d/ -f3"
        # Not twice to a group member: a second TERM would cut bash's EXIT trap.
        outside = f'{marked} | grep -vxF "$(pgrep -g {groups})"' if groups else marked
        signal_.append(f"kill -$s $({outside}) 2>/dev/null")
        alive.append(f'[ -n "$({marked})" ]')
    if not signal_:
        return "true"
    send = "; ".join(signal_)
    return (
        f"s=TERM; {send}; n=0; "
        f"while {{ {' || '.join(alive)}; }} && [ $n -lt 30 ]; do sleep 0.1; n=$((n + 1)); done; "
        f"s=KILL; {send}"
    )


class _RemoteScript:
    """What the wrapper of one script run says on stderr: its pid, then its exit status."""

    def __init__(self, nonce: bytes) -> None:
        # search, not match: sudo or a login banner may speak first, and a daemon the script
        # left may have printed half a line just before the exit line.
        self._pid_line = re.compile(rb"bbrx-pid " + nonce + rb" (\d+)\n")
        self._exit_line = re.compile(rb"bbrx-exit " + nonce + rb" (\d+)\n")
        self._lines = re.compile(rb"bbrx-(?:pid|exit) " + nonce + rb" \d+\n")
        self.pid: int | None = None
        self.exit_code: int | None = None

    def take(self, line: bytes) -> int | None:
        """Note a stderr line; the pid if this is the pid line."""
        if self.pid is None and (match := self._pid_line.search(line)):
            self.pid = int(match.group(1))
            return self.pid
        if self.exit_code is None and (match := self._exit_line.search(line)):
            self.exit_code = int(match.group(1))
        return None

    def strip(self, stderr: bytes) -> bytes:
        """The script's own stderr: the wrapper's lines taken out."""
        return self._lines.sub(b"", stderr)


# The SHA-256 of exactly what the VM's tar reads, in the one pass that unpacks it: tar
# runs this as its "decompressor" (-I), which passes its input (the stream ssh delivered;
# tar drains it to the end) through to tar and through the hash. POSIX sh: the VM's sh
# may be dash. Only tools an Ubuntu stemcell has: GNU tar, sh, tee, and openssl, whose
# SHA-256 uses the CPU's SHA instructions (coreutils' sha256sum, the fallback, measured
# 170 MB/s here against openssl's 600+, and was the restore's bottleneck).
_HASH_FILTER = (
    "if command -v openssl >/dev/null; then h='openssl dgst -sha256 -r'; else h=sha256sum; fi; "
    'exec 3>&1; d=$(tee /dev/fd/3 | $h) || exit 1; echo "bbrx-sha256 $d" >&2'
)
_DIGEST_LINE = re.compile(rb"^bbrx-sha256 ([0-9a-f]{64}) ", re.MULTILINE)


# A backup's copy on a VM without python3 (see _TAR_DIGEST_FILTER): the same, the other way
# round. tar runs it as its "compressor" (-I), whose stdout is tar's archive (the ssh
# channel): tee copies tar's stream to that and to the hash, in the one pass that sends it.
# tee writes the channel through its stdout (any kind of file) and the hash through
# /dev/fd/4, a pipe, which Linux reopens.
_HASH_OUT_FILTER = (
    "if command -v openssl >/dev/null; then h='openssl dgst -sha256 -r'; else h=sha256sum; fi; "
    "exec 3>&1; d=$( { tee /dev/fd/4 >&3 3>&-; } 4>&1 | $h 3>&- ) || exit 1; "
    'echo "bbrx-sha256 $d" >&2'
)


# A backup's copy where the VM has python3 (a stemcell does: bosh-linux-stemcell-builder's
# package list for Jammy has python3.10): the tar digest, one SHA-256 pass over each file's
# data that also covers every other byte, computed by the module's own source, run as tar's
# "compressor" in one process that copies the stream (see orchestrator.bbr.tardigest). The
# jump box hashes each file once for `metadata` and gets the same digest from that pass.
# Without python3 (or with one older than 3.4) the shell fallback above runs instead.
_TAR_DIGEST_SOURCE = Path(tardigest.__file__).read_text(encoding="utf-8")
# `cd /`: python3 -c puts the working directory first on its module path, and a
# hashlib.py left in the bbr user's home must not run as root. (-I would do it too, but a
# python3 older than 3.4 refuses -I before the program could fall back.)
_TAR_DIGEST_FILTER = (
    'cd / && command -v python3 >/dev/null 2>&1 && exec python3 -E -s -c "$1" "$2"; eval "$2"'
)
_TAR_DIGEST_LINE = re.compile(rb"^bbrx-tar-sha256 ([0-9a-f]{64})$", re.MULTILINE)


def pack_filter() -> str:
    """The program a backup's tar runs as its `-I` filter on the VM: the stream passes
    through, and its digest (tar digest, or SHA-256) is reported on stderr at the end."""
    return " ".join(
        [
            "/bin/sh -c",
            shlex.quote(_TAR_DIGEST_FILTER),
            "sh",
            shlex.quote(_TAR_DIGEST_SOURCE),
            shlex.quote(_HASH_OUT_FILTER),
        ]
    )


def _pack_command(directory: str) -> str:
    """The remote command of a backup's copy (`directory` already shell-quoted): the
    job's directory as a tar on stdout, its digest on stderr once it has all been sent."""
    hasher = shlex.quote(pack_filter())
    return f"sudo -n tar -C {directory} --use-compress-program={hasher} -cf - ."


def _unpack_command(directory: str) -> str:
    """The remote command of a restore's copy (`directory` already shell-quoted).

    As root GNU tar keeps the archive's owners and modes by default. --no-same-owner makes
    root own every file, but alone it keeps setuid/setgid bits: a setuid-root binary.
    --no-same-permissions applies the umask and drops setuid, setgid and sticky bits
    (checked with GNU tar 1.34 as root). bbrx refuses such members before they are sent;
    this is the VM's own line of defence.
    """
    hasher = "/bin/sh -c " + shlex.quote(_HASH_FILTER)
    tar = (
        f"exec tar -C {directory} --no-same-owner --no-same-permissions "
        f"--use-compress-program={shlex.quote(hasher)} -xf -"
    )
    return "sudo -n sh -c " + shlex.quote(f"mkdir -p {directory} && {tar}")


def _enlarge_pipe(stream: IO[bytes]) -> None:
    with contextlib.suppress(OSError):
        fcntl.fcntl(stream.fileno(), _F_SETPIPE_SZ, PIPE_SIZE)


def _tail(errors: IO[bytes]) -> str:
    errors.seek(0)
    text = errors.read().decode("utf-8", "replace").strip()
    return " ".join(text.splitlines())[-400:] or "no message"
