"""The address map: the rules in force, indexed, refusing rules that cannot stand together.

AddressMap.from_args puts together the `--map` rules (rules.py parses each), map files
(mapfile.py), fallback local rules (planner/sources.py's environment form) and the port
offset. Two address rules whose prefixes overlap, two local rules of one family, two
port rules with one old side or one new side, a second port offset: refused, naming the
first rule. AddressMap.bind applies the map to one checkpoint (boundmap.py).

Pure: rule texts and map files' contents in, a map out.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterable, Iterator, Sequence

from ..errors import MapError
from ..record import Record
from .boundmap import BoundMap, Resolver
from .mapfile import PORT_OFFSET_KEY, parse_map_file
from .rules import LocalRule, PortRule, Rule, check_port_offset, parse_rule
from .sockaddr import IPAddress

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


class AddressMap(Record):
    """The rules of a map (a Record, not a dataclass: ..record; compared and shown by its
    rules, not by the indexes built from them)."""

    __slots__ = ("rules", "local", "port_rules", "port_offset", "port_offset_source",
                 "prefixes", "_port_sides")
    _compared = __slots__[:5]
    __hash__ = None  # type: ignore[assignment]  # mutable, as a dataclass with eq is
    rules: list[Rule]
    local: dict[int, LocalRule]
    port_rules: list[PortRule]
    port_offset: int
    port_offset_source: str
    prefixes: dict[int, _Prefixes]
    _port_sides: _PortSides

    def __init__(self, rules: list[Rule] | None = None,
                 local: dict[int, LocalRule] | None = None,
                 port_rules: list[PortRule] | None = None, port_offset: int = 0,
                 port_offset_source: str = "") -> None:
        self.rules = [] if rules is None else rules
        self.local = {} if local is None else local
        self.port_rules = [] if port_rules is None else port_rules
        self.port_offset, self.port_offset_source = port_offset, port_offset_source
        self.prefixes = {4: _Prefixes(32), 6: _Prefixes(128)}
        self._port_sides = _PortSides()

    @classmethod
    def from_args(
        cls,
        specs: Sequence[str] = (),
        files: Iterable[tuple[str, bytes]] = (),
        port_offset: int | None = None,
        fallback_local: Sequence[tuple[str, str]] = (),
    ) -> AddressMap:
        """The map of `--map` rules, map files ((path, contents) pairs, read by an adapter:
        planner/sources.py; taken in order, so an adapter may read each as it is asked
        for) and `port_offset` (--port-offset; None: not given), and of `fallback_local`
        ((spec, source) pairs of `local4=`/`local6=` rules, each added only if no rule
        above is a local rule of its family: the environment form, sources.py). A port
        offset may not be given twice (on the command line and in a map file, or in two
        files)."""
        with _no_gc():
            return cls._from_args(specs, files, port_offset, fallback_local)

    @classmethod
    def _from_args(cls, specs: Sequence[str], files: Iterable[tuple[str, bytes]],
                   port_offset: int | None, fallback_local: Sequence[tuple[str, str]]
                   ) -> AddressMap:
        pairs: list[tuple[str, str]] = []
        amap = cls()
        for path, raw in files:
            got, offset = parse_map_file(path, raw)
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
        for spec, source in fallback_local:
            rule = parse_rule(spec, source)
            if isinstance(rule, list) and not any(lr.version in amap.local for lr in rule):
                add(rule)
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
            pos = self.prefixes[rule.version].place(rule.net, rule.plen, len(self.rules))
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
    ) -> BoundMap:
        """Fix the map for one image. `local_addrs`: the source addresses of the image's
        sockets (or a function giving them, called only if a `local` rule needs to know
        whether a destination is one of them). `auto` targets are resolved through
        `resolve` on first use."""
        return BoundMap(self, local_addrs, resolve)
