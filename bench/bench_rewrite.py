"""Benchmark: rewriting files.img of real dumps holding 10,000 inet sockets.

    .venv/bin/python bench/bench_rewrite.py [--sockets N] [--runs R] [--crit-runs C]
                                            [--images DIR] [--work DIR]

Two real CRIU 4.2.1 dumps, made here unless --images DIR already holds them (they are
kept there for the next run; the TCP one takes about 100 s to make):
  udp  a process holding N UDP sockets bound to one address: every socket agrees with the
       others (one decision for all: the best case);
  tcp  a server holding N ESTABLISHED connections from N distinct peers, half IPv4, half
       IPv6, plus its two listeners (inetsk_testbed.peers): no two sockets agree (one
       decision per socket: the worst case).
Both are rewritten with `--map local=NEW4 --map local=NEW6 --tcp-outside keep` (the server
moves, its peers stay; `keep` so that the crit route, which can only replace addresses,
gives the same bytes). In one invocation, per image:
  1. whole processes, alternating: `overlayfs-inetsk rewrite IMG OUT` (a whole restorable
     view dir) vs. the crit route (crit decode --pretty, edit the JSON, crit encode);
     wall and CPU (user+sys of the children) medians, and their ratios;
  2. in-process: plan_checkpoint without reports (what a mount does on first open) and
     with reports (what inspect and rewrite need), udp and tcp alternating, CPU time too,
     beside the floor (upb_floor: every inet entry decoded with upb and encoded back,
     nothing else), measured in the same loop;
     for comparison also the tcp image with address rules instead of `local=`, and with
     every peer on one address (derived from the dump with pycriu's classes);
  3. the crit route's bytes, ours in-process and the view's files.img must be the same;
  4. peak memory of one in-process rewrite over the interpreter's baseline;
  5. `overlayfs-inetsk inspect` of a small real image, start-up included;
  6. the parts of a whole `rewrite` of the tcp image, each alone: creating the view's links
     (os.symlink of as many names into a new dir), listing the dir into the tree
     (build_tree), start-up (`rewrite` of the small image, its own small listing and
     links included), the plan (2.); what the whole process took beyond them is printed
     too, but each part has its own noise: it is within some 20 ms of 0 either way.
The work dir (outputs) defaults to /dev/shm: on this VM's ext4 creating the 10,000
symlinks of a view takes 3 to 11 s depending on other load, which is the disk, not us.
Child processes keep their bytecode in the work dir (see bytecode_cache) and each route
has one unmeasured warm-up run.
Needs root and CRIU (scripts/setup.sh). Prints figures and ratios; exits 1 if a target
is missed.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from inetsk_testbed import TestNet
from inetsk_testbed import criu as tb_criu
from inetsk_testbed.critroute import crit_rewrite
from inetsk_testbed.peers import dump_server_with_peers, raise_nofile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the probes' cwd
BIN = os.path.join(os.path.dirname(sys.executable), "overlayfs-inetsk")
OLD4, OLD6 = "10.77.0.1", "fd77::1"  # the first test host's addresses (both dumps)
NEW4, NEW6 = "10.77.0.99", "fd77::99"
MAP = ["local=" + NEW4, "local=" + NEW6]
MAP_ARGS = ["--map", MAP[0], "--map", MAP[1], "--tcp-outside", "keep"]


def step(msg: str) -> None:
    print(f"-- {msg}", file=sys.stderr, flush=True)


def run_timed(argv: list[str], **kw) -> tuple[float, float]:
    """(wall, CPU of the children) of one whole process."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kw)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def crit_timed(src: str, dst: str) -> tuple[float, float]:
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    c0 = time.process_time()
    t = time.perf_counter()
    crit_rewrite(src, dst, {OLD4: NEW4, OLD6: NEW6})
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime) + time.process_time() - c0
    return wall, cpu


