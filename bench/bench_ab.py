"""Benchmark: this tree against another checkout of the project (its own .venv), in one
invocation, alternating run by run (the machine is shared: only ratios of interleaved runs
mean something).

    .venv/bin/python bench/bench_ab.py --against /path/to/checkout [--images DIR] [--runs 11]

The images are bench_rewrite.py's real dumps (--images: made there, kept; udp: 10,000 UDP
sockets on one address; tcp: a server with 10,000 connections from distinct peers), with
its map (`--map local=NEW4 --map local=NEW6 --tcp-outside keep`). Per image and tree:
  - whole processes: `overlayfs-inetsk rewrite IMG OUT` (start-up, listing, plan, the
    view's 10,000 symlinks) and `overlayfs-inetsk inspect --json IMG`;
  - in-process (a child process of each tree, warmed up): plan_checkpoint without reports
    (a mount's open, `rewrite`) and with reports (inspect), CPU time.
Prints the medians, and this tree / the other as ratios (below 1: this one is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAP = ["--map", "local=10.77.0.99", "--map", "local=fd77::99", "--tcp-outside", "keep"]

PROBE = r"""
import json, sys, time
from overlayfs_inetsk.core.addrmap import AddressMap
from overlayfs_inetsk.core.decide import RewriteOptions
from overlayfs_inetsk.core.plan import plan_checkpoint
data = open(sys.argv[1], "rb").read()
amap = AddressMap.from_args(["local=10.77.0.99", "local=fd77::99"])
opts = RewriteOptions(tcp_outside="keep")
out = {}
for reports in (False, True, False, True):  # the first two: warm-up
    c = time.process_time()
    plan_checkpoint({"files.img": data}, amap, None, opts, reports)
    out[str(reports)] = time.process_time() - c
print(json.dumps(out))
"""


def cpu_wall(argv: list[str], cwd: str) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(argv, check=True, cwd=cwd, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--against", required=True, help="another checkout, set up (its .venv)")
    ap.add_argument("--images", default="/var/tmp/oi-bench-images",
                    help="bench_rewrite.py's dumps (udp/, tcp/)")
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--work", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = ap.parse_args()
    trees = {"this": HERE, "other": os.path.abspath(args.against)}
    for name in ("udp", "tcp"):
        if not os.path.isfile(os.path.join(args.images, name, "files.img")):
            sys.exit(f"{args.images}/{name}/files.img missing: run bench_rewrite.py "
                     f"--images {args.images} first")
    work = tempfile.mkdtemp(prefix="oi-ab-", dir=args.work)
    # Both trees' children keep their bytecode (as bench_rewrite.bytecode_cache: an
    # installed package has it): with PYTHONDONTWRITEBYTECODE=1, as on this machine, a
    # tree whose modules changed since their .pyc was written compiled them at every
    # start (15-25 ms of a whole `rewrite`: measured as the tree's start-up before)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pycache")
    fig: dict[tuple[str, str, str], list[float]] = {}
    try:
        for i in range(args.runs + 1):  # run 0: warm-up (bytecode caches), not counted
            for name in ("udp", "tcp"):
                img = os.path.join(args.images, name)
                for tree, root in (trees.items() if i % 2 else reversed(trees.items())):
                    bin_ = os.path.join(root, ".venv", "bin", "overlayfs-inetsk")
                    py = os.path.join(root, ".venv", "bin", "python")
                    out = os.path.join(work, f"{tree}-{name}-{i}")
                    rw = cpu_wall([bin_, "rewrite", img, out, *MAP], root)
                    shutil.rmtree(out)
                    ins = cpu_wall([bin_, "inspect", "--json", img, *MAP], root)
                    probe = json.loads(subprocess.run(
                        [py, "-c", PROBE, os.path.join(img, "files.img")], check=True,
                        cwd=root, capture_output=True, text=True).stdout)
                    if i == 0:
                        continue
                    for what, v in (("rewrite, whole process (wall)", rw[0]),
                                    ("rewrite, whole process (CPU)", rw[1]),
                                    ("inspect --json, whole process (CPU)", ins[1]),
                                    ("in-process plan, no reports (CPU)", probe["False"]),
                                    ("in-process plan, reports (CPU)", probe["True"])):
                        fig.setdefault((name, what, tree), []).append(v)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"this tree: {HERE}\nagainst:   {trees['other']}\nmedians of {args.runs}, "
          f"alternating; load average {os.getloadavg()[0]:.2f}")
    for name in ("udp", "tcp"):
        for what in dict.fromkeys(w for (n, w, _t) in fig if n == name):
            a = statistics.median(fig[(name, what, "this")])
            b = statistics.median(fig[(name, what, "other")])
            print(f"[{name}] {what:40} this {a * 1000:7.1f} ms  other {b * 1000:7.1f} ms  "
                  f"this/other {a / b:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
