"""THE one place that decides what happens to a socket: its class, its verdict, the reason,
and its new addresses and ports (docs/tcp.md, docs/map.md, docs/design.md).
Long: the address decisions and the port decisions (which need the checkpoint's other
sockets: listeners, peers, clashes) are one decision and stay in this one place.

Pure: a decoded inet socket entry and a bound address map in, a SocketReport out. Nothing
here reads or writes image bytes (entries.py does) or walks a tree (plan.py does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import PortRangeError, RewriteError
from .addrmap import BoundMap, Moved
from .sockaddr import (
    AF_INET,
    FAMILY_NAMES,
    ICMP_PROTOS,
    PROTOCOLS,
    SOCK_DGRAM,
    SOCK_RAW,
    SOCK_STREAM,
    SOCK_TYPES,
    TCP_CLOSE_WAIT,
    TCP_CLOSING,
    TCP_CONNECTED_STATES,
    TCP_FIN_WAIT1,
    TCP_FIN_WAIT2,
    TCP_LAST_ACK,
    TCP_LISTEN,
    TCP_STATES,
    TCP_SYN_RECV,
    TCP_SYN_SENT,
    TCP_TIME_WAIT,
    IPAddress,
    addr_to_words,
    fmt_addr,
    fmt_endpoint,
    is_special,
)

if TYPE_CHECKING:  # entries.py's Protocol for pycriu's inet_sk_entry
    from .entries import InetSk

log = logging.getLogger(__name__)

TCP_FATES = ("close", "keep", "nat", "fail")
DEFAULT_TCP_FATE = "close"

# the reason's part for a connection of fate nat (its peer's side rewrites it)
NAT_REASON = ("peer {peer} is outside the map: kept established, the peer's side must "
              "follow (fate nat: overlayfs-inetsk nat-rules)")

# Verdicts
REWRITTEN = "rewritten"  # addresses changed
CLOSED = "closed"  # TCP connection to a peer outside the map, restored closed (fate close)
KEPT = "kept"  # nothing to change and nothing wrong (any address, loopback, unbound, ...)
NEEDS_ADDRESS = "needs-address"  # keeps a specific address no rule covers
REFUSED = "refused"  # TCP connection to a peer outside the map, fate fail
VERDICTS = (REWRITTEN, CLOSED, KEPT, NEEDS_ADDRESS, REFUSED)


@dataclass(frozen=True)
class RewriteOptions:
    strict: bool = False  # a socket left on a specific address no rule covers is an error
    tcp_outside: str = DEFAULT_TCP_FATE  # fate of TCP connected to a peer outside the map

    def __post_init__(self) -> None:
        if self.tcp_outside not in TCP_FATES:
            raise ValueError(f"tcp_outside must be one of {', '.join(TCP_FATES)}")


@dataclass(slots=True)
class SocketReport:
    file: str
    offset: int
    id: int
    ino: int
    family: int
    type: int
    proto: int
    state: int
    src: IPAddress
    sport: int
    dst: IPAddress
    dport: int
    klass: str = ""
    verdict: str = KEPT
    reason: str = ""
    new_src: IPAddress | None = None
    new_dst: IPAddress | None = None
    new_sport: int | None = None
    new_dport: int | None = None
    # fate nat: restored established at its new local endpoint; the peer's side must
    # rewrite the connection (core/natrules.py)
    peer_nat: bool = False

    @property
    def new_local(self) -> str | None:
        """The new local endpoint, or None when neither its address nor its port moves."""
        if self.new_src is None and self.new_sport is None:
            return None
        return fmt_endpoint(self.src if self.new_src is None else self.new_src,
                            self.sport if self.new_sport is None else self.new_sport)

    @property
    def new_remote(self) -> str | None:
        if self.new_dst is None and self.new_dport is None:
            return None
        return fmt_endpoint(self.dst if self.new_dst is None else self.new_dst,
                            self.dport if self.new_dport is None else self.new_dport)

    @property
    def family_name(self) -> str:
        return FAMILY_NAMES.get(self.family, str(self.family))

    @property
    def proto_name(self) -> str:
        name = PROTOCOLS.get(self.proto)
        if name is None or (self.proto == 0 and self.type in SOCK_TYPES):
            return {SOCK_STREAM: "tcp", SOCK_DGRAM: "udp"}.get(
                self.type, SOCK_TYPES.get(self.type, str(self.proto)))
        return name

    @property
    def type_name(self) -> str:
        """`stream`, `dgram`, `raw` (JSON `type`, table TYPE)."""
        return SOCK_TYPES.get(self.type, str(self.type))

    @property
    def proto_label(self) -> str:
        """The protocol with the family's digit, as the table shows it: tcp4, udp6, icmp6
        (not icmpv66)."""
        name = self.proto_name
        if name.endswith(("v4", "v6")):
            name = name[:-2]
        return name + self.family_name[-1]

    @property
    def kind(self) -> str:
        """Protocol and type for messages: `tcp`, `udp`, `ping`, `raw udp`."""
        if self.type == SOCK_RAW:
            return f"raw {self.proto_name}"
        if self.type == SOCK_DGRAM and self.proto in ICMP_PROTOS:
            return "ping"
        return self.proto_name

    @property
    def kind_label(self) -> str:
        """kind with the family's digit (the -v log lines): tcp4, ping6, raw udp4."""
        if self.type == SOCK_RAW:
            return f"raw {self.proto_label}"
        if self.type == SOCK_DGRAM and self.proto in ICMP_PROTOS:
            return "ping" + self.family_name[-1]
        return self.proto_label

    @property
    def state_name(self) -> str:
        return TCP_STATES.get(self.state, str(self.state))

    @property
    def local(self) -> str:
        return fmt_endpoint(self.src, self.sport)

    @property
    def remote(self) -> str:
        return fmt_endpoint(self.dst, self.dport)


