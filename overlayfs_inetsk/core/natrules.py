"""The peers' side of fate `nat`: an nftables ruleset that keeps an outside client's
established connection alive after its server moved (docs/tcp.md, "Fate nat").

Pure: the plan's socket reports in, `nft -f` text out. node/nat.py applies it.

A connection of fate nat is restored established at its new local endpoint (NEW) while
its peer, the client (PEER), still sends to the old one (OLD). Where the client's traffic
passes (its own network namespace, its node, a router on the path), the ruleset rewrites
exactly that 4-tuple, statelessly:

    PEER -> OLD   becomes  PEER -> NEW   (prerouting: forwarded; output: the client's own)
    NEW -> PEER   becomes  OLD -> PEER   (prerouting)

and marks both directions `notrack`. Stateless and untracked because conntrack would not
do it: its NAT is chosen at a flow's first packet, so an entry the client's side made
before the rules (without NAT) keeps matching them; deleting that entry does not help
either, since the restored side usually sends first (its window probe when repair mode
ends), and a mid-stream reply packet makes a new entry without NAT, which the client's
TCP answers with a reset. Both measured (docs/tcp.md).

The output chain is a `route` chain: the kernel routes a rewritten packet again (the new
address may be behind another hop). Everything sits in one table of our own, named after
the connections it rewrites (table_name), so removing it removes exactly what was added.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from .report import SocketReport
from .sockaddr import IPAddress, fmt_endpoint

TABLE_PREFIX = "overlayfs_inetsk_nat_"
FAMILY = "inet"  # one table for IPv4 and IPv6


@dataclass(frozen=True, order=True)
class NatConn:
    """One connection the peer's side rewrites. `version`: the packets' IP version (an
    AF_INET6 socket on IPv4-mapped addresses carries IPv4 packets: 4)."""

    version: int
    peer: IPAddress
    peer_port: int
    old: IPAddress
    old_port: int
    new: IPAddress
    new_port: int

    def describe(self) -> str:
        return (f"{fmt_endpoint(self.peer, self.peer_port)} -> "
                f"{fmt_endpoint(self.old, self.old_port)} now at "
                f"{fmt_endpoint(self.new, self.new_port)}")

    def key(self) -> str:
        return (f"{self.version} {self.peer} {self.peer_port} {self.old} {self.old_port} "
                f"{self.new} {self.new_port}")


def _plain(addr: IPAddress) -> IPAddress:
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr if mapped is None else mapped


def nat_connections(reports: Iterable[SocketReport]) -> list[NatConn]:
    """The connections of fate nat among a plan's reports (SocketReport.peer_nat), sorted,
    each once (two sockets of one checkpoint cannot share a 4-tuple; two checkpoints in
    one tree could list it twice)."""
    out: set[NatConn] = set()
    for r in reports:
        if not r.peer_nat:
            continue
        old, peer = _plain(r.src), _plain(r.dst)
        new = _plain(r.src if r.new_src is None else r.new_src)
        new_port = r.sport if r.new_sport is None else r.new_sport
        versions = {old.version, peer.version, new.version}
        if len(versions) != 1:  # decide() moves an address within its family only
            raise ValueError(f"{r.file}: socket id {r.id}: mixed IPv4 and IPv6 endpoints "
                             f"({r.local} -> {r.remote}, new {fmt_endpoint(new, new_port)})")
        out.add(NatConn(old.version, peer, r.dport, old, r.sport, new, new_port))
    return sorted(out)


def table_name(conns: Iterable[NatConn]) -> str:
    """`overlayfs_inetsk_nat_` + 12 hex digits of the connections' digest: the same plan
    gives the same name on every node and every run (nat-rules --remove finds it), two
    plans with other connections get other tables."""
    text = "\n".join(c.key() for c in sorted(conns))
    return TABLE_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:12]


def _match(c: NatConn, src: IPAddress, sport: int, dst: IPAddress, dport: int) -> str:
    ip = "ip" if c.version == 4 else "ip6"
    return f"{ip} saddr {src} tcp sport {sport} {ip} daddr {dst} tcp dport {dport}"


def _to_new(c: NatConn) -> str:
    """PEER -> OLD packets, sent to NEW instead."""
    ip = "ip" if c.version == 4 else "ip6"
    port = f" tcp dport set {c.new_port}" if c.new_port != c.old_port else ""
    return (f"{_match(c, c.peer, c.peer_port, c.old, c.old_port)} notrack "
            f"{ip} daddr set {c.new}{port}")


def _from_old(c: NatConn) -> str:
    """NEW -> PEER packets, shown to the peer as coming from OLD."""
    ip = "ip" if c.version == 4 else "ip6"
    port = f" tcp sport set {c.old_port}" if c.new_port != c.old_port else ""
    return (f"{_match(c, c.new, c.new_port, c.peer, c.peer_port)} notrack "
            f"{ip} saddr set {c.old}{port}")


def ruleset(conns: Iterable[NatConn], source: str = "") -> str:
    """`nft -f` input for the connections: the table alone (nat-rules prints it). Empty
    text but a comment when there is none: nothing to apply."""
    conns = sorted(conns)
    head = f"# overlayfs-inetsk nat-rules{': ' + source if source else ''}\n"
    if not conns:
        return head + "# no connection of fate nat: nothing to rewrite\n"
    name = table_name(conns)
    pre = []
    out = []
    for c in conns:
        pre += [f"\t\t# {c.describe()}", f"\t\t{_to_new(c)}", f"\t\t{_from_old(c)}"]
        out += [f"\t\t# {c.describe()}", f"\t\t{_to_new(c)}"]
    return (head + f"table {FAMILY} {name} {{\n"
            "\tchain prerouting {\n"
            "\t\ttype filter hook prerouting priority raw; policy accept;\n"
            + "\n".join(pre) + "\n\t}\n"
            "\tchain output {\n"
            "\t\ttype route hook output priority raw; policy accept;\n"
            + "\n".join(out) + "\n\t}\n}\n")


def apply_script(conns: Iterable[NatConn], source: str = "") -> str:
    """The ruleset as one atomic `nft -f` transaction that replaces our table if it is
    there already (applying twice leaves one copy)."""
    conns = sorted(conns)
    if not conns:
        return ""
    name = table_name(conns)
    return (f"table {FAMILY} {name}\ndelete table {FAMILY} {name}\n"
            + ruleset(conns, source))


def remove_script(name: str) -> str:
    """Remove our table whether it is there or not (one transaction)."""
    check_table_name(name)
    return f"table {FAMILY} {name}\ndelete table {FAMILY} {name}\n"


def check_table_name(name: str) -> None:
    rest = name[len(TABLE_PREFIX):]
    if not name.startswith(TABLE_PREFIX) or len(rest) != 12 or any(
            ch not in "0123456789abcdef" for ch in rest):
        raise ValueError(f"{name!r} is not a table of overlayfs-inetsk nat-rules")
