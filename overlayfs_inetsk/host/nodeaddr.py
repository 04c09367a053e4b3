"""This node's address for `auto` map targets.

In a network namespace (--netns: /run/netns/NAME or /proc/PID/ns/net; default: our own),
on an interface (--iface; default: the one holding the default route of the family, else
of the other family), the first global address of the family (scope universe, not
tentative, not DAD-failed, not an IPv6 temporary address).

The lookup reads the namespace's routes and addresses over rtnetlink (host/rtnl.py, stdlib
only): a netlink socket belongs to the namespace of the thread that makes it, so the lookup
makes its socket in a thread of its own in the namespace (host/netns.py: no fork).
"""

from __future__ import annotations

import ipaddress
import _socket
from collections.abc import Callable, Iterable

from ..errors import NodeAddressError
from .netns import in_netns

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from .rtnl import Rtnl

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[int], IPAddress | None]

RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1
IFA_F_SECONDARY = 0x01  # IPv6: IFA_F_TEMPORARY
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
_FAMILIES = {4: _socket.AF_INET, 6: _socket.AF_INET6}


def _default_oif(rtnl: Rtnl, af: int) -> int | None:
    """The interface of the default unicast route of `af` with the lowest metric (the first
    nexthop's of a multipath one); None if there is none."""
    best: tuple[int, int] | None = None
    for r in rtnl.routes(af):
        if r.dst_len != 0 or r.type != RTN_UNICAST:
            continue
        oif = r.oif or (r.nexthops[0] if r.nexthops else 0)
        if not oif:
            continue
        prio = r.priority or 0
        if best is None or prio < best[0]:
            best = (prio, oif)
    return None if best is None else best[1]


def _lookup(family: int, iface: str | None, where: str) -> IPAddress | None:
    from .rtnl import Rtnl  # imported here: only `auto` maps need netlink

    with Rtnl() as rtnl:
        return _lookup_with(rtnl, family, iface, where)


def _lookup_with(rtnl: Rtnl, family: int, iface: str | None, where: str) -> IPAddress | None:
    """_lookup() on an open socket (snapshot() asks one socket for every family)."""
    af = _FAMILIES[family]
    if iface is not None:
        found = rtnl.link_index(iface)
        if found is None:
            raise NodeAddressError(f"interface {iface} not found in {where}")
        index = found
    else:
        other = _FAMILIES[10 - family]
        found = _default_oif(rtnl, af) or _default_oif(rtnl, other)
        if found is None:
            raise NodeAddressError(f"no default route in {where}; pass --iface")
        index = found
    bad = IFA_F_TENTATIVE | IFA_F_DADFAILED | (IFA_F_SECONDARY if family == 6 else 0)
    for a in rtnl.addresses(af, index):
        if a.scope != RT_SCOPE_UNIVERSE or a.flags & bad:
            continue
        # IFA_LOCAL is ours; on a point-to-point link IFA_ADDRESS is the peer's
        # (iproute2 shows IFA_LOCAL first too); IPv6 often sends IFA_ADDRESS alone
        addr = a.local or a.address
        if addr:
            return addr
    return None


def node_address(family: int, netns: str | None = None,
                 iface: str | None = None) -> IPAddress | None:
    """This node's address of `family` (4 or 6); None if the interface has none.
    Raises NodeAddressError when the namespace or interface is missing."""
    if family not in _FAMILIES:
        raise ValueError(f"family must be 4 or 6, not {family!r}")
    where = f"netns {netns}" if netns else "our network namespace"
    try:
        return in_netns(netns, lambda: _lookup(family, iface, where))
    except NodeAddressError:
        raise
    except OSError as e:
        raise NodeAddressError(f"{where}: cannot read addresses: {e}") from None


def make_resolver(netns: str | None = None, iface: str | None = None) -> Resolver:
    """A Resolver for core.plan: looks the address up on every call (a node may get its
    address after the mount), raising NodeAddressError for a missing netns/interface."""

    def resolve(family: int) -> IPAddress | None:
        return node_address(family, netns, iface)

    return resolve