# Connected TCP states other than ESTABLISHED, by class (docs/tcp.md). TIME_WAIT sockets
# belong to no process, so CRIU never dumps one: the class is there for completeness.
_TCP_STATE_CLASSES = {
    TCP_SYN_SENT: "tcp-syn-sent", TCP_SYN_RECV: "tcp-syn-sent",
    TCP_FIN_WAIT1: "tcp-half-closed", TCP_FIN_WAIT2: "tcp-half-closed",
    TCP_CLOSE_WAIT: "tcp-half-closed", TCP_LAST_ACK: "tcp-half-closed",
    TCP_CLOSING: "tcp-half-closed", TCP_TIME_WAIT: "tcp-time-wait",
}


def _peer(r: SocketReport, bmap: BoundMap) -> str:
    """Where a connected TCP socket's peer goes: `self` (the same address: the process or
    its host talks to itself), `moved` (a rule moves the peer's address: a group member),
    `outside` (the peer stays where it was)."""
    if r.dst == r.src:
        return "self"
    return "moved" if bmap.lookup(r.dst) is not None else "outside"


def _is_ping(r: SocketReport) -> bool:
    return r.type == SOCK_DGRAM and r.proto in ICMP_PROTOS


def _classify(r: SocketReport, bmap: BoundMap) -> str:
    tcp = r.type == SOCK_STREAM
    if tcp and r.state == TCP_LISTEN:
        return "listener"
    # the type first: a raw or ping socket restores differently from UDP on any address
    if r.type == SOCK_RAW:
        return "raw"
    if _is_ping(r):
        return "ping"
    if _is_loopback(r.src):
        return "loopback"
    if tcp:
        if r.state not in TCP_CONNECTED_STATES:
            return "unconnected"
        if r.state in _TCP_STATE_CLASSES:
            return _TCP_STATE_CLASSES[r.state]
        return {"self": "tcp-self", "moved": "tcp-peer-moved",
                "outside": "tcp-peer-outside"}[_peer(r, bmap)]
    if r.type == SOCK_DGRAM:
        return "udp-connected" if r.dport else "udp-bound"
    return "other"


def _is_loopback(addr: IPAddress) -> bool:
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def decide(r: SocketReport, bmap: BoundMap, options: RewriteOptions,
           ports: PortContext | None = None) -> None:
    """Fill klass, verdict, reason, new_src, new_dst (and new_sport, new_dport) of one
    socket. `ports`: the checkpoint's sockets as the port decisions need them; given when
    the map moves ports (see PortContext)."""
    _decide_addresses(r, bmap, options)
    if ports is not None and r.verdict not in (CLOSED, REFUSED):
        _decide_ports(r, bmap, options, ports)


