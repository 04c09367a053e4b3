"""Benchmark: a Podman restore with the CRIU plugin (new address) vs. the same restore
keeping its address without the plugin.

    .venv/bin/python bench/bench_podman.py [--runs 11]

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
AGENT_SOCK = "/run/overlayfs-inetsk/agent.sock"  # the plugin's default


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
                    help=f"run `overlayfs-inetsk agent` on {AGENT_SOCK} for (a) (the plugin "
                         "asks it instead of starting the CLI)")
    opts = ap.parse_args()
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
        subprocess.run([cli, "plugin", "install", "--libdir", str(lib), "--cli", cli],
                       check=True, capture_output=True, text=True)
        agent = None
        if opts.agent:
            if os.path.exists(AGENT_SOCK):
                print(f"bench_podman: {AGENT_SOCK} exists (an agent runs?)", file=sys.stderr)
                return 2
            agent = subprocess.Popen([cli, "agent", "--socket", AGENT_SOCK],
                                     stdin=subprocess.DEVNULL)
            end = time.monotonic() + 20
            while not os.path.exists(AGENT_SOCK):
                if agent.poll() is not None or time.monotonic() > end:
                    print("bench_podman: the agent did not start", file=sys.stderr)
                    return 2
                time.sleep(0.05)
        try:
            figures = run(opts, tmp, lib, empty)
        finally:
            if agent is not None:
                agent.terminate()
                agent.wait(10)
    ta, tb = figures
    ma, mb = statistics.median(ta), statistics.median(tb)
    ratio = ma / mb
    mode = "agent" if opts.agent else "CLI"
    print("runs (a) plugin, new address:   ", " ".join(f"{x:.3f}" for x in ta))
    print("runs (b) no plugin, same address:", " ".join(f"{x:.3f}" for x in tb))
    print(f"median (a) podman restore --import --ignore-static-ip, plugin ({mode}): {ma:.3f} s")
    print(f"median (b) podman restore --import, no plugin:                {mb:.3f} s")
    ok = ratio <= TARGET
    print(f"ratio (a)/(b): {ratio:.3f}   target <= {TARGET:.2f}   {'ok' if ok else 'MISSED'}")
    return 0 if ok else 1


def run(opts: argparse.Namespace, tmp: Path, lib: Path, empty: Path
        ) -> tuple[list[float], list[float]]:
    with pm.PodmanNet(workdir=tmp) as net:
        archives = {}
        for key, libdir, host in (("a", lib, 10), ("b", empty, 11)):
            net.criu_conf = net.write_criu_conf(libdir)
            net.criu_conf = net.criu_conf.rename(tmp / f"criu-{key}.conf")
            c = net.run(f"src-{key}", host, workload(net.ipv4(host), net.ipv6(host)))
            archives[key] = tmp / f"{key}.tar.gz"
            net.checkpoint(c, archives[key])  # the container stops: (b) gets its address
            pm.podman(["rm", "-f", "-t", "0", c.name])
        note("warm-up")
        timed_restore(net, archives["a"], "warm-a", True)
        timed_restore(net, archives["b"], "warm-b", False)
        ta: list[float] = []
        tb: list[float] = []
        for i in range(opts.runs):
            order = ("a", "b") if i % 2 == 0 else ("b", "a")
            for key in order:
                if key == "a":
                    ta.append(timed_restore(net, archives["a"], f"a{i}", True))
                else:
                    tb.append(timed_restore(net, archives["b"], f"b{i}", False))
            note(f"run {i + 1}/{opts.runs}: (a) {ta[-1]:.3f} s (b) {tb[-1]:.3f} s")
    return ta, tb


if __name__ == "__main__":
    sys.exit(main())
