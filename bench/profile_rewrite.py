"""Where the time of `overlayfs-inetsk rewrite`/`inspect` goes (a profile, not a pass/fail
benchmark).

    .venv/bin/python bench/profile_rewrite.py IMAGES_DIR

IMAGES_DIR is bench_rewrite.py's --images dir (its udp/, tcp/ and small/ dumps). Prints:
  1. start-up: the bare interpreter, `python -X importtime` of `rewrite` and `inspect` on
     the small image (total import time, the heaviest top-level imports, how many *_pb2
     modules, and whether pyfuse3/trio/netlink (node/rtnl) were imported: they must not be);
  2. in-process stages for the udp (one address) and tcp (distinct peers) images: framing,
     decoding, re-serializing every inet entry, the plan with and without reports, what
     `rewrite` prints (the problem rows and the summary) and the table of `rewrite --table`;
  3. the functions that take the time in a plan of the tcp image (cProfile, by own time).
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import re
import statistics
import subprocess
import sys
import tempfile
import time

BIN = os.path.join(os.path.dirname(sys.executable), "overlayfs-inetsk")
MAP = ["local=10.77.0.99", "local=fd77::99"]
MAP_ARGS = ["--map", MAP[0], "--map", MAP[1], "--tcp-outside", "keep"]
FORBIDDEN = ("pyfuse3", "trio", "pyroute2", "overlayfs_inetsk.host.rtnl")


def med(f, n: int = 7) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def wall(argv: list[str], n: int = 7) -> float:
    return med(lambda: subprocess.run(argv, check=True, stdout=subprocess.DEVNULL), n)


def importtime(argv: list[str]) -> tuple[float, list[tuple[int, str]], int, list[str]]:
    """(total µs of top-level imports, heaviest top-level imports, *_pb2 count, forbidden
    modules imported) of one run of `python -X importtime -m overlayfs_inetsk.cli ARGV`."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-m", "overlayfs_inetsk.cli",
                          *argv], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True).stderr
    top: list[tuple[int, str]] = []
    names = []
    for ln in err.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", ln)
        if not m:
            continue
        names.append(m.group(4))
        if m.group(3) == " ":  # a top-level import (one space after the bar)
            top.append((int(m.group(2)), m.group(4)))
    total = sum(t for t, _ in top)
    pb2 = sum(1 for n in names if n.endswith("_pb2"))
    bad = sorted({n for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)})
    return total, sorted(top, reverse=True)[:8], pb2, bad


def main() -> int:
    images = sys.argv[1]
    small, udp, tcp = (os.path.join(images, x) for x in ("small", "udp", "tcp"))
    out = tempfile.mkdtemp(prefix="oi-prof-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    # as installed packages have their bytecode (see bench_rewrite.bytecode_cache); one
    # unmeasured run writes it
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(out, "pycache")
    subprocess.run([BIN, "inspect", small, "--json"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([BIN, "rewrite", small, os.path.join(out, "warm"), *MAP_ARGS], check=True,
                   stdout=subprocess.DEVNULL)

    print("== start-up (median of 7 wall times)")
    print(f"python -I -c pass                               {wall([sys.executable, '-I', '-c', 'pass']) * 1000:7.1f} ms")
    print(f"python -c pass (site)                           {wall([sys.executable, '-c', 'pass']) * 1000:7.1f} ms")
    print(f"overlayfs-inetsk --version (parser, no command) {wall([BIN, '--version']) * 1000:7.1f} ms")
    print(f"overlayfs-inetsk inspect small                  {wall([BIN, 'inspect', small]) * 1000:7.1f} ms")
    n = [0]

    def rewrite_small() -> None:
        n[0] += 1
        subprocess.run([BIN, "rewrite", small, os.path.join(out, f"s{n[0]}"), *MAP_ARGS],
                       check=True, stdout=subprocess.DEVNULL)
    print(f"overlayfs-inetsk rewrite small                  {med(rewrite_small) * 1000:7.1f} ms")
    for cmd in (["inspect", small], ["rewrite", small, os.path.join(out, "imp"), *MAP_ARGS]):
        total, top, pb2, bad = importtime(cmd)
        print(f"-X importtime {cmd[0]}: imports {total / 1000:.1f} ms, {pb2} *_pb2 modules, "
              f"forbidden imported: {', '.join(bad) or 'none'}")
        for us, name in top:
            print(f"    {us / 1000:6.1f} ms  {name}")

    from overlayfs_inetsk.core import imagefile
    from overlayfs_inetsk.core.addrmap import AddressMap
    from overlayfs_inetsk.core.decide import RewriteOptions
    from overlayfs_inetsk.core.entries import inet_entries
    from overlayfs_inetsk.core.plan import plan_checkpoint
    from overlayfs_inetsk.cli.render import render_table

    amap = AddressMap.from_args(MAP)
    opts = RewriteOptions(tcp_outside="keep")
    print("\n== in-process stages (median of 7)")
    for name, d in (("udp", udp), ("tcp", tcp)):
        path = os.path.join(d, "files.img")
        data = open(path, "rb").read()
        ents = list(inet_entries(data, path))
        res = plan_checkpoint({path: data}, amap, None, opts, True)
        rows = [
            ("frames (length prefixes)", lambda: sum(1 for _ in imagefile.frames(data, path))),
            ("decode inet entries (upb)", lambda: sum(1 for _ in inet_entries(data, path))),
            ("serialize every inet entry", lambda: [e[3].SerializeToString() for e in ents]),
            ("plan, no reports (mount, rewrite)", lambda: plan_checkpoint({path: data}, amap, None, opts, False)),
            ("plan with reports (inspect, rewrite --table)", lambda: plan_checkpoint({path: data}, amap, None, opts, True)),
            ("render rewrite's output (problems only)", lambda: render_table(d, res, with_map=True, only_problems=True)),
            ("render the rewrite --table table", lambda: render_table(d, res, with_map=True, only_changes=True)),
        ]
        print(f"[{name}] {len(ents)} inet sockets")
        for label, f in rows:
            print(f"    {label:<44} {med(f) * 1000:7.1f} ms")

    print("\n== cProfile of one plan of the tcp image with reports, by own time")
    path = os.path.join(tcp, "files.img")
    data = open(path, "rb").read()
    prof = cProfile.Profile()
    prof.enable()
    res = plan_checkpoint({path: data}, amap, None, opts, True)
    render_table(tcp, res, with_map=True, only_changes=True)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
    print("\n".join(ln for ln in s.getvalue().splitlines() if ln.strip())[-2600:])
    subprocess.run(["rm", "-rf", out], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
