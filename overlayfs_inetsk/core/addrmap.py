"""The address map: where the checkpoint's addresses move to on this node.

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

Pure: no I/O but reading map files.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

from ..errors import MapError, RewriteError
from .sockaddr import IPAddress, is_multicast, is_special

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[int], IPAddress | None]

ENV_LOCAL = {4: "INETSK_LOCAL_IPV4", 6: "INETSK_LOCAL_IPV6"}
AUTO = "auto"


@dataclass(frozen=True)
class Rule:
    old: Network
    new: Network | IPAddress | None  # network: keep host part; address: all to it; None: auto
    source: str  # where the rule came from, for messages

    @property
    def version(self) -> int:
        return self.old.version

    def __str__(self) -> str:
        return self.source


@dataclass(frozen=True)
class LocalRule:
    version: int
    new: IPAddress | None  # None: auto
    source: str


def _unmap(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _parse_addr(text: str, source: str, what: str) -> IPAddress:
    try:
        return _unmap(ipaddress.ip_address(text))
    except ValueError:
        raise MapError(f"{source}: {what} {text!r} is not an IPv4 or IPv6 address") from None


def _parse_net(text: str, source: str, what: str) -> Network:
    if "/" not in text:
        return ipaddress.ip_network(_parse_addr(text, source, what))
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise MapError(f"{source}: {what} {text!r} is not a valid prefix ({exc})") from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}")
    return net


def parse_rule(spec: str, source: str) -> Rule | list[LocalRule]:
    if spec.count("=") != 1:
        raise MapError(f"{source}: rule {spec!r} must have the form OLD=NEW")
    old_s, new_s = (p.strip() for p in spec.split("="))
    if not old_s or not new_s:
        raise MapError(f"{source}: rule {spec!r} has an empty side")
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
    old = _parse_net(old_s, source, "old address")
    if new_s.lower() == AUTO:
        return Rule(old, None, source)
    if "/" in new_s:
        new_net = _parse_net(new_s, source, "new prefix")
        if new_net.version != old.version:
            raise MapError(f"{source}: maps IPv{old.version} to IPv{new_net.version}")
        if new_net.prefixlen != old.prefixlen:
            raise MapError(
                f"{source}: prefix lengths differ (/{old.prefixlen} vs /{new_net.prefixlen}); "
                "give NEW as one address to map the whole prefix to it"
            )
        return Rule(old, new_net, source)
    new_addr = _parse_addr(new_s, source, "new address")
    if new_addr.version != old.version:
        raise MapError(f"{source}: maps IPv{old.version} to IPv{new_addr.version}")
    return Rule(old, new_addr, source)


def _load_map_file(path: str) -> list[tuple[str, str]]:
    """(spec, source) pairs from a TOML or JSON map file.

    Either form holds a table `map` of OLD -> NEW and/or a list `rules` of "OLD=NEW".
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
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
    unknown = set(doc) - {"map", "rules"}
    if unknown:
        raise MapError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (expected map, rules)")
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
    return out


@dataclass
class AddressMap:
    rules: list[Rule] = field(default_factory=list)
    local: dict[int, LocalRule] = field(default_factory=dict)

    @classmethod
    def from_args(
        cls,
        specs: Sequence[str] = (),
        files: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> "AddressMap":
        pairs: list[tuple[str, str]] = []
        for path in files:
            pairs.extend(_load_map_file(path))
        pairs.extend((s, f"--map {s}") for s in specs)
        amap = cls()
        for spec, source in pairs:
            amap._add(parse_rule(spec, source))
        if env is not None:
            for version, name in ENV_LOCAL.items():
                value = env.get(name, "").strip()
                if value and version not in amap.local:
                    rule = parse_rule(f"local{version}={value}", f"${name}")
                    amap._add(rule)
        return amap

    def _add(self, rule: Rule | list[LocalRule]) -> None:
        if isinstance(rule, list):
            for lr in rule:
                prev = self.local.get(lr.version)
                if prev is not None:
                    raise MapError(
                        f"{lr.source}: a second local rule for IPv{lr.version} "
                        f"(first: {prev.source})"
                    )
                self.local[lr.version] = lr
            return
        for other in self.rules:
            if other.version == rule.version and other.old.overlaps(rule.old):  # type: ignore[arg-type]
                raise MapError(f"{rule.source}: overlaps {other.source}")
        self.rules.append(rule)

    def is_empty(self) -> bool:
        return not self.rules and not self.local

    def auto_families(self) -> set[int]:
        fams = {r.version for r in self.rules if r.new is None}
        fams |= {v for v, lr in self.local.items() if lr.new is None}
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

    def _lookup_plain(self, addr: IPAddress, is_src: bool) -> tuple[IPAddress, str] | None:
        special = is_special(addr)
        for rule in self._rules:
            if rule.version != addr.version or addr not in rule.old:
                continue
            if special and not _names_special(rule.old):
                continue
            new = rule.new
            if new is None:
                return self._auto(addr.version, rule.source), rule.source
            if isinstance(new, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                host = int(addr) & int(rule.old.hostmask)
                return ipaddress.ip_address(int(new.network_address) | host), rule.source
            return new, rule.source
        lr = self._local_rules.get(addr.version)
        if lr is None or special or is_multicast(addr):
            return None
        if not is_src and addr not in self.local_addrs:
            return None
        target = lr.new if lr.new is not None else self._auto(addr.version, lr.source)
        return target, lr.source


def _names_special(net: Network) -> bool:
    """Whether a rule names special addresses on purpose (its whole prefix is special)."""
    first, last = net.network_address, net.broadcast_address
    return is_special(first) and is_special(last) and (
        first.is_loopback == last.is_loopback and first.is_link_local == last.is_link_local
    )
