"""Benchmark: restoring through the per-node view vs. the alternatives.

    .venv/bin/python bench/bench_view.py [--mib 1024] [--runs 11] [--images DIR]

One invocation, on test hosts made here, with a checkpoint holding --mib MiB of memory
and a TCP listener on host A's address:
  (a) restore straight from the image dir on host A (the limit: no rewrite needed there);
  (b) restore on host B through `overlayfs-inetsk mount` (a fresh mount per run, so each
      restore includes generating files.img);
  (d) the same with `--serve read` (every file's bytes through the daemon's read());
  (e) restore on host B from a view dir written offline by `overlayfs-inetsk rewrite`
      (the rewrite's own time included: a whole process, then the restore);
  (c) what users do today: copy the image dir, rewrite files.img (crit decode/edit/encode),
      restore on B from the copy.
Each is the median of --runs, page cache warm (one unmeasured warm-up restore first, and
every file of the checkpoint read again before each run: see warm_cache), runs (a), (b)
and (e) interleaved in rotating order, sync and 1 s of rest before each. Also:
`overlayfs-inetsk mount` to mount ready; the first open and the full read of a
10,000-socket files.img through a mount, for the one-address UDP image and for the
distinct-TCP-peers image (bench_rewrite.py's dumps; --images DIR reuses them), with a map
without `auto` (mount's validation made the bytes) and with `local=auto` in a test host's
namespace that gets its addresses after the mount: the daemon makes the bytes when they
come (fuse/images.py's warm()); the open after its log says so, the time from adding the
addresses to that line, and the open in the very instant they came (it waits for what is
left of making them: the worst case); the daemon's RSS idle and after that open.
Exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from inetsk_testbed.critroute import crit_rewrite
from inetsk_testbed import TestNet, probe
from inetsk_testbed import criu as tb
from inetsk_testbed.mount import BIN, ismount
from inetsk_testbed.peers import dump_server_with_peers
from overlayfs_inetsk.fuse.daemon import default_log_file

# the 10,000-socket images were dumped on 10.77.0.1 / fd77::1 (bench_rewrite.py's map)
VIEW_MAP = ("--map", "local=10.77.0.99", "--map", "local=fd77::99", "--tcp-outside", "keep")



def step(msg: str) -> None:
    print(f"-- {msg}", file=sys.stderr, flush=True)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


AHEAD = "auto, address after the mount, made ahead"
AT_ONCE = "auto, address after the mount, open at once"


def made_ahead(log: str, seen: int, timeout: float = 30.0) -> float:
    """When the daemon's log (past byte `seen`) says it made the socket images ahead of
    their open (fuse/images.py's warm()): perf_counter() of the first look that found it."""
    deadline = time.monotonic() + timeout
    while True:
        with open(log, "rb") as f:
            f.seek(seen)
            if b", ahead of its open" in f.read():
                return time.perf_counter()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{log}: no socket images made ahead within {timeout:.0f} s")
        time.sleep(0.001)


def daemon_pid(mnt: str) -> int:
    out = subprocess.run(["pgrep", "-f", f"cli.mount mount .* {mnt} "], capture_output=True,
                         text=True).stdout.split()
    return int(out[0])


def mount(img: str, mnt: str, *opts: str) -> float:
    os.makedirs(mnt, exist_ok=True)
    t = time.perf_counter()
    subprocess.run([BIN, "mount", img, mnt, *opts], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def umount(mnt: str) -> None:
    subprocess.run([BIN, "umount", mnt], check=False, stdout=subprocess.DEVNULL)
    if ismount(mnt):
        subprocess.run(["umount", "-l", mnt], check=False)


def warm_cache(image_dir: str) -> None:
    """Read every file of the image dir (unmeasured), so each run starts with its pages in
    the page cache. This VM runs DAMON proactive reclaim (a kdamond with a `pageout`
    scheme for pages idle a few seconds): without this, a run whose pages it had dropped
    reads them from disk and takes twice as long (0.5 s vs 1.1 s, in either column)."""
    for name in sorted(os.listdir(image_dir)):
        path = os.path.join(image_dir, name)
        if os.path.isfile(path):
            with open(path, "rb", buffering=0) as f:
                while f.read(1 << 20):
                    pass


def prefault(nbytes: int) -> None:
    """Touch nbytes of fresh memory and free it again (unmeasured). This VM reports free
    memory to its host (kernel command line page_reporting.page_reporting_order=11, a
    virtio_balloon): memory freed by the previous run's killed 1 GiB tree goes back to the
    host a few seconds later, and a restore that must fault it in again takes twice as
    long (0.5 s vs 1.1 s), in whichever column it falls. Touched just before the run, the
    memory is still the guest's when the restore allocates it (the kernel waits 2 s
    before reporting freed pages)."""
    m = mmap.mmap(-1, nbytes)
    try:
        buf = ctypes.c_char.from_buffer(m)
        ctypes.memset(ctypes.addressof(buf), 1, nbytes)
        del buf
    finally:
        m.close()


def settle(image_dir: str) -> None:
    """Let the kernel settle after the previous run (freeing a killed 1 GiB tree,
    writeback): without this, whichever restore comes right after a kill reads its pages up
    to 30% slower, seen in CRIU's own log as time spent in the restorer's page reads. Then
    warm the page cache (warm_cache) and the memory the restore will take (prefault)."""
    os.sync()
    time.sleep(1)
    warm_cache(image_dir)
    size = sum(e.stat().st_size for e in os.scandir(image_dir) if e.is_file())
    prefault(size + size // 4)


def timed_restore(host, images: str, work: str, originals: str | None = None) -> float:
    """`originals`: the image dir behind `images` (a mount of it), warmed before the run."""
    shutil.rmtree(work, ignore_errors=True)
    settle(originals or images)
    t = time.perf_counter()
    pid = tb.restore(host, images, work, tcp_established=False, timeout=300)
    dt = time.perf_counter() - t
    tb.kill_tree(pid)
    return dt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--sockets", type=int, default=10000)
    ap.add_argument("--opens-only", action="store_true",
                    help="only the first opens of the 10,000-socket files.img (no restores)")
    ap.add_argument("--images", help="bench_rewrite.py's --images dir: its udp/ and tcp/ "
                    "dumps are used (and made there if missing)")
    opts = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, opts.sockets + 200)), hard))
    work = tempfile.mkdtemp(prefix="oi-bench-view-")
    # the daemon and `rewrite` keep their bytecode as an installed package has it (see
    # bench_rewrite.bytecode_cache); the warm-up restores below write it
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pycache")
    results: list[tuple[str, str, str, bool]] = []
    opens: dict[tuple[str, str], list[float]] = {}
    reads: dict[tuple[str, str], list[float]] = {}
    mounts_many: dict[tuple[str, str], list[float]] = {}
    aheads: dict[str, list[float]] = {}  # from adding the addresses to made ahead
    rss_idle: list[int] = []
    rss_gen: list[int] = []

    def report(label: str, value: str, target: str, good: bool = True) -> None:
        results.append((label, value, target, good))

    try:
        with TestNet() as net:
            a, b = net.add_host("A"), net.add_host("B")
            a4, b4 = str(a.ipv4), str(b.ipv4)
            mnt = os.path.join(work, "mnt")
            if not opts.opens_only:  # the 1 GiB restores
                big = os.path.join(work, "big")
                step(f"dumping a service holding {opts.mib} MiB on host A")
                pid = tb.start_workload(a, [f"--tcp-listen=svc@{a4}:8080",
                                            f"--hold-mib={opts.mib}"], timeout=120)
                tb.dump(a, pid, big, timeout=600)
                size = sum(p.stat().st_size for p in Path(big).iterdir())
                mopts = ("--map", f"local={b4}")

                step("warm-up restores (page cache, bytecode)")
                timed_restore(a, big, os.path.join(work, "w-a"))
                mount(big, mnt, *mopts)
                timed_restore(b, mnt, os.path.join(work, "w-b"), big)
                umount(mnt)
                subprocess.run([BIN, "rewrite", big, os.path.join(work, "warm"), *mopts],
                               check=True, stdout=subprocess.DEVNULL)

                ta, tb_, tc, te, tmount = [], [], [], [], []

                def run_a() -> None:
                    ta.append(timed_restore(a, big, os.path.join(work, "w-a")))

                def run_b() -> None:
                    tmount.append(mount(big, mnt, *mopts))
                    tb_.append(timed_restore(b, mnt, os.path.join(work, "w-b"), big))
                    umount(mnt)

                def run_e() -> None:
                    view = os.path.join(work, "offline")
                    shutil.rmtree(view, ignore_errors=True)
                    settle(big)
                    t = time.perf_counter()
                    subprocess.run([BIN, "rewrite", big, view, *mopts], check=True,
                                   stdout=subprocess.DEVNULL)
                    pid = tb.restore(b, view, os.path.join(work, "w-e"), tcp_established=False,
                                     timeout=300)
                    te.append(time.perf_counter() - t)
                    tb.kill_tree(pid)

                # (a), (b) and (e) interleaved in rotating order; (c) afterwards, since its 1 GiB
                # copy leaves dirty pages whose writeback would slow whatever runs next.
                order = [run_a, run_b, run_e]
                for i in range(opts.runs):
                    step(f"run {i + 1}/{opts.runs}: (a) direct, (b) through the mount, "
                         "(e) offline rewrite")
                    for f in order[i % 3:] + order[:i % 3]:
                        f()
                td = []
                for i in range(max(3, opts.runs // 3)):
                    step(f"run {i + 1}: (d) through a mount with --serve read")
                    mount(big, mnt, *mopts, "--serve", "read")
                    td.append(timed_restore(b, mnt, os.path.join(work, "w-d"), big))
                    umount(mnt)
                for i in range(opts.runs):
                    step(f"run {i + 1}/{opts.runs}: (c) copy, rewrite, restore")
                    copy = os.path.join(work, "copy")
                    shutil.rmtree(copy, ignore_errors=True)
                    settle(big)
                    t = time.perf_counter()
                    shutil.copytree(big, copy)
                    crit_rewrite(os.path.join(big, "files.img"), os.path.join(copy, "files.img"),
                                 a4, b4)
                    tb.restore(b, copy, os.path.join(work, "w-c"), tcp_established=False)
                    tc.append(time.perf_counter() - t)
                    assert probe.tcp_hello(a, b4, 8080) == f"svc {b4} 8080"
                    tb.kill_tree(int((Path(work) / "w-c" / "restore.pid").read_text()))
                    shutil.rmtree(copy)

            images = opts.images or os.path.join(work, "images")
            many = {"udp": os.path.join(images, "udp"), "tcp": os.path.join(images, "tcp")}
            if not os.path.exists(os.path.join(many["udp"], ".complete")):
                step(f"dumping {opts.sockets} UDP sockets on one address")
                shutil.rmtree(many["udp"], ignore_errors=True)
                pid = tb.start_workload(a, [f"--udp-bind={a4}:{20000 + i}"
                                            for i in range(opts.sockets)], timeout=120)
                tb.dump(a, pid, many["udp"], timeout=300)
                open(os.path.join(many["udp"], ".complete"), "w").close()
        if not os.path.exists(os.path.join(many["tcp"], ".complete")):
            step(f"dumping a server with {opts.sockets} connections from distinct peers")
            shutil.rmtree(many["tcp"], ignore_errors=True)
            with TestNet() as net2:
                dump_server_with_peers(net2, opts.sockets, many["tcp"])
            open(os.path.join(many["tcp"], ".complete"), "w").close()
        # Without `auto`, mount's validation keeps the bytes it made and the first open
        # serves them. With `local=auto` in a test host's namespace that gets its address
        # only after the mount (the mount warns), the first open generates them.
        with TestNet() as net3:
            node = net3.add_host("N", ipv4=None, ipv6=None)
            auto = ("--map", "local=auto", "--netns", node.netns_path, "--iface",
                    node.ifname, "--tcp-outside", "keep")
            how = {"made at mount": VIEW_MAP,
                   AHEAD: auto,  # the open after the daemon made them (its log says so)
                   AT_ONCE: auto}  # the open in the instant the addresses came
            for name, img in many.items():
                for label, mo in how.items():
                    step(f"first open of a {name} files.img, {label}")
                    n_open: list[float] = []
                    n_read: list[float] = []
                    n_mount: list[float] = []
                    late = label != "made at mount"
                    n_ahead: list[float] = []
                    for _ in range(opts.runs):
                        n_mount.append(mount(img, mnt, *mo))
                        dpid = daemon_pid(mnt)
                        rss_idle.append(rss_kib(dpid))
                        if late:
                            log = default_log_file(mnt)
                            seen = os.path.getsize(log)
                            t_add = time.perf_counter()
                            node.add_addr("10.77.0.50/16")
                            node.add_addr("fd77::50/64")
                            if label == AHEAD:
                                n_ahead.append(made_ahead(log, seen) - t_add)
                        t = time.perf_counter()
                        fd = os.open(os.path.join(mnt, "files.img"), os.O_RDONLY)
                        n_open.append(time.perf_counter() - t)
                        while os.read(fd, 1 << 20):
                            pass
                        n_read.append(time.perf_counter() - t)
                        os.close(fd)
                        rss_gen.append(rss_kib(dpid))
                        umount(mnt)
                        if late:
                            node.del_addr("10.77.0.50/16")
                            node.del_addr("fd77::50/64")
                    opens[(name, label)], reads[(name, label)] = n_open, n_read
                    mounts_many[(name, label)] = n_mount
                    if n_ahead:
                        aheads[name] = n_ahead
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if not opts.opens_only:
        a_, b_, c_ = statistics.median(ta), statistics.median(tb_), statistics.median(tc)
        e_ = statistics.median(te)
        print(f"checkpoint: {opts.mib} MiB of memory, {size / 2**20:.0f} MiB of images; "
              f"median of {opts.runs} runs, warm page cache; load average "
              f"{os.getloadavg()[0]:.2f} at the end")
        report("(a) restore from the image dir (the limit)", f"{a_:.3f} s", "")
        report("(b) restore through the mount", f"{b_:.3f} s", "")
        report("(e) offline rewrite (whole process) + restore", f"{e_:.3f} s", "")
        print("runs (a):", " ".join(f"{x:.3f}" for x in ta))
        print("runs (b):", " ".join(f"{x:.3f}" for x in tb_))
        print("runs (e):", " ".join(f"{x:.3f}" for x in te))
        report("(c) copy + crit rewrite + restore (today)", f"{c_:.3f} s", "")
        report("(b)/(a), ratio of medians", f"{b_ / a_:.3f}", "target <= 1.05", b_ / a_ <= 1.05)
        report("(e)/(a), ratio of medians", f"{e_ / a_:.3f}", "(info)")
        report("(b)/(a), fastest runs", f"{min(tb_) / min(ta):.3f}", "(info)")
        d_ = statistics.median(td)
        report(f"(d) restore through a mount with --serve read ({len(td)} runs)", f"{d_:.3f} s", "")
        report("(d)/(b): every byte through Python read()", f"{d_ / b_:.1f}x", "")
        report("(c)/(b)", f"{c_ / b_:.1f}x", "")
        report("mount command until the view serves", f"{statistics.median(tmount) * 1000:.0f} ms",
               "target < 1000 ms", statistics.median(tmount) < 1.0)
    if opts.opens_only:
        print(f"median of {opts.runs} runs; load average {os.getloadavg()[0]:.2f} at the end")
    for (name, label), times in opens.items():
        o, r = statistics.median(times), statistics.median(reads[(name, label)])
        m = statistics.median(mounts_many[(name, label)])
        what = {"udp": "one address", "tcp": "distinct TCP peers"}[name]
        if label == AT_ONCE:  # waits for what is left of making them: no target
            report(f"first open, {opts.sockets} sockets, {what}, {label}",
                   f"{o * 1000:.0f} ms", "(info)")
        else:  # issue 21: the plan not paid by the restore, < 25 ms
            limit = 0.025 if label == AHEAD else 0.05
            report(f"first open, {opts.sockets} sockets, {what}, {label}",
                   f"{o * 1000:.0f} ms", f"target < {limit * 1000:.0f} ms", o < limit)
        if label == AHEAD:
            report("  made ahead: from adding the addresses to the daemon's log line",
                   f"{statistics.median(aheads[name]) * 1000:.0f} ms", "(info)")
        report(f"  open + read of all of it; mount command: {m * 1000:.0f} ms",
               f"{r * 1000:.0f} ms", "")
    report("daemon RSS after mount (idle)", f"{statistics.median(rss_idle) / 1024:.1f} MB",
           "target < 60 MB", statistics.median(rss_idle) < 60 * 1024)
    report("daemon RSS after generating it", f"{statistics.median(rss_gen) / 1024:.1f} MB",
           "target < 60 MB", statistics.median(rss_gen) < 60 * 1024)
    for label, value, target, good in results:
        mark = "" if not target or target == "(info)" else ("ok" if good else "MISSED")
        print(f"{label:<72} {value:>10}   {target:<18} {mark}")
    return 0 if all(g for *_, g in results) else 1


if __name__ == "__main__":
    sys.exit(main())
