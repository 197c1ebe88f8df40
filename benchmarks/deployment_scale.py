"""A deployment backup of 1, 10 and 100 simulated instances whose scripts each sleep 0.2 s.

    .venv/bin/python benchmarks/deployment_scale.py [--rounds 3] [--sizes 1,10,100]

Each size is a simulated deployment (`bbrx sim deploy`) of one instance group running
`redis-server`, whose pre-backup-lock, backup and post-backup-unlock scripts each sleep
0.2 s first (a `sleep 0.2` fault on every VM). Every round backs up every size with
`bbrx deployment ... backup` as a process of its own, interleaved, and records its wall
time and peak RSS. It prints the medians and, per size, the ratio of its time and RSS to
the 1-instance backup's, from the same run. The target: 100 instances in at most 3x the
time of one, with a flat peak RSS. The machines are shared and noisy: quote medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator import simulation  # noqa: E402

SCRIPTS = ("pre-backup-lock", "backup", "post-backup-unlock")
RSS_WRAPPER = (
    "import resource, runpy, sys\n"
    "out = sys.argv.pop(1)\n"
    "try:\n"
    "    runpy.run_module('orchestrator', run_name='__main__')\n"
    "finally:\n"
    "    open(out, 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))\n"
)


def deploy(home: Path, size: int) -> str:
    name = f"scale-{size}"
    manifest = {
        "name": name,
        "releases": [{"name": "redis", "version": "15.2.1"}],
        "instance_groups": [
            {
                "name": "redis",
                "instances": size,
                "jobs": [{"name": "redis-server", "release": "redis"}],
            }
        ],
    }
    path = home / f"{name}.yml"
    path.write_text(yaml.safe_dump(manifest))
    simulation.deploy(home, "demo", name, path)
    for index in range(size):
        for script in SCRIPTS:
            simulation.fault(
                home, "demo", "redis-server", script, "sleep 0.2",
                deployment=name, instance=f"redis/{index}",
            )  # fmt: skip
    return name


def backup(home: Path, name: str, out: Path, extra: list[str]) -> tuple[float, int]:
    rss_file = out / f".rss-{name}"
    env = {**os.environ, "BBRX_HOME": str(home), "BBRX_OPERATOR": "bench"}
    argv = [sys.executable, "-c", RSS_WRAPPER, str(rss_file), "deployment", "--target",
            "sim://demo", "--deployment", name, *extra, "backup", "-a", str(out)]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=out)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"backup of {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return elapsed, int(rss_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="1,10,100")
    parser.add_argument("--max-parallel", type=int, default=None)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    extra = ["--max-parallel", str(args.max_parallel)] if args.max_parallel else []
    with tempfile.TemporaryDirectory(prefix="bbrx-scale-") as base:
        home = Path(base)
        simulation.create(home, "demo")
        names = {size: deploy(home, size) for size in sizes}
        times: dict[int, list[float]] = {size: [] for size in sizes}
        rss: dict[int, list[int]] = {size: [] for size in sizes}
        for round_number in range(args.rounds):
            for size in sizes:
                out = home / f"out-{size}-{round_number}"
                out.mkdir()
                elapsed, peak = backup(home, names[size], out, extra)
                times[size].append(elapsed)
                rss[size].append(peak)
                print(f"round {round_number + 1}: {size:>4} instances {elapsed:6.2f} s "
                      f"{peak / 1024:6.1f} MiB", flush=True)  # fmt: skip
    base_time = statistics.median(times[sizes[0]])
    base_rss = statistics.median(rss[sizes[0]])
    print(f"\nmedians of {args.rounds} rounds (scripts sleep 0.2 s each; ratios to {sizes[0]}):")
    print("| instances | backup time | time ratio | peak RSS | RSS ratio |")
    print("|---|---|---|---|---|")
    for size in sizes:
        t, r = statistics.median(times[size]), statistics.median(rss[size])
        print(f"| {size} | {t:.2f} s | {t / base_time:.2f} | {r / 1024:.0f} MiB | "
              f"{r / base_rss:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
