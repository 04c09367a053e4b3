"""Apply an address map to the inet sockets of one checkpoint's socket images.

Pure: bytes in, bytes and a per-socket report out. Entries that are not inet sockets are
never decoded; entries that do not change are copied byte for byte; a changed entry is
re-serialized from pycriu's generated message, which keeps unknown fields.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field
from typing import Iterator, Mapping

from google.protobuf.message import DecodeError, EncodeError
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
    fmt_endpoint,
    is_special,
    words_to_addr,
)

log = logging.getLogger(__name__)

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
VERDICTS = (REWRITTEN, CLOSED, KEPT, NEEDS_ADDRESS, REFUSED)


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
    data: bytes | bytearray
    reports: list[SocketReport] = field(default_factory=list)  # only when asked for
    counts: dict[str, int] = field(default_factory=dict)  # verdict -> number of sockets
    problems: list[SocketReport] = field(default_factory=list)  # refused / needs-address

    @property
    def changed(self) -> int:
        return self.counts.get(REWRITTEN, 0) + self.counts.get(CLOSED, 0)


_KIND_NAMES = {imagefile.FILES_MAGIC: "files.img", imagefile.INETSK_MAGIC: "inetsk.img"}


def _inet_entries(data: bytes, path: str) -> Iterator[tuple[int, int, int, object, object]]:
    """(offset, start, end, message, inet_sk_entry) for each inet socket of a socket image.
    Entries of files.img that are not inet sockets are not decoded."""
    magic = imagefile.read_header(data, path, imagefile.MAGIC_BY_NAME.get(posixpath.basename(path)))
    mv = memoryview(data)
    if magic == imagefile.FILES_MAGIC:
        from_string = fdinfo_pb2.file_entry.FromString
        for off, start, end in imagefile.frames(data, path):
            # protobuf-c writes field 1 (type) first, so b"\x08\x04" starts an INETSK entry;
            # any other one-byte type is skipped undecoded; anything else is decoded.
            if end - start >= 2 and data[start] == 0x08:
                kind = data[start + 1]
                if kind != FD_INETSK and kind < 0x80:
                    continue
            try:
                fe = from_string(mv[start:end])
            except DecodeError as exc:
                raise ImageError(path, f"not a valid file_entry: {exc}", off) from None
            if fe.type != FD_INETSK:
                continue
            if not fe.HasField("isk"):
                raise ImageError(path, f"INETSK file_entry id {fe.id} has no isk", off)
            isk = fe.isk
            if fe.id != isk.id:
                raise ImageError(path, f"file_entry.id {fe.id} != isk.id {isk.id}", off)
            yield off, start, end, fe, isk
    elif magic == imagefile.INETSK_MAGIC:
        from_string = sk_inet_pb2.inet_sk_entry.FromString
        for off, start, end in imagefile.frames(data, path):
            try:
                isk = from_string(mv[start:end])
            except DecodeError as exc:
                raise ImageError(path, f"not a valid inet_sk_entry: {exc}", off) from None
            yield off, start, end, isk, isk
    else:
        raise ImageError(path, f"image type 0x{magic:08x} holds no inet sockets")


class _Interner:
    """One IPAddress object per distinct (family, words) of a plan, validated once."""

    def __init__(self) -> None:
        self.addrs: dict[tuple[int, tuple[int, ...]], IPAddress] = {}

    def get(self, family: int, words: tuple[int, ...], path: str, off: int, isk: object,
            which: str) -> IPAddress:
        key = (family, words)
        got = self.addrs.get(key)
        if got is None:
            if family not in (AF_INET, AF_INET6):
                raise ImageError(path, f"inet socket id {isk.id} has family {family}, "  # type: ignore[attr-defined]
                                 "not AF_INET/AF_INET6", off)
            try:
                got = words_to_addr(words, family)
            except ValueError as exc:
                raise ImageError(path, f"inet socket id {isk.id}: {which}: {exc}", off) from None  # type: ignore[attr-defined]
            self.addrs[key] = got
        return got


def _local_addresses(images: Mapping[str, bytes], interner: _Interner) -> list[IPAddress]:
    """Every address the group's sockets use as a source address (first pass)."""
    seen: dict[tuple[int, tuple[int, ...]], IPAddress] = {}
    for path, data in images.items():
        for off, _s, _e, _m, isk in _inet_entries(data, path):
            key = (isk.family, tuple(isk.src_addr))  # type: ignore[attr-defined]
            if key not in seen:
                seen[key] = interner.get(key[0], key[1], path, off, isk, "src_addr")
    return list(seen.values())


# Connected TCP states other than ESTABLISHED, by class (docs/tcp.md). TIME_WAIT sockets
# belong to no process, so CRIU never dumps one: the class is there for completeness.
_TCP_STATE_CLASSES = {2: "tcp-syn-sent", 3: "tcp-syn-sent", 4: "tcp-half-closed",
                      5: "tcp-half-closed", 8: "tcp-half-closed", 9: "tcp-half-closed",
                      11: "tcp-half-closed", 6: "tcp-time-wait"}


