"""The one entry point from an image tree and an address map to what happens to its sockets.
Long: the one pass over a checkpoint's entries and what keeps it fast (a decision per kind
of socket, not per socket; one pass for `local` maps) belong together.

    plan_tree(tree, amap, resolve, options)   one CheckpointPlan per checkpoint dir
    plan_checkpoint(images, amap, ...)        one checkpoint dir, its images already read

Every adapter goes through here: `inspect` (cli/images.py), the offline `rewrite`
(offline.py), `restore` and `barrier` (node/), mount validation (fuse/daemon.py) and the
FUSE view's generation on first open (fuse/ops.py). No other module loops over checkpoint
dirs or socket entries. Per entry, in ONE decoding pass: entries.py decodes it, decide.py
decides its fate (once per distinct key), entries.py splices a changed entry back when the
bytes are asked for.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

from ..errors import RewriteError
from .addrmap import AddressMap, BoundMap, Resolver
from .decide import (
    CLOSED,
    KEPT,
    NEEDS_ADDRESS,
    REFUSED,
    REWRITTEN,
    VERDICTS,
    Decision,
    PortContext,
    RewriteOptions,
    Sock,
    SocketReport,
    decision,
    log_decision,
    peer_class,
    reason_maker,
)
from .decide import decide as decide_one
from .decide import log as decide_log
from .entries import (
    Interner,
    Splicer,
    check_required,
    close_connection,
    inet_entries,
    set_endpoints,
)
from .imagedir import read_group
from .sockaddr import AF_INET, AF_INET6, IPAddress
from .tree import ImageTree

# What a pass does: "check" decodes only (mount validation: the map is applied on first
# open, when an `auto` address is looked up); "rewrite" decides every socket and splices
# the changed entries back in the same pass. inspect needs the splice too: an entry that
# decodes but cannot be re-encoded (a proto2 required field missing) is an image error
# (exit 4) for inspect as for rewrite and mount.
Mode = Literal["check", "rewrite"]


@dataclass
class RewriteResult:
    """The plan of one socket image (and its bytes when rewritten)."""

    path: str
    data: bytes | bytearray  # the rewritten bytes ("rewrite"), else the original ones
    reports: list[SocketReport] = field(default_factory=list)  # only when asked for
    counts: dict[str, int] = field(default_factory=dict)  # verdict -> number of sockets
    problems: list[SocketReport] = field(default_factory=list)  # refused / needs-address
    changed: int = 0  # entries spliced: rewritten, closed, and needs-address ones whose port moves


@dataclass
class CheckpointPlan:
    """One checkpoint dir of a tree: its socket images and what happens to every socket."""

    dir_inode: int
    name: str  # the dir inside the tree, for messages ("." for the root)
    paths: dict[str, str]  # image name ("files.img") -> real path, as messages name it
    results: dict[str, RewriteResult]  # real path -> its plan (data only, in "check" mode)

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

    def socks() -> Iterator[Sock]:
        for path, data in images.items():
            for off, _s, _e, _m, isk in inet_entries(data, path):
                fam = isk.family
                yield Sock(path, isk.id, isk.type, isk.state, fam,
                           interner.get(fam, tuple(isk.src_addr), path, off, isk, "src_addr"),
                           isk.src_port,
                           interner.get(fam, tuple(isk.dst_addr), path, off, isk, "dst_addr"),
                           isk.dst_port, isk.proto)

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
                ports: PortContext | None = None, seen: _Seen | None = None) -> RewriteResult:
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
    # at once. A socket's own report is made only when asked for (reports, a problem, -v),
    # its reason derived from its class's first one (decide.reason_maker).
    classes: dict[tuple[object, ...], Decision] = {}
    # id(Decision) -> (it, its reason maker): checked by identity, since `classes` may let
    # a Decision go and a new one take its id
    makers: dict[int, tuple[Decision, Callable[[IPAddress, int], str] | None]] = {}
    changed = 0
    splicer = Splicer(data, path)
    replace, keep = splicer.replace, splicer.keep
    debug = decide_log.isEnabledFor(logging.DEBUG)  # the per-socket decision lines (-v)
    might_move, lookup = bmap.might_move, bmap.lookup
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
        d = classes.get(key)
        if d is None:
            if dst is None:
                dst = interner.get(fam, dst_w, path, off, isk, "dst_addr")
            first = SocketReport(path, off, isk.id, isk.ino, fam, isk.type, isk.proto,
                                 isk.state, src, sport, dst, dport)
            d = classes[key] = decision(first, bmap, options, ports)
            if len(classes) > _SAME_MAX:
                classes.clear()  # keyed per socket (port moves): a key seldom comes back
                classes[key] = d
        proto = d.report
        verdict = proto.verdict
        counts[verdict] += 1
        if want_reports or verdict in (REFUSED, NEEDS_ADDRESS) or debug:
            if dst is None:
                dst = interner.get(fam, dst_w, path, off, isk, "dst_addr")
            if proto.offset == off and proto.file == path:
                report = proto  # the class's first socket, decided as itself
            else:
                report = SocketReport(
                    path, off, isk.id, isk.ino, fam, isk.type, isk.proto, isk.state,
                    src, isk.src_port, dst, dport, proto.klass, verdict, proto.reason,
                    proto.new_src, proto.new_dst, proto.new_sport, proto.new_dport,
                    proto.peer_nat,
                )
                if dport != proto.dport or dst != proto.dst:
                    made = makers.get(id(d))
                    if made is not None and made[0] is d:
                        mk = made[1]
                    else:
                        mk = reason_maker(proto)
                        makers[id(d)] = (d, mk)
                    if mk is None:
                        decide_one(report, bmap, options, ports)
                    else:
                        report.reason = mk(dst, dport)
            if debug:
                log_decision(path, off, isk, report)
            if want_reports:
                reports.append(report)
            if verdict != REWRITTEN and verdict != CLOSED and verdict != KEPT:
                problems_.append(report)
        if verdict == REWRITTEN or (verdict == NEEDS_ADDRESS and d.changes):
            set_endpoints(isk, d.src_words, d.dst_words, proto.new_sport, proto.new_dport)
        elif verdict == CLOSED:
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
    if amap.moves_ports():
        # With a `local` rule, a destination equal to any source address of the checkpoint
        # follows it; the port decisions ask the map about every socket up front: the
        # source addresses are collected first (one more decoding pass).
        bmap = amap.bind(lambda: _local_addresses(images, interner), resolve)
        ports = _port_context(images, interner, bmap)
        return {path: _plan_image(path, data, interner, bmap, options, reports, ports)
                for path, data in images.items()}
    # Without port moves, the map asks for the source addresses when a destination first
    # needs them, and gets those met so far (one pass instead of two). The pass notes the
    # source addresses it meets after that (`seen.late`); the map notes the addresses it
    # said were not the image's own (BoundMap.said_not_local): if it may have said so of a
    # late one, that answer may be wrong, and the checkpoint is planned again knowing every
    # source address. A server's listeners usually come before its connections.
    seen = _Seen()
    bmap = amap.bind(seen.asked, resolve)
    results = {path: _plan_image(path, data, interner, bmap, options, reports, None, seen)
               for path, data in images.items()}
    if seen.late and any(bmap.said_not_local(*key) for key in seen.late):
        decide_log.debug("%s: a source address came after the peers judged against it: "
                         "planning again", ", ".join(images))
        bmap = amap.bind(list(seen.srcs.values()), resolve)
        results = {path: _plan_image(path, data, Interner(), bmap, options, reports)
                   for path, data in images.items()}
    return results


class _Seen:
    """What one planning pass met: for plan_checkpoint's `local` check."""

    __slots__ = ("srcs", "asking", "late")

    def __init__(self) -> None:
        self.srcs: dict[tuple[int, tuple[int, ...]], IPAddress] = {}  # every source
        self.asking = False  # the map has asked for the source addresses
        self.late: list[tuple[int, tuple[int, ...]]] = []  # sources first met after it asked

    def asked(self) -> list[IPAddress]:
        self.asking = True
        return list(self.srcs.values())

    def src(self, key: tuple[int, tuple[int, ...]], addr: IPAddress) -> None:
        if key not in self.srcs:
            self.srcs[key] = addr
            if self.asking:
                self.late.append(key)


