"""The peers' NAT table (core/natrules.py) in real network namespaces, without CRIU: real
TCP through it, and a table of 10,000 connections that nft 1.0.6 and the kernel accept.
(test_tcp_nat.py moves a real server with CRIU through the same table.)

Hosts A (the old address), B (the new one), C (the client, with a stateful firewall so
that its conntrack is active). The table in C names two client endpoints: one moved to B
with its port too (7800 -> 8800), one to B at the same port. A third client endpoint is
not in the table and must reach A itself, tracked as usual.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys

import pytest

from inetsk_testbed.netns import scratch_netns
from inetsk_testbed.natclient import FIREWALL
from overlayfs_inetsk.core.natrules import NatConn, apply_script, ruleset, table_name
from overlayfs_inetsk.node import nat

pytestmark = [pytest.mark.root]

# each accepted connection is told where the server saw it: "LOCAL PEER\n"
SERVER = """import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(8)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(f"{c.getsockname()[1]} {peer[0]} {peer[1]}\\n".encode())
    c.close()
"""
# from a fixed local port: "PEER_AS_THE_CLIENT_SEES_IT | WHAT_THE_SERVER_SAID"
CLIENT = """import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
c = socket.socket(fam)
c.settimeout(10)
c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
c.bind((sys.argv[1], int(sys.argv[2])))
c.connect((sys.argv[3], int(sys.argv[4])))
said = b""
while not said.endswith(b"\\n"):
    more = c.recv(100)
    if not more:
        break
    said += more
print(c.getpeername()[0], c.getpeername()[1], "|", said.decode().strip())
"""
a = ipaddress.ip_address


def serve(host, addr: str, port: int) -> None:
    p = host.popen([sys.executable, "-c", SERVER, addr, str(port)], stdout=subprocess.PIPE,
                   text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"


def connect(host, src: str, sport: int, dst: str, dport: int) -> str:
    return host.run([sys.executable, "-c", CLIENT, src, str(sport), dst, str(dport)],
                    timeout=20).stdout.strip()


def tracked(host, sport: int) -> str:
    return host.run(["conntrack", "-L", "-p", "tcp", "--sport", str(sport)]).stdout


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_the_table_rewrites_exactly_its_connections_both_ways(testnet, family):
    ha, hb, hc = (testnet.add_host(n) for n in "ABC")
    v = 6 if family == "ipv6" else 4
    A, B, C = (str(h.ipv6 if v == 6 else h.ipv4) for h in (ha, hb, hc))
    hc.run(["nft", "-f", "-"], input=FIREWALL)
    serve(ha, A, 7800)
    serve(hb, B, 7800)
    serve(hb, B, 8800)
    conns = [NatConn(v, a(C), 41000, a(A), 7800, a(B), 8800),
             NatConn(v, a(C), 41001, a(A), 7800, a(B), 7800)]
    before = hc.run(["nft", "list", "ruleset"]).stdout
    name = nat.apply([hc.netns_path], conns, "test")
    try:
        # the client's kernel sees the old address and port; the server B's own, and the
        # client at its own endpoint
        assert connect(hc, C, 41000, A, 7800) == f"{A} 7800 | 8800 {C} 41000"
        assert connect(hc, C, 41001, A, 7800) == f"{A} 7800 | 7800 {C} 41001"
        # an endpoint the table does not name goes to A, tracked as usual
        assert connect(hc, C, 41002, A, 7800) == f"{A} 7800 | 7800 {C} 41002"
        assert tracked(hc, 41002).count("sport=41002") == 1
        assert tracked(hc, 41000) == tracked(hc, 41001) == ""  # notrack, both directions
    finally:
        assert nat.remove([hc.netns_path], name) == [hc.netns_path]
    assert hc.run(["nft", "list", "ruleset"]).stdout == before


def many(n: int) -> list[NatConn]:
    """n connections, half IPv4 and half IPv6, every tenth with its port moved."""
    out = []
    for i in range(n):
        v = 4 if i % 2 else 6
        peer = a(f"10.77.{1 + i // 250 % 200}.{1 + i % 250}" if v == 4
                 else f"fd77::1:{i:x}")
        old, new = (a("10.77.0.1"), a("10.77.0.2")) if v == 4 else (a("fd77::1"), a("fd77::2"))
        out.append(NatConn(v, peer, 20000 + i, old, 7800, new, 8800 if i % 10 == 0 else 7800))
    return out


def test_nft_takes_a_table_of_10000_connections(testnet):
    conns = many(10_000)
    text = ruleset(conns)
    assert text.count("\n\t\tip") == 6  # 4 rules in prerouting, 2 in output: no rule walk
    with scratch_netns(prefix="oitnat") as ns:
        cp = subprocess.run(["nsenter", f"--net={ns}", "nft", "-c", "-f", "-"], input=text,
                            capture_output=True, text=True, timeout=120)
        assert cp.returncode == 0, cp.stderr
        assert subprocess.run(["nsenter", f"--net={ns}", "nft", "list", "ruleset"],
                              capture_output=True, text=True,
                              timeout=30).stdout == ""  # -c: checked, nothing added
    host = testnet.add_host("C")
    host.run(["nft", "-f", "-"], input=apply_script(conns), timeout=120)
    name = table_name(conns)
    for m, count in (("to_new4", 5000), ("from_old6", 5000), ("to_new6_port", 5000)):
        listed = host.run(["nft", "list", "map", "inet", name, m], timeout=60).stdout
        assert listed.count(" : ") == count + 1, (m, listed[:500])  # and its type
    assert nat.remove([host.netns_path], name) == [host.netns_path]
