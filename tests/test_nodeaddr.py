"""`auto`'s address lookup (overlayfs_inetsk/host/nodeaddr.py over host/rtnl.py) on real
interfaces in namespaces the test makes; `ip` (iproute2) is the independent oracle: each
test checks with it that the namespace is what the test means (e.g. that the address that
must be skipped is the one the kernel lists first), so a lookup that ignored the rule fails.

Every namespace holds a veth pair v0/v1 (both ends in it, so each has carrier) with
10.77.50.1/24 + fd77::50:1 on v0 and 10.77.51.1/24 + fd77::51:1 on v1 (no DAD), unless a
test says otherwise."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
from collections.abc import Iterator, Sequence

import pytest

from overlayfs_inetsk.errors import NodeAddressError
from overlayfs_inetsk.host import rtnl
from overlayfs_inetsk.host.netns import check_netns, in_netns
from overlayfs_inetsk.host.nodeaddr import node_address, snapshot
from inetsk_testbed.netns import scratch_netns

pytestmark = pytest.mark.root

ip_address = ipaddress.ip_address
ADDR = {("v0", 4): "10.77.50.1", ("v0", 6): "fd77::50:1",
        ("v1", 4): "10.77.51.1", ("v1", 6): "fd77::51:1"}
GW = {("v0", 4): "10.77.50.254", ("v0", 6): "fd77::50:fe",
      ("v1", 4): "10.77.51.254", ("v1", 6): "fd77::51:fe"}
VETH: list[Sequence[str]] = [("link", "add", "v0", "type", "veth", "peer", "name", "v1"),
                             ("link", "set", "v0", "up"), ("link", "set", "v1", "up")]
TWO_LINKS: list[Sequence[str]] = VETH + [
    ("addr", "add", f"{ADDR[dev, 4]}/24", "dev", dev) for dev in ("v0", "v1")] + [
    ("-6", "addr", "add", f"{ADDR[dev, 6]}/64", "dev", dev, "nodad") for dev in ("v0", "v1")]


def default(dev: str, family: int, *extra: str) -> tuple[str, ...]:
    return (f"-{family}", "route", "add", "default", "via", GW[dev, family], "dev", dev, *extra)


def ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", os.path.basename(ns), *args], check=True,
                          capture_output=True, text=True).stdout


def ip_json(ns: str, *args: str) -> list[dict]:
    return json.loads(ip(ns, "-j", *args) or "[]")


def default_routes(ns: str, family: int) -> list[dict]:
    """`ip`'s default unicast routes of every table, in the kernel's dump order."""
    return [r for r in ip_json(ns, f"-{family}", "route", "show", "table", "all", "default")
            if r.get("type", "unicast") == "unicast"]


def addresses(ns: str, family: int, dev: str) -> list[dict]:
    return [a for link in ip_json(ns, f"-{family}", "addr", "show", "dev", dev)
            for a in link["addr_info"]]


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


@pytest.mark.parametrize("iface", [None, "p0"])
def test_auto_on_point_to_point_is_the_local_address(ptp_netns, iface):
    """IFA_ADDRESS is the peer there; IFA_LOCAL is ours (as `ip addr` shows it)."""
    assert addresses(ptp_netns, 4, "p0")[0]["address"] == "10.77.41.2"  # the peer's
    assert node_address(4, ptp_netns, iface) == ip_address("10.77.41.1")
    assert node_address(6, ptp_netns, iface) == ip_address("fd77::41:1")


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("dev", ["v0", "v1"])
def test_the_default_routes_interface_is_chosen(family, dev):
    with scratch_netns(*TWO_LINKS, default(dev, family), default(dev, 10 - family)) as ns:
        assert [r["dev"] for r in default_routes(ns, family)] == [dev]
        assert node_address(family, ns) == ip_address(ADDR[dev, family])


# (table, dev, metric) of each default route, the interface that must win
METRICS = {
    "main, v0 lower": ([("main", "v0", "10"), ("main", "v1", "20")], "v0"),
    "main, v1 lower": ([("main", "v0", "20"), ("main", "v1", "10")], "v1"),
    # table 100 is dumped before main: the winner is not the first route listed
    "main lower, listed later": ([("100", "v0", "20"), ("main", "v1", "5")], "v1"),
    "table 100 lower": ([("100", "v0", "5"), ("main", "v1", "20")], "v0"),
}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("case", list(METRICS))
def test_the_default_route_of_lowest_metric_wins(family, case):
    routes, winner = METRICS[case]
    setup = [default(dev, family, "metric", metric, "table", table)
             for table, dev, metric in routes]
    with scratch_netns(*TWO_LINKS, *setup) as ns:
        listed = default_routes(ns, family)
        assert len(listed) == 2
        assert min(listed, key=lambda r: r.get("metric", 0))["dev"] == winner  # ip agrees
        if case == "main lower, listed later":
            assert listed[0]["dev"] != winner
        assert node_address(family, ns) == ip_address(ADDR[winner, family])


@pytest.mark.parametrize("family", [4, 6])
def test_a_default_route_that_is_not_unicast_is_not_the_default_route(family):
    """A `local` default route on v0 (lowest metric) is no way out: v1's unicast one is."""
    with scratch_netns(*TWO_LINKS, (f"-{family}", "route", "add", "local", "default", "dev",
                                    "v0", "metric", "1"),
                       default("v1", family, "metric", "10")) as ns:
        listed = ip_json(ns, f"-{family}", "route", "show", "table", "all", "default")
        assert sorted((r.get("type", "unicast"), r["dev"]) for r in listed) == [
            ("local", "v0"), ("unicast", "v1")]
        assert node_address(family, ns) == ip_address(ADDR["v1", family])


