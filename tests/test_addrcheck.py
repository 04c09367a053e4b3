"""addrcheck: which addresses a restore binds the target namespace does not have (pure), and
the namespace's addresses as host/nodeaddr.local_addresses reads them (a scratch netns)."""

from __future__ import annotations

import ipaddress as ip

from overlayfs_inetsk.core.addrcheck import absent
from overlayfs_inetsk.core.portcheck import Want
from overlayfs_inetsk.core.sockaddr import AF_INET, AF_INET6
from overlayfs_inetsk.host.nodeaddr import local_addresses
import pytest

from inetsk_testbed.netns import scratch_netns

A = ip.ip_address
HAVE = {A("10.77.0.2"), A("fd77::2"), A("127.0.0.1"), A("::1")}


def want(addr: str, proto: str = "tcp", port: int = 80) -> Want:
    a = A(addr)
    return Want(proto, AF_INET6 if a.version == 6 else AF_INET, a, port, "files.img: socket id 7")


def test_only_specific_addresses_the_namespace_lacks_are_named():
    wants = [want("10.77.0.2"), want("fd77::2"), want("0.0.0.0"), want("::"),
             want("127.0.0.9"), want("::1"), want("fe80::1"), want("::ffff:10.77.0.2"),
             want("10.77.0.99"), want("fd77::99", "udp", 53), want("::ffff:10.77.0.98")]
    got = absent(wants, HAVE, "netns /run/netns/b")
    assert [g.want.addr for g in got] == [A("10.77.0.99"), A("fd77::99"), A("::ffff:10.77.0.98")]
    assert str(got[0]) == ("files.img: socket id 7: tcp 10.77.0.99:80: 10.77.0.99 is not an "
                           "address of netns /run/netns/b: the restore fails there (bind: "
                           "Cannot assign requested address)")
    assert str(got[1]) == ("files.img: socket id 7: udp [fd77::99]:53: fd77::99 is not an "
                           "address of netns /run/netns/b: it binds anyway (IP_FREEBIND) and "
                           "is unreachable there")
    # a dual-stack socket on a mapped address is bound as IPv4: it fails like one
    assert "10.77.0.98 is not an address" in str(got[2]) and "Cannot assign" in str(got[2])


def test_a_mapped_address_of_the_namespace_counts_as_its_ipv4():
    assert absent([want("10.77.0.2")], {A("::ffff:10.77.0.2")}, "x") == []


@pytest.mark.root
def test_local_addresses_reads_every_interface_of_the_namespace():
    setup = ["link add d0 type veth peer name d1", "link set d0 up",
             "addr add 10.77.33.4/24 dev d0",
             "addr add fd77::33:4/64 dev d0 nodad",
             "addr add 10.77.34.5/24 dev d1"]
    with scratch_netns(*(c.split() for c in setup)) as ns:
        got = local_addresses(ns)
    assert {A("10.77.33.4"), A("fd77::33:4"), A("10.77.34.5")} <= got  # d1 down: still its
    assert A("10.77.0.99") not in got
