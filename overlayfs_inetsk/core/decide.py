"""THE one place where a socket's fate is decided (docs/tcp.md, docs/map.md, docs/design.md).

decide(socket, bound map, options, port context) -> Decision, an immutable record of
everything that is done with the socket and why:
  * klass, verdict, reasons (data: reasons.py renders them at the edges);
  * action: KEEP (the entry stays byte for byte), SET (new addresses and/or ports, the
    new_* fields; None: that side stays), CLOSE (restored as a closed connection);
  * binds: the /proc/net table in which the restore binds the socket's own port (what
    the port check reads), or None;
  * hook: whether CRIU's UPDATE_INETSK hook can apply the decision (what the hook table
    reads): HOOK_SET, HOOK_LEAVE, or why not;
  * and fails(decision, options) says whether it makes the restore fail (--strict).
Nothing else re-derives any of these: plan.py applies `action` to the bytes, the port
check reads `binds`, the hook table reads `hook`, and the planner asks fails().

The facts come from elsewhere: what the socket is (sockets.py: its class), where the map
sends its addresses (boundmap.py) and its ports (ports.py: the moves, and the ones that
cannot be made). Here they are judged: the verdict and, for a TCP connection whose peer
stays (--tcp-outside), the fate, in _outside(): a new fate is added there and in
TCP_FATES.

Pure: a socket's facts and a bound map in, a Decision out.
"""

from __future__ import annotations

from ..errors import RewriteError
from ..record import Record
from .boundmap import BoundMap
from .ports import PortContext, PortMoves, port_moves
from .reasons import (
    ANY_ADDRESS,
    DST_BY,
    ICMP_NOT_BOUND,
    LINK_LOCAL,
    LOOPBACK,
    MULTICAST,
    NO_RULE_RAW,
    NO_RULE_V4,
    NO_RULE_V6,
    NOT_BOUND,
    OUTSIDE_CLOSED,
    OUTSIDE_KEEP,
    OUTSIDE_NAT,
    OUTSIDE_REFUSED,
    PEER_MOVES,
    PORT_OUTSIDE_CLOSED,
    PORT_OUTSIDE_REFUSED,
    SELF,
    SRC_BY,
    Reason,
)
from .sockaddr import (
    AF_INET,
    ICMP_PROTOS,
    SOCK_DGRAM,
    SOCK_RAW,
    SOCK_STREAM,
    TCP_ESTABLISHED,
    IPAddress,
    addr_to_words,
    is_special,
)
from .sockets import MOVED, OUTSIDE, Socket, classify, connected_tcp, is_loopback, own_port_table
from .sockets import SELF as PEER_SELF
from .sockets import peer_of

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from typing import NamedTuple
else:
    from ..record import NamedTuple

# The fates of a TCP connection whose local end moves and whose peer stays (--tcp-outside,
# docs/tcp.md): restored closed; kept on the old 4-tuple (the peer resets it); kept and
# rewritten on the peer's side (nat: core/natrules.py); refused. See _outside().
TCP_FATES = ("close", "keep", "nat", "fail")
DEFAULT_TCP_FATE = "close"

# Verdicts
REWRITTEN = "rewritten"  # addresses (or ports) changed
CLOSED = "closed"  # TCP connection to a peer outside the map, restored closed (fate close)
KEPT = "kept"  # nothing to change and nothing wrong (any address, loopback, unbound, ...)
NEEDS_ADDRESS = "needs-address"  # keeps a specific address no rule covers
REFUSED = "refused"  # cannot be restored as planned (fate fail, a port clash, ...)
VERDICTS = (REWRITTEN, CLOSED, KEPT, NEEDS_ADDRESS, REFUSED)

# Actions (what plan.py does to the entry)
KEEP = "keep"
SET = "set"
CLOSE = "close"

# What the UPDATE_INETSK hook can do with a decision (it changes address words only)
HOOK_SET = "set"  # set the new addresses
HOOK_LEAVE = "leave"  # leave the socket alone
HOOK_NO_PORTS = "ports"  # not: the ports move
HOOK_NO_CLOSED = "closed"  # not: restored closed (state, ports, shutdown change)
HOOK_NO_REFUSED = "refused"  # not: refused


class RewriteOptions(Record):
    """The options of a rewrite: a frozen value (a Record, not a dataclass: ..record)."""

    __slots__ = ("strict", "tcp_outside")
    strict: bool  # a socket left on a specific address no rule covers is an error
    tcp_outside: str  # fate of TCP connected to a peer outside the map

    def __init__(self, strict: bool = False, tcp_outside: str = DEFAULT_TCP_FATE) -> None:
        if tcp_outside not in TCP_FATES:
            raise ValueError(f"tcp_outside must be one of {', '.join(TCP_FATES)}")
        set_ = object.__setattr__
        set_(self, "strict", strict)
        set_(self, "tcp_outside", tcp_outside)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"RewriteOptions is frozen: cannot set {name}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"RewriteOptions is frozen: cannot delete {name}")


