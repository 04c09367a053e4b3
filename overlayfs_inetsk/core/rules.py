"""The map language's grammar: one rule's text to a Rule, a LocalRule or a PortRule.

Rules are `OLD=NEW` (docs/map.md):
  * `10.0.1.5=10.9.0.7`, `fd00::5=fd09::7`: one address;
  * `10.0.1.0/24=10.9.0.0/24`: a prefix, keeping the host part (lengths must match);
  * `10.0.1.0/24=10.9.0.7`: every address of a prefix to one address;
  * `NEW` may be `auto`: this node's address of that family, resolved when the image is
    generated (the caller supplies the resolver);
  * `local=X` (`local4=`/`local6=`; `local=auto` means both families): every specified,
    non-loopback, non-link-local address the image uses as a local (src) address, of X's
    family, moves to X. Explicit rules win over it.
Port rules move a local endpoint (docs/map.md, "Ports"):
  * `10.0.1.5:80=10.9.0.7:8080`, `[fd00::5]:80=[fd09::7]:8080`: that address and port;
  * `10.0.1.5:80=:8080`: the port only; the address goes where the address rules send it;
  * `:80=:8080`: port 80 on any address (the new side then names no address);
  * a port offset N (`--port-offset`, `port-offset` in a map file): every non-zero local
    port not named by a port rule moves by N (check_port_offset).

Pure: text in, rules out. Which rules may stand together is addrmap.py's; where a rule
sends an address or an endpoint, boundmap.py's.
"""

from __future__ import annotations

import ipaddress
import _socket

from ..errors import MapError
from ..record import Record
from .sockaddr import AF_INET, IPAddress

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from typing import NamedTuple
else:
    from ..record import NamedTuple

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

AUTO = "auto"
MAX_PORT = 65535


class Rule(NamedTuple):
    """An address rule: OLD prefix -> NEW. Kept as integers (a map may hold 100,000 rules:
    no ipaddress object is made for one until it is asked for, see `old` and `new`)."""

    version: int
    net: int  # the OLD prefix's first address
    plen: int  # the OLD prefix's length
    target: int | None  # the NEW address (or NEW prefix's first address); None: auto
    keep_host: bool  # NEW is a prefix (of the same length): the host part is kept
    source: str  # where the rule came from, for messages

    @property
    def old(self) -> Network:
        if self.version == 4:
            return ipaddress.IPv4Network((self.net, self.plen))
        return ipaddress.IPv6Network((self.net, self.plen))

    @property
    def new(self) -> Network | IPAddress | None:
        """A network: keep the host part; an address: all to it; None: auto."""
        if self.target is None:
            return None
        if self.keep_host:
            if self.version == 4:
                return ipaddress.IPv4Network((self.target, self.plen))
            return ipaddress.IPv6Network((self.target, self.plen))
        return _ip(self.version, self.target)

    def __str__(self) -> str:
        return self.source


class PortRule(NamedTuple):
    """`OLD_ADDR:OLD_PORT=NEW_ADDR:NEW_PORT`. old_addr None: any address. new_addr None:
    the address the address rules give (new_auto: this node's address, `auto:PORT`).
    overlaps() and same_target() say which pairs AddressMap refuses (it asks _PortSides,
    which answers the same of a new rule and all earlier ones at once)."""

    old_addr: IPAddress | None
    old_port: int
    new_addr: IPAddress | None
    new_port: int
    source: str
    new_auto: bool = False

    def __str__(self) -> str:
        return self.source

    def overlaps(self, other: "PortRule") -> bool:
        """Whether one endpoint could match both old sides."""
        return self.old_port == other.old_port and (
            self.old_addr is None or other.old_addr is None or self.old_addr == other.old_addr
        )

    def same_target(self, other: "PortRule") -> bool:
        """Whether the two rules can send two endpoints onto one (address, port), whatever
        the address rules do: the same new port and the same new address, or no new
        address and old sides that can share an address."""
        if self.new_port != other.new_port:
            return False
        if self.new_addr is not None and other.new_addr is not None:
            return self.new_addr == other.new_addr
        if self.new_addr is not None or other.new_addr is not None or self.new_auto \
                or other.new_auto:
            return False  # one names its address, the other keeps the mapped one: checked per socket
        return self.old_addr is None or other.old_addr is None or self.old_addr == other.old_addr


