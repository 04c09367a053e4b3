"""Each socket's own class, verdict and reason (core/decide.py): the decision shared by
sockets with one key must not carry a reason that depends on a field left out of the key
(issue 14)."""

from __future__ import annotations

import json

import pytest

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk
from overlayfs_inetsk.core.addrmap import AddressMap
from overlayfs_inetsk.core.decide import RewriteOptions
from overlayfs_inetsk.core.plan import plan_checkpoint
from overlayfs_inetsk.cli.render import render_json, render_table

MAP = ["10.0.1.0/24=10.77.1.0/24", "fd00::/64=fd77::/64"]


def plan(*entries, specs=MAP):
    data = files_img(*(inet_file_entry(e) for e in entries))
    res = plan_checkpoint({"files.img": data}, AddressMap.from_args(specs), None,
                          RewriteOptions())
    return res["files.img"].reports


@pytest.mark.parametrize("order", ["unbound-first", "bound-first"])
@pytest.mark.parametrize("proto, state, src", [
    ("udp", 7, "0.0.0.0"), ("udp", 7, "::"),
    ("tcp", 7, "0.0.0.0"), ("tcp", 7, "::"),  # zdtm socket-tcp-unconn / socket-tcp6-unconn
])
def test_reason_follows_each_sockets_own_port(order, proto, state, src):
    unbound = isk(1, src, 0, proto=proto, state=state)
    bound = isk(2, src, 5353, proto=proto, state=state)
    sks = [unbound, bound] if order == "unbound-first" else [bound, unbound]
    reasons = {r.id: r.reason for r in plan(*sks)}
    assert reasons == {1: "not bound", 2: "bound to any address"}


# ---- raw and ping sockets (issue 14). CRIU 4.2.1 (sk-inet.c) dumps SOCK_RAW sockets with
# any protocol and stores the protocol where a port would be (the kernel's inet_num): a raw
# UDP socket has src_port 17. On restore it binds a raw socket to its source address
# (inet_bind: no IP_FREEBIND for SOCK_RAW, so a missing address fails in both families),
# and never binds a ping socket (SOCK_DGRAM + IPPROTO_ICMP/ICMPV6).
SOCK_RAW, IPPROTO_ICMP, IPPROTO_UDP, IPPROTO_ICMPV6 = 3, 1, 17, 58


def raw(id_, src, proto, dst="", **kw):
    sk = isk(id_, src, proto, dst, proto="udp", state=7, **kw)
    sk.type, sk.proto = SOCK_RAW, proto
    return sk


def ping(id_, src, echo_id=0, dst="", dport=0):
    sk = isk(id_, src, echo_id, dst, dport, proto="udp", state=7)
    sk.proto = IPPROTO_ICMPV6 if ":" in src else IPPROTO_ICMP
    return sk


def _results(*entries, specs=MAP):
    data = files_img(*(inet_file_entry(e) for e in entries))
    return plan_checkpoint({"/img/files.img": data}, AddressMap.from_args(specs), None,
                           RewriteOptions())


def test_raw_and_ping_show_their_type_in_table_and_json():
    res = _results(raw(1, "127.0.0.12", IPPROTO_UDP), raw(2, "fd00::5", IPPROTO_ICMPV6),
                   ping(3, "10.0.1.5", 7), ping(4, "fd00::5", 9),
                   isk(5, "10.0.1.5", 53, proto="udp", state=7), isk(6, "10.0.1.5", 80))
    doc = json.loads(render_json("/img", AddressMap.from_args(MAP), res))
    got = {s["id"]: (s["type"], s["proto"], s["family"], s["class"]) for s in doc["sockets"]}
    assert doc["schema"] == 1
    assert got == {1: ("raw", "udp", "ipv4", "raw"), 2: ("raw", "icmpv6", "ipv6", "raw"),
                   3: ("dgram", "icmp", "ipv4", "ping"), 4: ("dgram", "icmpv6", "ipv6", "ping"),
                   5: ("dgram", "udp", "ipv4", "udp-bound"),
                   6: ("stream", "tcp", "ipv4", "listener")}
    rows = [line.split() for line in render_table("/img", res, False).splitlines()]
    assert rows[0][:4] == ["FILE", "ID", "TYPE", "PROTO"]
    assert {row[1]: tuple(row[2:4]) for row in rows[1:-1]} == {
        "1": ("raw", "udp4"), "2": ("raw", "icmp6"), "3": ("dgram", "icmp4"),
        "4": ("dgram", "icmp6"), "5": ("dgram", "udp4"), "6": ("stream", "tcp4")}
    assert "icmpv66" not in render_table("/img", res, True)


