"""One checkpoint's socket images and an address map to what happens to every socket, and
the bytes to serve: the one pass over the entries.

    plan_checkpoint(images, amap, resolve, options)   the images of one checkpoint dir
                                                      (path -> bytes), planned together
    rewrite_checkpoint(...)                           the same, RewriteError for a refusal

The planner (planner/planner.py) calls it for every adapter; no other module loops over
socket entries. Per entry, in ONE decoding pass: entries.py decodes it, decide.py decides
its fate (once per kind of socket: see _plan_image), entries.py splices a changed entry
back. The `local` protocol that keeps it one pass is boundmap.one_pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from .. import lazylog
from ..errors import RewriteError
from ..record import Record
from .addrmap import AddressMap
from .boundmap import BoundMap, Resolver, Sources, one_pass
from .bytepass import plan_bytes
from .decide import (
    CLOSE,
    CLOSED,
    KEPT,
    NEEDS_ADDRESS,
    REFUSED,
    REWRITTEN,
    SET,
    VERDICTS,
    Decision,
    RewriteOptions,
    decide,
    fails,
    peer_class,
)
from .entries import (
    Interner,
    Splicer,
    check_required,
    close_connection,
    inet_entries,
    set_endpoints,
)
from .ports import PortContext
from .report import SocketReport, log_decision
from .report import log as decide_log
from .sockaddr import AF_INET, AF_INET6, IPAddress
from .sockets import Socket

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from typing import Literal

# What a pass does: "check" decodes only (mount validation: the map is applied on first
# open, when an `auto` address is looked up); "rewrite" decides every socket and splices
# the changed entries back in the same pass. inspect needs the splice too: an entry that
# decodes but cannot be re-encoded (a proto2 required field missing) is an image error
# (exit 4) for inspect as for rewrite and mount.
if TYPE_CHECKING:
    Mode = Literal["check", "rewrite"]
else:
    Mode = str


class RewriteResult(Record):
    """The plan of one socket image (and its bytes when rewritten). (A Record, not a
    dataclass: ..record.)"""

    __slots__ = ("path", "data", "reports", "counts", "problems", "changed")
    __hash__ = None  # type: ignore[assignment]  # mutable, as a dataclass with eq is
    path: str
    data: bytes | bytearray  # the rewritten bytes ("rewrite"), else the original ones
    reports: list[SocketReport]  # only when asked for
    counts: dict[str, int]  # verdict -> number of sockets
    problems: list[SocketReport]  # refused / needs-address
    changed: int  # entries spliced: rewritten, closed, and needs-address ones whose port moves

    def __init__(self, path: str, data: bytes | bytearray,
                 reports: list[SocketReport] | None = None,
                 counts: dict[str, int] | None = None,
                 problems: list[SocketReport] | None = None, changed: int = 0) -> None:
        self.path, self.data, self.changed = path, data, changed
        self.reports = [] if reports is None else reports
        self.counts = {} if counts is None else counts
        self.problems = [] if problems is None else problems


class CheckpointPlan(Record):
    """One checkpoint dir of a tree: its socket images and what happens to every socket.
    (A Record, not a dataclass: ..record.)"""

    __slots__ = ("dir_inode", "name", "paths", "results")
    __hash__ = None  # type: ignore[assignment]  # mutable, as a dataclass with eq is
    dir_inode: int
    name: str  # the dir inside the tree, for messages ("." for the root)
    paths: dict[str, str]  # image name ("files.img") -> real path, as messages name it
    results: dict[str, RewriteResult]  # real path -> its plan (data only, in "check" mode)

    def __init__(self, dir_inode: int, name: str, paths: dict[str, str],
                 results: dict[str, RewriteResult]) -> None:
        self.dir_inode, self.name, self.paths, self.results = dir_inode, name, paths, results

    def data(self) -> dict[str, bytes | bytearray]:
        """Image name -> the bytes to serve or write (the original where nothing changed)."""
        return {name: self.results[path].data for name, path in self.paths.items()}


def _local_addresses(images: Mapping[str, bytes], interner: Interner) -> list[IPAddress]:
    """Every address the checkpoint's sockets use as a source address (for `local` rules;
    an extra decoding pass, made only when a destination needs it)."""
    seen: dict[tuple[int, tuple[int, ...]], IPAddress] = {}
    for path, data in images.items():
        for off, _s, _e, _m, isk in inet_entries(data, path):
            key = (isk.family, tuple(isk.src_addr))
            if key not in seen:
                seen[key] = interner.get(key[0], key[1], path, off, isk, "src_addr")
    return list(seen.values())


def _port_context(images: Mapping[str, bytes], interner: Interner,
                  bmap: BoundMap) -> PortContext:
    """The checkpoint's sockets as the port decisions need them (one more decoding pass,
    made only when the map moves ports)."""

    def socks() -> Iterator[Socket]:
        for path, data in images.items():
            for off, _s, _e, _m, isk in inet_entries(data, path):
                fam = isk.family
                yield Socket(path, off, isk.id, isk.ino, fam, isk.type, isk.proto, isk.state,
                             interner.get(fam, tuple(isk.src_addr), path, off, isk, "src_addr"),
                             isk.src_port,
                             interner.get(fam, tuple(isk.dst_addr), path, off, isk, "dst_addr"),
                             isk.dst_port)

    return PortContext.build(socks(), bmap)


def _check_image(path: str, data: bytes, interner: Interner) -> RewriteResult:
    for off, _s, _e, msg, isk in inet_entries(data, path):
        check_required(path, off, msg, isk)
        interner.get(isk.family, tuple(isk.src_addr), path, off, isk, "src_addr")
        interner.get(isk.family, tuple(isk.dst_addr), path, off, isk, "dst_addr")
    return RewriteResult(path, data)


_SAME_MAX = 1024  # decisions kept by _plan_image (memory for 10,000 peers with port moves)


def _plan_image(path: str, data: bytes, interner: Interner, bmap: BoundMap,
                options: RewriteOptions, want_reports: bool,
                ports: PortContext | None = None, seen: Sources | None = None) -> RewriteResult:
    debug = decide_log.isEnabledFor(lazylog.DEBUG)  # the per-socket decision lines (-v)
    if ports is None and not want_reports and not debug:  # in the bytes, when it can
        fast = plan_bytes(path, data, interner, bmap, options, seen)
        if fast is not None:
            return RewriteResult(path, fast[0], [], fast[1], fast[2], fast[3])
    counts = dict.fromkeys(VERDICTS, 0)
    reports: list[SocketReport] = []
    problems_: list[SocketReport] = []
    # decide() runs once per kind of socket, not once per socket: `classes` holds one
    # Decision per key, and the key holds every fact decide() reads. Without port moves
    # (ports=None) that is decide.peer_class: what the socket is (type, proto, state,
    # family, src), whether its ports are 0 (the reason says "not bound" or "bound to any
    # address"), whether its peer is itself and where the map moves the peer. A server with
    # 10,000 clients has a handful of classes; most peers are classed from their address
    # words alone (BoundMap.might_move), with no address object. With port moves, decide()
    # reads much more: the key is the socket's whole 4-tuple. What repeats from one entry to
    # the next (a service's source address, an unconnected socket's empty peer) is looked
    # at once. A socket's own report is made only when asked for (reports, a problem, -v):
    # its class's Decision beside its own facts (reasons are rendered with them).
    classes: dict[tuple[object, ...], tuple[Decision, str, str, tuple[int, ...] | None,
                                            tuple[int, ...] | None, int | None, int | None,
                                            Socket]] = {}
    changed = 0
    splicer = Splicer(data, path)
    replace, keep = splicer.replace, splicer.keep
    might_move, lookup = bmap.might_move, bmap.lookup
    new_tuple = tuple.__new__
    srcs: dict[tuple[int, tuple[int, ...]], IPAddress] = {}  # (family, words) -> address
    last_dst: tuple[int, tuple[int, ...]] | None = None
    dst: IPAddress | None = None
    moved: tuple[IPAddress, str] | None = None
    for off, _start, end, msg, isk in inet_entries(data, path):
        fam = isk.family
        src_w = tuple(isk.src_addr[:])  # a slice first: twice as fast as upb's iterator
        dst_w = tuple(isk.dst_addr[:])
        dport = isk.dst_port
        sport = isk.src_port
        skey = (fam, src_w)
        src = srcs.get(skey)
        if src is None:
            src = srcs[skey] = interner.get(fam, src_w, path, off, isk, "src_addr")  # checks fam
            if seen is not None:
                seen.src(skey, src)
            if len(srcs) > _SAME_MAX:  # a socket per source address: keep memory flat
                srcs.clear()
        if ports is None:
            if last_dst is None or dst_w != last_dst[1] or fam != last_dst[0]:
                last_dst = (fam, dst_w)
                if (len(dst_w) == 4 if fam == AF_INET6 else dst_w) and not might_move(
                        fam, dst_w):
                    dst = moved = None
                else:
                    dst = interner.get(fam, dst_w, path, off, isk, "dst_addr")
                    try:
                        moved = lookup(dst)
                    except RewriteError as exc:  # an `auto` target that cannot be resolved
                        raise RewriteError(f"{path}: {exc}") from None
            key = peer_class(isk.type, isk.proto, isk.state, fam, src_w, sport, dport,
                             dst_w[0] == src_w[0] if fam == AF_INET else dst_w == src_w,
                             moved)
        else:  # the local port matters too
            dst = interner.get(fam, dst_w, path, off, isk, "dst_addr")
            key = (isk.type, isk.proto, isk.state, fam, src_w, dst_w, dport, sport)
        got = classes.get(key)
        if got is None:
            if dst is None:
                dst = interner.get(fam, dst_w, path, off, isk, "dst_addr")
            first = Socket(path, off, isk.id, isk.ino, fam, isk.type, isk.proto, isk.state,
                           src, sport, dst, dport)
            d = decide(first, bmap, options, ports)
            # what the pass reads of it, at hand for every socket of the class
            got = classes[key] = (d, d.verdict, d.action, d.src_words, d.dst_words,
                                  d.new_sport, d.new_dport, first)
            if len(classes) > _SAME_MAX:
                classes.clear()  # keyed per socket (port moves): a key seldom comes back
                classes[key] = got
        d, verdict, action, src_words, dst_words, new_sport, new_dport, first = got
        counts[verdict] += 1
        if want_reports or verdict in (REFUSED, NEEDS_ADDRESS) or debug:
            if first.offset != off:  # not the class's first socket
                if dst is None:
                    dst = interner.get(fam, dst_w, path, off, isk, "dst_addr")
                # = Socket(...) and SocketReport(first, d), without their __new__ (10,000
                # sockets: 2 ms of inspect's plan)
                first = new_tuple(Socket, (path, off, isk.id, isk.ino, fam, isk.type,
                                           isk.proto, isk.state, src, sport, dst, dport))
            report = new_tuple(SocketReport, (first, d))
            if debug:
                log_decision(report)
            if want_reports:
                reports.append(report)
            if verdict != REWRITTEN and verdict != CLOSED and verdict != KEPT:
                problems_.append(report)
        if action == SET:
            set_endpoints(isk, src_words, dst_words, new_sport, new_dport)
        elif action == CLOSE:
            close_connection(isk)
        else:
            keep(off, msg, isk)
            continue
        replace(off, end, msg, isk)
        changed += 1
    return RewriteResult(path, splicer.result(), reports, counts, problems_, changed)


def plan_checkpoint(
    images: Mapping[str, bytes],
    amap: AddressMap,
    resolve: Resolver | None = None,
    options: RewriteOptions = RewriteOptions(),
    reports: bool = True,
    mode: Mode = "rewrite",
) -> dict[str, RewriteResult]:
    """Plan and rewrite all socket images of ONE checkpoint (path -> bytes) together, in one
    decoding pass (mode="check": decode and validate only). Never raises for a refused
    socket or a --strict violation: those show in the results (see problems()). With
    reports=False, only problem sockets get a SocketReport (less memory)."""
    interner = Interner()
    if mode == "check":
        return {path: _check_image(path, data, interner) for path, data in images.items()}

    def plan(bmap: BoundMap, sources: Sources | None) -> dict[str, RewriteResult]:
        ports = None if sources is not None or not bmap.moves_ports else _port_context(
            images, interner, bmap)
        return {path: _plan_image(path, data, interner, bmap, options, reports, ports, sources)
                for path, data in images.items()}

    # the source addresses, collected by a pass of their own when the map needs them first
    # (boundmap.one_pass: the map moves ports)
    return one_pass(amap, resolve, plan, lambda: _local_addresses(images, interner),
                    ", ".join(images))


def problems(results: Mapping[str, RewriteResult], options: RewriteOptions) -> list[SocketReport]:
    """The sockets that make the rewrite fail (decide.fails: refused ones, and with
    --strict the ones left on an uncovered specific address)."""
    return [r for res in results.values() for r in res.problems if fails(r.decision, options)]


def raise_problems(results: Mapping[str, RewriteResult], options: RewriteOptions) -> None:
    """RewriteError naming the first socket that makes the rewrite fail, if any."""
    bad = problems(results, options)
    if bad:
        first = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise RewriteError(f"{first.line()}{more}")


def rewrite_checkpoint(
    images: Mapping[str, bytes],
    amap: AddressMap,
    resolve: Resolver | None = None,
    options: RewriteOptions = RewriteOptions(),
    reports: bool = False,
) -> dict[str, RewriteResult]:
    """plan_checkpoint with the bytes, raising RewriteError when any socket is refused or
    violates --strict (what a view serves must restore as planned)."""
    results = plan_checkpoint(images, amap, resolve, options, reports)
    raise_problems(results, options)
    return results
