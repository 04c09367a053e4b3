"""The rtnetlink parser (overlayfs_inetsk/node/rtnl.py) on hand-built netlink bytes: what the
kernel sends, and what it must not choke on (truncated messages, NLMSG_ERROR, a reply that
never ends). No root needed; tests/test_nodeaddr.py reads real namespaces."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

import pytest

from overlayfs_inetsk.host import rtnl
from overlayfs_inetsk.host.rtnl import (
    IFA_ADDRESS, IFA_FLAGS, IFA_LOCAL, NLM_F_DUMP_INTR, NLM_F_MULTI, NLMSG_DONE, NLMSG_ERROR,
    RTA_MULTIPATH, RTA_OIF, RTA_PRIORITY, RTM_NEWADDR, RTM_NEWROUTE, Address, Route, collect,
    parse_address, parse_route, split,
)


def attr(atype: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), atype) + value
    return raw + b"\0" * (-len(raw) % 4)


def msg(mtype: int, payload: bytes, seq: int = 7, flags: int = NLM_F_MULTI) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(payload), mtype, flags, seq, 0) + payload
    return raw + b"\0" * (-len(raw) % 4)


def route(dst_len: int = 0, rtype: int = 1, *attrs: bytes) -> bytes:
    return struct.pack("=BBBBBBBBI", socket.AF_INET, dst_len, 0, 0, 254, 3, 0, rtype, 0) + \
        b"".join(attrs)


def address(index: int, flags8: int, scope: int, *attrs: bytes) -> bytes:
    return struct.pack("=BBBBI", socket.AF_INET6, 64, flags8, scope, index) + b"".join(attrs)


def done(seq: int = 7, error: int = 0) -> bytes:
    return msg(NLMSG_DONE, struct.pack("=i", error), seq)


def error(err: int, seq: int = 7) -> bytes:
    return msg(NLMSG_ERROR, struct.pack("=i", -err) + b"\0" * 16, seq, 0)


def feed(*chunks: bytes):
    """A recv() that hands out `chunks`, then fails the test (instead of hanging)."""
    it = iter(chunks)

    def recv() -> bytes:
        try:
            return next(it)
        except StopIteration:
            pytest.fail("collect() asked for more datagrams than the reply has")

    return recv


U32 = struct.Struct("=I").pack
V6 = ipaddress.ip_address("fd77::5")


def test_route_attributes_and_multipath_nexthops():
    hops = struct.pack("=HBBi", 8, 0, 0, 5) + struct.pack("=HBBi", 16, 0, 0, 6) + \
        attr(5, b"\x0a\x4d\x00\x01")  # the second nexthop carries a gateway attribute
    r = parse_route(route(0, 1, attr(RTA_PRIORITY, U32(20)), attr(RTA_MULTIPATH, hops)))
    assert r == Route(dst_len=0, type=1, oif=0, priority=20, nexthops=(5, 6))
    assert parse_route(route(24, 2, attr(RTA_OIF, U32(3)))) == Route(24, 2, 3, None, ())


def test_ifa_flags_overrides_the_u8_flags():
    only_u8 = parse_address(address(2, 0x40, 0, attr(IFA_ADDRESS, V6.packed)))
    assert only_u8 == Address(2, 0, 0x40, None, V6)
    # the u8 says tentative, IFA_FLAGS (the whole u32) says not: IFA_FLAGS wins, both ways
    assert parse_address(address(2, 0x40, 0, attr(IFA_FLAGS, U32(0)))).flags == 0
    assert parse_address(address(2, 0, 0, attr(IFA_FLAGS, U32(0x208)))).flags == 0x208


def test_the_first_of_two_attributes_of_a_type_wins():
    first, second = bytes([10, 77, 0, 1]), bytes([10, 77, 0, 2])
    a = parse_address(address(4, 0, 0, attr(IFA_LOCAL, first), attr(IFA_LOCAL, second)))
    assert a.local == ipaddress.ip_address("10.77.0.1")


def test_local_and_address_are_both_read():
    a = parse_address(address(4, 0, 0, attr(IFA_ADDRESS, bytes([10, 77, 0, 2])),
                              attr(IFA_LOCAL, bytes([10, 77, 0, 1]))))
    assert (a.local, a.address) == (ipaddress.ip_address("10.77.0.1"),
                                    ipaddress.ip_address("10.77.0.2"))


def test_a_multipart_dump_over_several_datagrams_ends_at_done():
    a1 = address(1, 0, 0, attr(IFA_ADDRESS, V6.packed))
    a2 = address(2, 0, 0, attr(IFA_ADDRESS, V6.packed))
    stale = msg(RTM_NEWADDR, a2, seq=6)  # an earlier request's answer: not ours
    got, intr = collect(feed(msg(RTM_NEWADDR, a1) + stale, msg(RTM_NEWADDR, a2), done()), 7)
    assert got == [a1, a2] and not intr
    got, intr = collect(feed(msg(RTM_NEWADDR, a1, flags=NLM_F_MULTI | NLM_F_DUMP_INTR),
                             done()), 7)
    assert got == [a1] and intr


def test_a_single_reply_ends_without_done():
    r = route()
    assert collect(feed(msg(RTM_NEWROUTE, r, flags=0)), 7) == ([r], False)


@pytest.mark.parametrize("reply, err", [
    (error(errno.ENODEV), errno.ENODEV),
    (msg(RTM_NEWADDR, address(1, 0, 0)) + error(errno.EPERM), errno.EPERM),
    (done(error=-errno.EINTR), errno.EINTR),  # a dump that failed half-way
])
def test_an_error_from_the_kernel_is_an_oserror_with_its_errno(reply, err):
    with pytest.raises(OSError) as e:
        collect(feed(reply), 7)
    assert e.value.errno == err


def test_an_ack_ends_the_reply():
    assert collect(feed(error(0)), 7) == ([], False)


GOOD = msg(RTM_NEWADDR, address(1, 0, 0, attr(IFA_ADDRESS, V6.packed)))


@pytest.mark.parametrize("data", [
    GOOD[:10],  # less than a header
    GOOD[:-4],  # the header's length runs past the datagram
    struct.pack("=IHHII", 8, RTM_NEWADDR, NLM_F_MULTI, 7, 0),  # a length shorter than a header
    GOOD + GOOD[:20],  # a whole message, then a truncated one
], ids=["short-header", "truncated", "length-below-header", "trailing-truncated"])
def test_a_truncated_message_raises_ebadmsg(data):
    with pytest.raises(OSError) as e:
        list(split(data))
    assert e.value.errno == errno.EBADMSG
    with pytest.raises(OSError) as e:
        collect(feed(data, done()), 7)
    assert e.value.errno == errno.EBADMSG


@pytest.mark.parametrize("payload, parse", [
    (address(1, 0, 0)[:5], parse_address),  # shorter than ifaddrmsg
    (route()[:11], parse_route),  # shorter than rtmsg
    (address(1, 0, 0) + struct.pack("=HH", 40, IFA_ADDRESS) + V6.packed, parse_address),
    (address(1, 0, 0) + struct.pack("=HH", 2, IFA_ADDRESS), parse_address),  # len < 4: no loop
    (address(1, 0, 0, attr(IFA_ADDRESS, b"\1\2\3")), parse_address),  # not 4 or 16 bytes
    (address(1, 0, 0, attr(IFA_FLAGS, b"\1\2")), parse_address),  # a u32 of 2 bytes
    (route(0, 1, attr(RTA_MULTIPATH, struct.pack("=HBBi", 30, 0, 0, 5))), parse_route),
    (route(0, 1, attr(RTA_MULTIPATH, struct.pack("=HBBi", 0, 0, 0, 5))), parse_route),
], ids=["short-ifaddrmsg", "short-rtmsg", "attr-past-end", "attr-len-2", "addr-3-bytes",
        "u32-2-bytes", "nexthop-past-end", "nexthop-len-0"])
def test_malformed_payloads_raise_ebadmsg(payload, parse):
    with pytest.raises(OSError) as e:
        parse(payload)
    assert e.value.errno == errno.EBADMSG


def test_a_reply_that_stops_is_an_error_not_a_hang():
    with pytest.raises(OSError) as e:
        collect(feed(GOOD, b""), 7)
    assert e.value.errno == errno.EBADMSG


def test_an_interrupted_dump_is_asked_again(monkeypatch):
    """NLM_F_DUMP_INTR: the kernel's tables changed during the dump; ask again (as often as
    DUMP_TRIES), then use the last answer as `ip` does."""
    answers = [([b"old"], True), ([b"new"], False)]
    asked = []

    def ask(self, mtype, flags, body):
        asked.append(mtype)
        return answers.pop(0) if answers else ([b"last"], True)

    monkeypatch.setattr(rtnl.Rtnl, "_ask", ask)
    r = rtnl.Rtnl.__new__(rtnl.Rtnl)
    assert r._dump(1, b"") == [b"new"] and len(asked) == 2
    asked.clear()
    assert r._dump(1, b"") == [b"last"] and len(asked) == rtnl.DUMP_TRIES


class FakeRtnl:
    """Routes and addresses as parsed, for nodeaddr's rules where a real kernel cannot be
    made to list them in the order that tells a right rule from a wrong one (it lists an
    IPv4 primary before its secondaries; a DAD failure keeps the tentative flag too)."""

    def __init__(self, addrs: list[Address]) -> None:
        self.addrs = addrs

    def routes(self, family: int) -> list[Route]:
        return [Route(0, 1, 2, None, ())]

    def addresses(self, family: int, index: int | None = None) -> list[Address]:
        return [a for a in self.addrs if index is None or a.ifindex == index]

    def link_index(self, name: str) -> int | None:
        return 2 if name == "v0" else None


def lookup(family: int, *addrs: Address):
    from overlayfs_inetsk.host.nodeaddr import _lookup_with

    return _lookup_with(FakeRtnl(list(addrs)), family, None, "here")


A4 = [ipaddress.ip_address(f"10.77.0.{i}") for i in range(4)]
A6 = [ipaddress.ip_address(f"fd77::{i}") for i in range(4)]


def test_an_ipv4_secondary_address_counts_an_ipv6_temporary_does_not():
    assert lookup(4, Address(2, 0, 0x01, A4[1], A4[1])) == A4[1]
    assert lookup(6, Address(2, 0, 0x01, None, A6[1]), Address(2, 0, 0, None, A6[2])) == A6[2]


@pytest.mark.parametrize("flag", [0x08, 0x40])  # IFA_F_DADFAILED, IFA_F_TENTATIVE
def test_dad_failed_and_tentative_addresses_are_skipped(flag):
    assert lookup(6, Address(2, 0, flag, None, A6[1]), Address(2, 0, 0x80, None, A6[2])) == A6[2]
    assert lookup(4, Address(2, 0, flag, A4[1], A4[1])) is None


def test_only_the_interfaces_universe_scope_addresses_are_looked_at():
    assert lookup(4, Address(3, 0, 0, A4[1], A4[1]), Address(2, 253, 0, A4[2], A4[2]),
                  Address(2, 0, 0, A4[3], A4[3])) == A4[3]


def test_ifa_local_before_ifa_address():
    assert lookup(4, Address(2, 0, 0, A4[1], A4[2])) == A4[1]
    assert lookup(6, Address(2, 0, 0, None, A6[2])) == A6[2]
    assert lookup(6, Address(2, 0, 0, None, None), Address(2, 0, 0, None, A6[3])) == A6[3]
