"""An address map bound to one checkpoint: where its addresses and local endpoints go.

BoundMap answers, for one checkpoint, what the rules make of an address (`lookup`), of a
local endpoint (`endpoint`: port rules, the offset, then the address rules), and whether a
peer's address could move at all (`might_move`, from CRIU's address words, with no address
object). `auto` targets are resolved through the caller's Resolver on first use.

A `local` rule moves the checkpoint's own source addresses, so a destination follows it
only if it is one of them. Collecting every source address first costs a decoding pass;
the one-pass protocol that avoids it lives here too (one_pass): see its docstring.

Pure: addresses in, addresses out.
"""

from __future__ import annotations

import ipaddress
import _socket
from collections.abc import Callable, Iterable, Mapping, Sequence

from .. import lazylog
from ..errors import RewriteError
from . import patch
from .endpoints import Endpoints, Moved
from .rules import LocalRule, Network, PortRule, Rule, _ip, _unmap
from .sockaddr import AF_INET, IPAddress, addr_to_words, is_multicast, is_special, words_to_addr

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
log = lazylog.getLogger(__name__)

Resolver = Callable[[int], IPAddress | None]
SrcKey = tuple[int, tuple[int, ...]]  # a source address as (family, CRIU words)

if TYPE_CHECKING:  # what the type checker reads (annotations only)
    from typing import Protocol, TypeVar

    T = TypeVar("T")

    class PrefixIndex(Protocol):
        """One IP version's address rules by prefix (addrmap._Prefixes)."""

        @property
        def tables(self) -> Sequence[tuple[int, Mapping[int, int]]]: ...
        def find(self, n: int) -> int | None: ...

    class MapRules(Protocol):
        """What a bound map reads of its AddressMap (addrmap.py, which imports this module)."""

        @property
        def rules(self) -> Sequence[Rule]: ...
        @property
        def local(self) -> Mapping[int, LocalRule]: ...
        @property
        def port_rules(self) -> Sequence[PortRule]: ...
        @property
        def port_offset(self) -> int: ...
        @property
        def port_offset_source(self) -> str: ...
        @property
        def prefixes(self) -> Mapping[int, PrefixIndex]: ...
        def moves_ports(self) -> bool: ...
        def bind(self, local_addrs: Iterable[IPAddress] | Callable[[], Iterable[IPAddress]],
                 resolve: Resolver | None) -> BoundMap: ...


# -- the one-pass `local` protocol ------------------------------------------------------
# With a `local` rule, a destination equal to any source address of the checkpoint
# follows it. The map asks for the source addresses when a destination first needs them,
# and gets those met so far in the pass (one pass instead of two). The pass notes the
# source addresses it meets after that (Sources.late); the map notes the addresses it said
# were not the checkpoint's own (BoundMap.said_not_local): if it may have said so of a
# late one, that answer may be wrong, and the checkpoint is planned again knowing every
# source address. A server's listeners usually come before its connections. A map that
# moves ports asks about every socket up front (the port decisions need the whole
# checkpoint): the source addresses are collected first, by one more decoding pass.

class Sources:
    """The source addresses one planning pass met (see one_pass)."""

    __slots__ = ("srcs", "asking", "late")

    def __init__(self) -> None:
        self.srcs: dict[SrcKey, IPAddress] = {}  # every source met
        self.asking = False  # the map has asked for the source addresses
        self.late: list[SrcKey] = []  # sources first met after it asked

    def asked(self) -> list[IPAddress]:
        self.asking = True
        return list(self.srcs.values())

    def src(self, key: SrcKey, addr: IPAddress) -> None:
        """The pass met source address `addr` (CRIU words `key`)."""
        if key not in self.srcs:
            self.srcs[key] = addr
            if self.asking:
                self.late.append(key)


def one_pass(amap: MapRules, resolve: Resolver | None,
             plan: Callable[[BoundMap, Sources | None], T],
             every_source: Callable[[], Iterable[IPAddress]], what: str) -> T:
    """`plan(bmap, sources)` with `amap` bound to one checkpoint, by the protocol above:
    `plan` is one planning pass over the checkpoint, which tells `sources` (when not None)
    each source address it meets; `every_source()` collects them all (a decoding pass of
    its own, made only when the map moves ports). `what`: the checkpoint, for the log."""
    if amap.moves_ports():
        return plan(amap.bind(every_source, resolve), None)
    seen = Sources()
    bmap = amap.bind(seen.asked, resolve)
    out = plan(bmap, seen)
    if seen.late and any(bmap.said_not_local(*key) for key in seen.late):
        log.debug("%s: a source address came after the peers judged against it: "
                  "planning again", what)
        out = plan(amap.bind(list(seen.srcs.values()), resolve), None)
    return out


_MISS = object()
_ntohl = _socket.ntohl
_MAPPED_WORD = _socket.htonl(0xFFFF)  # the third word of ::ffff:0:0/96 in CRIU's words


def _addr_key(addr: IPAddress) -> object:
    """An unmapped address as might_move() keys it: an IPv4 one by its CRIU word, an IPv6
    one by its four words."""
    words = addr_to_words(addr)
    return words[0] if addr.version == 4 else tuple(words)


_MAPPED_RAW = patch.words_field(patch.DST_TAG, (0, 0, _MAPPED_WORD)) + bytes((patch.DST_TAG,))


def _raw_key(addr: IPAddress) -> bytes:
    """An unmapped address as raw_locals() keys it: its dst_addr field (an IPv4 one of one
    word)."""
    return patch.words_field(patch.DST_TAG, addr_to_words(addr))