@pytest.mark.parametrize("family", [4, 6])
def test_iface_names_the_interface(family):
    with scratch_netns(*TWO_LINKS, default("v1", 4), default("v1", 6)) as ns:
        assert node_address(family, ns, "v0") == ip_address(ADDR["v0", family])
        assert node_address(family, ns, "v1") == ip_address(ADDR["v1", family])


@pytest.mark.parametrize("family", [4, 6])
def test_the_other_familys_default_route_when_the_family_has_none(family):
    """Only the other family has a default route (via v1): its interface is used."""
    with scratch_netns(*TWO_LINKS, default("v1", 10 - family)) as ns:
        assert default_routes(ns, family) == []
        assert node_address(family, ns) == ip_address(ADDR["v1", family])


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("order", [("v0", "v1"), ("v1", "v0")])
def test_a_multipath_default_route_uses_its_first_nexthop(family, order):
    hops = [w for dev in order for w in ("nexthop", "via", GW[dev, family], "dev", dev)]
    with scratch_netns(*TWO_LINKS, (f"-{family}", "route", "add", "default", *hops)) as ns:
        (listed,) = default_routes(ns, family)
        assert "dev" not in listed  # really one route with nexthops
        # the kernel keeps the nexthops in the order given (seen for both families here)
        assert [h["dev"] for h in listed["nexthops"]] == list(order)
        assert node_address(family, ns) == ip_address(ADDR[order[0], family])


def test_link_and_host_scope_ipv4_addresses_are_skipped():
    with scratch_netns(*VETH, ("addr", "add", "10.77.52.1/24", "dev", "v0", "scope", "link"),
                       ("addr", "add", "10.77.53.1/24", "dev", "v0", "scope", "host"),
                       ("route", "add", "default", "dev", "v0")) as ns:
        assert node_address(4, ns) is None  # none of universe scope
        ip(ns, "addr", "add", "10.77.50.1/24", "dev", "v0")
        scopes = [a["scope"] for a in addresses(ns, 4, "v0")]
        assert sorted(scopes[:2]) == ["host", "link"] and scopes[2:] == ["global"]
        assert node_address(4, ns) == ip_address("10.77.50.1")


def test_link_local_ipv6_addresses_are_skipped():
    """The kernel lists IPv6 global addresses before link-local ones: an interface with
    link-local ones only has no address for `auto`."""
    with scratch_netns(*VETH, ("-6", "addr", "add", "fe80::77:1/64", "dev", "v0", "nodad"),
                       ("-6", "route", "add", "default", "dev", "v0")) as ns:
        assert [a["scope"] for a in addresses(ns, 6, "v0")][:1] == ["link"]
        assert node_address(6, ns) is None
        assert node_address(6, ns, "v0") is None


def test_a_tentative_ipv6_address_is_skipped():
    """v1 (the peer) is down: v0 has no carrier, so DAD never finishes and an address added
    without nodad stays tentative; the kernel lists it first (newest first)."""
    with scratch_netns(*VETH[:2], ("link", "set", "v0", "up"),
                       ("-6", "addr", "add", "fd77::50:1/64", "dev", "v0", "nodad"),
                       ("-6", "addr", "add", "fd77::50:2/64", "dev", "v0"),
                       default("v0", 6)) as ns:
        first = addresses(ns, 6, "v0")[0]
        assert (first["local"], first.get("tentative")) == ("fd77::50:2", True)
        assert node_address(6, ns) == ip_address("fd77::50:1")
        ip(ns, "-6", "addr", "del", "fd77::50:1/64", "dev", "v0")
        assert node_address(6, ns) is None


def test_an_ipv6_temporary_address_is_skipped():
    """Privacy extensions: `mngtmpaddr` with use_tempaddr=2 makes the kernel add a temporary
    address (IFA_F_TEMPORARY, the same bit as IFA_F_SECONDARY) listed before it."""
    with scratch_netns(*VETH) as ns:
        subprocess.run(["ip", "netns", "exec", os.path.basename(ns), "sysctl", "-q", "-w",
                        "net.ipv6.conf.v0.use_tempaddr=2", "net.ipv6.conf.v0.accept_dad=0"],
                       check=True)
        ip(ns, "-6", "addr", "add", "fd77::50:1/64", "dev", "v0", "mngtmpaddr")
        ip(ns, "-6", "route", "add", "default", "via", "fd77::50:fe", "dev", "v0")
        first, second = addresses(ns, 6, "v0")[:2]
        assert first.get("temporary") and first["scope"] == "global"
        assert second["local"] == "fd77::50:1"
        assert node_address(6, ns) == ip_address("fd77::50:1")


