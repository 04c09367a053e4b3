"""Benchmark: what the CRIU plugin adds to a restore.

    .venv/bin/python bench/bench_plugin.py [--runs 11] [--sockets 10000] [--big-runs 5]
                                           [--against DIR]

In one invocation, on test hosts made here, with CRIU 4.2.1:
  (1) a small service (TCP on IPv4 and IPv6, bound UDP) dumped on host A, then restored
      `--runs` times each, alternating: (a) on A without the plugin (keeps its address: the
      baseline), (b) on B with the plugin through the node agent (new address), (c) on B
      with the plugin running the CLI (no agent). Wall time of the whole `criu restore -d`.
  (2) a process with `--sockets` UDP sockets bound to A's address: (a) on A without the
      plugin, (b) on B with the plugin (agent), (c) (CLI); `--big-runs` alternating runs.
      The plugin's own time is also read from restore.log (`view ready (N ms: files.img
      read in A ms, the planner's answer in B ms)`): the scan of files.img, and the rest.
  --against DIR: (d) the CLI route with the package of another checkout (e.g. the tree
      before a change), in the same alternation. `--big-runs 0` skips (2).
Prints every median and the ratios / differences against the baseline of the same run.
The CLI is run as an installed one is: a console script as pip writes it (`from
overlayfs_inetsk.cli import main`, no runpy, no shell), the package's bytecode kept (in
WORK/pycache: this machine sets PYTHONDONTWRITEBYTECODE=1, under which every restore
compiled the package again: the route took 160 to 210 ms so, 90 to 100 ms with its
bytecode, at the same load; an install has its .pyc files).
Needs root and CRIU (scripts/setup.sh) and a built plugin (make -C plugin).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from inetsk_testbed import TestNet
from inetsk_testbed import criu as tb_criu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

A4, A6 = "10.77.0.1", "fd77::1"
SMALL = ["--tcp-listen", f"{A4}:7001", "--udp-bind", f"{A4}:7002", "--tcp-listen", f"[{A6}]:7004"]


def step(msg: str) -> None:
    print(f"-- {msg}", file=sys.stderr, flush=True)


def console_script(path: str, tree: str) -> str:
    """An overlayfs-inetsk at `path` as pip's console script is, running `tree`'s package
    (put first on sys.path; the cwd is never on it, unlike `python -m` and `-c`)."""
    with open(path, "w") as f:
        f.write(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {tree!r})\n"
                "from overlayfs_inetsk.cli import main\nif __name__ == '__main__':\n"
                "    sys.exit(main())\n")
    os.chmod(path, 0o755)
    return path


def setup_plugin(work: str) -> tuple[str, str]:
    out = os.path.join(work, "build")
    subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "plugin"), f"OUT={out}"], check=True)
    cli = console_script(os.path.join(work, "overlayfs-inetsk"), ROOT)
    libdir = os.path.join(work, "criu-lib")
    subprocess.run([cli, "plugin", "install", "--libdir", libdir, "--so",
                    os.path.join(out, "overlayfs_inetsk_plugin.so"), "--cli", cli],
                   check=True, stdout=subprocess.DEVNULL)
    return libdir, cli


def start_agent(cli: str, sock: str) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([cli, "agent", "--socket", sock], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL)
    end = time.monotonic() + 30
    while not os.path.exists(sock):
        if p.poll() is not None or time.monotonic() > end:
            raise SystemExit("the agent did not start")
        time.sleep(0.02)
    return p


PLUGIN_LOG = re.compile(r"overlayfs-inetsk: view ready \((\d+) ms: files\.img read in ([\d.]+) ms, "
                        r"the planner's answer in ([\d.]+) ms\)")


def one_restore(host, images: str, work: str, extra: list[str]
                ) -> tuple[float, tuple[float, float, float] | None]:
    """(wall seconds, and from the log or None: the plugin's ms, of which reading
    files.img and the planner's answer)."""
    shutil.rmtree(work, ignore_errors=True)
    t = time.perf_counter()
    pid = tb_criu.restore(host, images, work, extra=extra, timeout=300)
    wall = time.perf_counter() - t
    tb_criu.kill_tree(pid)
    log = open(os.path.join(work, "restore.log"), errors="replace").read()
    m = PLUGIN_LOG.search(log)
    if "-L" in extra and m is None:
        raise SystemExit(f"no view made: {work}/restore.log")
    return wall, (tuple(float(g) for g in m.groups()) if m else None)  # type: ignore[misc]




def report(title: str, res: dict[str, list[tuple[float, tuple[float, float, float] | None]]]
           ) -> None:
    base = statistics.median(w for w, _ in res["baseline"])
    print(f"\n{title}")
    print(f"  {'route':<34} {'median wall':>12} {'vs baseline':>12} {'plugin (log)':>13}")
    for k, v in res.items():
        med = statistics.median(w for w, _ in v)
        logs = [p for _, p in v if p is not None]
        plug = "-"
        if logs:
            took, read, answer = (statistics.median(p[i] for p in logs) for i in range(3))
            plug = f"{took:.0f} ms (files.img {read:.1f}, answer {answer:.1f})"
        rel = "" if k == "baseline" else f"x{med / base:.3f} {1000 * (med - base):+.0f} ms"
        print(f"  {k:<34} {med * 1000:>9.0f} ms {rel:>12} {plug:>13}")
        print(f"    runs: {' '.join(f'{w * 1000:.0f}' for w, _ in v)}")


def floor_line(path: str, res: dict[str, list[tuple[float, tuple[float, float, float] | None]]],
               runs: int = 7) -> None:
    """The floor of the agent's answer, in this invocation: every inet entry of the same
    files.img decoded with upb and encoded back (bench_rewrite.upb_floor), in this process;
    beside what the agent added to the restore and its answer as the log gives it."""
    from bench_rewrite import upb_floor

    data = open(path, "rb").read()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        upb_floor(data)
        ts.append(time.perf_counter() - t)
    floor = statistics.median(ts)
    base = statistics.median(w for w, _ in res["baseline"])
    agent = res.get("plugin, agent (new address)", [])
    added = statistics.median(w for w, _ in agent) - base if agent else None
    answers = [p[2] / 1000 for _, p in agent if p is not None]
    print(f"  the floor (upb decode + encode of every inet entry, median of {runs}): "
          f"{floor * 1000:.1f} ms", end="")
    if added is not None:
        print(f"; the agent added {added * 1000:.0f} ms ({added / floor:.2f}x the floor)",
              end="")
    if answers:
        a = statistics.median(answers)
        print(f", its answer {a * 1000:.1f} ms ({a / floor:.2f}x)", end="")
    print()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--sockets", type=int, default=10000)
    ap.add_argument("--big-runs", type=int, default=5)
    ap.add_argument("--against", metavar="DIR",
                    help="also the CLI route of the package in DIR (another checkout)")
    opts = ap.parse_args()
    need = opts.sockets + 200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(need, hard)), hard))
    work = tempfile.mkdtemp(prefix="oi-bench-plugin-")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # the CLI's bytecode, as installed
    os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pycache")
    agent = None
    try:
        libdir, cli = setup_plugin(work)
        clis = {"CLI": cli}
        if opts.against:
            clis["CLI of --against"] = console_script(os.path.join(work, "against-cli"),
                                                     os.path.abspath(opts.against))
        sock = os.path.join(work, "agent.sock")
        agent = start_agent(cli, sock)
        os.environ.pop("OVERLAYFS_INETSK_MAP", None)
        with TestNet() as net:
            a, b = net.add_host("A"), net.add_host("B")
            small = os.path.join(work, "small")
            tb_criu.dump(a, tb_criu.start_workload(a, SMALL), small)
            plug = ["-L", libdir]
            runs = {
                "baseline": (a, small, os.path.join(work, "w0"), []),
                "plugin, agent (new address)": (b, small, os.path.join(work, "w1"), plug),
                "plugin, CLI (new address)": (b, small, os.path.join(work, "w2"), plug),
            }
            if opts.against:
                runs["plugin, CLI of --against (new address)"] = (
                    b, small, os.path.join(work, "w3"), plug)
            step(f"small service: {opts.runs} alternating runs of each")
            os.environ["OVERLAYFS_INETSK_AGENT_SOCK"] = sock

            def alternate(runs: dict[str, tuple], n: int) -> dict[str, list]:
                """n runs of each route, the order reversed every other time; the CLI
                route is pointed at an agent socket that does not exist."""
                res: dict[str, list] = {k: [] for k in runs}
                for i in range(-1, n):  # run -1: a warm-up of each (bytecode), not counted
                    for k in (list(runs) if i % 2 == 0 else list(reversed(runs))):
                        host, images, w, extra = runs[k]
                        os.environ["OVERLAYFS_INETSK_AGENT_SOCK"] = (
                            os.path.join(work, "none.sock") if "CLI" in k else sock)
                        os.environ["OVERLAYFS_INETSK_CLI"] = (
                            clis["CLI of --against" if "against" in k else "CLI"])
                        r = one_restore(host, images, w, extra)
                        if i >= 0:
                            res[k].append(r)
                return res

            report("small service (3 inet sockets)", alternate(runs, opts.runs))
            if opts.big_runs <= 0:
                return 0

            step(f"dumping a process with {opts.sockets} UDP sockets on {A4}")
            big = os.path.join(work, "big")
            tb_criu.dump(a, tb_criu.start_workload(
                a, [f"--udp-bind={A4}:{20000 + i}" for i in range(opts.sockets)], timeout=120),
                big, timeout=300)
            runs = {
                "baseline": (a, big, os.path.join(work, "b0"), []),
                "plugin, agent (new address)": (b, big, os.path.join(work, "b1"), plug),
                "plugin, CLI (new address)": (b, big, os.path.join(work, "b2"), plug),
            }
            if opts.against:
                runs["plugin, CLI of --against (new address)"] = (
                    b, big, os.path.join(work, "b3"), plug)
            step(f"{opts.sockets} sockets: {opts.big_runs} alternating runs of each")
            res = alternate(runs, opts.big_runs)
            report(f"{opts.sockets} UDP sockets (files.img "
                   f"{os.path.getsize(os.path.join(big, 'files.img'))} bytes)", res)
            floor_line(os.path.join(big, "files.img"), res)
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(10)
        shutil.rmtree(work, ignore_errors=True)
        print("load average at the end: %.2f %.2f %.2f" % os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