def _peer(r: SocketReport, bmap: BoundMap) -> str:
    """Where a connected TCP socket's peer goes: `self` (the same address: the process or
    its host talks to itself), `moved` (a rule moves the peer's address: a group member),
    `outside` (the peer stays where it was)."""
    if r.dst == r.src:
        return "self"
    return "moved" if bmap.lookup(r.dst) is not None else "outside"


def _classify(r: SocketReport, bmap: BoundMap) -> str:
    tcp = r.type == 1
    if tcp and r.state == TCP_LISTEN:
        return "listener"
    if _is_loopback(r.src):
        return "loopback"
    if tcp:
        if r.state not in TCP_CONNECTED_STATES:
            return "unconnected"
        if r.state in _TCP_STATE_CLASSES:
            return _TCP_STATE_CLASSES[r.state]
        return {"self": "tcp-self", "moved": "tcp-peer-moved",
                "outside": "tcp-peer-outside"}[_peer(r, bmap)]
    if r.type == 2:
        return "udp-connected" if r.dport else "udp-bound"
    return "other"


def _is_loopback(addr: IPAddress) -> bool:
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def _decide(r: SocketReport, bmap: BoundMap, options: RewriteOptions) -> None:
    """Fill klass, verdict, reason, new_src, new_dst."""
    r.klass = _classify(r, bmap)
    src_hit = bmap.lookup(r.src, is_src=True)
    dst_hit = bmap.lookup(r.dst)
    connected = r.type == 1 and r.state in TCP_CONNECTED_STATES and r.klass != "loopback"
    peer_is = _peer(r, bmap) if connected else ""
    if peer_is == "outside" and src_hit is not None:
        peer = fmt_endpoint(r.dst, r.dport)
        if options.tcp_outside == "close":
            r.verdict = CLOSED
            r.reason = (f"peer {peer} is outside the map: restored as a closed connection "
                        "(EOF on read, EPIPE on write; nothing bound)")
            return
        if options.tcp_outside == "fail":
            r.verdict = REFUSED
            r.reason = (f"peer {peer} is outside the map and keeps the old 4-tuple: this "
                        "connection cannot survive the move (--tcp-outside fail; close or "
                        "keep would let the restore go on)")
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
        if peer_is == "self":
            why.append("connected to itself")
        elif peer_is == "moved":
            why.append("peer moves with the group (restore it with the same map)")
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


def _set_words(field_: object, words: list[int]) -> None:
    for i, w in enumerate(words):  # IPv4 entries may carry extra words: keep them
        field_[i] = w  # type: ignore[index]


_ZERO = (0, 0, 0, 0)


def _log_decision(path: str, off: int, isk: object, d: SocketReport) -> None:
    """One DEBUG line per socket: where, what, the verdict, the new endpoints, why."""
    sport, dport = isk.src_port, isk.dst_port  # type: ignore[attr-defined]
    new = ""
    if d.new_src is not None or d.new_dst is not None:
        new_l = fmt_endpoint(d.new_src if d.new_src is not None else d.src, sport)
        new_r = fmt_endpoint(d.new_dst if d.new_dst is not None else d.dst, dport)
        new = f" => {new_l} -> {new_r}"
    log.debug("%s@%d: socket id %d %s%s %s %s -> %s: %s%s (%s)", path, off,
              isk.id, d.proto_name, d.family_name[-1], d.state_name if d.type == 1 else "-",  # type: ignore[attr-defined]
              fmt_endpoint(d.src, sport), fmt_endpoint(d.dst, dport), d.verdict, new, d.reason)


