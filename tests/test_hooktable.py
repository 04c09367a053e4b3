"""hooktable: when the UPDATE_INETSK hook can apply the plan exactly (pure, no CRIU)."""

from __future__ import annotations

import ipaddress

import pytest

from overlayfs_inetsk.core.addrmap import AddressMap
from overlayfs_inetsk.core.hooktable import hook_plan
from overlayfs_inetsk.planner.sources import load_map
from overlayfs_inetsk.core.decide import RewriteOptions
from overlayfs_inetsk.core.plan import plan_checkpoint as plan_group
from overlayfs_inetsk.core.sockaddr import addr_to_words
from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk

A, B, P = "10.77.0.1", "10.77.0.2", "10.77.0.3"


def plan(*sks, specs=("10.77.0.1=10.77.0.2",), env=None, fate="close"):
    images = {"files.img": files_img(*(inet_file_entry(s) for s in sks))}
    amap = load_map(list(specs), env=env)
    return plan_group(images, amap, None, RewriteOptions(tcp_outside=fate), reports=True)


def w(addr: str) -> tuple[int, ...]:
    words = addr_to_words(ipaddress.ip_address(addr))
    return tuple((words + [0, 0, 0])[:4])


def test_listener_udp_and_self_connection_give_one_entry_per_key():
    hp = hook_plan(plan(isk(1, A, 7001), isk(2, A, 7002, proto="udp"),
                        isk(3, A, 7008, A, 40000), isk(4, A, 40000, A, 7008),
                        isk(5, "0.0.0.0", 7006)))
    assert hp.entries is not None, hp.why_not
    by_key = {(e.family, e.state, e.src, e.dst): e for e in hp.entries}
    assert len(by_key) == 4  # both ends of the self-connection share a key and a decision
    assert by_key[(2, 10, w(A), w("0.0.0.0"))].new_src == w(B)
    assert by_key[(2, 1, w(A), w(A))].new_dst == w(B)
    assert by_key[(2, 10, w("0.0.0.0"), w("0.0.0.0"))].moves is False  # left alone
    assert hp.changed == 3
    lines = hp.wire().splitlines()
    assert lines[0] == "TABLE 4"
    a_word = f"{w(A)[0]:x}"
    assert f"2 a {a_word} 0 0 0 0 0 0 0 M {w(B)[0]:x} 0 0 0 0 0 0 0" in lines
    assert "2 a 0 0 0 0 0 0 0 0 L" in lines


def test_ipv6_and_ipv4_mapped_ipv6():
    hp = hook_plan(plan(isk(1, "fd77::1", 7004), isk(2, f"::ffff:{A}", 7005),
                        specs=("10.77.0.1=10.77.0.2", "fd77::1=fd77::2")))
    assert hp.entries is not None
    got = {e.src: e.new_src for e in hp.entries}
    assert got == {w("fd77::1"): w("fd77::2"), w(f"::ffff:{A}"): w(f"::ffff:{B}")}


def test_inetsk_local_ipv4_alone_is_local4():
    hp = hook_plan(plan(isk(1, A, 7001), specs=(), env={"INETSK_LOCAL_IPV4": B}))
    assert [(e.src, e.new_src) for e in hp.entries] == [(w(A), w(B))]


def test_a_connection_restored_closed_needs_the_view():
    hp = hook_plan(plan(isk(1, A, 7001), isk(2, A, 40000, P, 80), fate="close"))
    assert hp.entries is None
    assert "restored closed" in hp.why_not and "state and ports" in hp.why_not


def test_fate_keep_is_address_only():
    hp = hook_plan(plan(isk(2, A, 40000, P, 80), fate="keep"))
    assert hp.entries is not None and hp.changed == 1


def test_sockets_the_hook_cannot_tell_apart_but_the_plan_does_need_the_view():
    # same family, state (CLOSE), src and dst: a UDP socket and an unconnected TCP socket;
    # only a map that treats them differently could split them, so build the reports by hand
    results = plan(isk(1, A, 7002, proto="udp"), isk(2, A, 7003, proto="tcp", state=7))
    reports = [r for res in results.values() for r in res.reports]
    assert hook_plan(reports).entries is not None  # the map decides them alike
    d = reports[1].decision._replace(verdict="rewritten", action="set",
                                     new_src=ipaddress.ip_address(P), hook="set")
    reports[1] = reports[1]._replace(decision=d)
    hp = hook_plan(reports)
    assert hp.entries is None and "cannot tell" in hp.why_not


def test_a_socket_whose_peer_alone_moves_is_set_by_the_hook_as_in_the_view():
    """A connected UDP socket on an address no rule covers (needs-address) whose peer a port
    rule moves to another address, on the same port: the view changes its dst, and so does
    the hook's table (it used to leave the socket alone, restoring another plan than the
    view's)."""
    results = plan(isk(1, "10.77.5.5", 4000, B, 53, proto="udp"),
                   specs=("10.77.0.2:53=10.77.0.9:53",))
    [r] = results["files.img"].reports
    assert (r.verdict, str(r.new_dst), r.new_sport, r.new_dport) == (
        "needs-address", "10.77.0.9", None, None)
    hp = hook_plan(results)
    assert hp.entries is not None, hp.why_not
    [e] = hp.entries
    assert (e.src, e.dst, e.new_src, e.new_dst) == (w("10.77.5.5"), w(B), w("10.77.5.5"),
                                                    w("10.77.0.9"))


@pytest.mark.parametrize("limit, ok", [(4, True), (3, False)])
def test_table_size_limit(limit, ok):
    hp = hook_plan(plan(*(isk(i, f"10.77.0.{i}", 7000) for i in range(1, 5)),
                        specs=("10.77.0.0/24=10.77.1.0/24",)), max_entries=limit)
    assert (hp.entries is not None) is ok
    if not ok:
        assert hp.why_not == "more than 3 distinct sockets for the hook"


@pytest.mark.parametrize("specs", [("10.77.0.1:7001=10.77.0.2:9001",), (":7001=:9001",),
                                   ("local=10.77.0.2",)])
def test_a_port_move_needs_the_view(specs):
    """The hook changes addresses only: a plan that moves a port is not a hook table."""
    amap_specs = list(specs)
    images = {"files.img": files_img(inet_file_entry(isk(1, A, 7001)))}
    offset = None if specs != ("local=10.77.0.2",) else 1000
    amap = AddressMap.from_args(amap_specs, port_offset=offset)
    hp = hook_plan(plan_group(images, amap, None, RewriteOptions(), reports=True))
    assert hp.entries is None
    assert "moves to another port" in hp.why_not