class Decision(NamedTuple):
    """What is done with one socket (see the module's docstring). One Decision serves every
    socket that agrees with the one it was made for on every fact decide() read (plan.py's
    key): it names no socket, and its reasons are rendered with each socket's own."""

    klass: str
    verdict: str
    reasons: tuple[Reason, ...]
    action: str = KEEP
    new_src: IPAddress | None = None
    new_dst: IPAddress | None = None
    new_sport: int | None = None
    new_dport: int | None = None
    src_words: tuple[int, ...] | None = None  # new_src as CRIU words (for plan.py)
    dst_words: tuple[int, ...] | None = None
    binds: str | None = None
    hook: str = HOOK_LEAVE
    # fate nat: restored established at its new local endpoint; the peer's side must
    # rewrite the connection (core/natrules.py)
    peer_nat: bool = False


def fails(d: Decision, options: RewriteOptions) -> bool:
    """Whether this decision makes the rewrite fail: a refused socket, and with --strict one
    left on a specific address no rule covers."""
    return d.verdict == REFUSED or (options.strict and d.verdict == NEEDS_ADDRESS)


_new = tuple.__new__  # = Decision(...) without its __new__: decide() runs per socket with
# port moves (10,000 sockets: a few ms)


def _made(klass: str, verdict: str, reasons: tuple[Reason, ...],
          new_src: IPAddress | None = None, new_dst: IPAddress | None = None,
          new_sport: int | None = None, new_dport: int | None = None,
          peer_nat: bool = False) -> Decision:
    """A finding (decide() completes it: _finish)."""
    return _new(Decision, (klass, verdict, reasons, KEEP, new_src, new_dst, new_sport,
                           new_dport, None, None, None, HOOK_LEAVE, peer_nat))


def _finish(s: Socket, d: Decision) -> Decision:
    """d with what follows from its verdict and moves: the action, what it binds, what the
    hook can do, the new addresses as CRIU words."""
    klass, verdict, reasons, _a, new_src, new_dst, new_sport, new_dport = d[:8]
    peer_nat = d.peer_nat
    if verdict == CLOSED:
        return Decision(klass, verdict, reasons, CLOSE, hook=HOOK_NO_CLOSED)
    if verdict == REFUSED:
        return Decision(klass, verdict, reasons, KEEP, hook=HOOK_NO_REFUSED)
    changes = not (new_src is None and new_dst is None and new_sport is None
                   and new_dport is None)
    action = SET if verdict == REWRITTEN or changes else KEEP
    hook = (HOOK_NO_PORTS if new_sport is not None or new_dport is not None
            else HOOK_SET if action == SET else HOOK_LEAVE)
    binds = own_port_table(s.type, s.proto, s.state, s.sport if new_sport is None
                           else new_sport)
    return _new(Decision, (klass, verdict, reasons, action, new_src, new_dst, new_sport,
                           new_dport, None if new_src is None else tuple(addr_to_words(new_src)),
                           None if new_dst is None else tuple(addr_to_words(new_dst)), binds,
                           hook, peer_nat))


def decide(s: Socket, bmap: BoundMap, options: RewriteOptions,
           ports: PortContext | None = None) -> Decision:
    """The fate of socket s. `ports`: the checkpoint's sockets as the port decisions need
    them; given when the map moves ports. RewriteError (naming the file) when an `auto`
    target cannot be resolved."""
    try:
        d = _addresses(s, bmap, options)
        if (ports is not None and d.verdict not in (CLOSED, REFUSED)
                and s.type in (SOCK_STREAM, SOCK_DGRAM) and s.proto not in ICMP_PROTOS):
            # raw: the "port" is the protocol; ping: the echo id. Neither is bound
            d = _ports(d, port_moves(s, bmap, ports, d.new_dst), options)
    except RewriteError as exc:  # an `auto` target that cannot be resolved
        raise RewriteError(f"{s.file}: {exc}") from None
    return _finish(s, d)


def _outside(klass: str, fate: str, port_moves: bool
             ) -> Decision | tuple[tuple[Reason, ...], bool]:
    """THE fate of a TCP connection whose local end moves (its address or, port_moves, its
    port) while its peer stays (--tcp-outside): a Decision (closed, refused), or, for a
    connection that moves on, (its reasons, whether the peer's side rewrites it: nat)."""
    if fate == "close":
        return _made(klass, CLOSED, (Reason(PORT_OUTSIDE_CLOSED if port_moves
                                            else OUTSIDE_CLOSED),))
    if fate == "fail":
        return _made(klass, REFUSED, (Reason(PORT_OUTSIDE_REFUSED if port_moves
                                             else OUTSIDE_REFUSED),))
    if fate == "nat":
        return (Reason(OUTSIDE_NAT),), True
    return (Reason(OUTSIDE_KEEP),), False


