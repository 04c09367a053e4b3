"""Test program to checkpoint: holds raw and ICMP ping sockets (CRIU dumps both).

    python -m inetsk_testbed.rawsocks [--ready-fd N] [--raw ADDR/PROTO]...
                                      [--ping ADDR[/ID]]... [--udp ADDR/PORT]...

--raw 10.77.0.1/17 is a SOCK_RAW socket for IPPROTO_UDP bound to 10.77.0.1; --ping ADDR is
a SOCK_DGRAM + IPPROTO_ICMP(V6) socket bound to ADDR (needs net.ipv4.ping_group_range to
hold the caller's group in its network namespace), with echo id ID when given (a ping
socket's "port"); --udp a UDP socket bound to ADDR:PORT. Holds them and sleeps; READY
protocol of workload.serve.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import socket
import sys

from .workload import serve


class Holder:
    def __init__(self) -> None:
        self.socks: list[socket.socket] = []

    def add(self, addr: str, type_: int, proto: int, port: int = 0) -> None:
        ip = ipaddress.ip_address(addr)
        fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        s = socket.socket(fam, type_, proto)
        s.bind((addr, port))
        self.socks.append(s)

    def loop(self) -> None:
        while True:
            signal.pause()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ready-fd", type=int)
    ap.add_argument("--raw", action="append", default=[])
    ap.add_argument("--ping", action="append", default=[])
    ap.add_argument("--udp", action="append", default=[])
    args = ap.parse_args(argv)

    def setup() -> Holder:
        h = Holder()
        for spec in args.raw:
            addr, proto = spec.rsplit("/", 1)
            h.add(addr, socket.SOCK_RAW, int(proto))
        for spec in args.ping:
            addr, _, ident = spec.partition("/")
            v6 = ipaddress.ip_address(addr).version == 6
            h.add(addr, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP,
                  int(ident or 0))
        for spec in args.udp:
            addr, port = spec.rsplit("/", 1)
            h.add(addr, socket.SOCK_DGRAM, socket.IPPROTO_UDP, int(port))
        return h

    return serve(args.ready_fd, setup)


if __name__ == "__main__":
    sys.exit(main())
