"""Which of the ports a restore will bind are already taken in the target network namespace.

CRIU binds every listener and bound socket in the middle of the restore; a port that is
taken fails there with EADDRINUSE and the whole restore aborts after the processes were
half made. This module names such ports before anything is restored.

How: the planner (planner/ports.py) reads the namespace's socket tables
(/proc/thread-self/net/{tcp,udp,udplite}{,6}, host/proctables.py: from a short-lived thread
that setns()es into the namespace, the same way `auto` looks addresses up; no fork, so it is
safe inside the FUSE daemon), and this module compares each wanted endpoint with every
socket holding its port, with the kernel's overlap rules (same address, or either side a
wildcard; an IPv6 `::` socket covers IPv4 too unless it is v6only; `::ffff:a.b.c.d` is
a.b.c.d). Pure: the tables' text and the planned sockets in, the clashes out.

Why reading rather than a bind probe: a probe is not passive (it holds the port for a moment,
so a real bind at that moment fails), and it only answers like CRIU's own bind if it is made
with the socket's own options (SO_REUSEADDR, SO_REUSEPORT, IP_FREEBIND for IPv6, v6only),
in the namespace, by the same user: get one wrong and it is wrong both ways (a probe without
IP_FREEBIND fails with EADDRNOTAVAIL where CRIU's bind succeeds; one with SO_REUSEADDR
succeeds beside a UDP socket that also has it, where two copies of a service then share
datagrams). The tables also say who holds the port (state, endpoint, inode), which is what a
user needs to read. What the tables do not show is the holder's SO_REUSEADDR/SO_REUSEPORT,
so the answer is a warning (`--strict` refuses); the rules below lean to naming a port:

* a TCP socket in LISTEN, or bound and not listening (CLOSE with a port), holds its port;
* a TCP connection (any other state but TIME_WAIT) holds it unless the wanted socket has
  SO_REUSEADDR (the kernel then lets a non-listening holder be; a server's accepted sockets
  inherit its SO_REUSEADDR); TIME_WAIT never does for a socket with SO_REUSEADDR, and CRIU's
  listeners nearly always have it, so TIME_WAIT is not named;
* any UDP socket with that port holds it (with SO_REUSEADDR on both, the bind succeeds and
  the two sockets share the port's datagrams: worth a warning all the same);
* UDP-Lite has ports of its own (its own table), checked the same way;
* a ping socket (SOCK_DGRAM with IPPROTO_ICMP/ICMPV6) wants no port: what CRIU keeps as
  its port is the echo id, and CRIU 4.2.1 binds no ICMP socket on restore.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .report import SocketReport
from .sockaddr import AF_INET, AF_INET6, TCP_STATES, IPAddress, fmt_endpoint, words_to_addr

TCP_LISTEN_HEX = 0x0A
TCP_CLOSE_HEX = 0x07
TCP_TIME_WAIT_HEX = 0x06
# the /proc/net tables (name, family) that hold the sockets a restore can meet
TABLES = (("tcp", AF_INET), ("tcp6", AF_INET6), ("udp", AF_INET), ("udp6", AF_INET6),
          ("udplite", AF_INET), ("udplite6", AF_INET6))
_DATAGRAM = ("udp", "udplite")  # protocols whose every socket with the port holds it


@dataclass(frozen=True)
class Want:
    """An endpoint the restore will bind: proto "tcp", "udp" or "udplite", family
    AF_INET/AF_INET6."""

    proto: str
    family: int
    addr: IPAddress
    port: int
    label: str = ""  # who wants it, for messages (e.g. "files.img: socket id 7")
    reuseaddr: bool = False  # the socket's SO_REUSEADDR, from its image
    v6only: bool = False
    file: str = ""  # the socket image and the socket's id, when it comes from a plan
    id: int = 0


@dataclass(frozen=True)
class Holder:
    """A socket of the namespace (one row of /proc/net/{tcp,udp}{,6})."""

    proto: str
    family: int
    addr: IPAddress
    port: int
    state: int
    inode: int

    @property
    def state_name(self) -> str:
        if self.proto in _DATAGRAM:
            return "bound" if self.state == TCP_CLOSE_HEX else "connected"
        return TCP_STATES.get(self.state, str(self.state))

    def __str__(self) -> str:
        return (f"{self.proto}{'6' if self.family == AF_INET6 else ''} "
                f"{fmt_endpoint(self.addr, self.port)} {self.state_name} (inode {self.inode})")


@dataclass(frozen=True)
class Clash:
    want: Want
    holder: Holder
    where: str

    def __str__(self) -> str:
        who = f"{self.want.label}: " if self.want.label else ""
        return (f"{who}{self.want.proto} {fmt_endpoint(self.want.addr, self.want.port)} is "
                f"taken in {self.where} by {self.holder}")


def parse_table(text: str, proto: str, family: int) -> list[Holder]:
    """The rows of one /proc/net table. Addresses are CRIU-style words: network-order bytes
    printed as host-order u32s."""
    out: list[Holder] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        local, state, inode = fields[1], int(fields[3], 16), int(fields[9])
        addr_hex, _, port_hex = local.partition(":")
        words = [int(addr_hex[i:i + 8], 16) for i in range(0, len(addr_hex), 8)]
        out.append(Holder(proto, family, words_to_addr(words, family), int(port_hex, 16),
                          state, inode))
    return out


def _v4(addr: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address a socket address stands for (an IPv4 one, or ::ffff:a.b.c.d)."""
    if isinstance(addr, ipaddress.IPv4Address):
        return addr
    return addr.ipv4_mapped


