"""Benchmark: the CRIU plugin's CLI route alone, `overlayfs-inetsk plugin-view --socket-fd N`
serving one request, as the plugin runs it when no agent answers (no CRIU).

    .venv/bin/python bench/bench_cli_route.py [--runs 21] [--against DIR] [--callgrind]

In one invocation, a small image made here (one socket to move) and the request the C
plugin sends (no map in it: the default `local=auto`, resolved in this network namespace;
`--env-map` maps to 10.77.0.2 instead, no netlink), for this tree and, with --against, the
package of another checkout, alternating, `--runs` rounds:
  - wall time from the spawn to the reply (what the plugin waits for) and the process's CPU
    time (user + system), medians;
  - the modules the process loaded, and (--importtime N) where its import time goes:
    -X importtime of N more requests, the median of each module's own time, summed by
    who brought it in (protobuf and pycriu's generated modules, this package, the
    standard library) and the largest modules;
  - --callgrind: the instructions the process executes (valgrind --tool=callgrind, once
    each: repeatable to about 1 %, where wall time on this shared machine is not), and
    those of `python -c pass` and of `python -c "import re"` (the interpreter and the
    regular-expression module the byte pass needs: what no Python route goes under).
Each process keeps its bytecode (in a cache of this run: as an installed package has its
.pyc files) and runs with cwd / (so only the tree asked for is on sys.path). Each view is
removed after its request, outside the timing, as the plugin removes it at fini: the next
request's sweep finds none to clear (before, every request swept the one before it and
paid for that: 16 ms of importing shutil, which no real restore pays). Prints the figures
and the ratios to this tree's, and the load average.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
sys.path[:0] = [ROOT, os.path.join(ROOT, "testbed")]

from inetsk_testbed.agentproc import request  # noqa: E402
from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk  # noqa: E402

LAUNCH = "import sys; from overlayfs_inetsk.cli import main; sys.exit(main())"  # pip's script
CALLGRIND = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]


class Route:
    def __init__(self, tmp: Path, env_map: bool):
        (tmp / "images").mkdir()
        (tmp / "views").mkdir(mode=0o755)
        (tmp / "images" / "files.img").write_bytes(
            files_img(inet_file_entry(isk(2, "10.77.0.1", 7001))))
        self.views = tmp / "views"
        self.cache = tmp / "pycache"
        self.fds = [os.open(tmp / "images", os.O_RDONLY | os.O_DIRECTORY),
                    os.open("/proc/self/ns/net", os.O_RDONLY)]
        self.req_env = {"INETSK_LOCAL_IPV4": "10.77.0.2"} if env_map else {}

    def env(self, tree: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        return {**env, "PYTHONPATH": tree, "PYTHONPYCACHEPREFIX": str(self.cache)}

    def run(self, tree: str, prefix: tuple[str, ...] | list[str] = (),
            flags: tuple[str, ...] = ()) -> tuple[float, float, str]:
        """(wall s, CPU s, the child's stderr) of one request."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.Popen([*prefix, sys.executable, *flags, "-c", LAUNCH, "plugin-view",
                              "--socket-fd", str(b.fileno()), "--view-root", str(self.views)],
                             pass_fds=(b.fileno(),), env=self.env(tree), cwd="/",
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        b.close()
        socket.send_fds(a, [request(self.req_env, ms=300_000)], self.fds)
        msg, got, _f, _a = socket.recv_fds(a, 4096, 4)
        wall = time.perf_counter() - t0
        for fd in got:
            os.close(fd)
        a.close()
        _out, err = p.communicate(timeout=300)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if not msg.startswith(b"VIEW view-"):
            raise SystemExit(f"{tree}: no view: {msg!r} {err[-2000:]}")
        shutil.rmtree(self.views / msg.decode().split()[1])  # the plugin's fini
        if os.listdir(self.views):
            raise SystemExit(f"{tree}: left in the view root: {os.listdir(self.views)}")
        cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
        return wall, cpu, err


