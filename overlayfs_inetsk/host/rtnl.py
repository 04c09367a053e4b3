"""Routes, addresses and interface indexes of the caller's network namespace, read over
rtnetlink (an AF_NETLINK/NETLINK_ROUTE socket and struct: stdlib only).

What nodeaddr needs and nothing more: a dump of RTM_GETROUTE or RTM_GETADDR for one family,
and RTM_GETLINK by name. It replaced pyroute2, whose import alone took about 105 ms of every
`mount`, `restore` and CRIU plugin run (issue 12); this module loads `socket` and `struct`.

A netlink socket belongs to the network namespace of the thread that made it: make an Rtnl
inside netns.in_netns's thread, after its setns(). The parsing functions (split, collect,
parse_route, parse_address) are pure, so tests feed them hand-built bytes; malformed input
raises OSError(EBADMSG), a NLMSG_ERROR raises OSError(its errno), and a reply that never
ends is cut short by the socket's timeout (TimeoutError, an OSError too).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import _socket
import struct
from collections.abc import Callable, Iterator

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from typing import NamedTuple, TypeVar
else:
    from ..record import NamedTuple, TypeVar

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NETLINK_ROUTE = 0
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP_INTR = 0x01, 0x02, 0x10
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_DELADDR = 21
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
# the multicast groups an AddressWatch joins: what nodeaddr's answer depends on
RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x10, 0x40
RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE = 0x100, 0x400
WATCH_GROUPS = RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
_ADDR_CHANGES = frozenset((RTM_NEWADDR, RTM_DELADDR))
_ROUTE_CHANGES = frozenset((RTM_NEWROUTE, RTM_DELROUTE))
IFLA_IFNAME = 3
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
RTA_OIF, RTA_PRIORITY, RTA_MULTIPATH = 4, 6, 9
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
IFNAMSIZ = 16

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLATTR = struct.Struct("=HH")  # len, type
RTMSG = struct.Struct("=BBBBBBBBI")  # family dst_len src_len tos table protocol scope type flags
IFADDRMSG = struct.Struct("=BBBBI")  # family prefixlen flags scope index
IFINFOMSG = struct.Struct("=BxHiII")  # family type index flags change
RTNEXTHOP = struct.Struct("=HBBi")  # len flags hops ifindex
U32 = struct.Struct("=I")
ERR = struct.Struct("=i")  # NLMSG_ERROR's and NLMSG_DONE's error (negative errno)
RECV_SIZE = 65536  # a dump's messages are at most 32 KiB each (see MSG_TRUNC below)
DUMP_TRIES = 3  # a dump interrupted by a change (NLM_F_DUMP_INTR) is asked again this often

Message = tuple[int, int, int, bytes]  # (type, flags, seq, payload)


class Route(NamedTuple):
    """What nodeaddr reads of a route: rtmsg's dst_len and type, RTA_OIF (0 if absent),
    RTA_PRIORITY (None if absent) and RTA_MULTIPATH's nexthops' ifindexes."""

    dst_len: int
    type: int
    oif: int
    priority: int | None
    nexthops: tuple[int, ...]


class Address(NamedTuple):
    """What nodeaddr reads of an address: ifaddrmsg's index and scope, the flags (IFA_FLAGS
    when present, else ifaddrmsg's u8), IFA_LOCAL and IFA_ADDRESS (None if absent)."""

    ifindex: int
    scope: int
    flags: int
    local: IPAddress | None
    address: IPAddress | None


def _bad(what: str) -> OSError:
    return OSError(errno.EBADMSG, f"malformed netlink message: {what}")


def _align(n: int) -> int:
    return (n + 3) & ~3


def split(data: bytes) -> Iterator[Message]:
    """The netlink messages of one datagram, each (type, flags, seq, payload)."""
    off = 0
    while off < len(data):
        if len(data) - off < NLMSGHDR.size:
            raise _bad(f"{len(data) - off} bytes left at offset {off}, less than a header")
        length, mtype, flags, seq, _pid = NLMSGHDR.unpack_from(data, off)
        if length < NLMSGHDR.size or off + length > len(data):
            raise _bad(f"length {length} at offset {off} of a {len(data)}-byte datagram")
        yield mtype, flags, seq, data[off + NLMSGHDR.size:off + length]
        off += _align(length)


