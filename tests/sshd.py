"""A real OpenSSH server on 127.0.0.1 whose sessions see a test director tree at /var/vcap.

sshd runs inside a private mount namespace (`unshare --mount`) where a temporary directory is
bind-mounted on /var/vcap, a tmpfs on /run and a copy of /etc/passwd (root's shell: /bin/sh)
on /etc/passwd, so nothing of the host's real /var/vcap, /run or /etc is touched. It runs as
root (CI does), and is stopped by its own PID.

Inside the namespace, tar is wrapped (TAR_SHIM) so that the simulator's transfer faults
(`bbrx sim fault JOB transfer ...`) apply to copies over SSH too: the VM's real tar runs,
and the wrapper drops, delays or corrupts its stream the way a bad link would (and, for
`corrupt-local`, changes a byte of the jump box's copy once bbrx has written it, as a faulty
disk would). That is the one stand-in here; bbrx's side of every copy is the real ssh
client and pipeline.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
TAR = os.path.realpath(shutil.which("tar") or "/usr/bin/tar")

# Applies the fault file of the job whose work dir a copy reads or fills, and logs the
# copy's start in the scripts' call log, as SimInstance does for sim:// targets.
TAR_SHIM = r"""#!/bin/bash
real=@REAL@
dir="" mode=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    -C) dir="${args[i + 1]}" ;;
    -cf) mode=out ;;
    -xf) mode=in ;;
  esac
done
case "$dir" in
  /var/vcap/store/bbr-backup/?*) ;;
  *) exec "$real" "$@" ;;
esac
job=$(basename -- "$dir")
log=/var/vcap/sys/log/bbr-sim/calls.log
if [[ -d ${log%/*} ]]; then  # a simulated director's tree (the benchmark's has none)
  printf '%s\t%s\ttransfer\tstart\t%s\tdirection=%s\n' "$(date +%s.%N)" "$job" "$$" "$mode" >>"$log"
fi
fault=/var/vcap/sys/run/bbr-sim/faults/$job/transfer
[[ -f $fault ]] || exec "$real" "$@"
read -r word rest <"$fault"
if [[ $word == after ]]; then  # `after SECONDS SPEC`: copies that start that long after it was set
  read -r wait spec <<<"$rest"
  awk -v now="$(date +%s.%N)" -v due="$(stat -c %.9Y -- "$fault")" -v wait="$wait" \
    'BEGIN { exit !(now + 0 >= due + wait) }' || exec "$real" "$@"
  read -r word rest <<<"$spec"
fi
if [[ $word == call ]]; then  # `call N SPEC`: the Nth copy only (simulator/faults.py)
  calls_file="${fault%/*}/.transfer.calls"; calls=0
  [[ -f $calls_file ]] && read -r calls <"$calls_file"
  calls=$((calls + 1)); echo "$calls" >"$calls_file"
  read -r n spec <<<"$rest"
  (( calls == n )) || exec "$real" "$@"
  read -r word rest <<<"$spec"
fi
export LC_ALL=C
# Passes the stream through with the byte at offset $1 changed.
flip() {
  dd bs="$1" count=1 iflag=fullblock 2>/dev/null
  dd bs=1 count=1 2>/dev/null | tr '\000-\377' '\001-\377\000'
  cat
}
# corrupt-local: the byte at $2 of the jump box's copy of job $1's tar, once it is written
# there. The copy is the file a process on this machine has open as <name>.incomplete/
# <group>-<index>-$1.tar under this test's own directory (the parent of the sshd's), and
# only there: another test's backups are left alone. Opened through /proc/PID/fd, as root.
damage_copy() {
  local base=@BASE@ link n
  for ((n = 0; n < 200; n++)); do
    while read -r link; do
      if (( $(stat -L -c %s "$link" 2>/dev/null || echo 0) > $2 )); then
        dd if="$link" bs=1 skip="$2" count=1 2>/dev/null | tr '\000-\377' '\001-\377\000' |
          dd of="$link" bs=1 seek="$2" count=1 conv=notrunc 2>/dev/null
        return
      fi
    done < <(find /proc/[0-9]*/fd -maxdepth 1 -lname "$base/*.incomplete/*-$1.tar" 2>/dev/null)
    sleep 0.05
  done
  echo "corrupt-local: found no copy of $1 on the jump box" >&2
}
case "$word" in
  sleep) sleep "$rest"; exec "$real" "$@" ;;
  corrupt)
    # Out: after the VM's tar (and the digest its -I filter takes); in: in flight, before
    # the VM's tar reads it. One byte at the offset the simulator's _corrupted flips (file
    # data of the seed's blobstore, so the tar stays readable); in a shorter backup stream,
    # byte 1024 (the data of the first file after ./ in the seed's small jobs).
    head=$(mktemp)
    flip_early() {
      head -c 600001 >"$head"; at=600000
      (( $(stat -c %s "$head") > at )) || at=1024
      flip "$at" <"$head"; cat
    }
    if [[ $mode == out ]]; then
      "$real" "$@" | flip_early
    else
      flip_early | "$real" "$@"
    fi
    status=$?; rm -f "$head"; exit "$status" ;;
  corrupt-local)
    [[ $mode == out ]] || exec "$real" "$@"  # a backup's copy only, as on the simulator
    # The first MiB reaches the jump box (which writes its copy a MiB at a time); its byte
    # 600,000 is changed there once written; then the rest follows. A stream of less than
    # a MiB is written at its end, when this shim is done: make the data larger.
    "$real" "$@" | { dd bs=1M count=1 iflag=fullblock 2>/dev/null; damage_copy "$job" 600000; cat; }
    exit ;;
  *)
    # A dropped connection: what the VM's tar then says about its broken pipe (its hash
    # filter's exit status, with -I) never reaches the jump box; the link's error does.
    if [[ $mode == out ]]; then
      "$real" "$@" 2>/dev/null | head -c 4096
    else
      head -c 4096 >/dev/null
    fi
    printf '%s\n' "${rest:-connection reset by peer}" >&2
    exit 2 ;;
