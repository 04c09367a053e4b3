"""How CRIU stores inet socket addresses, and names for socket constants.

CRIU keeps an address as repeated uint32 words holding network-order bytes read as a host
u32: one word for AF_INET (CRIU accepts more and uses the first), exactly four for AF_INET6.
"""

from __future__ import annotations

import ipaddress
import _socket

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from typing import Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Linux's values, as CRIU stores them (pycriu defines none of these: its .proto files hold
# plain integers); the socket module has the same ones.
AF_INET = int(_socket.AF_INET)  # 2
AF_INET6 = int(_socket.AF_INET6)  # 10
FAMILY_NAMES = {AF_INET: "ipv4", AF_INET6: "ipv6"}

SOCK_STREAM = int(_socket.SOCK_STREAM)  # 1
SOCK_DGRAM = int(_socket.SOCK_DGRAM)  # 2
SOCK_RAW = int(_socket.SOCK_RAW)  # 3
SOCK_TYPES = {SOCK_STREAM: "stream", SOCK_DGRAM: "dgram", SOCK_RAW: "raw",
              int(_socket.SOCK_SEQPACKET): "seqpacket"}
# SOCK_DGRAM with one of these is a ping socket (net.ipv4.ping_group_range)
ICMP_PROTOS = frozenset({int(_socket.IPPROTO_ICMP), int(_socket.IPPROTO_ICMPV6)})
PROTOCOLS = {0: "ip", _socket.IPPROTO_ICMP: "icmp", _socket.IPPROTO_TCP: "tcp",
             _socket.IPPROTO_UDP: "udp", _socket.IPPROTO_ICMPV6: "icmpv6",
             _socket.IPPROTO_SCTP: "sctp", 136: "udplite"}

# TCP states (include/net/tcp_states.h; neither pycriu nor the socket module names them)
TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
TCP_SYN_RECV = 3
TCP_FIN_WAIT1 = 4
TCP_FIN_WAIT2 = 5
TCP_TIME_WAIT = 6
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8
TCP_LAST_ACK = 9
TCP_LISTEN = 10
TCP_CLOSING = 11
TCP_STATES = {
    TCP_ESTABLISHED: "ESTABLISHED",
    TCP_SYN_SENT: "SYN_SENT",
    TCP_SYN_RECV: "SYN_RECV",
    TCP_FIN_WAIT1: "FIN_WAIT1",
    TCP_FIN_WAIT2: "FIN_WAIT2",
    TCP_TIME_WAIT: "TIME_WAIT",
    TCP_CLOSE: "CLOSE",
    TCP_CLOSE_WAIT: "CLOSE_WAIT",
    TCP_LAST_ACK: "LAST_ACK",
    TCP_LISTEN: "LISTEN",
    TCP_CLOSING: "CLOSING",
}
# TCP states in which the socket has a peer (a 4-tuple that must still agree after a move).
TCP_CONNECTED_STATES = frozenset(TCP_STATES) - {TCP_CLOSE, TCP_LISTEN}

_IPv4 = ipaddress.IPv4Address
_IPv6 = ipaddress.IPv6Address
_ntohl = _socket.ntohl


def words_to_addr(words: Sequence[int], family: int) -> IPAddress:
    """Decode CRIU address words. Raises ValueError when the word count is wrong."""
    # Each word holds network-order bytes read as a host u32: ntohl gives the address's
    # bits as an int (ipaddress builds from an int without parsing bytes).
    if family == AF_INET:
        if len(words) < 1:
            raise ValueError("AF_INET address with no words")
        return _IPv4(_ntohl(words[0]))
    if family == AF_INET6:
        if len(words) != 4:
            raise ValueError(f"AF_INET6 address with {len(words)} words, expected 4")
        w0, w1, w2, w3 = words
        return _IPv6((_ntohl(w0) << 96) | (_ntohl(w1) << 64) | (_ntohl(w2) << 32) | _ntohl(w3))
    raise ValueError(f"unknown address family {family}")


def addr_to_words(addr: IPAddress) -> list[int]:
    n = int(addr)
    if addr.version == 4:
        return [_ntohl(n)]
    return [_ntohl((n >> s) & 0xFFFFFFFF) for s in (96, 64, 32, 0)]


def is_special(addr: IPAddress) -> bool:
    """Addresses a map leaves alone unless a rule names them: unspecified, loopback,
    link-local (and the IPv4-mapped forms of the IPv4 ones)."""
    # ipaddress's is_unspecified/is_loopback/is_link_local, as integer tests (this runs
    # once per distinct address of an image: 10,000 times for 10,000 peers)
    n = int(addr)
    if addr.version == 6:
        if n >> 32 != 0xFFFF:  # not IPv4-mapped
            return n == 0 or n == 1 or n >> 118 == 0x3FA  # ::, ::1, fe80::/10
        n &= 0xFFFFFFFF
    return n == 0 or n >> 24 == 127 or n >> 16 == 0xA9FE  # 0.0.0.0, 127/8, 169.254/16


def is_multicast(addr: IPAddress) -> bool:
    """addr.is_multicast, as an integer test (224.0.0.0/4, ff00::/8)."""
    n = int(addr)
    return n >> 120 == 0xFF if addr.version == 6 else n >> 28 == 0xE


def fmt_addr(addr: IPAddress) -> str:
    """str(addr), with IPv4-mapped IPv6 addresses written the usual way (::ffff:10.0.0.1)."""
    if isinstance(addr, ipaddress.IPv4Address):
        return _ntoa(addr.packed)
    if int(addr) >> 48 and addr.scope_id is None:
        # inet_ntop writes what str() writes (RFC 5952: the longest run of zero groups,
        # the first of equal ones, compressed) except for addresses whose first 80 bits
        # are zero, which it writes with a dotted IPv4 tail: those take the slow way.
        return _ntop(_AF6, addr.packed)
    mapped = addr.ipv4_mapped
    if mapped is not None:
        return f"::ffff:{mapped}"
    return str(addr)


def fmt_endpoint(addr: IPAddress, port: int) -> str:
    return f"[{fmt_addr(addr)}]:{port}" if addr.version == 6 else f"{fmt_addr(addr)}:{port}"


_ntoa = _socket.inet_ntoa
_ntop = _socket.inet_ntop
_AF6 = _socket.AF_INET6