def attrs(data: bytes, off: int) -> dict[int, bytes]:
    """The attributes from `off` on, type -> payload (the first of a type wins)."""
    out: dict[int, bytes] = {}
    while len(data) - off >= NLATTR.size:
        length, atype = NLATTR.unpack_from(data, off)
        if length < NLATTR.size or off + length > len(data):
            raise _bad(f"attribute length {length} at offset {off} of {len(data)} bytes")
        out.setdefault(atype & NLA_TYPE_MASK, data[off + NLATTR.size:off + length])
        off += _align(length)
    return out


def _u32(value: bytes | None) -> int | None:
    if value is None:
        return None
    if len(value) < U32.size:
        raise _bad(f"a {len(value)}-byte u32 attribute")
    return int(U32.unpack_from(value)[0])


def _ip(value: bytes | None) -> IPAddress | None:
    if value is None:
        return None
    if len(value) not in (4, 16):
        raise _bad(f"a {len(value)}-byte address")
    return ipaddress.ip_address(value)


def _nexthops(data: bytes) -> tuple[int, ...]:
    out = []
    off = 0
    while len(data) - off >= RTNEXTHOP.size:
        length, _flags, _hops, ifindex = RTNEXTHOP.unpack_from(data, off)
        if length < RTNEXTHOP.size or off + length > len(data):
            raise _bad(f"nexthop length {length} at offset {off} of {len(data)} bytes")
        out.append(ifindex)
        off += _align(length)
    return tuple(out)


def parse_route(payload: bytes) -> Route:
    """An RTM_NEWROUTE message's payload (rtmsg + attributes)."""
    if len(payload) < RTMSG.size:
        raise _bad(f"a {len(payload)}-byte route message")
    _fam, dst_len, _src, _tos, _table, _proto, _scope, rtype, _flags = RTMSG.unpack_from(payload)
    a = attrs(payload, RTMSG.size)
    mp = a.get(RTA_MULTIPATH)
    return Route(dst_len, rtype, _u32(a.get(RTA_OIF)) or 0, _u32(a.get(RTA_PRIORITY)),
                 _nexthops(mp) if mp else ())


def parse_address(payload: bytes) -> Address:
    """An RTM_NEWADDR message's payload (ifaddrmsg + attributes)."""
    if len(payload) < IFADDRMSG.size:
        raise _bad(f"a {len(payload)}-byte address message")
    _fam, _plen, flags8, scope, index = IFADDRMSG.unpack_from(payload)
    a = attrs(payload, IFADDRMSG.size)
    flags = _u32(a.get(IFA_FLAGS))
    return Address(index, scope, flags8 if flags is None else flags, _ip(a.get(IFA_LOCAL)),
                   _ip(a.get(IFA_ADDRESS)))


def announces_change(data: bytes) -> bool:
    """Whether a datagram of an AddressWatch announces what a node's `auto` address is read
    from: an address added or removed, or a default route (nodeaddr follows the default
    route's interface; a node's other routes, thousands on some, are no news)."""
    for mtype, _flags, _seq, payload in split(data):
        if mtype in _ADDR_CHANGES:
            return True
        if mtype in _ROUTE_CHANGES and (len(payload) < RTMSG.size or payload[1] == 0):
            return True  # rtmsg's dst_len 0: a default route (a short one: look again)
    return False


def collect(recv: Callable[[], bytes], seq: int) -> tuple[list[bytes], bool]:
    """Read the reply to request `seq`: (the payloads of its data messages, whether the
    kernel flagged the dump as interrupted). A dump ends at NLMSG_DONE, a single reply
    after its one message; an ACK (NLMSG_ERROR 0) ends it too."""
    out: list[bytes] = []
    intr = False
    while True:
        data = recv()
        if not data:
            raise _bad("empty datagram (the reply ended without NLMSG_DONE)")
        for mtype, flags, mseq, payload in split(data):
            if mseq != seq or mtype == NLMSG_NOOP:
                continue  # a late answer to an earlier request
            intr |= bool(flags & NLM_F_DUMP_INTR)
            if mtype in (NLMSG_ERROR, NLMSG_DONE):
                if len(payload) < ERR.size:
                    if mtype == NLMSG_DONE:
                        return out, intr  # old kernels: a DONE without its error field
                    raise _bad(f"a {len(payload)}-byte NLMSG_ERROR")
                err = -int(ERR.unpack_from(payload)[0])
                if err:
                    raise OSError(err, os.strerror(err))
                return out, intr
            if mtype == NLMSG_OVERRUN:
                raise OSError(errno.ENOBUFS, "netlink overrun: data lost")
            out.append(payload)
            if not flags & NLM_F_MULTI:
                return out, intr