esac
"""

VCAP = Path("/var/vcap")
SUDO_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # Debian's secure_path


def available() -> str | None:
    """Why the SSH fixture cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "the test sshd needs root (for unshare --mount and sudo)"
    for tool in (SSHD, shutil.which("unshare"), shutil.which("ssh"), shutil.which("sudo")):
        if not tool or not Path(tool).exists():
            return "openssh-server, openssh-client, sudo and util-linux are required"
    return None


@dataclass
class Keys:
    host_key: Path
    client_key: Path

    @classmethod
    def make(cls, directory: Path) -> Keys:
        directory.mkdir(parents=True, exist_ok=True)
        for name in ("host_key", "client_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"bbrx-test-{name}",
                 "-f", str(directory / name)],
                check=True,
            )  # fmt: skip
        return cls(directory / "host_key", directory / "client_key")


def free_port() -> int:
    """A loopback port no one listens on, from this test worker's own range.

    Below the kernel's ephemeral range (32768 up), so no port 0 bind elsewhere takes it, and
    one range per pytest-xdist worker (gw0, gw1 ...), so two workers never pick the same
    port between this probe and their sshd's bind."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    base = 10000 + 2000 * (int(worker) % 10 if worker.isdigit() else 0)
    for port in random.sample(range(base, base + 2000), 2000):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {base}-{base + 1999}")


class TestSshd:
    """One sshd, serving `vm_root/var/vcap` as /var/vcap, on a free loopback port."""

    def __init__(
        self,
        keys: Keys,
        vm_root: Path,
        workdir: Path,
        without: tuple[str, ...] = (),
        *,
        accounts: bool = False,
        log_level: str = "ERROR",
        force_command: str | None = None,
    ) -> None:
        """`without`: commands the VM lacks (hidden under /dev/null in the namespace).
        `accounts`: users can be added (`add_user`) as a BOSH agent adds the Director's SSH
        user: in this sshd's namespace only, through its own /etc/passwd and sudoers.d."""
        self.accounts = accounts
        self.log_level = log_level  # DEBUG1 logs each forwarded connection's target
        # What every session runs instead of what it asked for (`echo Windows_NT`: a VM
        # that answers as a Windows one's cmd.exe answers `echo %OS%`).
        self.force_command = force_command
        self.keys = keys
        self.without = without
        self.vm_root = vm_root
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._namespace: str | None = None
        self._namespace_fd: int | None = None
        self._log: IO[bytes] | None = None
        self.known_hosts = workdir / "known_hosts"

    def _configure(self, config: Path, authorized: Path, keys_dir: Path) -> None:
        """sshd_config and the known_hosts entry for the current port."""
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.keys.host_key}\n"
            + (
                # Read as root: sshd opens a key file as the user, who may not search the
                # test's private directories.
                f"AuthorizedKeysFile none\nAuthorizedKeysCommand /bin/cat {keys_dir}/%u\n"
                "AuthorizedKeysCommandUser root\n"
                if self.accounts
                else f"AuthorizedKeysFile {authorized}\n"
            )
            + "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "PidFile none\nStrictModes no\nMaxSessions 100\nMaxStartups 100:30:200\n"
            f"LogLevel {self.log_level}\n"
            + (f"ForceCommand {self.force_command}\n" if self.force_command else "")
        )
        host_pub = Path(f"{self.keys.host_key}.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")

    def start(self) -> TestSshd:
        VCAP.mkdir(parents=True, exist_ok=True)  # the mount point (tests/conftest.py)
        self.workdir.mkdir(parents=True, exist_ok=True)
        authorized = self.workdir / "authorized_keys"
        authorized.write_text(Path(f"{self.keys.client_key}.pub").read_text())
        keys_dir = self.workdir / "keys"
        keys_dir.mkdir(exist_ok=True)
        (keys_dir / "root").write_text(authorized.read_text())
        sudoers = self.workdir / "sudoers.d"
        sudoers.mkdir(mode=0o755, exist_ok=True)
        shadow = self.workdir / "shadow"  # sudo's PAM account check wants each user there
        shutil.copy2("/etc/shadow", shadow)
        config = self.workdir / "sshd_config"
        # Sessions run the login shell; root's bash here sources a slow ~/.bashrc (pyenv)
        # that a director's bbr user does not have. The namespace sees root with /bin/sh.
        passwd = self.workdir / "passwd"
        passwd.write_text(
            "".join(
                line.replace(":/bin/bash", ":/bin/sh") if line.startswith("root:") else line
                for line in Path("/etc/passwd").read_text().splitlines(keepends=True)
            )
        )
        shim = self.workdir / "tar"
        shim.write_text(
            TAR_SHIM.replace("@REAL@", shlex.quote(str(self.workdir / "real-tar"))).replace(
                "@BASE@", shlex.quote(str(self.workdir.resolve().parent))
            )
        )
        shim.chmod(0o755)
        shutil.copy2(TAR, self.workdir / "real-tar")
        hidden = "".join(f"mount --bind /dev/null {path} && " for path in self._hidden_paths())
        mounts = (
            hidden
            + f"mount --bind {passwd} /etc/passwd && "
            + (
                f"mount --bind {sudoers} /etc/sudoers.d && mount --bind {shadow} /etc/shadow && "
                if self.accounts
                else ""
            )
            + f"mount --bind {shim} {TAR} && "
            "mount -t tmpfs tmpfs /run && mkdir -p /run/sshd && "
            f"mount --bind {self.vm_root / 'var/vcap'} {VCAP} && "
            f"exec {SSHD} -D -e -f {config}"
        )
        try:
            for _ in range(5):
                self._configure(config, authorized, keys_dir)
                if self._launch(mounts):
                    return self
                self.port = free_port()  # another test session's sshd had it: another port
            said = (self.workdir / "sshd.log").read_text()
            raise RuntimeError(f"sshd found no free port: {said}")
        except BaseException:
            self.stop()  # an sshd that never listened is not left running
            raise

    def _launch(self, mounts: str) -> bool:
        """Start sshd; False if its port was taken, once it has exited saying so."""
        # unshare execs sh, which execs sshd: self.proc.pid is sshd's own PID.
        self._log = open(self.workdir / "sshd.log", "wb")  # noqa: SIM115 - lives with sshd
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", mounts],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                said = (self.workdir / "sshd.log").read_text()
                if "Address already in use" in said or "Cannot bind any address" in said:
                    return False
                raise RuntimeError(f"sshd exited: {said}")
            # Listening, and on a socket of its own (not another session's sshd's port).
            if self._listening():
                # Held open until stop(): the kernel cannot give this namespace's id to
                # another namespace while it is, so _end_sessions never kills another's.
                # (Opened before it is read: the id read is then the one held.)
                self._namespace_fd = os.open(f"/proc/{self.proc.pid}/ns/mnt", os.O_RDONLY)
                self._namespace = os.readlink(f"/proc/self/fd/{self._namespace_fd}")
                return True
            time.sleep(0.02)
        raise RuntimeError("sshd did not start listening")

    def _listening(self) -> bool:
        """Whether sshd itself listens on 127.0.0.1:port (read from /proc/net/tcp)."""
        assert self.proc is not None
        wanted = f"0100007F:{self.port:04X}"
        inodes = set()
        with contextlib.suppress(OSError):
            for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[1] == wanted and fields[3] == "0A":  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
        if not inodes:
            return False
        try:
            fds = os.listdir(f"/proc/{self.proc.pid}/fd")
        except OSError:
            return False
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{self.proc.pid}/fd/{fd}") in inodes:
                    return True
        return False

    def add_user(self, user: str, public_key: str) -> None:
        """What a BOSH agent does for the Director's SSH setup: the user, its key, and
        passwordless sudo, on this VM only (the bound /etc/passwd and /etc/sudoers.d)."""
        assert self.accounts and re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", user), user
        with open(self.workdir / "passwd", "a") as passwd:
            passwd.write(f"{user}:x:{60000 + len(self.users())}:65534::/:/bin/sh\n")
        with open(self.workdir / "shadow", "a") as shadow:
            shadow.write(f"{user}:*:20000:0:99999:7:::\n")
        (self.workdir / "keys" / user).write_text(public_key.strip() + "\n")
        entry = self.workdir / "sudoers.d" / user
        entry.write_text(f"{user} ALL=(ALL) NOPASSWD: ALL\n")
        entry.chmod(0o440)

    def remove_users(self, pattern: str) -> None:
        """The agent's SSH cleanup: every user matching the regex goes."""
        matches = re.compile(pattern).match
        gone = [user for user in self.users() if matches(user)]
        for name in ("passwd", "shadow"):
            path = self.workdir / name
            lines = path.read_text().splitlines(keepends=True)
            path.write_text("".join(ln for ln in lines if ln.split(":", 1)[0] not in gone))
        for user in gone:
            (self.workdir / "keys" / user).unlink(missing_ok=True)
            (self.workdir / "sudoers.d" / user).unlink(missing_ok=True)

    def users(self) -> list[str]:
        """The users added and not removed."""
        return sorted(p.name for p in (self.workdir / "sudoers.d").iterdir())

    def _hidden_paths(self) -> list[str]:
        """The files sudo's PATH finds for each command the VM lacks: /dev/null, which is
        not executable, is bound over each, so `command -v` finds none of them."""
        found = set()
        for command in self.without:
            for directory in SUDO_PATH.split(":"):
                candidate = Path(directory) / command
                if candidate.exists():
                    found.add(os.path.realpath(candidate))
        return sorted(found)

    def _end_sessions(self) -> None:
        """Kill what still runs in this sshd's mount namespace (scripts a test left behind).

        Every process there was started for this test. Left alive, one would outlive the
        bind mount on /var/vcap and could write into the host's /var/vcap instead.
        """
        if self._namespace is None or self.proc is None:
            return
        if self._namespace == os.readlink("/proc/self/ns/mnt"):
            return  # not a namespace of its own after all: kill nothing
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.proc.pid:
                continue
            try:
                if os.readlink(entry / "ns/mnt") == self._namespace:
                    os.kill(int(entry.name), signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue

    def stop(self) -> None:
        """Idempotent: a second call finds nothing of this sshd's to stop.

        sshd first, so that it accepts no session after the others are ended; the held
        namespace keeps its id this sshd's until the end."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self._end_sessions()
        finally:
            self._namespace = None
            if self._namespace_fd is not None:
                os.close(self._namespace_fd)
                self._namespace_fd = None
            if self._log is not None:
                self._log.close()