def _decide_addresses(r: SocketReport, bmap: BoundMap, options: RewriteOptions) -> None:
    r.klass = _classify(r, bmap)
    src_hit = bmap.lookup(r.src, is_src=True)
    dst_hit = bmap.lookup(r.dst)
    connected = r.type == SOCK_STREAM and r.state in TCP_CONNECTED_STATES and r.klass != "loopback"
    peer_is = _peer(r, bmap) if connected else ""
    if peer_is == "outside" and src_hit is not None:
        peer = fmt_endpoint(r.dst, r.dport)
        if options.tcp_outside == "close":
            r.verdict = CLOSED
            r.reason = (f"peer {peer} is outside the map: restored as a closed connection "
                        "(EOF on read, EPIPE on write; nothing bound)")
            return
        if options.tcp_outside == "fail":
            r.verdict = REFUSED
            r.reason = (f"peer {peer} is outside the map and keeps the old 4-tuple: this "
                        "connection cannot survive the move (--tcp-outside fail; close or "
                        "keep would let the restore go on)")
            return
        r.new_src = src_hit[0]
        r.verdict = REWRITTEN
        if options.tcp_outside == "nat":
            r.peer_nat = True
            r.reason = f"src by {src_hit[1]}; {NAT_REASON.format(peer=peer)}"
            return
        r.reason = (f"src by {src_hit[1]}; peer {peer} is outside the map and will "
                    "reset the connection (fate keep)")
        return
    if src_hit is not None or dst_hit is not None:
        why = []
        if src_hit is not None:
            r.new_src = src_hit[0]
            why.append(f"src by {src_hit[1]}")
        if dst_hit is not None:
            r.new_dst = dst_hit[0]
            why.append(f"dst by {dst_hit[1]}")
        if peer_is == "self":
            why.append("connected to itself")
        elif peer_is == "moved":
            why.append("peer moves with the group (restore it with the same map)")
        r.verdict = REWRITTEN
        r.reason = "; ".join(why)
        return
    src = r.src
    if src.is_unspecified:
        r.reason = "bound to any address" if r.sport else "not bound"
    elif is_special(src):
        r.reason = "loopback address" if _is_loopback(src) else "link-local address"
    elif src.is_multicast:
        r.reason = "multicast address"
    elif r.proto in ICMP_PROTOS:
        # CRIU 4.2.1 never binds an ICMP socket, ping or raw (open_inet_sk skips inet_bind
        # for IPPROTO_ICMP/ICMPV6; seen here: a raw ICMPv6 socket on fd77::1 came back on
        # `*`): the old address can make nothing fail, and is not restored either
        r.reason = (f"no rule covers {src}; CRIU does not bind an ICMP socket, so the "
                    "address is not restored")
    else:
        r.verdict = NEEDS_ADDRESS
        if r.type == SOCK_RAW:  # CRIU binds raw sockets without IP_FREEBIND, IPv6 too
            r.reason = (f"no rule covers {src}: bind fails (Cannot assign requested "
                        "address; raw sockets get no IP_FREEBIND) unless this node has it")
        elif r.family == AF_INET:
            r.reason = (f"no rule covers {src}: bind fails (Cannot assign requested address) "
                        "unless this node has it")
        else:
            r.reason = (f"no rule covers {src}: binds anyway (IP_FREEBIND) and is unreachable "
                        "unless this node has it")


# ----------------------------------------------------------------------------- ports
# With port rules or an offset, a socket's local endpoint is (address, port) and the two ends
# of a connection must still agree after the move (docs/map.md, "Ports"):
#   * a listener or bound socket: BoundMap.endpoint(src, sport);
#   * a connection accepted by a listener of the checkpoint: the listener's new port;
#   * the destination of a connection whose peer socket is in the checkpoint: that peer's
#     new local endpoint; whose peer moves with the group: what the same map makes of the
#     peer's endpoint; else it stays, and a connected TCP socket whose local endpoint moves
#     gets the --tcp-outside fate.

LocalKey = tuple[int, int, IPAddress, int]  # (type, family, address, port)


@dataclass(frozen=True, slots=True)
class Sock:
    """What PortContext needs of one socket entry."""

    file: str
    id: int
    type: int
    state: int
    family: int
    src: IPAddress
    sport: int
    dst: IPAddress
    dport: int
    proto: int = 0  # ICMP: a ping socket, whose "port" is an echo id

    @property
    def binds(self) -> bool:
        """Whether the restore binds this socket's own port (a listener, a bound UDP
        socket, a bound TCP socket), as opposed to a connection sharing its listener's."""
        if not self.sport:
            return False
        if self.type == SOCK_STREAM:
            return self.state not in TCP_CONNECTED_STATES
        # a ping socket's "port" is its echo id: CRIU never binds it
        return self.type == SOCK_DGRAM and self.proto not in ICMP_PROTOS