def test_raw_socket_is_rewritten_when_a_rule_covers_it_else_needs_its_address():
    # CRIU binds a raw socket to its source address: a rule moves it like any bound socket;
    # without one the restore's bind fails in BOTH families (no IP_FREEBIND for SOCK_RAW)
    by_id = {r.id: r for r in plan(raw(1, "10.0.1.5", IPPROTO_UDP),
                                   raw(2, "fd00::5", IPPROTO_ICMPV6),
                                   raw(3, "10.9.9.9", IPPROTO_UDP),
                                   raw(4, "fd09::9", 253),
                                   raw(5, "0.0.0.0", IPPROTO_UDP))}
    assert (by_id[1].verdict, str(by_id[1].new_src)) == ("rewritten", "10.77.1.5")
    assert (by_id[2].verdict, str(by_id[2].new_src)) == ("rewritten", "fd77::5")
    for i in (3, 4):
        assert by_id[i].verdict == "needs-address"
        assert "bind fails" in by_id[i].reason and "raw sockets get no IP_FREEBIND" in (
            by_id[i].reason)
    assert (by_id[5].verdict, by_id[5].reason) == ("kept", "bound to any address")


@pytest.mark.parametrize("sk", [raw(1, "10.9.9.9", IPPROTO_ICMP),
                                raw(1, "fd09::9", IPPROTO_ICMPV6)], ids=["raw4", "raw6"])
def test_raw_icmp_socket_is_never_bound_by_criu(sk):
    # open_inet_sk skips inet_bind for IPPROTO_ICMP/ICMPV6 whatever the type
    [r] = plan(sk)
    assert (r.klass, r.verdict) == ("raw", "kept")
    assert "CRIU does not bind an ICMP socket" in r.reason


def test_ping_socket_is_never_bound_so_an_uncovered_address_is_no_problem():
    by_id = {r.id: r for r in plan(ping(1, "10.0.1.5", 7), ping(2, "10.9.9.9", 7),
                                   ping(3, "fd09::9", 7),
                                   ping(4, "10.9.9.9", 7, "10.0.1.8", 1))}
    assert (by_id[1].verdict, str(by_id[1].new_src)) == ("rewritten", "10.77.1.5")
    for i in (2, 3):
        assert by_id[i].verdict == "kept", by_id[i]
        assert "CRIU does not bind an ICMP socket" in by_id[i].reason
    # connected (a non-zero peer "port"): CRIU connects it, so the peer follows the map
    assert (by_id[4].klass, by_id[4].verdict, str(by_id[4].new_dst)) == (
        "ping", "rewritten", "10.77.1.8")


def test_ping_and_udp_with_one_address_get_their_own_decisions():
    # the key holds the protocol: a ping socket first must not make a UDP one "kept"
    r = {x.id: x for x in plan(ping(1, "10.9.9.9", 7), isk(2, "10.9.9.9", 7, proto="udp",
                                                                state=7))}
    assert (r[1].klass, r[1].verdict) == ("ping", "kept")
    assert (r[2].klass, r[2].verdict) == ("udp-bound", "needs-address")


@pytest.mark.parametrize("make", [lambda: ping(1, "10.0.1.5", 7),
                                  lambda: raw(1, "10.0.1.5", IPPROTO_UDP)], ids=["ping", "raw"])
def test_port_offset_leaves_echo_ids_and_raw_protocols_alone(make):
    # a ping socket's "port" is its ICMP echo id and a raw socket's its protocol: CRIU binds
    # neither port, so a port offset moves neither (only the address)
    data = files_img(inet_file_entry(make()), inet_file_entry(isk(2, "10.0.1.5", 7, proto="udp",
                                                                   state=7)))
    res = plan_checkpoint({"files.img": data}, AddressMap.from_args(MAP, port_offset=1000),
                          None, RewriteOptions())["files.img"]
    r = {x.id: x for x in res.reports}
    assert (r[1].verdict, str(r[1].new_src), r[1].new_sport) == ("rewritten", "10.77.1.5", None)
    assert (r[2].verdict, r[2].new_sport) == ("rewritten", 1007)  # UDP port 7 does move
