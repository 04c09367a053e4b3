"""A real CRIU dump of a server holding many ESTABLISHED TCP connections, each from a
peer address of its own, IPv4 and IPv6 mixed: the worst case for a rewrite that decides
once per distinct socket (no two sockets agree on their peer).

    with TestNet() as net:
        info = dump_server_with_peers(net, 10000, "/tmp/img")

Host A runs the testbed workload with two listeners (A's IPv4 and IPv6 address, port
8080). Host B holds the peer addresses on its loopback device (the upper half of
10.77.0.0/16 and fd77::1:0:0/96, inside the test prefixes) and runs a second workload
with one ``--tcp-connect`` per peer address, half of them over IPv4, half over IPv6. Host
A routes those two prefixes through B (more specific than its on-link /16 and /64, so A
keeps one neighbour entry instead of 10,000). Once A's server has accepted every
connection, it is dumped with ``--tcp-established``. The dump holds N + 2 inet sockets
(the two listeners and N accepted connections) and N ``tcp-stream-*.img`` files.
A dump of 10,000 connections takes about 100 s here (CRIU puts each one in repair mode).
"""

from __future__ import annotations

import ipaddress
import os
import resource
import subprocess
import time
from dataclasses import dataclass

from . import criu as tb
from .net import TestNet

PEERS_V4 = ipaddress.IPv4Network("10.77.128.0/17")
PEERS_V6 = ipaddress.IPv6Network("fd77::1:0:0/96")
PORT = 8080


@dataclass
class PeersDump:
    images: str
    old4: str  # the server's addresses in the dump
    old6: str
    sockets: int  # inet sockets in files.img


def raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < n:
        raise RuntimeError(f"RLIMIT_NOFILE hard limit {hard} < {n}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, n), hard))


def dump_server_with_peers(net: TestNet, n: int, out: str, timeout: float = 900) -> PeersDump:
    """Dump (into `out`) a server on a new host "A" holding `n` connections from distinct
    peers on a new host "B". The client on B is killed when `net` closes."""
    if n > PEERS_V4.num_addresses - 2 or n < 2:
        raise ValueError(f"n = {n}: want 2 .. {PEERS_V4.num_addresses - 2}")
    raise_nofile(n + 200)
    a, b = net.add_host("A"), net.add_host("B")
    a4, a6, b4, b6 = str(a.ipv4), str(a.ipv6), str(b.ipv4), str(b.ipv6)
    n4 = n // 2
    c4 = [PEERS_V4.network_address + 1 + i for i in range(n4)]
    c6 = [PEERS_V6.network_address + 1 + i for i in range(n - n4)]
    batch = "".join(f"addr add {x}/32 dev lo\n" for x in c4)
    batch += "".join(f"addr add {x}/128 dev lo nodad\n" for x in c6)
    subprocess.run(b.cmd(["ip", "-force", "-batch", "-"]), input=batch, text=True, check=True,
                   capture_output=True)
    a.run(["ip", "route", "add", str(PEERS_V4), "via", b4])
    a.run(["ip", "-6", "route", "add", str(PEERS_V6), "via", b6])
    server = tb.start_workload(a, [f"--tcp-listen={a4}:{PORT},backlog=4096",
                                   f"--tcp-listen=[{a6}]:{PORT},v6only=1,backlog=4096"],
                               timeout=60)
    tb.start_workload(b, [f"--tcp-connect=c{x}@{a4}:{PORT},bind={x}" for x in c4]
                      + [f"--tcp-connect=c{x}@[{a6}]:{PORT},bind={x}" for x in c6],
                      timeout=timeout)
    # every connection accepted: fds 0-2, two listeners, n connections
    deadline = time.monotonic() + timeout
    while len(os.listdir(f"/proc/{server}/fd")) < n + 5:
        if time.monotonic() > deadline:
            raise RuntimeError(f"server accepted fewer than {n} connections in {timeout} s")
        time.sleep(0.2)
    tb.dump(a, server, out, tcp_established=True, timeout=timeout)
    return PeersDump(out, a4, a6, n + 2)