def problems(results: Mapping[str, RewriteResult], options: RewriteOptions) -> list[SocketReport]:
    """The sockets that make the rewrite fail: refused ones, and with --strict the ones left
    on an uncovered specific address."""
    bad = {REFUSED} | ({NEEDS_ADDRESS} if options.strict else set())
    return [r for res in results.values() for r in res.problems if r.verdict in bad]


def raise_problems(results: Mapping[str, RewriteResult], options: RewriteOptions) -> None:
    """RewriteError naming the first socket that makes the rewrite fail, if any."""
    bad = problems(results, options)
    if bad:
        first = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise RewriteError(
            f"{first.file}: socket id {first.id} {first.kind} {first.local} -> "
            f"{first.remote}: {first.verdict}: {first.reason}{more}"
        )


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


def generator(amap: AddressMap, resolve: Resolver | None, options: RewriteOptions
              ) -> Callable[[Mapping[str, bytes]], dict[str, RewriteResult]]:
    """What the FUSE view calls on first open of a checkpoint's socket image."""
    return partial(rewrite_checkpoint, amap=amap, resolve=resolve, options=options)


def served_bytes(paths: Mapping[str, bytes | str],
                 generate: Callable[[Mapping[str, bytes]], Mapping[str, RewriteResult]]
                 ) -> dict[str, bytes]:
    """Read one checkpoint's originals (image name -> real path) and run `generate` over
    them: image name -> the bytes to serve (the original where the generator left one
    out). The generator sees each image under its real path, so messages name the file."""
    by_path = {os.fsdecode(real): name for name, real in paths.items()}
    images = read_group(by_path)
    results = generate(images)
    out: dict[str, bytes] = {}
    for path, name in by_path.items():
        r = results.get(path)
        out[name] = images[path] if r is None else bytes(r.data)
    return out


def plan_tree(
    tree: ImageTree,
    amap: AddressMap,
    resolve: Resolver | None = None,
    options: RewriteOptions = RewriteOptions(),
    *,
    mode: Mode = "rewrite",
    reports: bool = True,
) -> Iterator[CheckpointPlan]:
    """One CheckpointPlan per checkpoint dir of `tree` (every dir holding a socket image),
    in the tree's order. Raises ImageError for a malformed image; never for a refused
    socket (see problems())."""
    for dino, group in tree.iter_socket_groups():
        paths = {name: os.fsdecode(real) for name, real in group.items()}
        results = plan_checkpoint(read_group(paths.values()), amap, resolve, options, reports,
                                  mode)
        yield CheckpointPlan(dino, tree.display(dino), paths, results)


def merged(plans: Iterator[CheckpointPlan]) -> dict[str, RewriteResult]:
    """Every image's result of every checkpoint, by real path (inspect's, rewrite's and
    restore's view of a whole tree)."""
    out: dict[str, RewriteResult] = {}
    for cp in plans:
        out.update(cp.results)
    return out