class BoundMap:
    """An AddressMap applied to one checkpoint: maps single addresses (and, through
    `endpoints`, local endpoints)."""

    def __init__(
        self,
        amap: MapRules,
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
        self.moves_ports = amap.moves_ports()
        # where local endpoints go (port rules, the offset, then lookup())
        self.endpoints = Endpoints(amap.port_rules, amap.port_offset, amap.port_offset_source)
        self.names_endpoint = self.endpoints.names_endpoint
        # the rules by prefix (shared with the map, which is not changed after from_args)
        self._prefixes = amap.prefixes
        self._names_special: dict[int, bool] = {}  # rule position -> _names_special()
        # might_move(): the local addresses as CRIU words (made when first needed, as
        # local_addrs is)
        self._local_words: dict[int, set[object]] | None = None
        self._local_raw: dict[int, set[bytes]] | None = None  # raw_locals()'
        self._not_local: bytearray | None = None  # see said_not_local()
        self._not_local_raw: bytearray | None = None  # the same, bytepass's raw keys

    @property
    def local_addrs(self) -> set[IPAddress]:
        """The image's specific local addresses (unmapped IPv4 for IPv4-mapped ones)."""
        if self._locals is None:
            src = self._locals_source
            addrs = src() if callable(src) else src
            self._locals = {u for u in map(_unmap, addrs) if not is_special(u) and not u.is_multicast}
        return self._locals

    def endpoint(self, addr: IPAddress, port: int) -> Moved | None:
        """Where a local endpoint goes (endpoints.py's Endpoints.endpoint)."""
        return self.endpoints.endpoint(addr, port, self)

    def auto(self, version: int, source: str) -> IPAddress:
        """This node's address of `version` for an `auto` target of rule `source`."""
        return self._auto(version, source)

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
        self.note_not_local(key)
        return False

    def raw_locals(self) -> tuple[set[bytes] | None, set[bytes] | None, bytes] | None:
        """might_move() on the bytes (core/bytepass.py): the image's own addresses as
        dst_addr fields, IPv4 ones and IPv6 ones (None: no `local` rule
        for that version: nothing moves), and the start of an IPv4-mapped dst_addr field;
        None when the map has address rules (only the words can tell). A key not in its
        set is given to note_not_local()."""
        if self._prefixes[4].tables or self._prefixes[6].tables:
            return None
        local = self._local_raw
        if local is None:
            local = self._local_raw = {4: set(), 6: set()}
            for a in self.local_addrs:
                local[a.version].add(_raw_key(a))
        return (local[4] if 4 in self._local_rules else None,
                local[6] if 6 in self._local_rules else None, _MAPPED_RAW)

    # An answer "not one of the image's addresses" is right only if the image has no such
    # source address: plan.py binds the map to the source addresses met so far and asks
    # said_not_local() of every one it meets later (then plans again). A bitmap of hashes
    # keeps this small (10,000 peers set 1% of 2**20 bits; a false hit costs a replan).
    _NOT_LOCAL_BITS = 1 << 20

    def note_not_local(self, key: object) -> None:
        bits = self._not_local
        if bits is None:
            bits = self._not_local = bytearray(self._NOT_LOCAL_BITS >> 3)
        b = self._bit(key)
        bits[b >> 3] |= 1 << (b & 7)

    def not_local_bits(self) -> tuple[bytearray, int]:
        """The bitmap core/bytepass.py sets bit hash(key) & mask of for a peer not local,
        its raw key (raw_locals()); apart from note_not_local()'s, so that a false hit (a
        plan again) is as unlikely as with one bitmap."""
        bits = self._not_local_raw
        if bits is None:
            bits = self._not_local_raw = bytearray(self._NOT_LOCAL_BITS >> 3)
        return bits, self._NOT_LOCAL_BITS - 1

    @classmethod
    def _bit(cls, key: object) -> int:
        if isinstance(key, bytes):
            return hash(key) & (cls._NOT_LOCAL_BITS - 1)
        return hash((key,)) & (cls._NOT_LOCAL_BITS - 1)  # (key,): an int's hash is itself

    def said_not_local(self, family: int, words: Sequence[int]) -> bool:
        """Whether might_move() or lookup() (or bytepass, on the bytes) may have answered
        that the address in these CRIU words is not one of the image's own (false hits
        possible, no misses)."""
        if self._not_local is None and self._not_local_raw is None:
            return False
        plain = _unmap(words_to_addr(words, family))
        if is_special(plain) or is_multicast(plain):
            return False  # never one of the image's own: asking could not change an answer
        for bits, key in ((self._not_local, _addr_key(plain)),
                          (self._not_local_raw, _raw_key(plain))):
            if bits is not None:
                b = self._bit(key)
                if bits[b >> 3] & (1 << (b & 7)):
                    return True
        return False

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
            self.note_not_local(_addr_key(addr))
            return None
        moved = lr.new if lr.new is not None else self._auto(addr.version, lr.source)
        return moved, lr.source


    def _rule_names_special(self, pos: int) -> bool:
        got = self._names_special.get(pos)
        if got is None:
            got = self._names_special[pos] = _names_special(self._rules[pos].old)
        return got


def _names_special(net: Network) -> bool:
    """Whether a rule names special addresses on purpose (its whole prefix is special)."""
    first, last = net.network_address, net.broadcast_address
    return is_special(first) and is_special(last) and (
        first.is_loopback == last.is_loopback and first.is_link_local == last.is_link_local
    )