def instructions(err: str) -> int:
    m = re.search(r"Collected : (\d+)", err)
    if m is None:
        raise SystemExit(f"no instruction count from valgrind: {err[-1000:]}")
    return int(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--against", metavar="DIR", help="also the package of another checkout")
    ap.add_argument("--callgrind", action="store_true", help="count instructions (valgrind)")
    ap.add_argument("--importtime", type=int, default=0, metavar="N",
                    help="import-time breakdown over N requests of this tree")
    ap.add_argument("--env-map", action="store_true",
                    help="the request maps to 10.77.0.2 (no `auto`, no netlink)")
    opts = ap.parse_args()
    trees = {"this tree": ROOT}
    if opts.against:
        trees["--against"] = os.path.abspath(opts.against)
    with tempfile.TemporaryDirectory(prefix="bench-cli-route-") as t:
        route = Route(Path(t), opts.env_map)
        for tree in trees.values():  # warm-up: the bytecode caches
            route.run(tree)
        wall: dict[str, list[float]] = {k: [] for k in trees}
        cpu: dict[str, list[float]] = {k: [] for k in trees}
        for i in range(opts.runs):
            for k in (list(trees) if i % 2 == 0 else list(reversed(trees))):
                w, c, _ = route.run(trees[k])
                wall[k].append(w)
                cpu[k].append(c)
        mods: dict[str, int] = {}
        for k, tree in trees.items():
            err = route.run(tree, flags=("-X", "importtime"))[2]
            mods[k] = len(re.findall(r"^import time:\s+\d+ \|", err, re.M))
        breakdown = [route.run(ROOT, flags=("-X", "importtime"))[2]
                     for _ in range(opts.importtime)]
        counts = {k: instructions(route.run(tree, CALLGRIND)[2]) for k, tree in trees.items()
                  } if opts.callgrind else {}
        bare = {}
        if opts.callgrind:
            for code in ("pass", "import re"):
                cp = subprocess.run([*CALLGRIND, sys.executable, "-c", code], cwd="/",
                                    env=route.env(ROOT), capture_output=True, text=True)
                bare[code] = instructions(cp.stderr)
    base_w = statistics.median(wall["this tree"])
    base_c = statistics.median(cpu["this tree"])
    print(f"plugin-view, one VIEW request ({'map 10.77.0.2' if opts.env_map else 'local=auto'}),"
          f" {opts.runs} alternating rounds, medians")
    for k in trees:
        w, c = statistics.median(wall[k]), statistics.median(cpu[k])
        line = (f"  {k:<10} wall {w * 1000:6.1f} ms (x{w / base_w:.3f})  cpu {c * 1000:6.1f} ms "
                f"(x{c / base_c:.3f})  modules imported: {mods[k]}")
        if k in counts:
            line += f"  instructions {counts[k] / 1e6:.1f} M (x{counts[k] / counts['this tree']:.3f})"
        print(line)
    for code, n in bare.items():
        print(f"  python -c {code!r}: {n / 1e6:.1f} M instructions "
              f"({n / counts['this tree']:.2f} of this tree's)")
    if breakdown:
        print_breakdown(breakdown)
    print("load average at the end: %.2f %.2f %.2f" % os.getloadavg())
    return 0


def owner(module: str) -> str | None:
    if module.startswith("google.") or module.endswith("_pb2"):
        return "protobuf + pycriu"
    return "overlayfs_inetsk" if module.startswith("overlayfs_inetsk") else None


def print_breakdown(traces: list[str]) -> None:
    """Each module's own import time (median over the traces), summed by the nearest
    importer that is protobuf/pycriu or this package (a standard module imported by one
    counts for it; the rest: the interpreter's start and the route's own code)."""
    own: dict[str, list[float]] = {}
    groups: dict[str, list[float]] = {}
    for trace in traces:
        rows = [(int(m.group(1)), len(m.group(2)) // 2, m.group(3)) for m in re.finditer(
            r"^import time:\s+(\d+) \|\s+\d+ \|( *)(\S+)$", trace, re.M)]
        stack: list[tuple[int, str]] = []
        sums: dict[str, float] = {}
        for us, depth, mod in reversed(rows):  # a module's importers come after it
            while stack and stack[-1][0] >= depth:
                stack.pop()
            who = owner(mod) or next((owner(m) for _, m in reversed(stack) if owner(m)),
                                     None) or "start-up and the route's own imports"
            sums[who] = sums.get(who, 0.0) + us / 1000
            own.setdefault(mod, []).append(us / 1000)
            stack.append((depth, mod))
        for k, v in sums.items():
            groups.setdefault(k, []).append(v)
    total = sum(statistics.median(v) for v in groups.values())
    print(f"  import time by who brings a module in (-X importtime, median of {len(traces)}):")
    for k, v in sorted(groups.items(), key=lambda kv: -statistics.median(kv[1])):
        print(f"    {k:<40} {statistics.median(v):6.1f} ms  {statistics.median(v) / total:5.1%}")
    top = sorted(own.items(), key=lambda kv: -statistics.median(kv[1]))[:12]
    print("  the largest modules (own time): " + ", ".join(
        f"{m} {statistics.median(v):.1f}" for m, v in top))


if __name__ == "__main__":
    sys.exit(main())
