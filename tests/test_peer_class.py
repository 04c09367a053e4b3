"""plan.py decides once per kind of socket (decide.peer_class) and gives every socket of
the class that one Decision (its reasons rendered with each socket's own peer). That must be
what decide() says of each socket on its own: compared here report by report, over a matrix
of sockets that share classes (many peers per class) and maps, fates and families that
exercise every branch of decide()."""

from __future__ import annotations

import itertools

import pytest

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk
from overlayfs_inetsk.core.addrmap import AddressMap
from overlayfs_inetsk.core.decide import RewriteOptions, decide
from overlayfs_inetsk.core.entries import inet_entries
from overlayfs_inetsk.core.plan import plan_checkpoint
from overlayfs_inetsk.core.report import SocketReport
from overlayfs_inetsk.core.sockaddr import AF_INET6, fmt_addr, words_to_addr
from overlayfs_inetsk.core.sockets import Socket

MAPS = {
    "group": ["10.77.0.1=10.77.0.3", "10.77.0.2=10.77.0.4", "fd77::1=fd77::3"],
    "local": ["local=10.77.0.99", "local=fd77::99"],
    "prefix": ["10.77.0.0/24=10.78.0.0/24"],
    "none": [],
}
SRCS = ["10.77.0.1", "10.77.0.7", "0.0.0.0", "127.0.0.1", "169.254.1.1", "fd77::1", "::",
        "::1", "fe80::1", "::ffff:10.77.0.1"]
DSTS = ["", "self", "10.77.0.2", "10.77.0.1", "10.77.5.5", "10.77.6.6", "10.77.0.9",
        "127.0.0.1", "fd77::2", "fd77::1:5", "fd77::1:6", "::ffff:10.77.5.5"]
PORTS = [0, 7, 80, 443, 40000, 40001]


def sockets():
    """Sockets of every kind, several per class (same class, different peers)."""
    sid = 0
    for proto, src, dst, sport, dport in itertools.product(
            ("tcp", "udp"), SRCS, DSTS, (0, 5353), PORTS):
        v6 = ":" in src
        if dst == "self":
            dst = src
        if dst and (":" in dst) != v6:
            continue
        if dst == "" and dport:
            continue
        states = (1, 7, 10, 8) if proto == "tcp" else (7, 1)
        for state in states:
            sid += 1
            yield isk(sid, src, sport, dst, dport, proto=proto, state=state,
                      family=AF_INET6 if v6 else None)


def reference(data: bytes, amap: AddressMap, options: RewriteOptions) -> list[tuple]:
    """decide() on every socket by itself."""
    entries = [e[4] for e in inet_entries(data, "files.img")]
    srcs = [words_to_addr(tuple(s.src_addr), s.family) for s in entries]
    bmap = amap.bind(srcs, None)
    out = []
    for (off, *_rest, s), src in zip(inet_entries(data, "files.img"), srcs):
        sk = Socket("files.img", off, s.id, s.ino, s.family, s.type, s.proto, s.state, src,
                    s.src_port, words_to_addr(tuple(s.dst_addr), s.family), s.dst_port)
        out.append(row(SocketReport(sk, decide(sk, bmap, options))))
    return out


def row(r: SocketReport) -> tuple:
    return (r.offset, r.id, r.src, r.sport, r.dst, r.dport, r.klass, r.verdict, r.reason,
            r.new_src, r.new_dst)


@pytest.mark.parametrize("fate", ["close", "keep", "fail"])
@pytest.mark.parametrize("mapname", sorted(MAPS))
def test_every_report_is_what_decide_says_of_that_socket(mapname, fate):
    data = files_img(*(inet_file_entry(s) for s in sockets()))
    amap = AddressMap.from_args(MAPS[mapname])
    options = RewriteOptions(tcp_outside=fate)
    res = plan_checkpoint({"files.img": data}, amap, None, options)["files.img"]
    got = [row(r) for r in res.reports]
    want = reference(data, amap, options)
    assert len(got) == len(want) > 1000
    for g, w in zip(got, want):
        assert g == w
    # without reports: the same counts, and the problem sockets' reports are the same
    bare = plan_checkpoint({"files.img": data}, amap, None, options, reports=False)["files.img"]
    assert bare.counts == res.counts
    assert [row(r) for r in bare.problems] == [row(r) for r in res.problems]
    assert bytes(bare.data) == bytes(res.data)


def test_a_class_shares_one_decision_among_distinct_peers():
    """The worst case the caches are for: 300 connections from 300 peers, one class."""
    entries = [isk(i + 1, "10.77.0.1", 8080, f"10.77.{1 + i // 200}.{1 + i % 200}", 40000 + i)
               for i in range(300)]
    data = files_img(*(inet_file_entry(s) for s in entries))
    amap = AddressMap.from_args(MAPS["local"])
    options = RewriteOptions(tcp_outside="keep")
    res = plan_checkpoint({"files.img": data}, amap, None, options)["files.img"]
    assert [row(r) for r in res.reports] == reference(data, amap, options)
    assert len({r.reason for r in res.reports}) == 300  # each names its own peer
    assert len({id(r.decision) for r in res.reports}) == 1  # from one decision
    assert res.counts["rewritten"] == 300


@pytest.mark.parametrize("order", ["listener-first", "listener-last"])
@pytest.mark.parametrize("peer", ["10.77.0.2", "::ffff:10.77.0.2"])
def test_a_source_address_met_after_a_peer_was_judged(order, peer):
    """plan_checkpoint answers `local` questions with the source addresses met so far and
    plans again when a later one was already judged as a peer (an IPv4-mapped peer is its
    IPv4 address): the result is the same as with every source address known from the
    start."""
    src = "::ffff:10.77.0.1" if ":" in peer else "10.77.0.1"
    conn = isk(1, src, 40000, peer, 80)  # its peer is the listener below
    other = isk(2, src, 40001, peer.replace("0.2", "9.9"), 443)  # a peer outside
    listener = isk(3, "10.77.0.2", 80)
    entries = [listener, conn, other] if order == "listener-first" else [conn, other, listener]
    data = files_img(*(inet_file_entry(s) for s in entries))
    amap = AddressMap.from_args(["local=10.77.0.99"])
    options = RewriteOptions(tcp_outside="keep")
    res = plan_checkpoint({"files.img": data}, amap, None, options)["files.img"]
    assert [row(r) for r in res.reports] == reference(data, amap, options)
    r = next(r for r in res.reports if r.id == 1)
    assert (r.klass, fmt_addr(r.new_dst)) == ("tcp-peer-moved",
                                              peer.replace("0.2", "0.99"))