def _overlap(want: Want, h: Holder) -> bool:
    """Whether a bind of `want` would meet `h` (same port assumed). An AF_INET6 holder on
    `::` is taken to be dual-stack (the default, net.ipv6.bindv6only=0): the tables do not
    say whether it is v6only."""
    w4, h4 = _v4(want.addr), _v4(h.addr)
    if want.family == h.family:
        if want.addr == h.addr or want.addr.is_unspecified or h.addr.is_unspecified:
            return True
        if want.family == AF_INET6 and (w4 is not None and h4 is not None):
            return w4 == h4
        return False
    # One AF_INET, one AF_INET6 socket: they meet on IPv4 only.
    v6, v4 = (want.addr, h.addr) if want.family == AF_INET6 else (h.addr, want.addr)
    v6only = want.v6only if want.family == AF_INET6 else False
    if v6.is_unspecified:
        return not v6only
    mapped = _v4(v6)
    if mapped is None:
        return False
    return mapped == v4 or v4.is_unspecified or mapped.is_unspecified


def _holds(want: Want, h: Holder) -> bool:
    if h.proto != want.proto or h.port != want.port or not _overlap(want, h):
        return False
    if h.proto in _DATAGRAM:
        return True
    if h.state in (TCP_LISTEN_HEX, TCP_CLOSE_HEX):
        return True
    if h.state == TCP_TIME_WAIT_HEX:
        return False
    return not want.reuseaddr


def clashes(wants: Iterable[Want], holders: Sequence[Holder], where: str) -> list[Clash]:
    """Each (wanted endpoint, holder) pair where the bind would meet the holder; one Clash
    per wanted endpoint (its first holder)."""
    by_port: dict[tuple[str, int], list[Holder]] = {}
    for h in holders:
        if h.port:
            by_port.setdefault((h.proto, h.port), []).append(h)
    out: list[Clash] = []
    for w in wants:
        if not w.port:
            continue
        for h in by_port.get((w.proto, w.port), ()):
            if _holds(w, h):
                out.append(Clash(w, h, where))
                break
    return out


def wants_of(reports: Iterable[SocketReport]) -> list[Want]:
    """The endpoints a restore of these planned sockets binds on its own (each decision's
    `binds`, at the socket's new local endpoint), each once."""
    out: list[Want] = []
    seen: set[tuple[str, int, IPAddress, int]] = set()
    for r in reports:
        key = r.binds
        if key is None or key in seen:
            continue
        seen.add(key)
        proto, family, addr, port = key
        out.append(Want(proto, family, addr, port, f"{r.file}: socket id {r.id}",
                        file=r.file, id=r.id))
    return out