# One lookup of every `auto` family, and a Resolver that answers from it: what a view was
# generated from (fuse/ops.py compares two of them to know whether to generate again).
Snapshot = tuple[tuple[int, str], ...]  # ((family, address | "none" | "error: ..."), ...)


def snapshot(families: Iterable[int], netns: str | None = None,
             iface: str | None = None) -> tuple[Snapshot, Resolver]:
    """Look up this node's address of each family now: (what was found, a Resolver that
    answers from it: the address, None, or the NodeAddressError of that lookup again)."""
    found: dict[int, IPAddress | None | NodeAddressError] = {}
    fams = sorted(set(families))
    for fam in fams:
        if fam not in _FAMILIES:
            raise ValueError(f"family must be 4 or 6, not {fam!r}")
    where = f"netns {netns}" if netns else "our network namespace"

    def lookup_all() -> None:  # one thread in the namespace, one netlink socket
        from .rtnl import Rtnl

        with Rtnl() as rtnl:
            for fam in fams:
                try:
                    found[fam] = _lookup_with(rtnl, fam, iface, where)
                except NodeAddressError as e:
                    found[fam] = e

    if fams:
        try:
            in_netns(netns, lookup_all)
        except NodeAddressError as e:
            found.update(dict.fromkeys(fams, e))
        except OSError as e:
            err = NodeAddressError(f"{where}: cannot read addresses: {e}")
            found.update(dict.fromkeys(fams, err))

    def resolve(family: int) -> IPAddress | None:
        got = found.get(family)
        if isinstance(got, NodeAddressError):
            raise NodeAddressError(str(got))
        return got if family in found else node_address(family, netns, iface)

    key = tuple((fam, "none" if v is None else f"error: {v}" if isinstance(v, Exception)
                 else str(v)) for fam, v in found.items())
    return key, resolve


def describe(snap: Snapshot) -> str:
    """'IPv4 10.77.0.2, IPv6 none' (for log lines)."""
    return ", ".join(f"IPv{fam} {v}" for fam, v in snap) or "no auto"


# What bytes planned from a snapshot depend on: only the families the plan asked for (an
# image of IPv4 sockets does not change when the node's IPv6 address does).

def asking(resolve: Resolver, asked: set[int]) -> Resolver:
    """`resolve`, noting in `asked` every family it is asked for."""

    def ask(family: int) -> IPAddress | None:
        asked.add(family)
        return resolve(family)

    return ask


def narrow(snap: Snapshot, asked: Iterable[int]) -> Snapshot:
    """The part of `snap` a plan that asked for the families `asked` depends on."""
    keep = set(asked)
    return tuple((fam, v) for fam, v in snap if fam in keep)


def fits(depends: Snapshot, snap: Snapshot) -> bool:
    """Whether bytes that depend on `depends` (narrow()) are still right for `snap`."""
    now = dict(snap)
    return all(now.get(fam) == v for fam, v in depends)


def families_without(snap: Snapshot) -> frozenset[int]:
    """The families of `snap` with no address (none, or the lookup failed)."""
    return frozenset(fam for fam, v in snap if v == "none" or v.startswith("error: "))


def local_addresses(netns: str | None = None) -> set[IPAddress]:
    """Every address of every interface of the namespace at path `netns` (None: ours), both
    families, in any state: what the restore's binds are checked against (core/addrcheck.py).
    Raises NodeAddressError when the namespace cannot be entered or read."""
    where = f"netns {netns}" if netns else "our network namespace"

    def read() -> set[IPAddress]:
        from .rtnl import Rtnl

        out: set[IPAddress] = set()
        with Rtnl() as rtnl:
            for af in _FAMILIES.values():
                for a in rtnl.addresses(af):
                    out.update(x for x in (a.local, a.address) if x is not None)
        return out

    try:
        return in_netns(netns, read)
    except OSError as e:
        raise NodeAddressError(f"{where}: cannot read addresses: {e}") from None
