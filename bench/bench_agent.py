"""Benchmark: what a request costs the plugin by each way the agent can be there.

    .venv/bin/python bench/bench_agent.py [--runs 11]

In one invocation, without CRIU (a small image made here, the request the C plugin sends,
over the agent's socket), `--runs` alternating rounds of:
  (a) a VIEW request to an agent already running (the baseline);
  (b) the same as the first request to a socket-activated agent (`systemd-socket-activate
      --seqpacket`, as systemd hands the socket over): the connection starts the agent,
      which answers it once it has started (the first restore after boot);
  (c) the same with `--metrics` (prometheus_client imported at start);
  (d) the CLI route: `plugin-view --socket-fd 3`, one process per request (no agent);
  (e) `agent --check` as a probe runs it (a process: Python's start, the check request).
Connect to reply, wall time. Also the import of prometheus_client alone (-X importtime).
Prints each median and its ratio to (a). Needs systemd-socket-activate (package systemd).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "testbed")]

from inetsk_testbed.agentproc import agent_argv, request, tree_env  # noqa: E402
from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk  # noqa: E402

SSA = "/usr/bin/systemd-socket-activate"
ENV = {"INETSK_LOCAL_IPV4": "10.77.0.2"}


def ask(s: socket.socket, fds: list[int]) -> str:
    socket.send_fds(s, [request(ENV)], fds)
    msg, got, _f, _a = socket.recv_fds(s, 4096, 4)
    for fd in got:
        os.close(fd)
    return msg.decode()


def connect(path: Path, timeout: float = 30) -> socket.socket:
    end = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(timeout)
        try:
            s.connect(str(path))
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > end:
                raise
            time.sleep(0.005)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(p: subprocess.Popen[bytes]) -> None:
    p.terminate()
    p.wait(60)


def running(tmp: Path, fds: list[int], proc: subprocess.Popen[bytes]) -> float:
    s = connect(tmp / "run.sock")
    t0 = time.perf_counter()
    text = ask(s, fds)
    took = time.perf_counter() - t0
    s.close()
    assert text.startswith("VIEW "), text
    return took


def activated(tmp: Path, fds: list[int], extra: tuple[str, ...] = ()) -> float:
    sock, err = tmp / "act.sock", tmp / "act.err"
    sock.unlink(missing_ok=True)
    with open(err, "wb") as f:
        p = subprocess.Popen([SSA, "--seqpacket", "-l", str(sock),
                              *agent_argv(sock, tmp / "views", extra)], env=tree_env(),
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=f)
    try:
        end = time.monotonic() + 30
        while b"Listening on" not in err.read_bytes():  # listening, the agent not started
            assert time.monotonic() < end and p.poll() is None, err.read_text()
            time.sleep(0.005)
        t0 = time.perf_counter()
        s = connect(sock)  # this starts the agent
        text = ask(s, fds)
        took = time.perf_counter() - t0
        s.close()
        assert text.startswith("VIEW "), text
        return took
    finally:
        stop(p)


def cli_route(tmp: Path, fds: list[int]) -> float:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "overlayfs_inetsk.cli", "plugin-view",
                          "--socket-fd", str(b.fileno()), "--view-root", str(tmp / "views")],
                         pass_fds=(b.fileno(),), env=tree_env(), stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    b.close()
    text = ask(a, fds)
    took = time.perf_counter() - t0
    a.close()
    p.wait(60)
    assert text.startswith("VIEW "), text
    return took


def probe(tmp: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "overlayfs_inetsk.cli", "agent", "--check",
                    "--socket", str(tmp / "run.sock")], env=tree_env(), check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def import_ms() -> float:
    cp = subprocess.run([sys.executable, "-X", "importtime", "-c", "import prometheus_client"],
                        capture_output=True, text=True, env=tree_env(), check=True)
    m = re.search(r"\|\s+(\d+) \| prometheus_client$", cp.stderr, re.M)
    assert m, cp.stderr[-500:]
    return int(m.group(1)) / 1000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=11)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as t:
        tmp = Path(t)
        (tmp / "images").mkdir()
        (tmp / "images" / "files.img").write_bytes(
            files_img(inet_file_entry(isk(2, "10.77.0.1", 7001))))
        img = os.open(tmp / "images", os.O_RDONLY | os.O_DIRECTORY)
        ns = os.open("/proc/self/ns/net", os.O_RDONLY)
        fds = [img, ns]
        agent = subprocess.Popen(agent_argv(tmp / "run.sock", tmp / "views"), env=tree_env(),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            connect(tmp / "run.sock").close()
            running(tmp, fds, agent)  # warm
            rows: dict[str, list[float]] = {k: [] for k in "abcde"}
            for i in range(args.runs):
                print(f"-- round {i + 1}/{args.runs}", file=sys.stderr, flush=True)
                rows["a"].append(running(tmp, fds, agent))
                rows["b"].append(activated(tmp, fds))
                rows["c"].append(activated(tmp, fds, ("--metrics", f"127.0.0.1:{free_port()}")))
                rows["d"].append(cli_route(tmp, fds))
                rows["e"].append(probe(tmp))
        finally:
            stop(agent)
        imports = [import_ms() for _ in range(5)]
    names = {"a": "running agent (baseline)", "b": "socket-activated, first request",
             "c": "socket-activated with --metrics, first request",
             "d": "CLI route (plugin-view per request)", "e": "agent --check (a probe)"}
    base = statistics.median(rows["a"])
    print(f"runs: {args.runs} (medians, connect to reply)")
    for k, name in names.items():
        med = statistics.median(rows[k])
        print(f"  ({k}) {name:<48} {med * 1000:8.1f} ms  x{med / base:6.1f}")
    print(f"  import prometheus_client alone: {statistics.median(imports):.1f} ms "
          f"(median of {len(imports)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
