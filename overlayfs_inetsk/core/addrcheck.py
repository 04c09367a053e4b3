"""Which of the addresses a restore will bind are no address of the target network namespace.

A map with a typo in its new address (10.77.0.99 for 10.77.0.2), or one written for another
node, plans fine: the address is valid, only the node lacks it. CRIU then binds it in the
middle of the restore: an AF_INET socket fails (`Can't bind inet socket ... Cannot assign
requested address`, the reason only in criu's log), an AF_INET6 one binds anyway
(IP_FREEBIND) and is silently unreachable. The planner's port step (planner/ports.py) names
each such socket before anything is restored, with the namespace's addresses read over
rtnetlink (host/nodeaddr.local_addresses). Pure: the wanted endpoints and the addresses in,
the absent ones out.

Not named: the wildcard addresses, loopback (127/8 and ::1 are always local), link-local
ones (bound with their interface, which the image names), and an address any interface of
the namespace has (in any state: a tentative IPv6 address becomes usable by itself).
`::ffff:a.b.c.d` is a.b.c.d.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from .portcheck import Want
from .sockaddr import fmt_endpoint

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Absent:
    """A socket the restore binds at an address the namespace (`where`) does not have."""

    want: Want
    where: str

    def __str__(self) -> str:
        w = self.want
        addr = _plain(w.addr)
        who = f"{w.label}: " if w.label else ""
        what = ("the restore fails there (bind: Cannot assign requested address)"
                if addr.version == 4 else
                "it binds anyway (IP_FREEBIND) and is unreachable there")
        return (f"{who}{w.proto} {fmt_endpoint(w.addr, w.port)}: {addr} is not an address "
                f"of {self.where}: {what}")


def _plain(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def needs_check(addr: IPAddress) -> bool:
    """Whether binding `addr` needs the namespace to have it."""
    a = _plain(addr)
    return not (a.is_unspecified or a.is_loopback or a.is_link_local)


def absent(wants: Iterable[Want], local: Collection[IPAddress], where: str) -> list[Absent]:
    """The wanted endpoints whose address is not among `local` (the namespace's addresses),
    each address once per socket."""
    have = {_plain(a) for a in local}
    return [Absent(w, where) for w in wants
            if needs_check(w.addr) and _plain(w.addr) not in have]
