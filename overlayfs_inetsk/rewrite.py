"""Apply an address map to the inet sockets of one checkpoint's socket images.

Pure: bytes in, bytes and a per-socket report out. Entries that are not inet sockets are
never decoded; entries that do not change are copied byte for byte; a changed entry is
re-serialized from pycriu's generated message, which keeps unknown fields.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from google.protobuf.message import DecodeError
from pycriu.images import fdinfo_pb2, sk_inet_pb2

from . import imagefile
from .addrmap import AddressMap, BoundMap, Resolver
from .errors import ImageError, RewriteError
from .sockaddr import (
    AF_INET,
    AF_INET6,
    FAMILY_NAMES,
    PROTOCOLS,
    SOCK_TYPES,
    TCP_CLOSE,
    TCP_CONNECTED_STATES,
    TCP_LISTEN,
    TCP_STATES,
    IPAddress,
    addr_to_words,
    fmt_addr,
    fmt_endpoint,
    is_special,
    words_to_addr,
)

FD_INETSK = 4
SHUT_BOTH = 3
TCP_FATES = ("close", "keep", "fail")
DEFAULT_TCP_FATE = "close"

# Verdicts
REWRITTEN = "rewritten"  # addresses changed
CLOSED = "closed"  # TCP connection to a peer outside the map, restored closed (fate close)
KEPT = "kept"  # nothing to change and nothing wrong (any address, loopback, unbound, ...)
NEEDS_ADDRESS = "needs-address"  # keeps a specific address no rule covers
REFUSED = "refused"  # TCP connection to a peer outside the map, fate fail


@dataclass(frozen=True)
class RewriteOptions:
    strict: bool = False  # a socket left on a specific address no rule covers is an error
    tcp_outside: str = DEFAULT_TCP_FATE  # fate of TCP connected to a peer outside the map

    def __post_init__(self) -> None:
        if self.tcp_outside not in TCP_FATES:
            raise ValueError(f"tcp_outside must be one of {', '.join(TCP_FATES)}")


@dataclass(slots=True)
class SocketReport:
    file: str
    offset: int
    id: int
    ino: int
    family: int
    type: int
    proto: int
    state: int
    src: IPAddress
    sport: int
    dst: IPAddress
    dport: int
    klass: str = ""
    verdict: str = KEPT
    reason: str = ""
    new_src: IPAddress | None = None
    new_dst: IPAddress | None = None

    @property
    def family_name(self) -> str:
        return FAMILY_NAMES.get(self.family, str(self.family))

    @property
    def proto_name(self) -> str:
        name = PROTOCOLS.get(self.proto)
        if name is None or (self.proto == 0 and self.type in SOCK_TYPES):
            return {1: "tcp", 2: "udp"}.get(self.type, SOCK_TYPES.get(self.type, str(self.proto)))
        return name

    @property
    def state_name(self) -> str:
        return TCP_STATES.get(self.state, str(self.state))

    @property
    def local(self) -> str:
        return fmt_endpoint(self.src, self.sport)

    @property
    def remote(self) -> str:
        return fmt_endpoint(self.dst, self.dport)


@dataclass
class RewriteResult:
    path: str
    data: bytes
    reports: list[SocketReport] = field(default_factory=list)

    @property
    def changed(self) -> int:
        return sum(1 for r in self.reports if r.verdict in (REWRITTEN, CLOSED))


@dataclass
class _Sock:
    report: SocketReport
    entry_index: int
    msg: object  # file_entry (files.img) or inet_sk_entry (inetsk.img)
    isk: object  # the inet_sk_entry inside msg


@dataclass
class _Parsed:
    path: str
    data: bytes
    image: imagefile.ImageFile
    socks: list[_Sock]


class _Interner:
    """One IPAddress object per distinct address of a plan, so hot paths can key caches on
    small tuples and object identity instead of hashing ipaddress objects."""

    def __init__(self) -> None:
        self.addrs: dict[tuple[int, tuple[int, ...]], IPAddress] = {}
        self.src: dict[int, IPAddress] = {}  # id -> address used as a local (src) address

    def get(self, words: Iterable[int], family: int) -> IPAddress:
        key = (family, tuple(words))
        got = self.addrs.get(key)
        if got is None:
            got = self.addrs[key] = words_to_addr(key[1], family)
        return got


def _socket_from(path: str, offset: int, isk: object, interner: _Interner) -> SocketReport:
    fam = isk.family  # type: ignore[attr-defined]
    if fam not in (AF_INET, AF_INET6):
        raise ImageError(
            path, f"inet socket id {isk.id} has family {fam}, not AF_INET/AF_INET6", offset  # type: ignore[attr-defined]
        )
    try:
        src = interner.get(isk.src_addr, fam)  # type: ignore[attr-defined]
        dst = interner.get(isk.dst_addr, fam)  # type: ignore[attr-defined]
    except ValueError as exc:
        raise ImageError(
            path,
            f"inet socket id {isk.id}: {exc} "  # type: ignore[attr-defined]
            f"(src_addr has {len(isk.src_addr)} words, dst_addr {len(isk.dst_addr)})",  # type: ignore[attr-defined]
            offset,
        ) from None
    interner.src[id(src)] = src
    return SocketReport(
        path, offset, isk.id, isk.ino, fam, isk.type, isk.proto, isk.state,  # type: ignore[attr-defined]
        src, isk.src_port, dst, isk.dst_port,  # type: ignore[attr-defined]
    )


def parse_sockets(data: bytes, path: str, interner: _Interner | None = None) -> _Parsed:
    """Parse a socket image (files.img or inetsk.img) and decode its inet sockets only."""
    if interner is None:
        interner = _Interner()
    name = posixpath.basename(path)
    magic = imagefile.MAGIC_BY_NAME.get(name)
    image = imagefile.parse(data, path, magic)
    socks: list[_Sock] = []
    if image.magic == imagefile.FILES_MAGIC:
        for i, entry in enumerate(image.entries):
            kind = imagefile.leading_varint_field(entry.payload, 1)
            if kind is not None and kind != FD_INETSK:
                continue
            try:
                fe = fdinfo_pb2.file_entry.FromString(entry.payload)
            except DecodeError as exc:
                raise ImageError(path, f"not a valid file_entry: {exc}", entry.offset) from None
            if fe.type != FD_INETSK:
                continue
            if not fe.HasField("isk"):
                raise ImageError(path, f"INETSK file_entry id {fe.id} has no isk", entry.offset)
            if fe.id != fe.isk.id:
                raise ImageError(
                    path, f"file_entry.id {fe.id} != isk.id {fe.isk.id}", entry.offset
                )
            socks.append(_Sock(_socket_from(path, entry.offset, fe.isk, interner), i, fe, fe.isk))
    elif image.magic == imagefile.INETSK_MAGIC:
        for i, entry in enumerate(image.entries):
            try:
                isk = sk_inet_pb2.inet_sk_entry.FromString(entry.payload)
            except DecodeError as exc:
                raise ImageError(path, f"not a valid inet_sk_entry: {exc}", entry.offset) from None
            socks.append(_Sock(_socket_from(path, entry.offset, isk, interner), i, isk, isk))
    else:
        raise ImageError(path, f"image type 0x{image.magic:08x} holds no inet sockets")
    return _Parsed(path, data, image, socks)


def _classify(r: SocketReport, bmap: BoundMap) -> str:
    tcp = r.type == 1
    if tcp and r.state == TCP_LISTEN:
        return "listener"
    if _is_loopback(r.src):
        return "loopback"
    if tcp:
        if r.state not in TCP_CONNECTED_STATES:
            return "unconnected"
        if r.dst == r.src:
            return "tcp-self"
        if bmap.lookup(r.dst) is not None:
            return "tcp-peer-moved"
        return "tcp-peer-outside"
    if r.type == 2:
        return "udp-connected" if r.dport else "udp-bound"
    return "other"


def _is_loopback(addr: IPAddress) -> bool:
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def _decide(r: SocketReport, bmap: BoundMap, options: RewriteOptions) -> None:
    """Fill klass, verdict, reason, new_src, new_dst."""
    r.klass = _classify(r, bmap)
    src_hit = bmap.lookup(r.src)
    dst_hit = bmap.lookup(r.dst)
    if r.klass == "tcp-peer-outside" and src_hit is not None:
        peer = fmt_addr(r.dst)
        if options.tcp_outside == "close":
            r.verdict = CLOSED
            r.reason = f"peer {peer} is outside the map: restored as a closed connection"
            return
        if options.tcp_outside == "fail":
            r.verdict = REFUSED
            r.reason = f"peer {peer} is outside the map (fate fail)"
            return
        r.new_src = src_hit[0]
        r.verdict = REWRITTEN
        r.reason = (f"src by {src_hit[1]}; peer {peer} is outside the map and will "
                    "reset the connection (fate keep)")
        return
    if src_hit is not None or dst_hit is not None:
        why = []
        if src_hit is not None:
            r.new_src = src_hit[0]
            why.append(f"src by {src_hit[1]}")
        if dst_hit is not None:
            r.new_dst = dst_hit[0]
            why.append(f"dst by {dst_hit[1]}")
        r.verdict = REWRITTEN
        r.reason = "; ".join(why)
        return
    src = r.src
    if src.is_unspecified:
        r.reason = "bound to any address" if r.sport else "not bound"
    elif is_special(src):
        r.reason = "loopback address" if _is_loopback(src) else "link-local address"
    elif src.is_multicast:
        r.reason = "multicast address"
    else:
        r.verdict = NEEDS_ADDRESS
        if r.family == AF_INET:
            r.reason = (f"no rule covers {src}: bind fails (Cannot assign requested address) "
                        "unless this node has it")
        else:
            r.reason = (f"no rule covers {src}: binds anyway (IP_FREEBIND) and is unreachable "
                        "unless this node has it")


def _apply(s: _Sock, words_of: dict[int, list[int]]) -> bytes:
    r = s.report
    isk = s.isk
    if r.verdict == CLOSED:
        isk.state = TCP_CLOSE  # type: ignore[attr-defined]
        isk.src_port = 0  # type: ignore[attr-defined]
        isk.dst_port = 0  # type: ignore[attr-defined]
        for words in (isk.src_addr, isk.dst_addr):  # type: ignore[attr-defined]
            for i in range(len(words)):
                words[i] = 0
        isk.shutdown = SHUT_BOTH  # type: ignore[attr-defined]
    else:
        for field_, addr in ((isk.src_addr, r.new_src), (isk.dst_addr, r.new_dst)):  # type: ignore[attr-defined]
            if addr is None:
                continue
            words = words_of.get(id(addr))
            if words is None:
                words = words_of[id(addr)] = addr_to_words(addr)
            for i, w in enumerate(words):  # IPv4 entries may carry extra words: keep them
                field_[i] = w
    return s.msg.SerializeToString()  # type: ignore[attr-defined]


def plan_group(
    images: Mapping[str, bytes],
    amap: AddressMap,
    resolve: Resolver | None = None,
    options: RewriteOptions = RewriteOptions(),
) -> dict[str, RewriteResult]:
    """Rewrite all socket images of ONE checkpoint (name -> bytes). Never raises for a
    refused socket or a --strict violation: those show in the reports (see problems())."""
    interner = _Interner()
    parsed = [parse_sockets(data, name, interner) for name, data in images.items()]
    bmap = amap.bind(interner.src.values(), resolve)
    # Sockets that agree on these inputs get the same decision: decide once per distinct key
    # (addresses are interned, so their ids identify them for the plan's lifetime).
    decided: dict[tuple[int, int, int, int, bool], SocketReport] = {}
    words_of: dict[int, list[int]] = {}
    results: dict[str, RewriteResult] = {}
    for p in parsed:
        changed: dict[int, bytes] = {}
        for s in p.socks:
            r = s.report
            key = (r.type, r.state, id(r.src), id(r.dst), r.dport != 0)
            d = decided.get(key)
            if d is None:
                try:
                    _decide(r, bmap, options)
                except RewriteError as exc:
                    raise RewriteError(f"{p.path}: {exc}") from None
                decided[key] = r
            else:
                r.klass, r.verdict, r.reason = d.klass, d.verdict, d.reason
                r.new_src, r.new_dst = d.new_src, d.new_dst
            if r.verdict in (REWRITTEN, CLOSED):
                changed[s.entry_index] = _apply(s, words_of)
        if changed:
            data = imagefile.encode(
                p.image.magic,
                (changed.get(i, e.payload) for i, e in enumerate(p.image.entries)),
            )
        else:
            data = p.data
        results[p.path] = RewriteResult(p.path, data, [s.report for s in p.socks])
    return results


def problems(results: Mapping[str, RewriteResult], options: RewriteOptions) -> list[SocketReport]:
    """The sockets that make the rewrite fail: refused ones, and with --strict the ones left
    on an uncovered specific address."""
    bad = {REFUSED} | ({NEEDS_ADDRESS} if options.strict else set())
    return [r for res in results.values() for r in res.reports if r.verdict in bad]


def rewrite_group(
    images: Mapping[str, bytes],
    amap: AddressMap,
    resolve: Resolver | None = None,
    options: RewriteOptions = RewriteOptions(),
) -> dict[str, RewriteResult]:
    """plan_group, raising RewriteError when any socket is refused or violates --strict."""
    results = plan_group(images, amap, resolve, options)
    bad = problems(results, options)
    if bad:
        first = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise RewriteError(
            f"{first.file}: socket id {first.id} {first.proto_name} {first.local} -> "
            f"{first.remote}: {first.verdict}: {first.reason}{more}"
        )
    return results


def validate_group(images: Mapping[str, bytes], amap: AddressMap) -> None:
    """Parse-only check before mounting: raises ImageError for a malformed image."""
    for name, data in images.items():
        parse_sockets(data, name)
