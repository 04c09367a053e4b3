"""The peers' side of fate nat: an nftables table that keeps an outside client's
established connection alive after its server moved (docs/tcp.md, "Fate nat").

Pure: the plan's socket reports in, `nft -f` text out. node/nat.py applies it.

A connection of fate nat is restored established at its new local endpoint (NEW) while
its peer, the client (PEER), still sends to the old one (OLD). Where the client's traffic
passes (its own network namespace, its node, a router on the path), the table rewrites
exactly that 4-tuple, statelessly:

    PEER -> OLD   becomes  PEER -> NEW   (prerouting: forwarded; output: the client's own)
    NEW -> PEER   becomes  OLD -> PEER   (prerouting)

and marks both directions `notrack`. Stateless and untracked because conntrack would not
do it: its NAT is chosen at a flow's first packet, so an entry the client's side made
before the rules (without NAT) keeps matching them; deleting that entry does not help
either, since the restored side usually sends first (its window probe when repair mode
ends), and a mid-stream reply packet makes a new entry without NAT, which the client's
TCP answers with a reset. Both measured (docs/tcp.md).

The connections are elements of maps keyed by the packet's 4-tuple (`ip saddr . tcp sport
. ip daddr . tcp dport`), one hash lookup per packet and rule whatever their number: a
rule `ip daddr set KEY map @to_new4 notrack` rewrites and untracks the packets whose
4-tuple is in the map, and ends at the lookup for every other packet. A port that moves
takes a second map, keyed by the packet as the first left it (_Maps). (One rule per
connection made every packet walk them all: x7.4 the time of a bulk transfer with
10,000; bench/bench_nat.py.)

The output chain is a `route` chain: the kernel routes a rewritten packet again (the new
address may be behind another hop). Everything sits in one table of our own, named after
the connections it rewrites (table_name), so removing it removes exactly what was added.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import RewriteError
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
        return (f"{self.version} {_text(self.peer)} {self.peer_port} {_text(self.old)} "
                f"{self.old_port} {_text(self.new)} {self.new_port}")


# an address as nft and the table's name write it: a table of 10,000 connections names
# each address up to six times, and str() of an IPv6 address costs ~7 us
_text = functools.lru_cache(maxsize=1 << 16)(str)


def _sorted(conns: Iterable[NatConn]) -> list[NatConn]:
    """NatConn's own order (its fields in turn), with a cheaper key: the dataclass's
    comparisons took half the rendering of 10,000 connections."""
    return sorted(conns, key=lambda c: (c.version, int(c.peer), c.peer_port, int(c.old),
                                        c.old_port, int(c.new), c.new_port))


def _plain(addr: IPAddress) -> IPAddress:
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr if mapped is None else mapped


def nat_connections(reports: Iterable[SocketReport]) -> list[NatConn]:
    """The connections of fate nat among a plan's reports (SocketReport.peer_nat), sorted,
    each once (two sockets of one checkpoint cannot share a 4-tuple; two checkpoints in
    one tree could list it twice). RewriteError when one table cannot rewrite them all
    (check_table)."""
    out: set[NatConn] = set()
    for r in reports:
        if not r.peer_nat:
            continue
        old, peer = _plain(r.src), _plain(r.dst)
        new = _plain(r.src if r.new_src is None else r.new_src)
        new_port = r.sport if r.new_sport is None else r.new_sport
        versions = {old.version, peer.version, new.version}
        if len(versions) != 1:  # an IPv6 socket from an IPv4-mapped address to a plain
            # IPv6 peer (no kernel makes one): no table of one family rewrites it
            raise RewriteError(f"{r.file}: socket id {r.id}: mixed IPv4 and IPv6 endpoints "
                               f"({r.local} -> {r.remote}, new "
                               f"{fmt_endpoint(new, new_port)}): no nftables table of one "
                               "family can rewrite this connection's packets")
        out.add(NatConn(old.version, peer, r.dport, old, r.sport, new, new_port))
    conns = _sorted(out)
    check_table(conns)  # refused when planned, not when the table is applied
    return conns


def table_name(conns: Iterable[NatConn]) -> str:
    """`overlayfs_inetsk_nat_` + 12 hex digits of the connections' digest: the same plan
    gives the same name on every node and every run (nat-rules --remove finds it), two
    plans with other connections get other tables."""
    text = "\n".join(c.key() for c in _sorted(conns))
    return TABLE_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:12]


# nftables' names for the key and value types, by IP version
_TYPES = {4: ("ip", "ipv4_addr"), 6: ("ip6", "ipv6_addr")}


def _key(v: int) -> str:
    """The lookup key: the packet's 4-tuple as it is when the lookup runs."""
    ip = _TYPES[v][0]
    return f"{ip} saddr . tcp sport . {ip} daddr . tcp dport"


def _tuple(a1: IPAddress, p1: int, a2: IPAddress, p2: int) -> str:
    return f"{_text(a1)} . {p1} . {_text(a2)} . {p2}"


