"""What an inet socket of a checkpoint is: its facts (Socket, as its entry says), their
names for messages and tables, and its class (docs/tcp.md): the facts decide.py decides
from. Nothing here says what happens to a socket.

Pure: values in, values out.
"""

from __future__ import annotations

from .sockaddr import (
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
    fmt_endpoint,
)

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from typing import NamedTuple
else:
    from ..record import NamedTuple

UDPLITE = 136  # IPPROTO_UDPLITE (the socket module has no name for it)


class Socket(NamedTuple):
    """One inet socket entry of a checkpoint's socket image, as decoded."""

    file: str  # the socket image, as messages name it
    offset: int  # of its entry in that file
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
        if is_ping(self.type, self.proto):
            return "ping"
        return self.proto_name

    @property
    def kind_label(self) -> str:
        """kind with the family's digit (the -v log lines): tcp4, ping6, raw udp4."""
        if self.type == SOCK_RAW:
            return f"raw {self.proto_label}"
        if is_ping(self.type, self.proto):
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


def is_ping(type_: int, proto: int) -> bool:
    """A ping socket: SOCK_DGRAM with IPPROTO_ICMP/ICMPV6 (net.ipv4.ping_group_range)."""
    return type_ == SOCK_DGRAM and proto in ICMP_PROTOS


def is_loopback(addr: IPAddress) -> bool:
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def own_port_table(type_: int, proto: int, state: int, sport: int) -> str | None:
    """The /proc/net table ("tcp", "udp", "udplite") in which a restore binds this socket's
    own local port: a listener, a bound TCP socket, a UDP or UDP-Lite socket with a port;
    None for what binds no port of its own: a TCP connection (it shares its listener's),
    a socket without a port, a raw socket (its "port" is the protocol) and a ping socket
    (its "port" is the echo id: CRIU 4.2.1 binds no ICMP socket)."""
    if not sport:
        return None
    if type_ == SOCK_STREAM:
        return None if state in TCP_CONNECTED_STATES else "tcp"
    if type_ == SOCK_DGRAM and proto not in ICMP_PROTOS:
        return "udplite" if proto == UDPLITE else "udp"
    return None


# Connected TCP states other than ESTABLISHED, by class (docs/tcp.md). TIME_WAIT sockets
# belong to no process, so CRIU never dumps one: the class is there for completeness.
_TCP_STATE_CLASSES = {
    TCP_SYN_SENT: "tcp-syn-sent", TCP_SYN_RECV: "tcp-syn-sent",
    TCP_FIN_WAIT1: "tcp-half-closed", TCP_FIN_WAIT2: "tcp-half-closed",
    TCP_CLOSE_WAIT: "tcp-half-closed", TCP_LAST_ACK: "tcp-half-closed",
    TCP_CLOSING: "tcp-half-closed", TCP_TIME_WAIT: "tcp-time-wait",
}

# Where a connected TCP socket's peer goes (peer_of)
SELF = "self"  # the same address: the process or its host talks to itself
MOVED = "moved"  # a rule moves the peer's address: a group member
OUTSIDE = "outside"  # the peer stays where it was
_PEER_CLASSES = {SELF: "tcp-self", MOVED: "tcp-peer-moved", OUTSIDE: "tcp-peer-outside"}


def connected_tcp(s: Socket) -> bool:
    """A TCP socket with a peer (a 4-tuple that must still agree after a move)."""
    return s.type == SOCK_STREAM and s.state in TCP_CONNECTED_STATES


def peer_of(s: Socket, dst_moves: bool) -> str:
    """SELF, MOVED or OUTSIDE (see above); `dst_moves`: the map moves s.dst."""
    if s.dst == s.src:
        return SELF
    return MOVED if dst_moves else OUTSIDE


def classify(s: Socket, dst_moves: bool) -> str:
    """The socket's class (docs/tcp.md); `dst_moves`: the map moves s.dst."""
    tcp = s.type == SOCK_STREAM
    if tcp and s.state == TCP_LISTEN:
        return "listener"
    # the type first: a raw or ping socket restores differently from UDP on any address
    if s.type == SOCK_RAW:
        return "raw"
    if is_ping(s.type, s.proto):
        return "ping"
    if is_loopback(s.src):
        return "loopback"
    if tcp:
        if s.state not in TCP_CONNECTED_STATES:
            return "unconnected"
        if s.state in _TCP_STATE_CLASSES:
            return _TCP_STATE_CLASSES[s.state]
        return _PEER_CLASSES[peer_of(s, dst_moves)]
    if s.type == SOCK_DGRAM:
        return "udp-connected" if s.dport else "udp-bound"
    return "other"
