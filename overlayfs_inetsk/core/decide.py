"""THE one place that decides what happens to a socket: its class, its verdict, the reason,
and its new addresses (docs/tcp.md, docs/design.md).

Pure: a decoded inet socket entry and a bound address map in, a SocketReport out. Nothing
here reads or writes image bytes (entries.py does) or walks a tree (plan.py does).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import RewriteError
from .addrmap import BoundMap
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
    fmt_endpoint,
    is_special,
)

log = logging.getLogger(__name__)

TCP_FATES = ("close", "keep", "fail")
DEFAULT_TCP_FATE = "close"

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


def decide(r: SocketReport, bmap: BoundMap, options: RewriteOptions) -> None:
    """Fill klass, verdict, reason, new_src, new_dst of one socket."""
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


def log_decision(path: str, off: int, isk: object, d: SocketReport) -> None:
    """One DEBUG line per socket: where, what, the verdict, the new endpoints, why."""
    sport, dport = isk.src_port, isk.dst_port  # type: ignore[attr-defined]
    new = ""
    if d.new_src is not None or d.new_dst is not None:
        new_l = fmt_endpoint(d.new_src if d.new_src is not None else d.src, sport)
        new_r = fmt_endpoint(d.new_dst if d.new_dst is not None else d.dst, dport)
        new = f" => {new_l} -> {new_r}"
    log.debug("%s@%d: socket id %d %s %s %s -> %s: %s%s (%s)", path, off,
              isk.id, d.kind_label, d.state_name if d.type == SOCK_STREAM else "-",  # type: ignore[attr-defined]
              fmt_endpoint(d.src, sport), fmt_endpoint(d.dst, dport), d.verdict, new, d.reason)




@dataclass(slots=True)
class Decision:
    """What decide() made of one socket, ready to be applied to every entry that agrees with
    it on plan.py's key (every fact decide() reads): the report of the first such socket
    and the new address words (None: that side stays)."""

    report: SocketReport
    src_words: list[int] | None
    dst_words: list[int] | None


def decision(proto: SocketReport, bmap: BoundMap, options: RewriteOptions) -> Decision:
    """decide() on `proto` (filled in place), with the new addresses as CRIU words."""
    try:
        decide(proto, bmap, options)
    except RewriteError as exc:  # an `auto` target that cannot be resolved
        raise RewriteError(f"{proto.file}: {exc}") from None
    return Decision(
        proto,
        None if proto.new_src is None else addr_to_words(proto.new_src),
        None if proto.new_dst is None else addr_to_words(proto.new_dst),
    )
