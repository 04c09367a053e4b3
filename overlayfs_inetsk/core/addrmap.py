"""The address map: where the checkpoint's addresses (and ports) move to on this node.
Long: the whole map language (address, local, port rules, the port offset, map files), its
checks and its binding to one image are read together.

Rules are `OLD=NEW`:
  * `10.0.1.5=10.9.0.7`, `fd00::5=fd09::7`: one address;
  * `10.0.1.0/24=10.9.0.0/24`: a prefix, keeping the host part (lengths must match);
  * `10.0.1.0/24=10.9.0.7`: every address of a prefix to one address;
  * `NEW` may be `auto`: this node's address of that family, resolved when the image is
    generated (the caller supplies the resolver);
  * `local=X` (`local4=`/`local6=`; `local=auto` means both families): every specified,
    non-loopback, non-link-local address the image uses as a local (src) address, of X's
    family, moves to X. Explicit rules win over it.
The environment form of CRIU's sample plugin, `INETSK_LOCAL_IPV4=<ipv4>`, means
`local4=<ipv4>` (and `INETSK_LOCAL_IPV6` likewise) unless a `local` rule is given.

Port rules move a local endpoint (docs/map.md, "Ports"):
  * `10.0.1.5:80=10.9.0.7:8080`, `[fd00::5]:80=[fd09::7]:8080`: that address and port;
  * `10.0.1.5:80=:8080`: the port only; the address goes where the address rules send it;
  * `:80=:8080`: port 80 on any address (the new side then names no address);
  * a port offset N (`--port-offset`, `port-offset` in a map file): every non-zero local
    port not named by a port rule moves by N.

Pure: no I/O but reading map files.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

from ..errors import MapError, PortRangeError, RewriteError
from .sockaddr import (
    AF_INET,
    IPAddress,
    addr_to_words,
    is_multicast,
    is_special,
    words_to_addr,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[int], IPAddress | None]

ENV_LOCAL = {4: "INETSK_LOCAL_IPV4", 6: "INETSK_LOCAL_IPV6"}
AUTO = "auto"


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


@dataclass(frozen=True)
class LocalRule:
    version: int
    new: IPAddress | None  # None: auto
    source: str


def _unmap(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


_pton = socket.inet_pton
_AF6 = socket.AF_INET6
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


MAX_PORT = 65535


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


PORT_OFFSET_KEY = "port-offset"
NOT_REGULAR = "not a regular file (a symlink is not followed)"


def open_regular_file(path: str) -> int:
    """An fd of the regular file at path, opened without following a symlink in the last
    component (O_NOFOLLOW) and without waiting for a FIFO's writer (O_NONBLOCK), then
    checked with fstat: what was checked is what is read (an lstat and then an open could
    read a symlink swapped in between). OSError; for a symlink, a FIFO, a device or a
    socket its strerror is NOT_REGULAR."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a symlink; a socket
            raise OSError(exc.errno, NOT_REGULAR, path) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, NOT_REGULAR, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


# A map or options file may come with a checkpoint (the plugin reads the images dir's):
# one that says it is bigger is refused before it is read. 100,000 rules take 3.5 MB.
MAX_FILE_BYTES = 64 << 20


