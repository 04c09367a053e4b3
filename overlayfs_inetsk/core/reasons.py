"""Why a socket is treated as it is, as data: a Reason is a code and its fields, and a
decision carries a tuple of them (decide.py). Nothing decides from a reason's text, and no
text is made until an edge asks for it (a table, the JSON, an error, a log line): text()
renders them, with the socket they are about (its own peer and addresses are not repeated
in the fields, so one decision serves every socket of its class).

Pure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .sockaddr import fmt_addr, fmt_endpoint
from .sockets import Socket

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from typing import NamedTuple
else:
    from ..record import NamedTuple


class Reason(NamedTuple):
    code: str
    args: tuple[object, ...] = ()


# -- codes -----------------------------------------------------------------------------
# addresses
SRC_BY = "src-by"  # (rule source,)
DST_BY = "dst-by"  # (rule source,)
SELF = "self"
PEER_MOVES = "peer-moves"
ANY_ADDRESS = "any-address"
NOT_BOUND = "not-bound"
LOOPBACK = "loopback"
LINK_LOCAL = "link-local"
MULTICAST = "multicast"
ICMP_NOT_BOUND = "icmp-not-bound"
NO_RULE_RAW = "no-rule-raw"
NO_RULE_V4 = "no-rule-v4"
NO_RULE_V6 = "no-rule-v6"
# a TCP connection whose peer stays, by fate (OUTSIDE_*: its address moves; PORT_OUTSIDE_*:
# its local port moves)
OUTSIDE_CLOSED = "outside-closed"
OUTSIDE_REFUSED = "outside-refused"
OUTSIDE_KEEP = "outside-keep"
OUTSIDE_NAT = "outside-nat"  # kept established, the peer's side rewrites it
PORT_OUTSIDE_CLOSED = "port-outside-closed"
PORT_OUTSIDE_REFUSED = "port-outside-refused"
OLD_PORT = "old-port"  # a connected UDP socket whose port moves, its peer outside
# ports
SRC_AND_PORT_BY = "src-and-port-by"  # (port, new port, rule source)
PORT_BY = "port-by"  # (port, new port, rule source)
PORT_WITH_LISTENER = "port-with-listener"  # (port, new port, the listener's address)
DST_PORT_PEER_SOCKET = "dst-port-peer-socket"  # (dport, new dport)
DST_PORT_PEER_MOVES = "dst-port-peer-moves"  # (dport, new dport)
PORT_CLASH = "port-clash"  # see _clash
PORT_RANGE = "port-range"  # (port, offset, new port, offset source)
PEER_PORT_RANGE = "peer-port-range"  # the same, of the peer's endpoint
SPLIT = "split"  # (new addr, new port, how it moves, addr the peer looks at, port)
SPLIT_ADDRESS = "split-address"  # (new addr, new port)

_PEER_MOVES = "peer moves with the group (restore it with the same map)"
_CLOSED = "restored as a closed connection (EOF on read, EPIPE on write; nothing bound)"
_NO_RULE = "no rule covers {}: "


def _clash(s: Socket, a: tuple[object, ...]) -> str:
    x_new, port, x_by, y_file, y_id, y_src, y_sport, y_by = a
    how = f" by {x_by}" if x_by else " (stays)"
    other = f" by {y_by}" if y_by else " (stays)"
    return (f"two sockets onto one port: {s.local} goes to {_ep(x_new, port)}{how}, where "
            f"{y_file}: socket id {y_id} ({_ep(y_src, y_sport)}) also goes{other}")


def _range(a: tuple[object, ...]) -> str:
    port, offset, new, source = a
    return f"port {port} {offset:+d} = {new} is out of range (1-65535) ({source})"


def _ep(addr: object, port: object) -> str:
    return fmt_endpoint(addr, port)  # type: ignore[arg-type]


def _split(s: Socket, a: tuple[object, ...]) -> str:
    addr, port, how, at_addr, at_port = a
    return (f"would split the connection with {s.remote}: this end moves to {_ep(addr, port)} "
            f"({how or 'by the map'}), but its peer, restored with the same map, will look "
            f"for it at {_ep(at_addr, at_port)}")


def _split_address(s: Socket, a: tuple[object, ...]) -> str:
    return (f"would split the connection with {s.remote}: this end moves to "
            f"{_ep(a[0], a[1])}, but the map does not move its address {fmt_addr(s.src)}, so "
            f"its peer, restored with the same map, keeps {s.local}: name this end by "
            f"address ({s.local}=:PORT) or move its address")


_TEXT: dict[str, Callable[[Socket, tuple[object, ...]], str]] = {
    SRC_BY: lambda s, a: f"src by {a[0]}",
    DST_BY: lambda s, a: f"dst by {a[0]}",
    SELF: lambda s, a: "connected to itself",
    PEER_MOVES: lambda s, a: _PEER_MOVES,
    ANY_ADDRESS: lambda s, a: "bound to any address",
    NOT_BOUND: lambda s, a: "not bound",
    LOOPBACK: lambda s, a: "loopback address",
    LINK_LOCAL: lambda s, a: "link-local address",
    MULTICAST: lambda s, a: "multicast address",
    ICMP_NOT_BOUND: lambda s, a: (f"no rule covers {s.src}; CRIU does not bind an ICMP "
                                  "socket, so the address is not restored"),
    NO_RULE_RAW: lambda s, a: (_NO_RULE.format(s.src) + "bind fails (Cannot assign "
                               "requested address; raw sockets get no IP_FREEBIND) unless "
                               "this node has it"),
    NO_RULE_V4: lambda s, a: (_NO_RULE.format(s.src) + "bind fails (Cannot assign requested "
                              "address) unless this node has it"),
    NO_RULE_V6: lambda s, a: (_NO_RULE.format(s.src) + "binds anyway (IP_FREEBIND) and is "
                              "unreachable unless this node has it"),
    OUTSIDE_CLOSED: lambda s, a: f"peer {s.remote} is outside the map: {_CLOSED}",
    OUTSIDE_REFUSED: lambda s, a: (f"peer {s.remote} is outside the map and keeps the old "
                                   "4-tuple: this connection cannot survive the move "
                                   "(--tcp-outside fail; close or keep would let the restore "
                                   "go on)"),
    OUTSIDE_KEEP: lambda s, a: (f"peer {s.remote} is outside the map and will reset the "
                                "connection (fate keep)"),
    OUTSIDE_NAT: lambda s, a: (f"peer {s.remote} is outside the map: kept established, the "
                               "peer's side must follow (fate nat: overlayfs-inetsk "
                               "nat-rules)"),
    PORT_OUTSIDE_CLOSED: lambda s, a: (f"its local port moves and its peer {s.remote} is "
                                       f"outside the map: {_CLOSED}"),
    PORT_OUTSIDE_REFUSED: lambda s, a: (f"its local port moves and its peer {s.remote} is "
                                        "outside the map and keeps the old 4-tuple: this "
                                        "connection cannot survive the move (--tcp-outside "
                                        "fail)"),
    OLD_PORT: lambda s, a: "peer outside the map keeps sending to the old port",
    SRC_AND_PORT_BY: lambda s, a: f"src and port {a[0]}->{a[1]} by {a[2]}",
    PORT_BY: lambda s, a: f"port {a[0]}->{a[1]} by {a[2]}",
    PORT_WITH_LISTENER: lambda s, a: f"port {a[0]}->{a[1]} with its listener {_ep(a[2], a[0])}",
    DST_PORT_PEER_SOCKET: lambda s, a: (f"dst port {a[0]}->{a[1]} (its peer socket is in "
                                        "this checkpoint)"),
    DST_PORT_PEER_MOVES: lambda s, a: f"dst port {a[0]}->{a[1]} ({_PEER_MOVES})",
    PORT_CLASH: _clash,
    PORT_RANGE: lambda s, a: _range(a),
    PEER_PORT_RANGE: lambda s, a: f"its peer {s.remote}: {_range(a)}",
    SPLIT: _split,
    SPLIT_ADDRESS: _split_address,
}


def text(reasons: Iterable[Reason], s: Socket) -> str:
    """The reasons of socket s's decision as one line, as tables, the JSON, errors and log
    lines show them."""
    return "; ".join(_TEXT[r.code](s, r.args) for r in reasons)
