"""Benchmark and experiment for fate nat (issue 22): the conntrack question, and what the
peers' table costs. Needs root, CRIU, FUSE, nft and conntrack (scripts/setup.sh).

    .venv/bin/python bench/bench_nat.py [--runs 2] [--sizes 100,1000,10000] [--mb 200]

(1) Which way of rewriting keeps the connection. A client on host C streams with a server
    on host A (testbed/stream.py, a number every 20 ms each way); C has a stateful
    firewall table (`ct state established accept`), so conntrack holds the connection's
    entry before any NAT rule. The server is dumped with --tcp-established and restored on
    B with the map A=B, B's new 4-tuple locked from pre-restore to CRIU's network unlock,
    the rules added in C at post-restore. Modes:
      stateful      an `inet` nat table in C: `dnat to B` for the 4-tuple (the old entry
                    left as it is)
      stateful-del  the same, and the connection's conntrack entry deleted right after
                    (`conntrack -D`), so that the next packet is NATed (tcp_loose picks a
                    mid-stream flow up)
      stateless     overlayfs-inetsk's own route: `restore --tcp-outside nat
                    --nat-peer-netns C` (notrack + address rewrite, both directions)
    Printed per mode and family: connections kept / runs, and the numbers the client got
    in the second after the restore (50 at 20 ms when nothing is lost).
(2) The cost of the table on traffic it does not rewrite: a bulk TCP transfer (--mb MiB)
    from C to A over the test bridge with a table of N connections in C, median of
    --runs, against the same transfer with no table (the baseline), in turn in the same
    invocation, for two layouts of the same table:
      rules  one rule per connection and direction (the layout before the maps: every
             packet walks them all; rendered here, by rules_table)
      maps   overlayfs-inetsk's own (core/natrules.py): the connections are elements of
             maps keyed by the 4-tuple, one lookup per packet and rule
    and the time `nft -f` takes to add each (median; on a restore's critical path:
    post-restore, the network locked). The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from inetsk_testbed import TestNet, criu
from inetsk_testbed.mount import BIN
from inetsk_testbed.natclient import client_stream, ep
from inetsk_testbed.procs import netns_pids
from inetsk_testbed.stream import status

from overlayfs_inetsk.core.natrules import FAMILY, NatConn, apply_script, table_name

PORT, CTL, CCTL = 7900, 7901, 7902

def _stateful_script(tmp: Path, c, A: str, B: str, C: str, cport: int, v: int,
                     delete: bool) -> Path:
    ip = "ip" if v == 4 else "ip6"
    to = ep(B, PORT) if v == 4 else f"[{B}]:{PORT}"
    (tmp / "nat.nft").write_text(
        f"table inet oit_bench_nat {{\n chain out {{\n  type nat hook output priority -100; "
        f"policy accept;\n  {ip} saddr {C} tcp sport {cport} {ip} daddr {A} tcp dport {PORT} "
        f"dnat {ip} to {to}\n }}\n chain in {{\n  type nat hook input priority 100; "
        "policy accept;\n }\n}\n")
    ipt = "iptables" if v == 4 else "ip6tables"
    dele = (f"nsenter --net={c.netns_path} conntrack -D -f ipv{v} -p tcp --orig-src {C} "
            f"--orig-dst {A} --sport {cport} --dport {PORT} >/dev/null 2>&1") if delete else ""
    lock = (f"{ipt} -w -I INPUT -p tcp -m mark ! --mark 0xC114 -s {C} --sport {cport} -d {B} "
            f"--dport {PORT} -j DROP\n  {ipt} -w -I OUTPUT -p tcp -m mark ! --mark 0xC114 "
            f"-s {B} --sport {PORT} -d {C} --dport {cport} -j DROP")
    script = tmp / "act.sh"
    script.write_text(f"#!/bin/sh\ncase \"$CRTOOLS_SCRIPT_ACTION\" in\npre-restore)\n  {lock} ;;\n"
                      f"post-restore)\n  nsenter --net={c.netns_path} nft -f {tmp}/nat.nft "
                      f"|| exit 1\n  {dele} ;;\nesac\nexit 0\n")
    os.chmod(script, 0o755)
    return script


def move_once(mode: str, v: int) -> tuple[bool, int]:
    """One move; (kept on the same socket with nothing bad, numbers in the next second)."""
    with TestNet() as net, tempfile.TemporaryDirectory(prefix="bench-nat-") as d:
        tmp = Path(d)
        a, b, c = (net.add_host(n) for n in "ABC")
        A, B, C = (str(h.ipv4 if v == 4 else h.ipv6) for h in (a, b, c))
        srv, cport = client_stream(a, c, A, C, (PORT, CTL, CCTL))
        criu.dump(a, srv, tmp / "img", tcp_established=True)
        argv = [BIN, "-q", "restore", str(tmp / "img"), "--netns", b.netns_path,
                "--map", f"{A}={B}"]
        if mode == "stateless":
            argv += ["--tcp-outside", "nat", "--nat-peer-netns", c.netns_path]
        else:
            script = _stateful_script(tmp, c, A, B, C, cport, v, mode == "stateful-del")
            argv += ["--tcp-outside", "keep", "--", "--action-script", str(script)]
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        for pid in netns_pids(b.netns_path):
            b.adopt(pid)
        if cp.returncode != 0:
            raise SystemExit(f"restore failed ({mode}): {cp.stderr.strip()}")
        r0 = int(status(c, C, CCTL)["recv"])
        time.sleep(1.0)
        s1 = status(c, C, CCTL)
        got = int(s1["recv"]) - r0
        kept = (s1["conn"] == "open" and s1["events"] == "connected" and s1["bad"] == "0"
                and got > 0)
        return kept, got


def _conns(n: int) -> list[NatConn]:
    """n connections that the transfer never matches (peers 10.77.1.x, 10.77.2.x)."""
    out = []
    for i in range(n):
        peer = ipaddress.ip_address(f"10.77.{1 + i // 60000}.{1 + i % 250}")
        out.append(NatConn(4, peer, 20000 + i % 40000, ipaddress.ip_address("10.77.0.1"),
                           PORT, ipaddress.ip_address("10.77.0.2"), PORT))
    return out


SINK = ("import socket,sys\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,"
        "socket.SO_REUSEADDR,1);s.bind((sys.argv[1],int(sys.argv[2])));s.listen(1)\n"
        "print('ready',flush=True)\nc,_=s.accept()\nn=0\nwhile True:\n b=c.recv(1<<20)\n"
        " if not b: break\n n+=len(b)\nprint(n,flush=True)\n")
SOURCE = ("import socket,sys,time\nc=socket.create_connection((sys.argv[1],int(sys.argv[2])))\n"
          "buf=b'x'*(1<<20)\nt=time.monotonic()\nfor _ in range(int(sys.argv[3])): c.sendall(buf)\n"
          "c.shutdown(socket.SHUT_WR);c.recv(1)\nprint(time.monotonic()-t)\n")


def transfer(a, c, A: str, mb: int, port: int) -> float:
    sink = a.popen([sys.executable, "-c", SINK, A, str(port)], stdout=subprocess.PIPE,
                   text=True)
    assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
    cp = c.run([sys.executable, "-c", SOURCE, A, str(port), str(mb)], timeout=120)
    sink.wait(timeout=30)
    return float(cp.stdout.strip())


def rules_table(conns: list[NatConn]) -> str:
    """The same table in the layout before the maps: one rule per connection and
    direction, each naming the whole 4-tuple (the baseline layout of (2))."""
    name = table_name(conns)
    pre, out = [], []
    for c in conns:
        ip = "ip" if c.version == 4 else "ip6"
        to_new = (f"{ip} saddr {c.peer} tcp sport {c.peer_port} {ip} daddr {c.old} tcp dport "
                  f"{c.old_port} notrack {ip} daddr set {c.new}")
        from_old = (f"{ip} saddr {c.new} tcp sport {c.new_port} {ip} daddr {c.peer} tcp "
                    f"dport {c.peer_port} notrack {ip} saddr set {c.old}")
        pre += [to_new, from_old]
        out.append(to_new)
    return (f"table {FAMILY} {name}\ndelete table {FAMILY} {name}\n"
            f"table {FAMILY} {name} {{\n\tchain prerouting {{\n"
            "\t\ttype filter hook prerouting priority raw; policy accept;\n\t\t"
            + "\n\t\t".join(pre) + "\n\t}\n\tchain output {\n"
            "\t\ttype route hook output priority raw; policy accept;\n\t\t"
            + "\n\t\t".join(out) + "\n\t}\n}\n")


LAYOUTS = {"rules": rules_table, "maps": apply_script}


def load(c, text: str) -> float:
    t = time.monotonic()
    c.run(["nft", "-f", "-"], input=text, timeout=300)
    return time.monotonic() - t


def cost(sizes: list[int], runs: int, mb: int) -> None:
    with TestNet() as net:
        a, c = net.add_host("A"), net.add_host("C")
        A = str(a.ipv4)
        port = 8100

        def once() -> float:
            nonlocal port
            port += 1
            return transfer(a, c, A, mb, port)

        print(f"\n(2) bulk transfer C -> A, {mb} MiB, table of N connections in C (median of "
              f"{runs}, in turn: no table (base), rules, maps); load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        once()  # warm up
        for n in (s for s in sizes if s):
            conns = _conns(n)
            texts, rendered = {}, {}
            for layout, render in LAYOUTS.items():
                t = time.monotonic()
                texts[layout] = render(conns)
                rendered[layout] = time.monotonic() - t
            secs: dict[str, list[float]] = {"base": [], **{k: [] for k in LAYOUTS}}
            adds: dict[str, list[float]] = {k: [] for k in LAYOUTS}
            for _ in range(runs):
                secs["base"].append(once())
                for layout, text in texts.items():
                    adds[layout].append(load(c, text))
                    secs[layout].append(once())
                    c.run(["nft", "flush", "ruleset"])
            base, base_min = statistics.median(secs["base"]), min(secs["base"])
            print(f"  N={n:>6}: base  {mb / base:6.0f} MiB/s ({base:.2f} s; fastest "
                  f"{base_min:.2f} s)")
            for layout in LAYOUTS:
                med, fast = statistics.median(secs[layout]), min(secs[layout])
                print(f"           {layout:<5} {mb / med:6.0f} MiB/s ({med:.2f} s, x{med / base:.2f} "
                      f"of the base; fastest {fast:.2f} s, x{fast / base_min:.2f})  nft -f took "
                      f"{statistics.median(adds[layout]):.2f} s (rendered in {rendered[layout]:.2f} s)")
        print(f"  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--no-moves", action="store_true", help="only (2)")
    args = ap.parse_args()
    if not args.no_moves:
        print(f"(1) a real CRIU move of the server, {args.runs} run(s) per mode and family")
        for mode in ("stateful", "stateful-del", "stateless"):
            for v in (4, 6):
                res = [move_once(mode, v) for _ in range(args.runs)]
                kept = sum(k for k, _ in res)
                print(f"  {mode:<13} IPv{v}: kept {kept}/{len(res)}; numbers in the second "
                      f"after: {', '.join(str(g) for _, g in res)}")
    cost([int(x) for x in args.sizes.split(",")], args.runs, args.mb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