def _covers(listener: IPAddress, addr: IPAddress) -> bool:
    return listener == addr or listener.is_unspecified


@dataclass
class PortContext:
    """The sockets of one checkpoint, for the port decisions: listeners and bound UDP
    sockets by (family, port), the local 4-tuples of its TCP connections, and the sockets
    refused because the map sends two of them onto one port."""

    listeners: dict[tuple[int, int], list[IPAddress]] = field(default_factory=dict)
    udp_bound: dict[tuple[int, int], list[IPAddress]] = field(default_factory=dict)
    tcp_ends: set[tuple[int, IPAddress, int, IPAddress, int]] = field(default_factory=set)
    clashes: dict[LocalKey, str] = field(default_factory=dict)

    @classmethod
    def build(cls, socks: Iterable[Sock], bmap: BoundMap) -> "PortContext":
        ctx = cls()
        binders: dict[LocalKey, Sock] = {}
        for k in socks:
            if k.type == SOCK_STREAM and k.state == TCP_LISTEN:
                ctx.listeners.setdefault((k.family, k.sport), []).append(k.src)
            elif k.type == SOCK_STREAM and k.state in TCP_CONNECTED_STATES:
                ctx.tcp_ends.add((k.family, k.src, k.sport, k.dst, k.dport))
            elif k.type == SOCK_DGRAM and k.sport and k.proto not in ICMP_PROTOS:
                ctx.udp_bound.setdefault((k.family, k.sport), []).append(k.src)
            if k.binds:
                binders.setdefault((k.type, k.family, k.src, k.sport), k)
        ctx._find_clashes(binders, bmap)
        return ctx

    def _find_clashes(self, binders: dict[LocalKey, Sock], bmap: BoundMap) -> None:
        """Two sockets that did not share a port before and would after the move (the same
        address, or one of them on the wildcard address): both refused, each naming the
        other. Sockets that shared one before (SO_REUSEPORT, ...) share it still."""
        by_new: dict[tuple[int, int, int], list[tuple[Sock, IPAddress, str]]] = {}
        for key, k in binders.items():
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
                        how = f" by {x_by}" if x_by else " (stays)"
                        other = f" by {y_by}" if y_by else " (stays)"
                        self.clashes.setdefault(
                            (x.type, x.family, x.src, x.sport),
                            f"two sockets onto one port: {fmt_endpoint(x.src, x.sport)} goes to "
                            f"{fmt_endpoint(x_new, port)}{how}, where {y.file}: socket id "
                            f"{y.id} ({fmt_endpoint(y.src, y.sport)}) also goes{other}")

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
        why.append(f"src by {addr_by}")
    if new_port != port:
        why.append(f"port {port}->{new_port} with its listener {fmt_endpoint(lst, port)}")
    return (Moved(new_addr, new_port, addr_by, lm.port_by if lm is not None else None,
                  "; ".join(why)), "accepted" if new_port != port else "")


def _peer_in_group(r: SocketReport, bmap: BoundMap) -> bool:
    """Whether the peer of a connection (not in this checkpoint) moves with the group: the
    map moves its address, or a port rule names its endpoint by address."""
    return bmap.lookup(r.dst) is not None or bmap.names_endpoint(r.dst, r.dport)


def _refuse(r: SocketReport, reason: str) -> None:
    r.verdict = REFUSED
    r.reason = reason
    r.new_src = r.new_dst = None
    r.new_sport = r.new_dport = None


def _decide_ports(r: SocketReport, bmap: BoundMap, options: RewriteOptions,
                  ports: PortContext) -> None:
    """Add the port moves to an address decision (which is neither closed nor refused)."""
    if r.type not in (SOCK_STREAM, SOCK_DGRAM) or r.proto in ICMP_PROTOS:
        return  # raw: the "port" is the protocol; ping: the echo id. Neither is bound
    clash = ports.clashes.get((r.type, r.family, r.src, r.sport))
    if clash is not None:
        _refuse(r, clash)
        return
    connected = (r.state in TCP_CONNECTED_STATES) if r.type == SOCK_STREAM else bool(r.dport)
    try:
        if r.type == SOCK_STREAM and connected:
            mine, how = _tcp_local(r.family, r.src, r.sport, bmap, ports)
        else:
            mine, how = bmap.endpoint(r.src, r.sport), ""
    except PortRangeError as exc:
        _refuse(r, str(exc))
        return
    why: list[str] = []
    moved_port = mine is not None and mine.port != r.sport
    if mine is not None:
        if moved_port:
            r.new_sport = mine.port
        if mine.addr_by is not None and mine.addr != r.src:
            r.new_src = mine.addr
        why.append(mine.why)
    if connected:
        peer_why = _decide_peer(r, bmap, options, ports, mine, how)
        if peer_why is None:
            return  # refused or closed: decided
        why.extend(peer_why)
    if r.new_sport is None and r.new_dport is None and r.new_src is None and r.new_dst is None:
        return
    if r.verdict == NEEDS_ADDRESS and r.new_src is None:
        r.reason = "; ".join([w for w in why if w] + [r.reason])  # the port moves; still
        return  # on an address no rule covers
    before = r.reason.split("; ") if r.verdict == REWRITTEN else []
    if mine is not None:  # its own `src by` is in mine.why
        before = [x for x in before if not x.startswith("src by")]
    r.verdict = REWRITTEN
    r.reason = "; ".join(dict.fromkeys([w for w in why if w] + [x for x in before if x]))


