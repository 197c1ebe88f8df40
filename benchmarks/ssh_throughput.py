"""bbrx over SSH against the raw OpenSSH pipeline, on the loopback test sshd.

Run as root (it starts a private sshd, as the tests do):

    .venv/bin/python benchmarks/ssh_throughput.py [--rounds 3] [--gib 1] [--small-files 20000]

It times, interleaved over several rounds:
  (a) `bbrx director backup` of a director whose one job holds N GiB of incompressible data,
  (b) the raw pipeline: ssh -o Ciphers=aes128-gcm@openssh.com HOST 'sudo tar -C DIR -c .'
      read by Python in 1 MiB chunks, hashed with hashlib and written to a file,
  (c) both again for a job of many small files,
  (d) `bbrx director restore` against the raw reverse pipeline (a file read in 1 MiB chunks,
      hashed, piped into ssh 'sudo tar -C DIR -x'),
each started once the disk has written back what the one before left (see settle), and
prints the medians, the ratios raw/bbrx (1.0 = as fast as the raw pipeline; higher is
better for bbrx) and bbrx's peak RSS. The machines are shared and noisy: quote medians.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simulator.director import SimDirector  # noqa: E402
from tests import sshd  # noqa: E402

CHUNK = 1 << 20
JOB = "bench"
SCRIPTS = {
    "metadata": "#!/bin/sh\necho '{}'\n",
    # Hard links: the backup script costs nothing, so the run measures the transfer.
    "backup": '#!/bin/sh\nset -e\ncp -al /var/vcap/store/bench/. "$BBR_ARTIFACT_DIRECTORY"\n',
    "restore": "#!/bin/sh\nexit 0\n",
}
RSS_WRAPPER = (
    "import resource, runpy, sys\n"
    "out = sys.argv.pop(1)\n"
    "try:\n"
    "    runpy.run_module('orchestrator', run_name='__main__')\n"
    "finally:\n"
    "    open(out, 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))\n"
)


def make_vm(base: Path, gib: int, small_files: int, which: str) -> SimDirector:
    vm = SimDirector(base / f"vm-{which}")
    vm.create(empty=True)
    jobs = vm.root / "var/vcap/jobs"
    for job in jobs.iterdir():
        shutil.rmtree(job)
    scripts = jobs / JOB / "bin/bbr"
    scripts.mkdir(parents=True)
    for name, text in SCRIPTS.items():
        (scripts / name).write_text(text)
        (scripts / name).chmod(0o755)
    store = vm.root / "var/vcap/store" / JOB
    store.mkdir(parents=True)
    if which == "big":
        with open(store / "blob", "wb") as handle:
            for _ in range(gib * 1024):
                handle.write(os.urandom(CHUNK))
    else:
        for number in range(small_files):
            folder = store / f"{number % 100:02d}"
            folder.mkdir(exist_ok=True)
            (folder / f"file-{number}").write_bytes(os.urandom(4096))
    return vm


def ssh_command(server: sshd.TestSshd, remote: str) -> list[str]:
    return [
        "ssh", "-p", str(server.port), "-i", str(server.keys.client_key),
        "-o", f"UserKnownHostsFile={server.known_hosts}", "-o", "BatchMode=yes",
        "-o", "Ciphers=aes128-gcm@openssh.com", "root@127.0.0.1", remote,
    ]  # fmt: skip


def settle() -> None:
    """Write back what the last timed command left dirty, before the next is timed. The raw
    pipeline does not sync its 1 GiB, nor does the VM's tar after a restore: unsettled, the
    kernel writes it back during the next measurement, which then pays for it."""
    os.sync()


def raw_backup(server: sshd.TestSshd, out: Path) -> float:
    settle()
    start = time.perf_counter()
    proc = subprocess.Popen(
        ssh_command(server, f"sudo tar -C /var/vcap/store/bbr-backup/{JOB} -c ."),
        stdout=subprocess.PIPE,
    )
    digest = hashlib.sha256()
    assert proc.stdout is not None
    with open(out, "wb") as sink:
        while chunk := proc.stdout.read(CHUNK):
            digest.update(chunk)
            sink.write(chunk)
    assert proc.wait() == 0
    return time.perf_counter() - start


def raw_restore(server: sshd.TestSshd, tar: Path) -> float:
    settle()
    start = time.perf_counter()
    target = f"/var/vcap/store/bbr-backup/{JOB}"
    proc = subprocess.Popen(
        ssh_command(server, f"sudo mkdir -p {target} && sudo tar -C {target} -x"),
        stdin=subprocess.PIPE,
    )
    digest = hashlib.sha256()
    assert proc.stdin is not None
    with open(tar, "rb") as source:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            proc.stdin.write(chunk)
    proc.stdin.close()
    assert proc.wait() == 0
    return time.perf_counter() - start


def bbrx(server: sshd.TestSshd, home: Path, *args: str) -> tuple[float, int]:
    rss_file = home / "rss"
    command = [
        sys.executable, "-c", RSS_WRAPPER, str(rss_file), "director",
        "--host", f"127.0.0.1:{server.port}", "--username", "root",
        "--private-key-path", str(server.keys.client_key),
        "--known-hosts", str(server.known_hosts), *args,
    ]  # fmt: skip
    env = dict(os.environ, BBRX_HOME=str(home))
    settle()
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bbrx {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return elapsed, int(rss_file.read_text()) // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gib", type=int, default=1)
    parser.add_argument("--small-files", type=int, default=20_000)
    options = parser.parse_args()
    reason = sshd.available()
    if reason:
        raise SystemExit(f"cannot run: {reason}")

    # bbrx is timed as installed from a wheel, whose modules pip compiles to bytecode: an
    # editable install under PYTHONDONTWRITEBYTECODE (this machine sets it) would compile
    # some 70 modules from source on every run, about 0.2 s, which no user's install does.
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "orchestrator", "simulator", "audit"],
        cwd=ROOT,
        check=True,
    )
    base = Path(tempfile.mkdtemp(prefix="bbrx-bench-"))
    created_vcap = not sshd.VCAP.exists()
    sshd.VCAP.mkdir(exist_ok=True)
    keys = sshd.Keys.make(base / "keys")
    keys.client_key.chmod(0o600)
    results: dict[str, list[float]] = {}
    peak_rss = 0
    try:
        for which in ("big", "small"):
            vm = make_vm(base, options.gib, options.small_files, which)
            server = sshd.TestSshd(keys, vm.root, base / f"sshd-{which}").start()
            work = vm.root / "var/vcap/store/bbr-backup" / JOB
            try:
                for round_number in range(options.rounds):
                    home = base / f"home-{which}-{round_number}"
                    out = home / "out"
                    out.mkdir(parents=True)
                    # (a)/(c): bbrx backup, then the raw pipeline over the same files.
                    seconds, rss = bbrx(server, home, "backup", "--artifact-path", str(out))
                    results.setdefault(f"backup-{which}-bbrx", []).append(seconds)
                    peak_rss = max(peak_rss, rss)
                    work.mkdir(parents=True, exist_ok=True)
                    subprocess.run(["cp", "-al", f"{vm.root}/var/vcap/store/{JOB}/.", str(work)],
                                   check=True)  # fmt: skip
                    raw_tar = base / "raw.tar"
                    results.setdefault(f"backup-{which}-raw", []).append(
                        raw_backup(server, raw_tar)
                    )
                    shutil.rmtree(work.parent)
                    # (d): restore, bbrx against the raw reverse pipeline.
                    [artifact] = list(out.iterdir())
                    seconds, rss = bbrx(server, home, "restore", "--artifact-path", str(artifact))
                    results.setdefault(f"restore-{which}-bbrx", []).append(seconds)
                    peak_rss = max(peak_rss, rss)
                    results.setdefault(f"restore-{which}-raw", []).append(
                        raw_restore(server, artifact / f"bosh-0-{JOB}.tar")
                    )
                    shutil.rmtree(work.parent, ignore_errors=True)
                    shutil.rmtree(home)
                    raw_tar.unlink()
                    print(f"round {round_number + 1}/{options.rounds} ({which}) done", flush=True)
            finally:
                server.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
        if created_vcap:
            sshd.VCAP.rmdir()

    print(f"\n{'measure':<24}{'median s':>10}{'runs':>30}")
    for name, values in sorted(results.items()):
        runs = " ".join(f"{v:.2f}" for v in values)
        print(f"{name:<24}{statistics.median(values):>10.2f}   {runs}")
    print(f"\n{'ratio raw/bbrx':<24}{'(>= 0.95 is the target)':>10}")
    for kind in ("backup-big", "backup-small", "restore-big", "restore-small"):
        ratio = statistics.median(results[f"{kind}-raw"]) / statistics.median(
            results[f"{kind}-bbrx"]
        )
        print(f"{kind:<24}{ratio:>10.2f}")
    print(f"\nbbrx peak RSS: {peak_rss} MiB (target <= 100)")


if __name__ == "__main__":
    main()