def _addresses(s: Socket, bmap: BoundMap, options: RewriteOptions) -> Decision:
    # the lookups in the order the class needs them (an `auto` failure names that rule)
    if (s.type == SOCK_STREAM and s.state == TCP_ESTABLISHED and s.dst != s.src
            and not is_loopback(s.src)):
        dst_hit = bmap.lookup(s.dst)
        src_hit = bmap.lookup(s.src, is_src=True)
    else:
        src_hit = bmap.lookup(s.src, is_src=True)
        dst_hit = bmap.lookup(s.dst)
    klass = classify(s, dst_hit is not None)
    peer = peer_of(s, dst_hit is not None) if (connected_tcp(s) and klass != "loopback") else ""
    if peer == OUTSIDE and src_hit is not None:
        got = _outside(klass, options.tcp_outside, False)
        if isinstance(got, Decision):
            return got
        fate_why, nat = got
        return _made(klass, REWRITTEN, (Reason(SRC_BY, (src_hit[1],)), *fate_why), src_hit[0],
                     peer_nat=nat)
    if src_hit is not None or dst_hit is not None:
        why = []
        if src_hit is not None:
            why.append(Reason(SRC_BY, (src_hit[1],)))
        if dst_hit is not None:
            why.append(Reason(DST_BY, (dst_hit[1],)))
        if peer == PEER_SELF:
            why.append(Reason(SELF))
        elif peer == MOVED:
            why.append(Reason(PEER_MOVES))
        return _made(klass, REWRITTEN, tuple(why), None if src_hit is None else src_hit[0],
                     None if dst_hit is None else dst_hit[0])
    src = s.src
    if src.is_unspecified:
        return _made(klass, KEPT, (Reason(ANY_ADDRESS if s.sport else NOT_BOUND),))
    if is_special(src):
        return _made(klass, KEPT, (Reason(LOOPBACK if is_loopback(src) else LINK_LOCAL),))
    if src.is_multicast:
        return _made(klass, KEPT, (Reason(MULTICAST),))
    if s.proto in ICMP_PROTOS:
        # CRIU 4.2.1 never binds an ICMP socket, ping or raw (open_inet_sk skips inet_bind
        # for IPPROTO_ICMP/ICMPV6; seen here: a raw ICMPv6 socket on fd77::1 came back on
        # `*`): the old address can make nothing fail, and is not restored either
        return _made(klass, KEPT, (Reason(ICMP_NOT_BOUND),))
    # CRIU binds raw sockets without IP_FREEBIND, IPv6 too; other IPv6 ones with it
    code = (NO_RULE_RAW if s.type == SOCK_RAW else NO_RULE_V4 if s.family == AF_INET
            else NO_RULE_V6)
    return _made(klass, NEEDS_ADDRESS, (Reason(code),))


def _ports(d: Decision, pm: PortMoves, options: RewriteOptions) -> Decision:
    """The address decision d of a TCP or UDP socket with its port moves pm added."""
    if pm.refused is not None:
        return _made(d.klass, REFUSED, (pm.refused,))
    why = pm.why
    nat = d.peer_nat
    if pm.outside:  # its local port moves, its peer stays: the connection's fate
        got = _outside(d.klass, options.tcp_outside, True)
        if isinstance(got, Decision):
            return got
        why += got[0]
        nat = nat or got[1]
    new_src = d.new_src if pm.new_src is None else pm.new_src
    new_dst = d.new_dst if pm.new_dst is None else pm.new_dst
    if pm.new_sport is None and pm.new_dport is None and new_src is None and new_dst is None:
        return d
    if d.verdict == NEEDS_ADDRESS and new_src is None:  # the port moves; still on an
        return _made(d.klass, NEEDS_ADDRESS, (*why, *d.reasons), None, new_dst,
                     pm.new_sport, pm.new_dport, nat)  # address no rule covers
    before = d.reasons if d.verdict == REWRITTEN else ()
    if pm.moves_local:  # its own `src by` is in the endpoint's why
        before = tuple([r for r in before if r.code != SRC_BY])
    return _made(d.klass, REWRITTEN, tuple(dict.fromkeys((*why, *before))), new_src,
                 new_dst, pm.new_sport, pm.new_dport, nat)


# Deciding sockets that differ only in their peer (plan.py): a server with 10,000 clients
# has 10,000 distinct peers but one decision. Without port moves (ports=None), decide()
# reads of a socket's peer (dst, dport) only whether the map moves dst, whether dst is the
# socket's own src and whether dport is 0 (no reason holds the peer: reasons.py renders it
# from each socket). With port moves it reads much more: plan.py then decides per socket.
# Keep this in step with decide(): tests/test_peer_class.py compares plan.py's decisions
# with decide() socket by socket.

def peer_class(type_: int, proto: int, state: int, family: int, src_key: object,
               sport: int, dport: int, dst_is_src: bool,
               dst_moved: tuple[IPAddress, str] | None) -> tuple[object, ...]:
    """Sockets with equal peer_class get the same Decision from decide(bmap, ports=None).
    `src_key` stands for src (its address words: cheaper to hash); `dst_moved` is
    bmap.lookup(dst) (plan.py answers it without an address object when
    BoundMap.might_move says the map cannot move dst)."""
    return (type_, proto, state, family, src_key, bool(sport), bool(dport), dst_is_src,
            dst_moved)
