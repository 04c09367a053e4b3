"""The scene of the fate-nat tests and bench: a client in host C streaming with a server
in host A (the stream of stream.py), with a stateful rule in C's firewall so that
conntrack tracks C's flows, as on any host with a stateful firewall."""

from __future__ import annotations

from typing import Any

from .probe import wait_for
from .stream import start_stream, status

# a ct rule in C's input: conntrack then tracks every flow of C (policy accept: it drops
# nothing itself)
FIREWALL = """table inet oit_fw {
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tct state established,related accept
\t}
}
"""


def ep(addr: str, port: int) -> str:
    """ADDR:PORT as the stream's options take it (IPv6 in brackets)."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def client_stream(a: Any, c: Any, A: str, C: str, ports: tuple[int, int, int]
                  ) -> tuple[int, int]:
    """The server listening in host a at A, the client in host c (at C) connected to it
    and the stream flowing; ports: (stream, server's control, client's control).
    Returns (the server's pid, the client's local port)."""
    port, ctl, cctl = ports
    c.run(["nft", "-f", "-"], input=FIREWALL)
    srv = start_stream(a, ["--ctl", ep(A, ctl), "--listen", ep(A, port)])
    start_stream(c, ["--ctl", ep(C, cctl), "--connect", ep(A, port)])
    s = wait_for(lambda: (st := status(c, C, cctl)) and int(st["recv"]) > 10 and st,
                 what="the stream to flow")
    return srv, int(s["local"].rsplit(":", 1)[1])
