"""Where a local endpoint (a socket's source address and port) goes under a bound map:
the port by the port rule naming it, else by the port offset; the address by the port
rule's new address if it names one, else by the address rules (docs/map.md, "Ports").

Pure. BoundMap (boundmap.py) makes one Endpoints per checkpoint and lends it its address
lookup and its `auto` resolution.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from ..errors import PortRangeError
from .reasons import PORT_BY, SRC_AND_PORT_BY, SRC_BY, Reason
from .rules import MAX_PORT, PortRule, _unmap
from .sockaddr import IPAddress

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from typing import NamedTuple, Protocol
else:
    from ..record import NamedTuple, Protocol


class Moved(NamedTuple):
    """A local endpoint's new place; addr_by / port_by name the rule that moved each part
    (None: that part stays)."""

    addr: IPAddress
    port: int
    addr_by: str | None
    port_by: str | None
    why: tuple[Reason, ...]  # how it moves (decide.py puts these in a socket's reasons)


_new = tuple.__new__


class Owner(Protocol):
    """The bound map an Endpoints serves (passed per call, not kept: no reference cycle, so
    a bound map goes with its last user)."""

    def lookup(self, addr: IPAddress, is_src: bool = False) -> tuple[IPAddress, str] | None: ...
    def auto(self, version: int, source: str) -> IPAddress: ...


class Endpoints:
    """The port rules (by old port) and the port offset of one bound map."""

    def __init__(self, port_rules: Sequence[PortRule], offset: int, offset_source: str
                 ) -> None:
        self._rules: dict[int, list[PortRule]] = {}
        for pr in port_rules:
            self._rules.setdefault(pr.old_port, []).append(pr)
        self._offset = offset
        self._offset_source = offset_source
        self._cache: dict[tuple[IPAddress, int], Moved | None | PortRangeError] = {}

    def port_rule(self, addr: IPAddress, port: int) -> PortRule | None:
        """The port rule whose old side is this endpoint, if any (at most one: old sides
        never overlap)."""
        rules = self._rules.get(port)
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

    def endpoint(self, addr: IPAddress, port: int, owner: Owner) -> Moved | None:
        """Where a local endpoint (a socket's source address and port) goes: the port by
        the port rule naming it, else by the port offset (non-zero ports only); the address
        by the port rule's new address if it names one, else by the address rules
        (`lookup(addr, is_src=True)`). None if neither moves. Cached per endpoint.
        Raises PortRangeError when the offset pushes the port out of 1..65535 and
        RewriteError when an `auto` target has no address."""
        key = (addr, port)
        cache = self._cache
        if key in cache:
            got = cache[key]
            if isinstance(got, PortRangeError):
                raise got
            return got
        try:
            got = self._endpoint(addr, port, owner)
        except PortRangeError as exc:
            cache[key] = exc
            raise
        cache[key] = got
        return got

    def _endpoint(self, addr: IPAddress, port: int, owner: Owner) -> Moved | None:
        pr = self.port_rule(addr, port) if port else None
        new_port, port_why = port, ""
        new_addr: IPAddress | None = None
        addr_why = ""
        if pr is not None:
            new_port, port_why = pr.new_port, pr.source
            if pr.new_addr is not None or pr.new_auto:
                target = pr.new_addr if pr.new_addr is not None else owner.auto(
                    _unmap(addr).version, pr.source)
                if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                    target = ipaddress.IPv6Address("::ffff:" + str(target))
                if target != addr:
                    new_addr, addr_why = target, pr.source
        elif port and self._offset:
            new_port = port + self._offset
            if not 0 < new_port <= MAX_PORT:
                raise PortRangeError(port, self._offset, new_port, self._offset_source)
            port_why = self._offset_source
        if new_addr is None and not addr_why:
            hit = owner.lookup(addr, True)
            if hit is not None:
                new_addr, addr_why = hit
        if new_addr is None and new_port == port:
            return None
        # Reason(...) and Moved(...) without their __new__: made once per endpoint (with port
        # moves, 10,000 sockets make 10,000)
        why: tuple[Reason, ...]
        if addr_why and new_port != port and addr_why == port_why:
            why = (_new(Reason, (SRC_AND_PORT_BY, (port, new_port, addr_why))),)
        elif not addr_why:
            why = (_new(Reason, (PORT_BY, (port, new_port, port_why))),)
        elif new_port == port:
            why = (_new(Reason, (SRC_BY, (addr_why,))),)
        else:
            why = (_new(Reason, (SRC_BY, (addr_why,))),
                   _new(Reason, (PORT_BY, (port, new_port, port_why))))
        return _new(Moved, (addr if new_addr is None else new_addr, new_port,
                            None if new_addr is None else addr_why,
                            port_why if new_port != port else None, why))
