"""How CRIU stores inet socket addresses, and names for socket constants.

CRIU keeps an address as repeated uint32 words holding network-order bytes read as a host
u32: one word for AF_INET (CRIU accepts more and uses the first), exactly four for AF_INET6.
"""

from __future__ import annotations

import ipaddress
import sys
from typing import Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

AF_INET = 2
AF_INET6 = 10
FAMILY_NAMES = {AF_INET: "ipv4", AF_INET6: "ipv6"}

SOCK_TYPES = {1: "stream", 2: "dgram", 3: "raw", 5: "seqpacket"}
PROTOCOLS = {0: "ip", 1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp", 136: "udplite"}

TCP_ESTABLISHED = 1
TCP_CLOSE = 7
TCP_LISTEN = 10
TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
}
# TCP states in which the socket has a peer (a 4-tuple that must still agree after a move).
TCP_CONNECTED_STATES = frozenset({1, 2, 3, 4, 5, 6, 8, 9, 11})

_ORDER = sys.byteorder


def words_to_addr(words: Sequence[int], family: int) -> IPAddress:
    """Decode CRIU address words. Raises ValueError when the word count is wrong."""
    if family == AF_INET:
        if len(words) < 1:
            raise ValueError("AF_INET address with no words")
        return ipaddress.IPv4Address(words[0].to_bytes(4, _ORDER))
    if family == AF_INET6:
        if len(words) != 4:
            raise ValueError(f"AF_INET6 address with {len(words)} words, expected 4")
        return ipaddress.IPv6Address(b"".join(w.to_bytes(4, _ORDER) for w in words))
    raise ValueError(f"unknown address family {family}")


def addr_to_words(addr: IPAddress) -> list[int]:
    packed = addr.packed
    return [int.from_bytes(packed[i : i + 4], _ORDER) for i in range(0, len(packed), 4)]


def is_special(addr: IPAddress) -> bool:
    """Addresses a map leaves alone unless a rule names them: unspecified, loopback,
    link-local (and the IPv4-mapped forms of the IPv4 ones)."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_unspecified or addr.is_loopback or addr.is_link_local


def fmt_addr(addr: IPAddress) -> str:
    """str(addr), with IPv4-mapped IPv6 addresses written the usual way (::ffff:10.0.0.1)."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return f"::ffff:{addr.ipv4_mapped}"
    return str(addr)


def fmt_endpoint(addr: IPAddress, port: int) -> str:
    return f"[{fmt_addr(addr)}]:{port}" if addr.version == 6 else f"{addr}:{port}"