def _rewrite_image(
    path: str,
    data: bytes,
    interner: _Interner,
    bmap: BoundMap,
    options: RewriteOptions,
    want_reports: bool,
) -> RewriteResult:
    counts = dict.fromkeys(VERDICTS, 0)
    reports: list[SocketReport] = []
    problems_: list[SocketReport] = []
    # Sockets that agree on (type, state, family, src, dst, peer port) get the same
    # decision, made once: a 10,000-socket image usually has a handful of distinct keys.
    decided: dict[tuple[object, ...], tuple[SocketReport, list[int] | None, list[int] | None]] = {}
    out: bytearray | None = None
    copied = 0
    pack = imagefile.pack_length
    debug = log.isEnabledFor(logging.DEBUG)  # the per-socket decision lines (-v)
    for off, start, end, msg, isk in _inet_entries(data, path):
        fam = isk.family  # type: ignore[attr-defined]
        src_w = tuple(isk.src_addr)  # type: ignore[attr-defined]
        dst_w = tuple(isk.dst_addr)  # type: ignore[attr-defined]
        dport = isk.dst_port  # type: ignore[attr-defined]
        key = (isk.type, isk.state, fam, src_w, dst_w, dport)  # type: ignore[attr-defined]
        d = decided.get(key)
        if d is None:
            src = interner.get(fam, src_w, path, off, isk, "src_addr")
            dst = interner.get(fam, dst_w, path, off, isk, "dst_addr")
            proto = SocketReport(path, off, isk.id, isk.ino, fam, isk.type, isk.proto,  # type: ignore[attr-defined]
                                 isk.state, src, isk.src_port, dst, dport)  # type: ignore[attr-defined]
            try:
                _decide(proto, bmap, options)
            except RewriteError as exc:
                raise RewriteError(f"{path}: {exc}") from None
            d = decided[key] = (
                proto,
                None if proto.new_src is None else addr_to_words(proto.new_src),
                None if proto.new_dst is None else addr_to_words(proto.new_dst),
            )
        proto, new_src_w, new_dst_w = d
        verdict = proto.verdict
        counts[verdict] += 1
        if debug:
            _log_decision(path, off, isk, proto)
        report = None
        if want_reports or verdict in (REFUSED, NEEDS_ADDRESS):
            report = SocketReport(
                path, off, isk.id, isk.ino, fam, isk.type, isk.proto, isk.state,  # type: ignore[attr-defined]
                proto.src, isk.src_port, proto.dst, dport, proto.klass, verdict, proto.reason,  # type: ignore[attr-defined]
                proto.new_src, proto.new_dst,
            )
            if want_reports:
                reports.append(report)
            if verdict != REWRITTEN and verdict != CLOSED and verdict != KEPT:
                problems_.append(report)
        if verdict == REWRITTEN:
            if new_src_w is not None:
                _set_words(isk.src_addr, new_src_w)  # type: ignore[attr-defined]
            if new_dst_w is not None:
                _set_words(isk.dst_addr, new_dst_w)  # type: ignore[attr-defined]
        elif verdict == CLOSED:
            isk.state = TCP_CLOSE  # type: ignore[attr-defined]
            isk.src_port = 0  # type: ignore[attr-defined]
            isk.dst_port = 0  # type: ignore[attr-defined]
            _set_words(isk.src_addr, _ZERO[: len(src_w)])  # type: ignore[attr-defined]
            _set_words(isk.dst_addr, _ZERO[: len(dst_w)])  # type: ignore[attr-defined]
            isk.shutdown = SHUT_BOTH  # type: ignore[attr-defined]
        else:
            continue
        try:
            payload = msg.SerializeToString()  # type: ignore[attr-defined]
        except EncodeError as exc:  # upb decodes entries that lack proto2 required fields
            sid = isk.id  # type: ignore[attr-defined]
            raise ImageError(path, f"inet socket id {sid}: {exc}", off) from None
        if out is None:
            out = bytearray()
        out += data[copied:off]
        out += pack(len(payload))
        out += payload
        copied = end
    if out is not None:
        out += data[copied:]
    return RewriteResult(path, data if out is None else out, reports, counts, problems_)


def plan_group(
    images: Mapping[str, bytes],
    amap: AddressMap,
    resolve: Resolver | None = None,
    options: RewriteOptions = RewriteOptions(),
    reports: bool = True,
) -> dict[str, RewriteResult]:
    """Rewrite all socket images of ONE checkpoint (name -> bytes). Never raises for a
    refused socket or a --strict violation: those show in the results (see problems()).
    With reports=False, only problem sockets get a SocketReport (less memory)."""
    interner = _Interner()
    # With a `local` rule, a destination equal to any source address of the group follows
    # it: that needs one extra decoding pass, made only when such a destination comes up.
    bmap = amap.bind(lambda: _local_addresses(images, interner), resolve)
    return {
        path: _rewrite_image(path, data, interner, bmap, options, reports)
        for path, data in images.items()
    }


def problems(results: Mapping[str, RewriteResult], options: RewriteOptions) -> list[SocketReport]:
    """The sockets that make the rewrite fail: refused ones, and with --strict the ones left
    on an uncovered specific address."""
    bad = {REFUSED} | ({NEEDS_ADDRESS} if options.strict else set())
    return [r for res in results.values() for r in res.problems if r.verdict in bad]


def rewrite_group(
    images: Mapping[str, bytes],
    amap: AddressMap,
    resolve: Resolver | None = None,
    options: RewriteOptions = RewriteOptions(),
    reports: bool = False,
) -> dict[str, RewriteResult]:
    """plan_group, raising RewriteError when any socket is refused or violates --strict."""
    results = plan_group(images, amap, resolve, options, reports)
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
    interner = _Interner()
    for path, data in images.items():
        for off, _s, _e, _m, isk in _inet_entries(data, path):
            interner.get(isk.family, tuple(isk.src_addr), path, off, isk, "src_addr")  # type: ignore[attr-defined]
            interner.get(isk.family, tuple(isk.dst_addr), path, off, isk, "dst_addr")  # type: ignore[attr-defined]