@dataclass
class _Maps:
    """The four lookups of one IP version: `to_new` (PEER . pport . OLD . oport -> NEW),
    `to_new_port` (PEER . pport . NEW . oport -> nport: the packet as to_new left it),
    `from_old` (NEW . nport . PEER . pport -> OLD), `from_old_port` (OLD . nport . PEER .
    pport -> oport). The port maps only when a connection's port moves."""

    to_new: dict[str, tuple[str, NatConn]]
    to_new_port: dict[str, tuple[str, NatConn]]
    from_old: dict[str, tuple[str, NatConn]]
    from_old_port: dict[str, tuple[str, NatConn]]


def _put(m: dict[str, tuple[str, NatConn]], key: str, value: object, c: NatConn) -> None:
    had = m.setdefault(key, (str(value), c))
    if had[0] != str(value):
        raise RewriteError(
            f"connections {had[1].describe()} and {c.describe()}: one nftables table "
            f"cannot rewrite both (the same lookup {key} would give {had[0]} and {value}); "
            "move them with maps that keep them apart")


def _maps(conns: list[NatConn], v: int) -> _Maps:
    m = _Maps({}, {}, {}, {})
    mine = [c for c in conns if c.version == v]
    ports = any(c.new_port != c.old_port for c in mine)
    for c in mine:
        _put(m.to_new, _tuple(c.peer, c.peer_port, c.old, c.old_port), _text(c.new), c)
        _put(m.from_old, _tuple(c.new, c.new_port, c.peer, c.peer_port), _text(c.old), c)
        if ports:  # every connection of the version: a miss would keep a port it must not
            _put(m.to_new_port, _tuple(c.peer, c.peer_port, c.new, c.old_port),
                 c.new_port, c)
            _put(m.from_old_port, _tuple(c.old, c.new_port, c.peer, c.peer_port),
                 c.old_port, c)
    return m


def check_table(conns: Iterable[NatConn]) -> None:
    """RewriteError when one table cannot rewrite all of `conns` (two connections that
    need other answers from one lookup: only with port moves, see _Maps)."""
    conns = _sorted(conns)
    for v in _TYPES:
        _maps(conns, v)


def _map(name: str, v: int, value: str, elements: dict[str, tuple[str, NatConn]]
         ) -> list[str]:
    addr = _TYPES[v][1]
    return ([f"\tmap {name} {{",
             f"\t\ttype {addr} . inet_service . {addr} . inet_service : {value}",
             "\t\telements = {"]
            + [f"\t\t\t{k} : {val}," for k, (val, _) in elements.items()]
            + ["\t\t}", "\t}"])


def _rules(v: int, m: _Maps, out: bool) -> list[str]:
    """The rules of one version: a lookup that misses ends the rule, so each rewrites
    (and marks notrack) exactly the packets of its map's 4-tuples."""
    ip, key = _TYPES[v][0], _key(v)
    to_new = f"{ip} daddr set {key} map @to_new{v} notrack"
    if m.to_new_port:
        to_new += f" tcp dport set {key} map @to_new{v}_port"
    if out:
        return [f"\t\t{to_new}"]
    from_old = f"{ip} saddr set {key} map @from_old{v} notrack"
    if m.from_old_port:
        from_old += f" tcp sport set {key} map @from_old{v}_port"
    return [f"\t\t{to_new}", f"\t\t{from_old}"]


def ruleset(conns: Iterable[NatConn], source: str = "") -> str:
    """`nft -f` input for the connections: the table alone (nat-rules prints it). Empty
    text but a comment when there is none: nothing to apply. RewriteError: check_table."""
    conns = _sorted(conns)
    head = f"# overlayfs-inetsk nat-rules{': ' + source if source else ''}\n"
    if not conns:
        return head + "# no connection of fate nat: nothing to rewrite\n"
    head += (f"# {len(conns)} connection(s) of fate nat, keyed by the packet's "
             "saddr . sport . daddr . dport:\n# to_new: the client's packets to the old "
             "address go to the new one; from_old: the replies come from the old one\n")
    lines = [f"table {FAMILY} {table_name(conns)} {{"]
    pre: list[str] = []
    out: list[str] = []
    for v in sorted({c.version for c in conns}):
        m = _maps(conns, v)
        addr = _TYPES[v][1]
        lines += _map(f"to_new{v}", v, addr, m.to_new)
        if m.to_new_port:
            lines += _map(f"to_new{v}_port", v, "inet_service", m.to_new_port)
        lines += _map(f"from_old{v}", v, addr, m.from_old)
        if m.from_old_port:
            lines += _map(f"from_old{v}_port", v, "inet_service", m.from_old_port)
        pre += _rules(v, m, out=False)
        out += _rules(v, m, out=True)
    lines += ["\tchain prerouting {",
              "\t\ttype filter hook prerouting priority raw; policy accept;", *pre, "\t}",
              "\tchain output {",
              "\t\ttype route hook output priority raw; policy accept;", *out, "\t}", "}"]
    return head + "\n".join(lines) + "\n"


def apply_script(conns: Iterable[NatConn], source: str = "") -> str:
    """The ruleset as one atomic `nft -f` transaction that replaces our table if it is
    there already (applying twice leaves one copy)."""
    conns = _sorted(conns)
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