def bytecode_cache(work: str) -> None:
    """Child processes (ours and crit's) keep their compiled bytecode in WORK/pycache, as
    installed packages have theirs (pip writes them at install): with
    PYTHONDONTWRITEBYTECODE=1 in the environment, as on this machine, every start would
    compile this repo's modules again (about 25 ms of `rewrite`), and not crit's."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pycache")


def have(d: str) -> bool:
    return os.path.exists(os.path.join(d, ".complete"))


def done(d: str) -> None:
    open(os.path.join(d, ".complete"), "w").close()


def make_images(images: str, n: int) -> None:
    udp, tcp, small = (os.path.join(images, x) for x in ("udp", "tcp", "small"))
    for d in (udp, tcp, small):
        if not have(d):
            shutil.rmtree(d, ignore_errors=True)
    if not have(udp) or not have(small):
        with TestNet() as net:
            host = net.add_host("a")
            if not have(udp):
                step(f"dumping a process holding {n} UDP sockets on {OLD4}")
                pid = tb_criu.start_workload(
                    host, [f"--udp-bind={OLD4}:{20000 + i}" for i in range(n)], timeout=120)
                tb_criu.dump(host, pid, udp, timeout=300)
                done(udp)
            if not have(small):
                pid = tb_criu.start_workload(host, [f"--tcp-listen={OLD4}:8000",
                                                    f"--udp-bind={OLD4}:8001",
                                                    "--tcp-listen=127.0.0.1:8002"])
                tb_criu.dump(host, pid, small)
                done(small)
    if not have(tcp):
        step(f"dumping a server holding {n} established connections from {n} distinct "
             "peers (IPv4 and IPv6); about 100 s for 10,000")
        t = time.perf_counter()
        with TestNet() as net:
            got = dump_server_with_peers(net, n, tcp)
        assert (got.old4, got.old6) == (OLD4, OLD6), got
        done(tcp)
        step(f"dumped in {time.perf_counter() - t:.0f} s")


MEM_PROBE = r"""
import resource, sys, tracemalloc
from overlayfs_inetsk.core.addrmap import AddressMap
from overlayfs_inetsk.core.decide import RewriteOptions
from overlayfs_inetsk.core.plan import rewrite_checkpoint
amap = AddressMap.from_args(sys.argv[2:])
opts = RewriteOptions(tcp_outside="keep")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
data = open(sys.argv[1], "rb").read()
out = rewrite_checkpoint({"files.img": data}, amap, None, opts)["files.img"].data
cur, peak = tracemalloc.get_traced_memory()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(peak, (rss - base) * 1024)
"""


def one_peer_address(data: bytes) -> bytes:
    """The tcp dump's files.img with every connection's peer address set to the first
    one of its family (ports unchanged): the same sockets, one peer address. Derived with
    pycriu's generated classes, not dumped."""
    from overlayfs_inetsk.core import imagefile
    from pycriu.images import fdinfo_pb2

    first: dict[int, list[int]] = {}
    out = []
    for _off, start, end in imagefile.frames(data, "files.img"):
        fe = fdinfo_pb2.file_entry.FromString(data[start:end])
        if fe.type == fdinfo_pb2.INETSK and fe.isk.state == 1:
            dst = first.setdefault(fe.isk.family, list(fe.isk.dst_addr))
            fe.isk.dst_addr[:] = dst
        out.append(fe.SerializeToString())
    return imagefile.encode(imagefile.FILES_MAGIC, out)


def upb_floor(data: bytes) -> int:
    """The floor: every inet entry of files.img decoded with upb and encoded back, nothing
    else (no decision, no splice, the bytes thrown away)."""
    from overlayfs_inetsk.core import imagefile
    from overlayfs_inetsk.core.entries import FD_INETSK, fdinfo_pb2

    from_string = fdinfo_pb2.file_entry.FromString
    mv = memoryview(data)
    n = 0
    for _off, start, end in imagefile.frames(data, "files.img"):
        if data[start + 1] == FD_INETSK:
            n += len(from_string(mv[start:end]).SerializeToString())
    return n


