"""Where a socket's ports go when the map moves ports (port rules, --port-offset), and which
of those moves cannot be made: facts for decide.py, which alone says what then happens.

With port moves a socket's local endpoint is (address, port), and the two ends of a
connection must still agree after the move (docs/map.md, "Ports"):
  * a listener or bound socket: BoundMap.endpoint(src, sport);
  * a connection accepted by a listener of the checkpoint: the listener's new port;
  * the destination of a connection whose peer socket is in the checkpoint: that peer's new
    local endpoint; whose peer moves with the group: what the same map makes of the peer's
    endpoint (and this end must come out where the peer, restored with the same map, will
    look for it); else it stays, and a connected TCP socket whose local port moves gets the
    --tcp-outside fate (decide.py).
Two sockets that did not share a port before and would after the move cannot both be made.

Pure: the checkpoint's sockets (PortContext) and one socket in, PortMoves out.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import PortRangeError
from .boundmap import BoundMap
from .endpoints import Moved
from ..record import Record
from .reasons import (
    DST_PORT_PEER_MOVES,
    DST_PORT_PEER_SOCKET,
    OLD_PORT,
    PEER_PORT_RANGE,
    PORT_CLASH,
    PORT_RANGE,
    PORT_WITH_LISTENER,
    SPLIT,
    SPLIT_ADDRESS,
    SRC_BY,
    Reason,
)
from .sockaddr import ICMP_PROTOS, SOCK_DGRAM, SOCK_STREAM, TCP_CONNECTED_STATES, TCP_LISTEN
from .sockaddr import IPAddress
from .sockets import Socket, own_port_table

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from typing import NamedTuple
else:
    from ..record import NamedTuple

LocalKey = tuple[int, int, IPAddress, int]  # (type, family, address, port)


def _covers(listener: IPAddress, addr: IPAddress) -> bool:
    return listener == addr or listener.is_unspecified


class PortContext(Record):
    """The sockets of one checkpoint, for the port decisions: listeners and bound UDP
    sockets by (family, port), the local 4-tuples of its TCP connections, and the sockets
    the map would send two of onto one port (each with why). (A Record: ..record.)"""

    __slots__ = ("listeners", "udp_bound", "tcp_ends", "clashes")
    __hash__ = None  # type: ignore[assignment]  # mutable, as a dataclass with eq is
    listeners: dict[tuple[int, int], list[IPAddress]]
    udp_bound: dict[tuple[int, int], list[IPAddress]]
    tcp_ends: set[tuple[int, IPAddress, int, IPAddress, int]]
    clashes: dict[LocalKey, Reason]

    def __init__(self) -> None:
        self.listeners, self.udp_bound, self.tcp_ends, self.clashes = {}, {}, set(), {}

    @classmethod
    def build(cls, socks: Iterable[Socket], bmap: BoundMap) -> PortContext:
        ctx = cls()
        binders: dict[LocalKey, Socket] = {}
        for k in socks:
            if k.type == SOCK_STREAM and k.state == TCP_LISTEN:
                ctx.listeners.setdefault((k.family, k.sport), []).append(k.src)
            elif k.type == SOCK_STREAM and k.state in TCP_CONNECTED_STATES:
                ctx.tcp_ends.add((k.family, k.src, k.sport, k.dst, k.dport))
            elif k.type == SOCK_DGRAM and k.sport and k.proto not in ICMP_PROTOS:
                ctx.udp_bound.setdefault((k.family, k.sport), []).append(k.src)
            if own_port_table(k.type, k.proto, k.state, k.sport) is not None:
                binders.setdefault((k.type, k.family, k.src, k.sport), k)
        ctx._find_clashes(binders, bmap)
        return ctx

    def _find_clashes(self, binders: dict[LocalKey, Socket], bmap: BoundMap) -> None:
        """Two sockets that did not share a port before and would after the move (the same
        address, or one of them on the wildcard address): both refused, each naming the
        other. Sockets that shared one before (SO_REUSEPORT, ...) share it still."""
        by_new: dict[tuple[int, int, int], list[tuple[Socket, IPAddress, str]]] = {}
        for k in binders.values():
            try:
                m = bmap.endpoint(k.src, k.sport)
            except PortRangeError:
                continue  # refused on its own
            addr, port = (k.src, k.sport) if m is None else (m.addr, m.port)
            by = "" if m is None else (m.port_by or m.addr_by or "")
            by_new.setdefault((k.type, k.family, port), []).append((k, addr, by))
        for (_t, _f, port), group in by_new.items():
            for i, (a, a_new, a_by) in enumerate(group):
                for b, b_new, b_by in group[i + 1:]:
                    if not (_covers(a_new, b_new) or _covers(b_new, a_new)):
                        continue
                    if a.sport == b.sport and (_covers(a.src, b.src) or _covers(b.src, a.src)):
                        continue
                    for x, x_new, x_by, y, y_by in ((a, a_new, a_by, b, b_by),
                                                    (b, b_new, b_by, a, a_by)):
                        self.clashes.setdefault(
                            (x.type, x.family, x.src, x.sport),
                            Reason(PORT_CLASH, (x_new, port, x_by, y.file, y.id, y.src,
                                                y.sport, y_by)))

    def listener_for(self, family: int, addr: IPAddress, port: int) -> IPAddress | None:
        """The address of the checkpoint's listener that accepted a connection on
        (addr, port), if there is one (the same address first, then the wildcard)."""
        got = self.listeners.get((family, port))
        if not got:
            return None
        if addr in got:
            return addr
        return next((a for a in got if a.is_unspecified), None)

    def udp_for(self, family: int, addr: IPAddress, port: int) -> IPAddress | None:
        got = self.udp_bound.get((family, port))
        if not got:
            return None
        if addr in got:
            return addr
        return next((a for a in got if a.is_unspecified), None)


class PortMoves(NamedTuple):
    """What the port moves make of one socket (its address decision made first)."""

    refused: Reason | None = None  # a move that cannot be made: the socket is refused
    moves_local: bool = False  # the map moves the local endpoint (its `src by` is in why)
    new_src: IPAddress | None = None  # the local address, where the endpoint's move sets it
    new_sport: int | None = None
    new_dst: IPAddress | None = None  # the peer's new address, where the move sets it
    new_dport: int | None = None
    why: tuple[Reason, ...] = ()  # the moves, in order
    outside: bool = False  # a TCP connection whose local port moves, its peer staying


def _tcp_local(family: int, addr: IPAddress, port: int, bmap: BoundMap,
               ports: PortContext) -> tuple[Moved | None, str]:
    """The new local endpoint of a TCP connection's end at (addr, port): if a listener of
    the checkpoint accepted it, its listener's new port (and, for a listener on this very
    address, its new address); else by the map. (move or None, "accepted" or "")."""
    lst = ports.listener_for(family, addr, port)
    if lst is None:
        return bmap.endpoint(addr, port), ""
    lm = bmap.endpoint(lst, port)
    new_port = port if lm is None else lm.port
    addr_by: str | None = None
    new_addr = addr
    if lst == addr:
        if lm is not None and lm.addr_by is not None:
            new_addr, addr_by = lm.addr, lm.addr_by
    else:
        hit = bmap.lookup(addr, is_src=True)
        if hit is not None:
            new_addr, addr_by = hit
    if new_addr == addr and new_port == port:
        return None, ""
    why = []
    if addr_by:
        why.append(Reason(SRC_BY, (addr_by,)))
    if new_port != port:
        why.append(Reason(PORT_WITH_LISTENER, (port, new_port, lst)))
    return (Moved(new_addr, new_port, addr_by, lm.port_by if lm is not None else None,
                  tuple(why)), "accepted" if new_port != port else "")


def port_moves(s: Socket, bmap: BoundMap, ports: PortContext,
               new_dst: IPAddress | None) -> PortMoves:
    """The port moves of a TCP or UDP socket (not a ping socket) that the address decision
    neither closed nor refused; `new_dst`: the peer's new address by that decision."""
    clash = ports.clashes.get((s.type, s.family, s.src, s.sport))
    if clash is not None:
        return PortMoves(clash)
    tcp = s.type == SOCK_STREAM
    connected = (s.state in TCP_CONNECTED_STATES) if tcp else bool(s.dport)
    try:
        if tcp and connected:
            mine, how = _tcp_local(s.family, s.src, s.sport, bmap, ports)
        else:
            mine, how = bmap.endpoint(s.src, s.sport), ""
    except PortRangeError as exc:
        return PortMoves(Reason(PORT_RANGE, exc.fields))
    why: list[Reason] = []
    new_src = new_sport = None
    if mine is not None:
        if mine.port != s.sport:
            new_sport = mine.port
        if mine.addr_by is not None and mine.addr != s.src:
            new_src = mine.addr
        why.extend(mine.why)
    local = mine is not None
    if not connected:
        return PortMoves(None, local, new_src, new_sport, None, None, tuple(why))
    try:
        if tcp and (s.family, s.dst, s.dport, s.src, s.sport) in ports.tcp_ends:
            theirs, _ = _tcp_local(s.family, s.dst, s.dport, bmap, ports)
            where = DST_PORT_PEER_SOCKET
        elif not tcp and (bound := ports.udp_for(s.family, s.dst, s.dport)) is not None:
            theirs = bmap.endpoint(bound, s.dport)
            if theirs is not None and bound != s.dst:  # a wildcard socket: the address stays
                hit = bmap.lookup(s.dst)
                theirs = Moved(s.dst if hit is None else hit[0], theirs.port,
                               None if hit is None else hit[1], theirs.port_by, theirs.why)
            where = DST_PORT_PEER_SOCKET
        elif bmap.lookup(s.dst) is not None or bmap.names_endpoint(s.dst, s.dport):
            # the peer moves with the group: it works out this end's new endpoint from the
            # map alone, which must come out the same
            theirs = bmap.endpoint(s.dst, s.dport)
            where = DST_PORT_PEER_MOVES
            by_rules = bmap.endpoint(s.src, s.sport)
            mine_ep = (s.src, s.sport) if mine is None else (mine.addr, mine.port)
            rules_ep = (s.src, s.sport) if by_rules is None else (by_rules.addr, by_rules.port)
            if mine_ep != rules_ep:
                return PortMoves(Reason(SPLIT, (*mine_ep, how, *rules_ep)))
            if mine_ep != (s.src, s.sport) and not (
                    bmap.lookup(s.src, is_src=True) is not None
                    or bmap.names_endpoint(s.src, s.sport)):
                return PortMoves(Reason(SPLIT_ADDRESS, mine_ep))
        else:  # the peer stays
            if mine is not None and mine.port != s.sport:
                if tcp:
                    return PortMoves(None, local, new_src, new_sport, None, None, tuple(why),
                                     True)
                why.append(Reason(OLD_PORT))
            return PortMoves(None, local, new_src, new_sport, None, None, tuple(why))
    except PortRangeError as exc:
        return PortMoves(Reason(PEER_PORT_RANGE, exc.fields))
    if theirs is None:
        return PortMoves(None, local, new_src, new_sport, None, None, tuple(why))
    new_dport = None
    if theirs.port != s.dport:
        new_dport = theirs.port
        why.append(Reason(where, (s.dport, theirs.port)))
    dst = None
    if theirs.addr != s.dst and (new_dst is None or theirs.addr_by is not None):
        dst = theirs.addr
    return PortMoves(None, local, new_src, new_sport, dst, new_dport, tuple(why))