class _Netlink:
    """An rtnetlink socket in the namespace of the thread that makes it, bound to the
    multicast `groups` (0: none); `timeout` None: non-blocking."""

    def __init__(self, groups: int, timeout: float | None) -> None:
        self._sock = _socket.socket(
            _socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        try:
            if timeout is None:
                self._sock.setblocking(False)
            else:
                self._sock.settimeout(timeout)
            self._sock.bind((0, groups))
        except BaseException:
            self._sock.close()
            raise

    def __enter__(self: _N) -> _N:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()


_N = TypeVar("_N", bound=_Netlink)


class Rtnl(_Netlink):
    """One rtnetlink socket in the namespace of the thread that makes it."""

    def __init__(self, timeout: float = 10.0) -> None:
        super().__init__(0, timeout)
        self._seq = 0

    def _recv(self) -> bytes:
        data, _anc, flags, _addr = self._sock.recvmsg(RECV_SIZE)
        if flags & _socket.MSG_TRUNC:
            raise OSError(errno.EMSGSIZE, f"netlink message longer than {RECV_SIZE} bytes")
        return data

    def _ask(self, mtype: int, flags: int, body: bytes) -> tuple[list[bytes], bool]:
        self._seq += 1
        self._sock.send(NLMSGHDR.pack(NLMSGHDR.size + len(body), mtype, NLM_F_REQUEST | flags,
                                      self._seq, 0) + body)
        return collect(self._recv, self._seq)

    def _dump(self, mtype: int, body: bytes) -> list[bytes]:
        for _ in range(DUMP_TRIES - 1):
            got, intr = self._ask(mtype, NLM_F_DUMP, body)
            if not intr:
                return got
        return self._ask(mtype, NLM_F_DUMP, body)[0]  # as `ip` does: use it all the same

    def routes(self, family: int) -> list[Route]:
        """Every route of `family` (AF_INET/AF_INET6), of every table."""
        body = RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        return [parse_route(p) for p in self._dump(RTM_GETROUTE, body)]

    def addresses(self, family: int, index: int | None = None) -> list[Address]:
        """Every address of `family`, in the kernel's order (only interface `index`'s)."""
        body = IFADDRMSG.pack(family, 0, 0, 0, 0)
        got = [parse_address(p) for p in self._dump(RTM_GETADDR, body)]
        return got if index is None else [a for a in got if a.ifindex == index]

    def link_index(self, name: str) -> int | None:
        """The index of interface `name`; None if there is none of that name."""
        raw = os.fsencode(name)  # a name from argv may hold surrogate escapes
        if not raw or len(raw) >= IFNAMSIZ or b"\0" in raw:
            return None  # no interface can have that name (the kernel refuses it: ERANGE)
        attr = raw + b"\0"
        body = (IFINFOMSG.pack(_socket.AF_UNSPEC, 0, 0, 0, 0)
                + NLATTR.pack(NLATTR.size + len(attr), IFLA_IFNAME)
                + attr.ljust(_align(len(attr)), b"\0"))
        try:
            got, _ = self._ask(RTM_GETLINK, 0, body)
        except OSError as e:
            if e.errno == errno.ENODEV:
                return None
            raise
        if not got or len(got[0]) < IFINFOMSG.size:
            raise _bad("no link in the RTM_GETLINK reply")
        return int(IFINFOMSG.unpack_from(got[0])[2])


class AddressWatch(_Netlink):
    """A non-blocking rtnetlink socket in the namespace of the thread that makes it, joined
    to the groups that announce address and route changes (WATCH_GROUPS). fileno() is for
    the caller's event loop; changed() reads what is queued."""

    def __init__(self) -> None:
        super().__init__(WATCH_GROUPS, None)

    def fileno(self) -> int:
        return self._sock.fileno()

    def changed(self) -> bool:
        """Read every queued datagram: whether one announced a change. A lost notice (the
        queue overran: ENOBUFS) or a malformed datagram counts as one (look again)."""
        got = False
        while True:
            try:
                data = self._sock.recv(RECV_SIZE)
            except BlockingIOError:
                return got
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                got = True
                continue
            if not data:
                return got
            try:
                got = got or announces_change(data)
            except OSError:  # EBADMSG
                got = True