def _decide_peer(r: SocketReport, bmap: BoundMap, options: RewriteOptions,
                 ports: PortContext, mine: Moved | None, how: str) -> list[str] | None:
    """The destination of a connected socket; None when the socket is refused or closed."""
    tcp = r.type == SOCK_STREAM
    peer = fmt_endpoint(r.dst, r.dport)
    try:
        if tcp and (r.family, r.dst, r.dport, r.src, r.sport) in ports.tcp_ends:
            theirs, _ = _tcp_local(r.family, r.dst, r.dport, bmap, ports)
            where = "its peer socket is in this checkpoint"
        elif not tcp and (bound := ports.udp_for(r.family, r.dst, r.dport)) is not None:
            theirs = bmap.endpoint(bound, r.dport)
            if theirs is not None and bound != r.dst:  # a wildcard socket: the address stays
                hit = bmap.lookup(r.dst)
                theirs = Moved(r.dst if hit is None else hit[0], theirs.port,
                               None if hit is None else hit[1], theirs.port_by, theirs.why)
            where = "its peer socket is in this checkpoint"
        elif _peer_in_group(r, bmap):
            theirs = bmap.endpoint(r.dst, r.dport)
            where = "peer moves with the group (restore it with the same map)"
            # The peer works out this end's new endpoint from the map alone: it must come
            # out the same.
            by_rules = bmap.endpoint(r.src, r.sport)
            mine_ep = (r.src, r.sport) if mine is None else (mine.addr, mine.port)
            rules_ep = (r.src, r.sport) if by_rules is None else (by_rules.addr, by_rules.port)
            if mine_ep != rules_ep:
                _refuse(r, f"would split the connection with {peer}: this end moves to "
                           f"{fmt_endpoint(*mine_ep)} ({how or 'by the map'}), but its peer, "
                           f"restored with the same map, will look for it at "
                           f"{fmt_endpoint(*rules_ep)}")
                return None
            if mine_ep != (r.src, r.sport) and not (
                    bmap.lookup(r.src, is_src=True) is not None
                    or bmap.names_endpoint(r.src, r.sport)):
                _refuse(r, f"would split the connection with {peer}: this end moves to "
                           f"{fmt_endpoint(*mine_ep)}, but the map does not move its address "
                           f"{fmt_addr(r.src)}, so its peer, restored with the same map, keeps "
                           f"{fmt_endpoint(r.src, r.sport)}: name this end by address "
                           f"({fmt_endpoint(r.src, r.sport)}=:PORT) or move its address")
                return None
        else:
            if mine is not None and mine.port != r.sport and tcp:
                return _outside_fate(r, options, peer)
            return ["peer outside the map keeps sending to the old port"] \
                if mine is not None and mine.port != r.sport else []
    except PortRangeError as exc:
        _refuse(r, f"its peer {peer}: {exc}")
        return None
    if theirs is None:
        return []
    out = []
    if theirs.port != r.dport:
        r.new_dport = theirs.port
        out.append(f"dst port {r.dport}->{theirs.port} ({where})")
    if theirs.addr != r.dst and (r.new_dst is None or theirs.addr_by is not None):
        r.new_dst = theirs.addr
    return out


