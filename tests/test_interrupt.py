"""Ctrl-C and SIGTERM: bbr leaves the director locked; bbrx unlocks every job first.

Signals in every phase are in the fault matrix (test_fault_matrix.py); here is what a
second Ctrl-C does while bbrx is unlocking."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import threading

from tests.conftest import BBRX, wait_for

ALL_JOBS = {"bbr-credhubdb", "blobstore", "director", "uaa"}


def started(target, job: str, script: str) -> bool:
    return any((c.job, c.script, c.event) == (job, script, "start") for c in target.vm.calls())


def start_on_a_terminal(target, *args: str) -> tuple[subprocess.Popen[str], int]:
    """bbrx as a shell runs it: a pseudo-terminal as its controlling terminal and stdin, and
    bbrx in that terminal's foreground. Returns the terminal's master side."""
    master, slave = pty.openpty()
    # setsid --ctty (util-linux): a session of its own whose controlling terminal is stdin.
    proc = subprocess.Popen(
        ["setsid", "--ctty", *BBRX, "director", "--host", target.host, *target.extra_args, *args],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=target.bbrx.environ(),
        cwd=target.bbrx.home,
    )
    os.close(slave)
    return proc, master


CTRL_C = b"\x03"  # typed at the terminal: SIGINT to its foreground process group


class StderrLines:
    """Reads a running process's stderr as it comes (a prompt has no newline yet)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        while chunk := os.read(self.proc.stderr.fileno(), 4096):
            self.chunks.append(chunk)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode()

    def wait_for(self, text: str) -> None:
        try:
            wait_for(lambda: text in self.text, what=repr(text))
        except AssertionError as error:
            raise AssertionError(f"{error}; stderr so far:\n{self.text}") from None

    def finish(self) -> tuple[int, str]:
        code = self.proc.wait(timeout=60)
        self._reader.join(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return code, self.text


def second_ctrl_c_while_unlocking(proc, target, master: int | None = None) -> StderrLines:
    """Ctrl-C twice while the director's unlock runs: the second while the first is in hand.

    Typed at the terminal when there is one, else sent to bbrx's process."""
    stderr = StderrLines(proc)
    wait_for(lambda: started(target, "director", "post-backup-unlock"), what="director unlock")
    for reply in ("SIGINT received: stopping", "SIGINT received again"):
        if master is not None:
            os.write(master, CTRL_C)
        else:
            proc.send_signal(signal.SIGINT)
        stderr.wait_for(reply)
    return stderr


def test_second_ctrl_c_while_unlocking_asks_and_leaving_locked_is_recorded(target, tmp_path):
    target.vm.set_fault("director", "post-backup-unlock", "hang")
    proc, master = start_on_a_terminal(target, "backup", "--artifact-path", str(tmp_path))
    lines = second_ctrl_c_while_unlocking(proc, target, master)
    lines.wait_for(
        "Still locked: bbr-credhubdb, director, uaa. bbrx is unlocking them. "
        "Stop now and leave them locked? [y/N]"
    )
    os.write(master, b"y\n")
    code, stderr = lines.finish()
    os.close(master)

    assert code == 1 | 8, stderr  # interrupted, and jobs left locked
    assert "Error: backup was interrupted by SIGINT; the operator stopped the unlock\n" in stderr
    assert (
        f"Error: jobs that may still be locked on {target.address}: bbr-credhubdb, director, uaa"
        in stderr
    )
    assert f"run `bbrx director --host {target.address} backup-cleanup`" in stderr
    # The hung director unlock was ended; the level unlocked after it was never reached.
    assert target.vm.locked_jobs() == ["bbr-credhubdb", "director", "uaa"]
    assert target.scripts_run("post-backup-unlock") == ["blobstore", "director"]
    rows = target.bbrx.audit_rows()
    abandon = next(r for r in rows if r["trigger"] == "abandon")
    assert abandon["detail"]["jobs_left_locked"] == ["bbr-credhubdb", "director", "uaa"]
    assert abandon["detail"]["confirmed_by"] == "trainee@test"
    assert rows[-1]["to_state"] == "interrupted"
    status = target.bbrx("status", "--host", target.host).stdout
    assert (
        "needs cleanup" in status and "may still be locked: bbr-credhubdb, director, uaa" in status
    )

    target.vm.clear_faults()
    assert target.director("backup-cleanup").code == 0
    assert target.vm.locked_jobs() == []


def test_second_ctrl_c_answered_no_goes_on_unlocking(target, tmp_path):
    target.vm.set_fault("director", "post-backup-unlock", "sleep 3")
    proc, master = start_on_a_terminal(target, "backup", "--artifact-path", str(tmp_path))
    lines = second_ctrl_c_while_unlocking(proc, target, master)
    lines.wait_for("leave them locked? [y/N]")
    os.write(master, b"n\n")
    code, stderr = lines.finish()
    os.close(master)
    assert code == 1, stderr
    assert "Going on unlocking." in stderr
    assert "every job that was locked has been unlocked" in stderr
    assert target.vm.locked_jobs() == []
    assert set(target.scripts_run("post-backup-unlock")) == ALL_JOBS


def test_second_ctrl_c_without_a_terminal_never_leaves_jobs_locked(target, tmp_path):
    target.vm.set_fault("director", "post-backup-unlock", "sleep 3")
    proc = target.start("backup", "--artifact-path", str(tmp_path))
    code, stderr = second_ctrl_c_while_unlocking(proc, target).finish()
    assert code == 1, stderr
    assert "SIGINT received again" in stderr
    assert "No terminal to confirm on: bbrx goes on unlocking." in stderr
    assert "every job that was locked has been unlocked" in stderr
    assert target.vm.locked_jobs() == []


def test_a_terminal_that_hangs_up_mid_backup_leaves_nothing_locked(bbrx, tmp_path):
    """The operator's SSH session to the jump box drops: the terminal hangs up and bbrx,
    its session leader, gets SIGHUP. bbr dies with every job locked; bbrx unlocks first."""
    from simulator.director import SimDirector, sim_root
    from tests.conftest import Target

    vm = SimDirector(sim_root(bbrx.home, "demo"))
    vm.create()
    target = Target("sim", "sim://demo", vm, bbrx)
    vm.set_fault("director", "backup", "hang")
    proc, master = start_on_a_terminal(target, "backup", "--artifact-path", str(tmp_path))
    wait_for(lambda: started(target, "director", "backup"), what="the backup script")
    os.close(master)  # the hang-up
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert vm.locked_jobs() == []
    assert set(target.unlock_env().values()) == {"false"}
    rows = bbrx.audit_rows()
    assert any("SIGHUP" in str(r["detail"]) for r in rows), rows[-3:]
    assert [r["to_state"] for r in rows if r["job"] is None][-1] == "interrupted"