def read_regular_file(path: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a map or options file, read from open_regular_file's fd; OSError
    (EFBIG) for one of more than `limit` bytes (a sparse file of 100 GB, e.g., in a
    checkpoint), checked before reading and while reading (a file that grows)."""
    fd = open_regular_file(path)
    try:
        size = os.fstat(fd).st_size
        chunks = []
        got = 0
        while size <= limit and (chunk := os.read(fd, min(1 << 20, limit + 1 - got))):
            chunks.append(chunk)
            got += len(chunk)
            size = max(size, got)
        if size > limit:
            raise OSError(errno.EFBIG, f"{size} bytes or more, past the limit of {limit} "
                          "bytes for a map or options file", path)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _load_map_file(path: str) -> tuple[list[tuple[str, str]], int | None]:
    """(spec, source) pairs from a TOML or JSON map file, and its port offset if it has one.

    Either form holds a table `map` of OLD -> NEW and/or a list `rules` of "OLD=NEW", and
    optionally `port-offset`, an integer.
    """
    try:
        raw = read_regular_file(path)
    except OSError as exc:
        raise MapError(f"{path}: cannot read map file: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MapError(f"{path}: map file is not UTF-8 text") from None
    doc: object
    if path.endswith(".json") or text.lstrip().startswith("{"):
        import json  # here, not at the top: only map files need it (start-up time)

        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MapError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    else:
        import tomllib

        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise MapError(f"{path}: invalid TOML: {exc}") from None
    if not isinstance(doc, dict):
        raise MapError(f"{path}: top level must be a table/object")
    unknown = set(doc) - {"map", "rules", PORT_OFFSET_KEY}
    if unknown:
        raise MapError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} "
                       f"(expected map, rules, {PORT_OFFSET_KEY})")
    offset: int | None = None
    if PORT_OFFSET_KEY in doc:
        raw_off = doc[PORT_OFFSET_KEY]
        if not isinstance(raw_off, int) or isinstance(raw_off, bool):
            raise MapError(f"{path}: {PORT_OFFSET_KEY} must be an integer")
        offset = check_port_offset(raw_off, f"{path}: {PORT_OFFSET_KEY}")
    out: list[tuple[str, str]] = []
    table = doc.get("map", {})
    if not isinstance(table, dict):
        raise MapError(f"{path}: `map` must be a table of OLD = NEW")
    for old, new in table.items():
        if not isinstance(new, str):
            raise MapError(f"{path}: map[{old!r}] must be a string")
        out.append((f"{old}={new}", f"{path}: map[{old!r}]"))
    rules = doc.get("rules", [])
    if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
        raise MapError(f"{path}: `rules` must be a list of \"OLD=NEW\" strings")
    for i, r in enumerate(rules):
        out.append((r, f"{path}: rules[{i}]"))
    return out, offset


def check_port_offset(offset: int, source: str) -> int:
    """The offset if a port can take it at all (|N| < 65535), else MapError."""
    if not -MAX_PORT < offset < MAX_PORT:
        raise MapError(f"{source}: port offset {offset} is out of range "
                       f"(-{MAX_PORT - 1}..{MAX_PORT - 1})")
    return offset


class _Prefixes:
    """One IP version's address rules by prefix length: what the overlap check and the
    lookups ask, a dict lookup per prefix length in use (a map of 100,000 rules uses a few)
    instead of a pass over every rule. Two CIDR prefixes overlap when one holds the other:
    an earlier rule holding the new one is found in `exact` at its (shorter or equal)
    length, an earlier one inside the new one in `under` at the new one's length."""

    __slots__ = ("bits", "exact", "under", "members", "tables")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        # length -> {prefix >> (bits - length): position in AddressMap.rules}
        self.exact: dict[int, dict[int, int]] = {}
        # length -> {prefix of a rule at least that long, cut to that length: the first
        # such rule's position}; made for a length when a rule of that length is checked
        self.under: dict[int, dict[int, int]] = {}
        self.members: list[tuple[int, int, int]] = []  # (net, length, position), in order
        self.tables: list[tuple[int, dict[int, int]]] = []  # (shift, exact[length])

    def place(self, net: int, plen: int, pos: int) -> int | None:
        """Add net/plen as the rule at `pos`, unless a rule added before overlaps it: then
        the first such rule's position (and nothing is added)."""
        bits = self.bits
        found: int | None = None
        exact = self.exact
        for length, table in exact.items():
            if length <= plen:
                hit = table.get(net >> (bits - length))
                if hit is not None and (found is None or hit < found):
                    found = hit
        under = self.under
        mine = under.get(plen)
        if mine is None:  # the first rule of this length: rules at least as long, cut
            mine = under[plen] = {}
            shift = bits - plen
            for m_net, m_len, m_pos in self.members:
                if m_len >= plen:
                    mine.setdefault(m_net >> shift, m_pos)
        hit = mine.get(net >> (bits - plen))
        if hit is not None and (found is None or hit < found):
            found = hit
        if found is not None:
            return found
        got = exact.get(plen)
        if got is None:
            got = exact[plen] = {}
            self.tables.append((bits - plen, got))
        table = got
        table[net >> (bits - plen)] = pos
        for length, cut in under.items():
            if length <= plen:
                cut.setdefault(net >> (bits - length), pos)
        self.members.append((net, plen, pos))
        return None

    def find(self, n: int) -> int | None:
        """The position of the rule holding address n (at most one: rules never overlap)."""
        for shift, table in self.tables:
            pos = table.get(n >> shift)
            if pos is not None:
                return pos
        return None


def _akey(addr: IPAddress | None) -> int | None:
    """A dict key for an address that hashes fast (an ipaddress object hashes through
    hex()): its integer, IPv6 ones above every IPv4 one."""
    if addr is None:
        return None
    return int(addr) if addr.version == 4 else int(addr) | 1 << 128


class _PortSides:
    """The port rules' old and new sides, so that AddressMap._add finds the first earlier
    rule a new one clashes with by a few dict lookups (what PortRule.overlaps and
    PortRule.same_target answer of each pair). Every key is unique among accepted rules
    (a second one would have clashed), so each dict's first value is its earliest rule.
    Addresses are keyed by _akey (None: any address)."""

    __slots__ = ("old", "named", "kept")

    def __init__(self) -> None:
        # old port -> {old address: position}
        self.old: dict[int, dict[int | None, int]] = {}
        # (new port, new address) -> position, for rules naming their new address
        self.named: dict[tuple[int, int | None], int] = {}
        # new port -> {old address: position}, for rules keeping the mapped address
        self.kept: dict[int, dict[int | None, int]] = {}

    @staticmethod
    def _first(group: dict[int | None, int] | None, addr: int | None) -> int | None:
        """The first rule of group whose old address can be addr (None: any address)."""
        if not group:
            return None
        if addr is None:
            return next(iter(group.values()))
        # a group never holds both: a rule for any address and one for addr would clash
        got = group.get(addr)
        return got if got is not None else group.get(None)

    def place(self, r: PortRule, pos: int) -> tuple[int, bool] | None:
        """Add r as the rule at `pos`, unless it clashes with an earlier rule: then (the
        first such rule's position, whether they overlap (else they move onto one port))
        and nothing is added."""
        old_key = _akey(r.old_addr)
        over = self._first(self.old.get(r.old_port), old_key)
        same: int | None = None
        new_key = None
        if r.new_addr is not None:
            new_key = _akey(r.new_addr)
            same = self.named.get((r.new_port, new_key))
        elif not r.new_auto:
            same = self._first(self.kept.get(r.new_port), old_key)
        if over is not None and (same is None or over <= same):
            return over, True
        if same is not None:
            return same, False
        self.old.setdefault(r.old_port, {})[old_key] = pos
        if r.new_addr is not None:
            self.named[(r.new_port, new_key)] = pos
        elif not r.new_auto:
            self.kept.setdefault(r.new_port, {})[old_key] = pos
        return None


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """The cyclic garbage collector paused while a map is made: the rules and indexes hold
    no cycles, and the collections their allocations set off took a fifth of a 100,000-rule
    load, the map file's parse included (bench/bench_map.py). Only the caller that paused
    it resumes it (another thread's load that finds it paused leaves it be)."""
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


@dataclass
class AddressMap:
    rules: list[Rule] = field(default_factory=list)
    local: dict[int, LocalRule] = field(default_factory=dict)
    port_rules: list[PortRule] = field(default_factory=list)
    port_offset: int = 0
    port_offset_source: str = ""
    _prefixes: dict[int, _Prefixes] = field(
        default_factory=lambda: {4: _Prefixes(32), 6: _Prefixes(128)}, repr=False, compare=False)
    _port_sides: _PortSides = field(default_factory=_PortSides, repr=False, compare=False)

    @classmethod
    def from_args(
        cls,
        specs: Sequence[str] = (),
        files: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        port_offset: int | None = None,
    ) -> "AddressMap":
        """`port_offset`: --port-offset (None: not given). It may not be given twice (on the
        command line and in a map file, or in two files)."""
        with _no_gc():
            return cls._from_args(specs, files, env, port_offset)

    @classmethod
    def _from_args(cls, specs: Sequence[str], files: Sequence[str],
                   env: Mapping[str, str] | None, port_offset: int | None) -> "AddressMap":
        pairs: list[tuple[str, str]] = []
        amap = cls()
        for path in files:
            got, offset = _load_map_file(path)
            pairs.extend(got)
            if offset is not None:
                amap._set_offset(offset, f"{path}: {PORT_OFFSET_KEY}")
        if port_offset is not None:
            amap._set_offset(check_port_offset(port_offset, f"--port-offset {port_offset}"),
                             f"--port-offset {port_offset}")
        pairs.extend((s, f"--map {s}") for s in specs)
        add = amap._add
        for spec, source in pairs:
            add(parse_rule(spec, source))
        if env is not None:
            for version, name in ENV_LOCAL.items():
                value = env.get(name, "").strip()
                if value and version not in amap.local:
                    rule = parse_rule(f"local{version}={value}", f"${name}")
                    amap._add(rule)
        return amap

    def _set_offset(self, offset: int, source: str) -> None:
        if self.port_offset_source:
            raise MapError(f"{source}: a second port offset (first: {self.port_offset_source})")
        self.port_offset, self.port_offset_source = offset, source

    def _add(self, rule: Rule | list[LocalRule] | PortRule) -> None:
        """Add one parsed rule, refusing one that overlaps an earlier rule (naming the first
        such rule). Each check is a few dict lookups (_Prefixes, _PortSides), so a map of
        100,000 rules loads in a fraction of a second (bench/bench_map.py)."""
        if isinstance(rule, PortRule):
            hit = self._port_sides.place(rule, len(self.port_rules))
            if hit is not None:
                other = self.port_rules[hit[0]]
                if hit[1]:
                    raise MapError(f"{rule.source}: overlaps {other.source} (both move "
                                   f"port {rule.old_port} of one address)")
                raise MapError(f"{rule.source}: moves onto the port {other.source} "
                               f"moves onto ({rule.new_port})")
            self.port_rules.append(rule)
        elif isinstance(rule, list):
            for lr in rule:
                prev = self.local.get(lr.version)
                if prev is not None:
                    raise MapError(
                        f"{lr.source}: a second local rule for IPv{lr.version} "
                        f"(first: {prev.source})"
                    )
                self.local[lr.version] = lr
        else:
            pos = self._prefixes[rule.version].place(rule.net, rule.plen, len(self.rules))
            if pos is not None:
                raise MapError(f"{rule.source}: overlaps {self.rules[pos].source}")
            self.rules.append(rule)

    def is_empty(self) -> bool:
        return not self.rules and not self.local and not self.moves_ports()

    def moves_ports(self) -> bool:
        """Whether any port rule or a port offset is given."""
        return bool(self.port_rules) or self.port_offset != 0

    def auto_families(self) -> set[int]:
        fams = {r.version for r in self.rules if r.target is None}
        fams |= {v for v, lr in self.local.items() if lr.new is None}
        fams |= {r.old_addr.version for r in self.port_rules if r.new_auto and r.old_addr}
        return fams

    def bind(
        self,
        local_addrs: Iterable[IPAddress] | Callable[[], Iterable[IPAddress]],
        resolve: Resolver | None,
    ) -> "BoundMap":
        """Fix the map for one image. `local_addrs`: the source addresses of the image's
        sockets (or a function giving them, called only if a `local` rule needs to know
        whether a destination is one of them). `auto` targets are resolved through
        `resolve` on first use."""
        return BoundMap(self, local_addrs, resolve)


_MISS = object()


_ntohl = socket.ntohl
_MAPPED_WORD = socket.htonl(0xFFFF)  # the third word of ::ffff:0:0/96 in CRIU's words


def _addr_key(addr: IPAddress) -> object:
    """An unmapped address as might_move() keys it: an IPv4 one by its CRIU word, an IPv6
    one by its four words."""
    words = addr_to_words(addr)
    return words[0] if addr.version == 4 else tuple(words)


class BoundMap:
    """An AddressMap applied to one image: maps single addresses."""

    def __init__(
        self,
        amap: AddressMap,
        local_addrs: Iterable[IPAddress] | Callable[[], Iterable[IPAddress]],
        resolve: Resolver | None,
    ) -> None:
        self._rules = amap.rules
        self._local_rules = amap.local
        self._resolve = resolve
        self._resolved: dict[int, IPAddress] = {}
        self._cache: dict[IPAddress, tuple[IPAddress, str] | None] = {}
        self._locals_source = local_addrs
        self._locals: set[IPAddress] | None = None
        self._port_rules: dict[int, list[PortRule]] = {}
        for pr in amap.port_rules:
            self._port_rules.setdefault(pr.old_port, []).append(pr)
        self._offset = amap.port_offset
        self._offset_source = amap.port_offset_source
        self.moves_ports = amap.moves_ports()
        self._ep_cache: dict[tuple[IPAddress, int], Moved | None | PortRangeError] = {}
        # the rules by prefix (shared with the map, which is not changed after from_args)
        self._prefixes = amap._prefixes
        self._names_special: dict[int, bool] = {}  # rule position -> _names_special()
        # might_move(): the local addresses as CRIU words (made when first needed, as
        # local_addrs is)
        self._local_words: dict[int, set[object]] | None = None
        self._not_local: bytearray | None = None  # see said_not_local()

    @property
    def local_addrs(self) -> set[IPAddress]:
        """The image's specific local addresses (unmapped IPv4 for IPv4-mapped ones)."""
        if self._locals is None:
            src = self._locals_source
            addrs = src() if callable(src) else src
            self._locals = {u for u in map(_unmap, addrs) if not is_special(u) and not u.is_multicast}
        return self._locals

    def _auto(self, version: int, source: str) -> IPAddress:
        got = self._resolved.get(version)
        if got is None:
            found = self._resolve(version) if self._resolve is not None else None
            if found is None:
                raise RewriteError(
                    f"{source}: auto target has no IPv{version} address on this node"
                )
            found = _unmap(found)
            if found.version != version:
                raise RewriteError(f"{source}: auto resolved to {found}, not IPv{version}")
            got = self._resolved[version] = found
        return got

    def lookup(self, addr: IPAddress, is_src: bool = False) -> tuple[IPAddress, str] | None:
        """(new address, rule source) if the map moves `addr`, else None. `is_src`: addr is
        some socket's source address (so it is local without asking). An IPv4-mapped IPv6
        address is mapped by the IPv4 rules and stays mapped."""
        cache = self._cache
        hit = cache.get(addr, _MISS)
        if hit is not _MISS:
            return hit  # type: ignore[return-value]
        v4 = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
        hit = self._lookup_plain(v4 if v4 is not None else addr, is_src)
        if hit is not None and v4 is not None:
            hit = (ipaddress.IPv6Address("::ffff:" + str(hit[0])), hit[1])
        if hit is not None and hit[0] == addr:
            hit = None
        if len(cache) >= 1024:  # 10,000 distinct peers: keep memory flat
            cache.clear()
        cache[addr] = hit
        return hit

    def might_move(self, family: int, words: Sequence[int]) -> bool:
        """False when lookup() of the address in these CRIU words (AF_INET: the first one;
        AF_INET6: a tuple of four) surely answers None; True when it has to be asked. No
        address object: plan.py asks this of each of 10,000 distinct peers."""
        key: object
        if family == AF_INET:
            version, key = 4, words[0]
        elif words[0] == 0 and words[1] == 0 and words[2] == _MAPPED_WORD:  # ::ffff:a.b.c.d
            version, key = 4, words[3]
        else:
            version, key = 6, words
        tables = self._prefixes[version].tables
        if tables:
            if version == 4:
                n = _ntohl(words[0] if family == AF_INET else words[3])
            else:
                n = (_ntohl(words[0]) << 96 | _ntohl(words[1]) << 64
                     | _ntohl(words[2]) << 32 | _ntohl(words[3]))
            for shift, table in tables:
                if n >> shift in table:
                    return True  # a rule's prefix holds it (lookup() weighs special ones)
        if version not in self._local_rules:
            return False
        # A `local` rule moves the image's own addresses (never special or multicast ones)
        local = self._local_words
        if local is None:
            local = self._local_words = {4: set(), 6: set()}
            for a in self.local_addrs:
                local[a.version].add(_addr_key(a))
        if key in local[version]:
            return True
        self._note_not_local(key)
        return False

    # An answer "not one of the image's addresses" is right only if the image has no such
    # source address: plan.py binds the map to the source addresses met so far and asks
    # said_not_local() of every one it meets later (then plans again). A bitmap of hashes
    # keeps this small (10,000 peers set 1% of 2**20 bits; a false hit costs a replan).
    _NOT_LOCAL_BITS = 1 << 20

    def _note_not_local(self, key: object) -> None:
        bits = self._not_local
        if bits is None:
            bits = self._not_local = bytearray(self._NOT_LOCAL_BITS >> 3)
        b = self._bit(key)
        bits[b >> 3] |= 1 << (b & 7)

    @classmethod
    def _bit(cls, key: object) -> int:
        return hash((key,)) & (cls._NOT_LOCAL_BITS - 1)  # (key,): an int's hash is itself

    def said_not_local(self, family: int, words: Sequence[int]) -> bool:
        """Whether might_move() or lookup() may have answered that the address in these
        CRIU words is not one of the image's own (false hits possible, no misses)."""
        bits = self._not_local
        if bits is None:
            return False
        plain = _unmap(words_to_addr(words, family))
        if is_special(plain) or is_multicast(plain):
            return False  # never one of the image's own: asking could not change an answer
        b = self._bit(_addr_key(plain))
        return bool(bits[b >> 3] & (1 << (b & 7)))

    def _lookup_plain(self, addr: IPAddress, is_src: bool) -> tuple[IPAddress, str] | None:
        special = is_special(addr)
        version, n = addr.version, int(addr)
        pos = self._prefixes[version].find(n)
        if pos is not None and (not special or self._rule_names_special(pos)):
            rule = self._rules[pos]
            target = rule.target
            if target is None:
                return self._auto(version, rule.source), rule.source
            if rule.keep_host:
                target |= n & ((1 << ((32 if version == 4 else 128) - rule.plen)) - 1)
            return _ip(version, target), rule.source
        lr = self._local_rules.get(addr.version)
        if lr is None or special or is_multicast(addr):
            return None
        if not is_src and addr not in self.local_addrs:
            self._note_not_local(_addr_key(addr))
            return None
        moved = lr.new if lr.new is not None else self._auto(addr.version, lr.source)
        return moved, lr.source


    def _rule_names_special(self, pos: int) -> bool:
        got = self._names_special.get(pos)
        if got is None:
            got = self._names_special[pos] = _names_special(self._rules[pos].old)
        return got

    def port_rule(self, addr: IPAddress, port: int) -> PortRule | None:
        """The port rule whose old side is this endpoint, if any (at most one: old sides
        never overlap)."""
        rules = self._port_rules.get(port)
        if not rules:
            return None
        plain = _unmap(addr)
        for pr in rules:
            if pr.old_addr is None or pr.old_addr == plain:
                return pr
        return None

    def names_endpoint(self, addr: IPAddress, port: int) -> bool:
        """Whether a port rule names this endpoint by its address (so a peer connected to it
        knows it moves with the group)."""
        pr = self.port_rule(addr, port)
        return pr is not None and pr.old_addr is not None

    def endpoint(self, addr: IPAddress, port: int) -> Moved | None:
        """Where a local endpoint (a socket's source address and port) goes: the port by
        the port rule naming it, else by the port offset (non-zero ports only); the address
        by the port rule's new address if it names one, else by the address rules
        (`lookup(addr, is_src=True)`). None if neither moves. Cached per endpoint.
        Raises PortRangeError when the offset pushes the port out of 1..65535 and
        RewriteError when an `auto` target has no address."""
        key = (addr, port)
        cache = self._ep_cache
        if key in cache:
            got = cache[key]
            if isinstance(got, PortRangeError):
                raise got
            return got
        try:
            got = self._endpoint(addr, port)
        except PortRangeError as exc:
            cache[key] = exc
            raise
        cache[key] = got
        return got

    def _endpoint(self, addr: IPAddress, port: int) -> Moved | None:
        pr = self.port_rule(addr, port) if port else None
        new_port, port_why = port, ""
        new_addr: IPAddress | None = None
        addr_why = ""
        if pr is not None:
            new_port, port_why = pr.new_port, pr.source
            if pr.new_addr is not None or pr.new_auto:
                target = pr.new_addr if pr.new_addr is not None else self._auto(
                    _unmap(addr).version, pr.source)
                if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                    target = ipaddress.IPv6Address("::ffff:" + str(target))
                if target != addr:
                    new_addr, addr_why = target, pr.source
        elif port and self._offset:
            new_port = port + self._offset
            if not 0 < new_port <= MAX_PORT:
                raise PortRangeError(
                    f"port {port} {self._offset:+d} = {new_port} is out of range "
                    f"(1-{MAX_PORT}) ({self._offset_source})")
            port_why = self._offset_source
        if new_addr is None and not addr_why:
            hit = self.lookup(addr, is_src=True)
            if hit is not None:
                new_addr, addr_why = hit
        if new_addr is None and new_port == port:
            return None
        why = []
        if addr_why and new_port != port and addr_why == port_why:
            why.append(f"src and port {port}->{new_port} by {addr_why}")
        else:
            if addr_why:
                why.append(f"src by {addr_why}")
            if new_port != port:
                why.append(f"port {port}->{new_port} by {port_why}")
        return Moved(addr if new_addr is None else new_addr, new_port,
                     None if new_addr is None else addr_why, port_why if new_port != port else None,
                     "; ".join(why))


@dataclass(frozen=True, slots=True)
class Moved:
    """A local endpoint's new place; addr_by / port_by name the rule that moved each part
    (None: that part stays)."""

    addr: IPAddress
    port: int
    addr_by: str | None
    port_by: str | None
    why: str


def _names_special(net: Network) -> bool:
    """Whether a rule names special addresses on purpose (its whole prefix is special)."""
    first, last = net.network_address, net.broadcast_address
    return is_special(first) and is_special(last) and (
        first.is_loopback == last.is_loopback and first.is_link_local == last.is_link_local
    )