def _outside_fate(r: SocketReport, options: RewriteOptions, peer: str) -> list[str] | None:
    """A TCP connection whose local port moves, to a peer that does not move."""
    if options.tcp_outside == "close":
        r.verdict = CLOSED
        r.reason = (f"its local port moves and its peer {peer} is outside the map: restored as "
                    "a closed connection (EOF on read, EPIPE on write; nothing bound)")
        r.new_src = r.new_dst = None
        r.new_sport = r.new_dport = None
        return None
    if options.tcp_outside == "fail":
        _refuse(r, f"its local port moves and its peer {peer} is outside the map and keeps the "
                   "old 4-tuple: this connection cannot survive the move (--tcp-outside fail)")
        return None
    if options.tcp_outside == "nat":
        r.peer_nat = True
        return [NAT_REASON.format(peer=peer)]
    return [f"peer {peer} is outside the map and will reset the connection (fate keep)"]


def log_decision(path: str, off: int, isk: InetSk, d: SocketReport) -> None:
    """One DEBUG line per socket: where, what, the verdict, the new endpoints, why."""
    sport, dport = isk.src_port, isk.dst_port
    new = ""
    if d.new_local is not None or d.new_remote is not None:
        new_l = fmt_endpoint(d.new_src if d.new_src is not None else d.src,
                             sport if d.new_sport is None else d.new_sport)
        new_r = fmt_endpoint(d.new_dst if d.new_dst is not None else d.dst,
                             dport if d.new_dport is None else d.new_dport)
        new = f" => {new_l} -> {new_r}"
    log.debug("%s@%d: socket id %d %s %s %s -> %s: %s%s (%s)", path, off,
              isk.id, d.kind_label, d.state_name if d.type == SOCK_STREAM else "-",
              fmt_endpoint(d.src, sport), fmt_endpoint(d.dst, dport), d.verdict, new, d.reason)




@dataclass(slots=True)
class Decision:
    """What decide() made of one socket, ready to be applied to every entry that agrees with
    it on plan.py's key (every fact decide() reads): the report of the first such socket
    and the new address words (None: that side stays)."""

    report: SocketReport
    src_words: list[int] | None
    dst_words: list[int] | None

    @property
    def changes(self) -> bool:
        r = self.report
        return (self.src_words is not None or self.dst_words is not None
                or r.new_sport is not None or r.new_dport is not None)


def decision(proto: SocketReport, bmap: BoundMap, options: RewriteOptions,
             ports: PortContext | None = None) -> Decision:
    """decide() on `proto` (filled in place), with the new addresses as CRIU words."""
    try:
        decide(proto, bmap, options, ports)
    except RewriteError as exc:  # an `auto` target that cannot be resolved
        raise RewriteError(f"{proto.file}: {exc}") from None
    return Decision(
        proto,
        None if proto.new_src is None else addr_to_words(proto.new_src),
        None if proto.new_dst is None else addr_to_words(proto.new_dst),
    )


# Deciding sockets that differ only in their peer (plan.py): a server with 10,000 clients
# has 10,000 distinct peers but one decision. Without port moves (ports=None), decide()
# reads of a socket's peer (dst, dport) only whether the map moves dst, whether dst is the
# socket's own src and whether dport is 0; the peer's endpoint text goes into some
# reasons. (With port moves it reads much more: plan.py then decides per socket key.)
# Keep these two functions in step with decide(): tests/test_peer_class.py compares them
# with decide() socket by socket.

def peer_class(type_: int, proto: int, state: int, family: int, src_key: object,
               sport: int, dport: int, dst_is_src: bool,
               dst_moved: tuple[IPAddress, str] | None) -> tuple[object, ...]:
    """Sockets with equal peer_class get the same klass, verdict, new_src and new_dst from
    decide(bmap, ports=None), and reasons that differ at most in the peer's endpoint
    (reason_maker). `src_key` stands for src (its address words: cheaper to hash);
    `dst_moved` is bmap.lookup(dst) (plan.py answers it without an address object when
    BoundMap.might_move says the map cannot move dst)."""
    return (type_, proto, state, family, src_key, bool(sport), bool(dport), dst_is_src,
            dst_moved)


def reason_maker(first: SocketReport) -> Callable[[IPAddress, int], str] | None:
    """A function giving the reason decide() gives a socket of first's peer_class whose
    peer is (dst, dport); None when first's reason shows the peer in a way it cannot redo
    (then decide() each such socket)."""
    reason = first.reason
    old = fmt_endpoint(first.dst, first.dport)
    before, found, after = reason.partition(old)
    rest = before + after
    if old in after or fmt_addr(first.dst) in rest or str(first.dst) in rest or (
            str(first.dport) in rest):
        return None
    if not found:
        return lambda dst, dport: reason
    return lambda dst, dport: f"{before}{fmt_endpoint(dst, dport)}{after}"
