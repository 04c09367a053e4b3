"""`auto`'s address lookup (overlayfs_inetsk/nodeaddr.py) on real interfaces in a namespace
the test makes."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from overlayfs_inetsk.node.nodeaddr import node_address
from inetsk_testbed.net import scratch_netns


@pytest.fixture
def ptp_netns() -> Iterator[str]:
    """A namespace whose only interface (the default route's) has point-to-point addresses:
    10.77.41.1 peer 10.77.41.2 and fd77::41:1 peer fd77::41:2."""
    with scratch_netns(
        ("link", "add", "p0", "type", "veth", "peer", "name", "p1"),  # no dummy module here
        ("link", "set", "p0", "up"), ("link", "set", "p1", "up"),
        ("addr", "add", "10.77.41.1", "peer", "10.77.41.2", "dev", "p0"),
        ("-6", "addr", "add", "fd77::41:1", "peer", "fd77::41:2", "dev", "p0", "nodad"),
        ("route", "add", "default", "dev", "p0"),
    ) as ns:
        yield ns


@pytest.mark.root
@pytest.mark.parametrize("iface", [None, "p0"])
def test_auto_on_point_to_point_is_the_local_address(ptp_netns, iface):
    """IFA_ADDRESS is the peer there; IFA_LOCAL is ours (as `ip addr` shows it)."""
    assert node_address(4, ptp_netns, iface) == ipaddress.ip_address("10.77.41.1")
    assert node_address(6, ptp_netns, iface) == ipaddress.ip_address("fd77::41:1")