def test_no_default_route_is_an_error_naming_the_namespace():
    with scratch_netns(*TWO_LINKS) as ns:
        with pytest.raises(NodeAddressError) as e:
            node_address(4, ns)
        assert str(e.value) == f"no default route in netns {ns}; pass --iface"
        assert node_address(4, ns, "v1") == ip_address(ADDR["v1", 4])  # --iface still works


def _an_interface_only_outside() -> list[str]:
    names = [n for _, n in socket.if_nameindex() if n not in ("lo", "v0", "v1")]
    return names[:1]


@pytest.mark.parametrize("iface", ["nope", "x" * 20, "", "\udcff0"] + _an_interface_only_outside())
def test_an_unknown_interface_is_an_error(iface):
    """Looked up in the namespace: an interface of our own namespace is unknown there."""
    with scratch_netns(*TWO_LINKS, default("v0", 4)) as ns:
        with pytest.raises(NodeAddressError) as e:
            node_address(4, ns, iface)
        assert str(e.value) == f"interface {iface} not found in netns {ns}"


@pytest.mark.parametrize("kind", ["missing", "regular file", "mount namespace", "directory"])
def test_a_path_that_is_no_network_namespace(tmp_path, kind):
    path = {"missing": str(tmp_path / "nope"), "regular file": str(tmp_path / "f"),
            "mount namespace": "/proc/self/ns/mnt", "directory": str(tmp_path)}[kind]
    (tmp_path / "f").write_text("")
    with pytest.raises(NodeAddressError) as e:
        node_address(4, path)
    reason = "No such file or directory" if kind == "missing" else "Invalid argument"
    assert str(e.value) == f"netns {path}: {reason}"
    with pytest.raises(NodeAddressError) as e:
        check_netns(path)
    reason = "no such file" if kind == "missing" else "not a network namespace"
    assert str(e.value) == f"netns {path}: {reason}"


def test_snapshot_reads_both_families_with_one_socket(monkeypatch):
    made = []
    real_init = rtnl.Rtnl.__init__

    def init(self, *a, **k):
        made.append(1)
        real_init(self, *a, **k)

    monkeypatch.setattr(rtnl.Rtnl, "__init__", init)
    with scratch_netns(*TWO_LINKS, default("v1", 4)) as ns:
        key, resolve = snapshot([6, 4], ns)
        assert key == ((4, "10.77.51.1"), (6, "fd77::51:1"))
        assert resolve(4) == ip_address("10.77.51.1") and len(made) == 1


def test_hundreds_of_addresses_and_routes_are_read_completely(monkeypatch):
    """600 addresses (and their 600 local routes): each dump takes several recv() calls;
    every address comes back, in `ip`'s order."""
    recvs: list[int] = []
    real_recv = rtnl.Rtnl._recv

    def recv(self):
        data = real_recv(self)
        recvs.append(len(data))
        return data

    monkeypatch.setattr(rtnl.Rtnl, "_recv", recv)
    many = [f"10.77.{100 + i // 200}.{1 + i % 200}" for i in range(600)]
    batch = "".join(f"addr add {a}/32 dev v0 scope link\n" for a in many[:-1])
    batch += f"addr add {many[-1]}/32 dev v0\n"  # the only global one: listed last
    with scratch_netns(*VETH, ("route", "add", "default", "dev", "v0")) as ns:
        subprocess.run(["ip", "-n", os.path.basename(ns), "-batch", "-"], input=batch,
                       text=True, check=True)
        listed = [a["local"] for a in addresses(ns, 4, "v0")]
        assert sorted(listed) == sorted(many) and listed[-1] == many[-1]

        def read() -> tuple[list[str], int, int, int]:
            with rtnl.Rtnl() as r:
                index = r.link_index("v0")
                assert index is not None
                del recvs[:]
                got = [str(a.local) for a in r.addresses(socket.AF_INET, index)]
                n_addr = len(recvs)
                del recvs[:]
                return got, n_addr, len(r.routes(socket.AF_INET)), len(recvs)

        got, addr_recvs, nroutes, route_recvs = in_netns(ns, read)
        assert got == listed
        assert addr_recvs >= 2 and route_recvs >= 2 and nroutes >= 600
        assert node_address(4, ns) == ip_address(many[-1])


def test_in_netns_enters_another_namespace_and_not_its_own():
    """Another namespace: fn runs in a thread of its own that setns()es (it sees that
    namespace's inode); this thread's own: fn runs right here, no thread, no setns (the
    plugin's CLI route on a node's own namespace: no ctypes)."""
    import threading

    def where() -> tuple[int, int]:
        return threading.get_ident(), os.stat("/proc/thread-self/ns/net").st_ino

    here = where()
    assert in_netns("/proc/self/ns/net", where) == here
    assert in_netns(f"/proc/{os.getpid()}/task/{threading.get_native_id()}/ns/net",
                    where) == here
    with scratch_netns() as ns:
        ident, ino = in_netns(ns, where)
        assert ident != here[0] and ino == os.stat(ns).st_ino != here[1]
    assert where() == here
