"""Benchmark: a Podman restore with the CRIU plugin (new address) vs. the same restore
keeping its address without the plugin.

    .venv/bin/python bench/bench_podman.py [--runs 11] [--agent] [--against DIR]

One invocation, on a private podman network (testbed/podman.py; needs root, podman, runc,
CRIU 4.2.1 and the base image of scripts/setup-containers.sh). A small container (the
sample workload: TCP listeners and bound UDP sockets on its own IPv4 and IPv6) is
checkpointed twice with `podman container checkpoint --export`:
  (a) with the plugin in its CRIU plugin dir (org.criu.config `lib DIR`, installed by
      `overlayfs-inetsk plugin install --libdir DIR`); restored with
      `restore --import --ignore-static-ip`: a new address, the plugin makes the view;
  (b) with an empty CRIU plugin dir; restored with `restore --import`, keeping its address
      (nothing to rewrite: what a restore costs without us).
Each run times the whole `podman container restore` command (wall clock); the container
is removed (untimed) before the next run. One unmeasured warm-up of each, then --runs of
each, alternating which goes first. Prints every run, the medians and their ratio (target:
at most 1.10); exits 1 when the target is missed.
  --agent: an `overlayfs-inetsk agent` serves (a), on a socket of this run's own (the
      plugin's config file names it: the node's default socket is left alone); without it,
      (a) runs the CLI (the config names a socket nobody listens on).
  --against DIR: (c) as (a) with the CLI of the package in DIR (another checkout), in the
      same alternation (without --agent only).

OVERLAYFS_INETSK_BENCH_CLI names the overlayfs-inetsk to install the plugin with (default:
the one beside this interpreter).
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]

from inetsk_testbed import podman as pm  # noqa: E402

TARGET = 1.10
AGENT_SOCK = "agent.sock"  # in this run's temporary dir


def note(msg: str) -> None:
    print(f"-- {msg}", file=sys.stderr, flush=True)


def workload(v4: str, v6: str) -> list[str]:
    return ["--tcp-listen", f"t4@{v4}:7001", "--udp-bind", f"u4@{v4}:7002",
            "--tcp-listen", f"t6@[{v6}]:7004", "--udp-bind", f"u6@[{v6}]:7005"]


def timed_restore(net: pm.PodmanNet, archive: Path, name: str, new_address: bool) -> float:
    t0 = time.perf_counter()
    r = net.restore(archive, name, ignore_static_ip=new_address)
    dt = time.perf_counter() - t0
    r.container.inspect()
    assert r.container.state == "running", r.container.name
    pm.podman(["rm", "-f", "-t", "0", r.container.name])
    net.containers.remove(r.container.name)
    return dt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--agent", action="store_true",
                    help="run `overlayfs-inetsk agent` for (a), on a socket of its own (the "
                         "plugin asks it instead of starting the CLI)")
    ap.add_argument("--against", metavar="DIR",
                    help="(c): (a) with the CLI of the package in DIR (not with --agent)")
    opts = ap.parse_args()
    if opts.against and opts.agent:
        ap.error("--against compares CLI routes: not with --agent")
    if os.geteuid() != 0 or (why := pm.missing()):
        print(f"bench_podman: needs root, podman and runc ({why or 'not root'})",
              file=sys.stderr)
        return 2
    pm.ensure_base_image(Path(ROOT) / "scripts" / "setup-containers.sh")
    cli = os.environ.get("OVERLAYFS_INETSK_BENCH_CLI") or os.path.join(
        os.path.dirname(sys.executable), "overlayfs-inetsk")
    with tempfile.TemporaryDirectory(prefix="bench-podman-") as tmp_s:
        tmp = Path(tmp_s)
        lib, empty = tmp / "lib", tmp / "empty"
        empty.mkdir()
        sock = tmp / AGENT_SOCK
        libs = {"a": lib, "b": empty}
        clis = {"a": cli}
        if opts.against:
            libs["c"] = tmp / "lib-against"
            clis["c"] = console_script(tmp / "against-cli", os.path.abspath(opts.against))
        for key, c in clis.items():
            subprocess.run([c, "plugin", "install", "--libdir", str(libs[key]), "--cli", c,
                            "--agent-socket", str(sock), "--no-agent"],
                           check=True, capture_output=True, text=True)
        agent = None
        if opts.agent:
            agent = subprocess.Popen([cli, "agent", "--socket", str(sock)],
                                     stdin=subprocess.DEVNULL)
            end = time.monotonic() + 20
            while not os.path.exists(sock):
                if agent.poll() is not None or time.monotonic() > end:
                    print("bench_podman: the agent did not start", file=sys.stderr)
                    return 2
                time.sleep(0.05)
        try:
            figures = run(opts, tmp, libs)
        finally:
            if agent is not None:
                agent.terminate()
                agent.wait(10)
    ta, tb = figures["a"], figures["b"]
    ma, mb = statistics.median(ta), statistics.median(tb)
    ratio = ma / mb
    mode = "agent" if opts.agent else "CLI"
    print("runs (a) plugin, new address:   ", " ".join(f"{x:.3f}" for x in ta))
    print("runs (b) no plugin, same address:", " ".join(f"{x:.3f}" for x in tb))
    if "c" in figures:
        print("runs (c) plugin, CLI of --against:", " ".join(f"{x:.3f}" for x in figures["c"]))
    print(f"median (a) podman restore --import --ignore-static-ip, plugin ({mode}): {ma:.3f} s")
    print(f"median (b) podman restore --import, no plugin:                {mb:.3f} s")
    if "c" in figures:
        mc = statistics.median(figures["c"])
        print(f"median (c) the same as (a), CLI of {opts.against}: {mc:.3f} s "
              f"(ratio to (b) {mc / mb:.3f})")
    ok = ratio <= TARGET
    print(f"ratio (a)/(b): {ratio:.3f}   target <= {TARGET:.2f}   {'ok' if ok else 'MISSED'}")
    print("load average at the end: %.2f %.2f %.2f" % os.getloadavg())
    return 0 if ok else 1


def console_script(path: Path, tree: str) -> str:
    """An overlayfs-inetsk at `path` as pip's console script is, running `tree`'s package."""
    path.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {tree!r})\n"
                    "from overlayfs_inetsk.cli import main\nif __name__ == '__main__':\n"
                    "    sys.exit(main())\n")
    path.chmod(0o755)
    return str(path)


def run(opts: argparse.Namespace, tmp: Path, libs: dict[str, Path]) -> dict[str, list[float]]:
    with pm.PodmanNet(workdir=tmp) as net:
        archives = {}
        for key, host in zip(libs, (10, 11, 12)):
            libdir = libs[key]
            net.criu_conf = net.write_criu_conf(libdir)
            net.criu_conf = net.criu_conf.rename(tmp / f"criu-{key}.conf")
            c = net.run(f"src-{key}", host, workload(net.ipv4(host), net.ipv6(host)))
            archives[key] = tmp / f"{key}.tar.gz"
            net.checkpoint(c, archives[key])  # the container stops: (b) gets its address
            pm.podman(["rm", "-f", "-t", "0", c.name])
        note("warm-up")
        for key in libs:
            timed_restore(net, archives[key], f"warm-{key}", key != "b")
        times: dict[str, list[float]] = {k: [] for k in libs}
        for i in range(opts.runs):
            for key in (list(libs) if i % 2 == 0 else list(reversed(libs))):
                times[key].append(timed_restore(net, archives[key], f"{key}{i}", key != "b"))
            note(f"run {i + 1}/{opts.runs}: " + " ".join(f"({k}) {v[-1]:.3f} s"
                                                       for k, v in times.items()))
    return times


if __name__ == "__main__":
    sys.exit(main())