@dataclass
class Figures:
    name: str
    sockets: int
    size: int
    proc: list[tuple[float, float]]
    crit: list[tuple[float, float]]
    same: bool = False

    def med(self, xs: list[tuple[float, float]], i: int) -> float:
        return statistics.median(x[i] for x in xs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sockets", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--crit-runs", type=int, default=3)
    ap.add_argument("--images", help="dir keeping the dumps between runs (made if missing)")
    ap.add_argument("--work", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="where outputs go (default /dev/shm)")
    opts = ap.parse_args()
    raise_nofile(opts.sockets + 200)

    from overlayfs_inetsk.core.addrmap import AddressMap
    from overlayfs_inetsk.core.decide import RewriteOptions
    from overlayfs_inetsk.core.plan import plan_checkpoint

    work = tempfile.mkdtemp(prefix="oi-bench-", dir=opts.work)
    bytecode_cache(work)
    images = opts.images or os.path.join(work, "images")
    os.makedirs(images, exist_ok=True)
    ok = True
    results: list[tuple[str, str, str, bool | None]] = []

    def line(label: str, value: str, target: str = "", good: bool | None = None) -> None:
        nonlocal ok
        ok = ok and good is not False
        results.append((label, value, target, good))

    try:
        make_images(images, opts.sockets)
        figs: dict[str, Figures] = {}
        data: dict[str, bytes] = {}
        for name in ("udp", "tcp"):
            img = os.path.join(images, name)
            data[name] = open(os.path.join(img, "files.img"), "rb").read()
            fig = figs[name] = Figures(name, 0, len(data[name]), [], [])
            if name == "udp":  # unmeasured: the bytecode caches of both routes written
                step("warm-up runs of both routes (bytecode caches)")
                subprocess.run([BIN, "rewrite", img, os.path.join(work, "warm"), *MAP_ARGS],
                               check=True, stdout=subprocess.DEVNULL)
                crit_timed(os.path.join(img, "files.img"), os.path.join(work, "warm.img"))
            step(f"{name}: whole processes, overlayfs-inetsk rewrite and the crit route, "
                 "alternating")
            for i in range(max(opts.runs, opts.crit_runs)):
                out = os.path.join(work, f"view-{name}-{i}")
                fig.proc.append(run_timed([BIN, "rewrite", img, out, *MAP_ARGS]))
                if i < opts.crit_runs:
                    fig.crit.append(crit_timed(os.path.join(img, "files.img"),
                                               os.path.join(work, f"crit-{name}-{i}.img")))
                if i:
                    shutil.rmtree(out)

        step("in-process: udp and tcp alternating, without and with reports")
        amap = AddressMap.from_args(MAP)
        ropts = RewriteOptions(tcp_outside="keep")
        rules = AddressMap.from_args([f"{OLD4}={NEW4}", f"{OLD6}={NEW6}"])
        data["tcp1"] = one_peer_address(data["tcp"])
        inproc: dict[tuple[str, bool | str], list[float]] = {}
        inproc_cpu: dict[tuple[str, bool | str], list[float]] = {}
        outs: dict[str, object] = {}
        for _ in range(opts.runs):
            for name in ("udp", "tcp"):  # the floor, alternating with the plans below
                c = time.process_time()
                t = time.perf_counter()
                upb_floor(data[name])
                inproc.setdefault((name, "floor"), []).append(time.perf_counter() - t)
                inproc_cpu.setdefault((name, "floor"), []).append(time.process_time() - c)
            for name in ("udp", "tcp", "tcp-rules", "tcp1"):
                for reports in (False, True):
                    img = data[name.split("-")[0]]
                    c = time.process_time()
                    t = time.perf_counter()
                    res = plan_checkpoint({"files.img": img}, rules if "rules" in name else amap,
                                          None, ropts, reports)["files.img"]
                    inproc.setdefault((name, reports), []).append(time.perf_counter() - t)
                    inproc_cpu.setdefault((name, reports), []).append(time.process_time() - c)
                    outs[name] = res
        for name, fig in figs.items():
            res = outs[name]
            fig.sockets = sum(res.counts.values())  # type: ignore[attr-defined]
            crit_bytes = open(os.path.join(work, f"crit-{name}-0.img"), "rb").read()
            view_bytes = open(os.path.join(work, f"view-{name}-0", "files.img"), "rb").read()
            fig.same = crit_bytes == bytes(res.data) == view_bytes  # type: ignore[attr-defined]
            assert res.changed == fig.sockets, (name, res.counts)  # type: ignore[attr-defined]

        step("peak memory")
        mem = {}
        for name in ("udp", "tcp"):
            out = subprocess.run([sys.executable, "-c", MEM_PROBE,
                                  os.path.join(images, name, "files.img"), *MAP], check=True,
                                 capture_output=True, text=True, cwd=ROOT).stdout.split()
            mem[name] = (int(out[0]), int(out[1]))

        step("creating the links of a view alone (the tcp image's file count)")
        names = sorted(os.listdir(os.path.join(images, "tcp")))
        links = []
        for i in range(opts.runs):
            d = os.path.join(work, f"links-{i}")
            os.mkdir(d)
            t = time.perf_counter()
            for n in names:
                os.symlink(os.path.join("/nonexistent", n), os.path.join(d, n))
            links.append(time.perf_counter() - t)
            shutil.rmtree(d)

        step("the rest of a whole `rewrite` of the tcp image, alone: the tree, start-up")
        from overlayfs_inetsk.host.listing import build_tree
        tree_t = []
        for _ in range(opts.runs):
            t = time.perf_counter()
            build_tree(os.path.join(images, "tcp"), attrs=False)  # as `rewrite` lists it
            tree_t.append(time.perf_counter() - t)
        small_rw = []
        for i in range(opts.runs):
            out = os.path.join(work, f"small-{i}")
            small_rw.append(run_timed([BIN, "rewrite", os.path.join(images, "small"), out,
                                       *MAP_ARGS])[0])

        step("inspect of a small image, wall time with start-up")
        small = os.path.join(images, "small")
        inspect_wall = statistics.median(run_timed([BIN, "inspect", small])[0]
                                         for _ in range(opts.runs))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    desc = {"udp": "one address (best case)", "tcp": "distinct TCP peers (worst case)"}
    for name, fig in figs.items():
        print(f"{name}: files.img {fig.size} bytes, {fig.sockets} inet sockets, "
              f"{desc[name]}; a real CRIU 4.2.1 dump")
    for name, fig in figs.items():
        pw, pc = fig.med(fig.proc, 0), fig.med(fig.proc, 1)
        cw, cc = fig.med(fig.crit, 0), fig.med(fig.crit, 1)
        line(f"[{name}] overlayfs-inetsk rewrite, whole process", f"{pw * 1000:.0f} ms",
             f"CPU {pc * 1000:.0f} ms")
        line(f"[{name}] crit route, whole processes", f"{cw:.2f} s", f"CPU {cc:.2f} s")
        line(f"[{name}] ratio crit / ours, whole process (wall)", f"{cw / pw:.1f}x",
             "target >= 20x", cw / pw >= 20)
        line(f"[{name}] ratio crit / ours, whole process (CPU)", f"{cc / pc:.1f}x", "(info)")
    tcp_whole = figs["tcp"].med(figs["tcp"].proc, 0)
    tcp_plan = statistics.median(inproc[("tcp", False)])
    parts = {"links": statistics.median(links), "tree": statistics.median(tree_t),
             "start": statistics.median(small_rw)}
    line("[tcp] whole rewrite: creating the view's links alone (os.symlink)",
         f"{parts['links'] * 1000:.0f} ms", f"{len(names)} links")
    line("[tcp] whole rewrite: listing the dir, the tree (build_tree)",
         f"{parts['tree'] * 1000:.0f} ms", "(info)")
    line("[tcp] whole rewrite: start-up and a small view (rewrite small)",
         f"{parts['start'] * 1000:.0f} ms", "(info)")
    line("[tcp] whole rewrite: the plan (in-process, above)", f"{tcp_plan * 1000:.0f} ms",
         "(info)")
    # measured apart, each with its own noise (and a small view's listing and links in the
    # start-up): their sum is the whole process within some 20 ms either way
    line("[tcp] whole rewrite: the whole less those four",
         f"{(tcp_whole - sum(parts.values()) - tcp_plan) * 1000:.0f} ms", "(info: noise)")
    line("[tcp] crit / ours without the links (wall)",
         f"{figs['tcp'].med(figs['tcp'].crit, 0) / (tcp_whole - parts['links']):.1f}x", "(info)")
    for name, fig in figs.items():
        m = statistics.median(inproc[(name, False)])
        mc = statistics.median(inproc_cpu[(name, False)])
        mr = statistics.median(inproc[(name, True)])
        fl = statistics.median(inproc[(name, "floor")])
        flc = statistics.median(inproc_cpu[(name, "floor")])
        cw = fig.med(fig.crit, 0)
        line(f"[{name}] floor: upb decode + encode of every inet entry", f"{fl * 1000:.1f} ms",
             f"CPU {flc * 1000:.1f} ms")
        line(f"[{name}] ours in-process, no reports (mount)", f"{m * 1000:.1f} ms",
             "target < 25 ms", m < 0.025)
        line(f"[{name}]   the same, CPU time", f"{mc * 1000:.1f} ms")
        line(f"[{name}]   ours / floor (wall)", f"{m / fl:.2f}x", "target <= 1.5x", m <= 1.5 * fl)
        line(f"[{name}]   ours / floor (CPU)", f"{mc / flc:.2f}x", "(info)")
        line(f"[{name}] ours in-process, with reports (inspect)", f"{mr * 1000:.1f} ms")
        line(f"[{name}] ratio crit / ours in-process", f"{cw / m:.0f}x")
    udp_m = statistics.median(inproc[("udp", False)])
    tcp_m = statistics.median(inproc[("tcp", False)])
    line("in-process tcp / udp (distinct peers / one address)", f"{tcp_m / udp_m:.2f}x",
         "target < 2x", tcp_m / udp_m < 2)
    udp_c = statistics.median(inproc_cpu[("udp", False)])
    tcp_c = statistics.median(inproc_cpu[("tcp", False)])
    line("  the same ratio in CPU time", f"{tcp_c / udp_c:.2f}x", "(info)")
    t1 = statistics.median(inproc[("tcp1", False)])
    line("[tcp] every peer on one address (derived), no reports", f"{t1 * 1000:.1f} ms", "(info)")
    line("  distinct peers / one peer address", f"{tcp_m / t1:.2f}x", "(info)")
    tr = statistics.median(inproc[("tcp-rules", False)])
    line("[tcp] with address rules instead of local=", f"{tr * 1000:.1f} ms", "(info)")
    line("  the same / udp", f"{tr / udp_m:.2f}x", "(info)")
    for name, fig in figs.items():
        line(f"[{name}] crit route, ours, view: same bytes", str(fig.same), "must be True",
             fig.same)
        traced, rss = mem[name]
        line(f"[{name}] peak memory over baseline (tracemalloc)",
             f"{traced / fig.size:.2f}x file", "target < 3x file", traced < 3 * fig.size)
        line(f"[{name}] max RSS growth over baseline", f"{rss / fig.size:.2f}x file",
             "target < 3x file", rss < 3 * fig.size)
    line("inspect of a small image, wall with start-up", f"{inspect_wall * 1000:.0f} ms",
         "target < 500 ms", inspect_wall < 0.5)
    print(f"runs: {opts.runs} (crit route {opts.crit_runs}); medians; "
          f"load average before printing: {os.getloadavg()[0]:.2f}")
    for label, value, target, good in results:
        mark = "" if good is None else ("ok" if good else "MISSED")
        print(f"{label:<56} {value:>12}   {target:<16} {mark}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