class LocalRule(Record):  # a Record, not a dataclass: ..record
    __slots__ = ("version", "new", "source")
    version: int
    new: IPAddress | None  # None: auto
    source: str

    def __init__(self, version: int, new: IPAddress | None, source: str) -> None:
        self.version, self.new, self.source = version, new, source


def _unmap(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


_pton = _socket.inet_pton
_AF6 = _socket.AF_INET6
_IPv4, _IPv6 = ipaddress.IPv4Address, ipaddress.IPv6Address
_MAPPED = 0xFFFF  # n >> 32 of an IPv4-mapped IPv6 address (::ffff:a.b.c.d)


def _ip(version: int, n: int) -> IPAddress:
    return _IPv4(n) if version == 4 else _IPv6(n)


def _addr_int(text: str) -> tuple[int, int] | None:
    """(version, integer) of an address, unmapped (::ffff:a.b.c.d is IPv4); None when
    inet_pton does not take it (then ipaddress gives the answer or the message). On every
    text both accept, they agree (ipaddress also takes an IPv6 scope, `%eth0`)."""
    try:
        if ":" in text:
            n = int.from_bytes(_pton(_AF6, text), "big")
            if n >> 32 == _MAPPED:
                return 4, n & 0xFFFFFFFF
            return 6, n
        return 4, int.from_bytes(_pton(AF_INET, text), "big")
    except (OSError, ValueError):
        return None


def _parse_addr(text: str, source: str, what: str) -> IPAddress:
    got = _addr_int(text)
    if got is not None:
        return _IPv4(got[1]) if got[0] == 4 else _IPv6(got[1])
    try:
        return _unmap(ipaddress.ip_address(text))
    except ValueError:
        raise MapError(f"{source}: {what} {text!r} is not an IPv4 or IPv6 address") from None


def _parse_net(text: str, source: str, what: str) -> tuple[int, int, int]:
    """(version, first address, prefix length) of an address or prefix, an IPv4-mapped
    one read as IPv4."""
    if "/" not in text:
        got = _addr_int(text)
        if got is None:
            got = (a := _parse_addr(text, source, what)).version, int(a)
        return got[0], got[1], 32 if got[0] == 4 else 128
    addr_s, _, len_s = text.partition("/")
    if len_s.isascii() and len_s.isdigit():  # a length, as ipaddress reads one
        plen = int(len_s)
        six = ":" in addr_s
        try:
            n = int.from_bytes(_pton(_AF6 if six else AF_INET, addr_s), "big")
        except (OSError, ValueError):
            n, plen = 0, -1
        bits = 128 if six else 32
        if 0 <= plen <= bits and not n & ((1 << (bits - plen)) - 1):
            if six and plen >= 96 and n >> 32 == _MAPPED:
                return 4, n & 0xFFFFFFFF, plen - 96
            return (6 if six else 4), n, plen
    # anything else (a netmask, host bits set, a bad length): ipaddress's answer or message
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise MapError(f"{source}: {what} {text!r} is not a valid prefix ({exc})") from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return 4, int(mapped), net.prefixlen - 96
    return net.version, int(net.network_address), net.prefixlen


def _parse_port(text: str, source: str, spec: str) -> int:
    if not text.isdigit():
        raise MapError(f"{source}: rule {spec!r}: port {text!r} is not a number")
    port = int(text)
    if port == 0:
        raise MapError(f"{source}: rule {spec!r}: port 0 is no port (an unbound socket)")
    if port > MAX_PORT:
        raise MapError(f"{source}: rule {spec!r}: port {port} is out of range (1-{MAX_PORT})")
    return port


def _split_endpoint(text: str, source: str, spec: str) -> tuple[str, str | None]:
    """(address text, port text or None). `[v6]:port`, `v4:port`, `auto:port`, `:port`;
    a bare address (IPv6 ones unbracketed too) has no port."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise MapError(f"{source}: rule {spec!r}: {text!r} lacks the closing ]")
        addr, rest = text[1:close], text[close + 1:]
        if not rest:
            return addr, None
        if not rest.startswith(":"):
            raise MapError(f"{source}: rule {spec!r}: {text!r}: expected :PORT after ]")
        return addr, rest[1:]
    if text.count(":") == 1:
        addr, port = text.split(":")
        return addr, port
    return text, None


def _parse_port_rule(spec: str, source: str, old_s: str, new_s: str) -> PortRule | None:
    """A PortRule if either side names a port, else None (an address rule)."""
    old_a, old_p = _split_endpoint(old_s, source, spec)
    new_a, new_p = _split_endpoint(new_s, source, spec)
    if old_p is None and new_p is None:
        return None
    if old_p is None or new_p is None:
        raise MapError(f"{source}: rule {spec!r}: a port rule needs a port on both sides "
                       "(ADDR:PORT=ADDR:PORT, ADDR:PORT=:PORT or :PORT=:PORT)")
    old_port = _parse_port(old_p, source, spec)
    new_port = _parse_port(new_p, source, spec)
    old_addr: IPAddress | None = None
    if old_a:
        if "/" in old_a:
            raise MapError(f"{source}: rule {spec!r}: a port rule takes one address, not a prefix")
        old_addr = _parse_addr(old_a, source, "old address")
    new_addr: IPAddress | None = None
    auto = new_a.lower() == AUTO
    if new_a and not auto:
        if "/" in new_a:
            raise MapError(f"{source}: rule {spec!r}: a port rule takes one address, not a prefix")
        new_addr = _parse_addr(new_a, source, "new address")
    if old_addr is None and (new_addr is not None or auto):
        raise MapError(f"{source}: rule {spec!r}: :PORT (any address) cannot name a new "
                       "address; give the old address (ADDR:PORT=NEW:PORT)")
    if old_addr is not None and new_addr is not None and old_addr.version != new_addr.version:
        raise MapError(f"{source}: maps IPv{old_addr.version} to IPv{new_addr.version}")
    return PortRule(old_addr, old_port, new_addr, new_port, source, auto)


def parse_rule(spec: str, source: str) -> Rule | list[LocalRule] | PortRule:
    if spec.count("=") != 1:
        raise MapError(f"{source}: rule {spec!r} must have the form OLD=NEW")
    old_s, new_s = spec.split("=")
    old_s, new_s = old_s.strip(), new_s.strip()
    if not old_s or not new_s:
        raise MapError(f"{source}: rule {spec!r} has an empty side")
    # what makes _split_endpoint see a port (else neither side has one: an address rule)
    if old_s[0] == "[" or new_s[0] == "[" or old_s.count(":") == 1 or new_s.count(":") == 1:
        prule = _parse_port_rule(spec, source, old_s, new_s)
        if prule is not None:
            return prule
    if old_s.startswith("[") and old_s.endswith("]"):
        old_s = old_s[1:-1]
    if new_s.startswith("[") and new_s.endswith("]"):
        new_s = new_s[1:-1]
    key = old_s.lower()
    if key in ("local", "local4", "local6"):
        if new_s.lower() == AUTO:
            versions = {"local": (4, 6), "local4": (4,), "local6": (6,)}[key]
            return [LocalRule(v, None, source) for v in versions]
        if "/" in new_s:
            raise MapError(f"{source}: {old_s} takes one address or auto, not a prefix")
        new = _parse_addr(new_s, source, "new address")
        if key != "local" and new.version != int(key[-1]):
            raise MapError(f"{source}: {old_s} needs an IPv{key[-1]} address, got {new_s}")
        return [LocalRule(new.version, new, source)]
    version, net, plen = _parse_net(old_s, source, "old address")
    if new_s.lower() == AUTO:
        return Rule(version, net, plen, None, False, source)
    if "/" in new_s:
        new_version, new_net, new_plen = _parse_net(new_s, source, "new prefix")
        if new_version != version:
            raise MapError(f"{source}: maps IPv{version} to IPv{new_version}")
        if new_plen != plen:
            raise MapError(
                f"{source}: prefix lengths differ (/{plen} vs /{new_plen}); "
                "give NEW as one address to map the whole prefix to it"
            )
        return Rule(version, net, plen, new_net, True, source)
    got = _addr_int(new_s)
    if got is None:
        got = (a := _parse_addr(new_s, source, "new address")).version, int(a)
    if got[0] != version:
        raise MapError(f"{source}: maps IPv{version} to IPv{got[0]}")
    return Rule(version, net, plen, got[1], False, source)


def check_port_offset(offset: int, source: str) -> int:
    """The offset if a port can take it at all (|N| < 65535), else MapError."""
    if not -MAX_PORT < offset < MAX_PORT:
        raise MapError(f"{source}: port offset {offset} is out of range "
                       f"(-{MAX_PORT - 1}..{MAX_PORT - 1})")
    return offset

