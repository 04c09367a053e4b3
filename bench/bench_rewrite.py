"""Benchmark: rewriting files.img of a real dump holding 10,000 inet sockets.

    .venv/bin/python bench/bench_rewrite.py [--sockets N] [--runs R]

In one invocation it (1) starts the testbed workload on a test host holding N UDP sockets
bound to the host's address and dumps it with CRIU 4.2.1, (2) times our rewrite in-process
(median of R runs) and as a whole `overlayfs-inetsk rewrite` process, (3) times the crit
JSON route on the same file (crit decode --pretty, edit the JSON, crit encode), checks both
give the same bytes, (4) measures our rewrite's peak memory over the interpreter's
baseline, and (5) times `overlayfs-inetsk inspect` of a small real image, start-up included.
Needs root and CRIU (scripts/setup.sh). Prints figures and ratios; exits 1 if a target
is missed.
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

from inetsk_testbed.critroute import crit_rewrite
from inetsk_testbed import TestNet
from inetsk_testbed import criu as tb_criu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the peak-memory child's cwd
BIN = os.path.join(os.path.dirname(sys.executable), "overlayfs-inetsk")
OLD, NEW = "10.77.0.1", "10.77.0.2"


def step(msg: str) -> None:
    print(f"-- {msg}", file=sys.stderr, flush=True)


def timed(argv: list[str], **kw) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t


def make_dump(net: TestNet, args: list[str], out: str) -> None:
    host = net.hosts.get("a") or net.add_host("a")
    pid = tb_criu.start_workload(host, args, timeout=120)
    tb_criu.dump(host, pid, out, timeout=300)


def crit_route(src: str, dst: str) -> float:
    t = time.perf_counter()
    crit_rewrite(src, dst, OLD, NEW)
    return time.perf_counter() - t


MEM_PROBE = r"""
import resource, sys, tracemalloc
from overlayfs_inetsk.core.addrmap import AddressMap
from overlayfs_inetsk.core.plan import rewrite_checkpoint
amap = AddressMap.from_args(["local=%s"])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
data = open(sys.argv[1], "rb").read()
out = rewrite_checkpoint({"files.img": data}, amap)["files.img"].data
cur, peak = tracemalloc.get_traced_memory()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(peak, (rss - base) * 1024)
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sockets", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--crit-runs", type=int, default=3)
    opts = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = opts.sockets + 200
    if hard < need:
        print(f"RLIMIT_NOFILE hard limit {hard} < {need}", file=sys.stderr)
        return 2
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))

    from overlayfs_inetsk.core.addrmap import AddressMap
    from overlayfs_inetsk.core.plan import rewrite_checkpoint

    work = tempfile.mkdtemp(prefix="oi-bench-")
    ok = True
    try:
        big, small = os.path.join(work, "big"), os.path.join(work, "small")
        with TestNet() as net:
            step(f"dumping a workload holding {opts.sockets} UDP sockets on {OLD}")
            t = time.perf_counter()
            make_dump(net, [f"--udp-bind={OLD}:{20000 + i}" for i in range(opts.sockets)], big)
            step(f"dumped in {time.perf_counter() - t:.1f} s")
            make_dump(net, [f"--tcp-listen={OLD}:8000", f"--udp-bind={OLD}:8001",
                            "--tcp-listen=127.0.0.1:8002"], small)
        files_img = os.path.join(big, "files.img")
        data = open(files_img, "rb").read()
        size = len(data)
        amap = AddressMap.from_args([f"local={NEW}"])

        step("our rewrite, in-process")
        times = []
        for _ in range(opts.runs):
            t = time.perf_counter()
            res = rewrite_checkpoint({"files.img": data}, amap)["files.img"]
            times.append(time.perf_counter() - t)
        ours = statistics.median(times)
        assert res.changed == opts.sockets, (res.changed, opts.sockets)

        step("our rewrite, whole process (overlayfs-inetsk rewrite)")
        proc_times = []
        for i in range(3):
            proc_times.append(timed([BIN, "rewrite", big, os.path.join(work, f"view{i}"),
                                     "--map", f"local={NEW}"]))
        ours_proc = statistics.median(proc_times)

        step("crit route (decode --pretty, edit JSON, encode)")
        crit_times = []
        for i in range(opts.crit_runs):
            crit_times.append(crit_route(files_img, os.path.join(work, f"crit{i}.img")))
        crit = statistics.median(crit_times)
        same = open(os.path.join(work, "crit0.img"), "rb").read() == res.data

        step("peak memory")
        out = subprocess.run([sys.executable, "-c", MEM_PROBE % NEW, files_img], check=True,
                             capture_output=True, text=True, cwd=ROOT).stdout.split()
        traced_peak, rss_delta = int(out[0]), int(out[1])

        step("inspect of a small image, wall time with start-up")
        inspect_times = [timed([BIN, "inspect", small]) for _ in range(5)]
        inspect_wall = statistics.median(inspect_times)
        n_small = json.loads(subprocess.run([BIN, "inspect", small, "--json"], check=True,
                                            capture_output=True, text=True).stdout)["summary"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def line(label: str, value: str, target: str, good: bool) -> None:
        nonlocal ok
        ok = ok and good
        print(f"{label:<48} {value:>14}   {target:<22} {'ok' if good else 'MISSED'}")

    print(f"files.img: {opts.sockets} inet sockets, {size} bytes (a real CRIU 4.2.1 dump)")
    line("our rewrite in-process (median)", f"{ours * 1000:.1f} ms", "target < 100 ms",
         ours < 0.1)
    line("our rewrite, whole process (median)", f"{ours_proc * 1000:.0f} ms", "(info)", True)
    line("crit route: decode --pretty, edit, encode", f"{crit:.2f} s", "(baseline)", True)
    line("ratio crit route / ours in-process", f"{crit / ours:.0f}x", "target >= 50x",
         crit / ours >= 50)
    line("ratio crit route / ours whole process", f"{crit / ours_proc:.1f}x", "(info)", True)
    line("crit route gives the same bytes", str(same), "must be True", same)
    line("peak memory over baseline (tracemalloc)", f"{traced_peak / size:.2f}x file",
         "target < 3x file", traced_peak < 3 * size)
    line("max RSS growth over baseline", f"{rss_delta / size:.2f}x file", "target < 3x file",
         rss_delta < 3 * size)
    line(f"inspect of a small image ({n_small['sockets']} sockets), wall", f"{inspect_wall * 1000:.0f} ms",
         "target < 500 ms", inspect_wall < 0.5)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
