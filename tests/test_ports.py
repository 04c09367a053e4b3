"""Port moves in the one decision place (core/decide.py) and the splice (issue 13)."""

from __future__ import annotations

import pytest
from pycriu.images import fdinfo_pb2

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk
from overlayfs_inetsk.core import imagefile
from overlayfs_inetsk.core.addrmap import AddressMap
from overlayfs_inetsk.core.decide import RewriteOptions
from overlayfs_inetsk.core.plan import plan_checkpoint, raise_problems
from overlayfs_inetsk.errors import RewriteError

A, B = "10.77.0.1", "10.77.0.2"


def plan(*entries, specs=(), offset=None, fate="close"):
    data = files_img(*(inet_file_entry(e) for e in entries))
    res = plan_checkpoint({"files.img": data}, AddressMap.from_args(specs, port_offset=offset),
                          None, RewriteOptions(tcp_outside=fate))
    return res


def reports(*entries, **kw):
    return {r.id: r for r in plan(*entries, **kw)["files.img"].reports}


def spliced(res):
    img = imagefile.parse(bytes(res["files.img"].data), "files.img")
    out = {}
    for e in img.entries:
        fe = fdinfo_pb2.file_entry.FromString(e.payload)
        out[fe.id] = (fe.isk.src_port, fe.isk.dst_port)
    return out


def ends(r):
    return (r.new_local, r.new_remote, r.verdict)


def test_listener_and_bound_udp_move_both_families():
    rs = reports(isk(1, A, 80), isk(2, A, 53, proto="udp"), isk(3, "fd77::1", 80),
                 isk(4, "::", 53, proto="udp"),
                 specs=[f"{A}:80=:8080", "[fd77::1]:80=[fd77::3]:8081", ":53=:5353"])
    assert ends(rs[1]) == (f"{A}:8080", None, "needs-address")  # A itself stays: no rule
    assert ends(rs[2]) == (f"{A}:5353", None, "needs-address")
    assert ends(rs[3]) == ("[fd77::3]:8081", None, "rewritten")
    assert ends(rs[4]) == ("[::]:5353", None, "rewritten")
    assert rs[3].reason == "src and port 80->8081 by --map [fd77::1]:80=[fd77::3]:8081"


def test_port_and_address_rules_together_and_the_splice():
    res = plan(isk(1, A, 80), isk(2, A, 53, proto="udp"), isk(3, A, 22),
               specs=[f"{A}=10.77.0.3", f"{A}:80=:8080", ":53=:5353"])
    rs = {r.id: r for r in res["files.img"].reports}
    assert ends(rs[1]) == ("10.77.0.3:8080", None, "rewritten")
    assert ends(rs[3]) == ("10.77.0.3:22", None, "rewritten")
    assert rs[1].reason == f"src by --map {A}=10.77.0.3; port 80->8080 by --map {A}:80=:8080"
    assert spliced(res) == {1: (8080, 0), 2: (5353, 0), 3: (22, 0)}


def test_accepted_connections_inherit_their_listeners_port_and_a_self_connection_moves():
    # a listener on any address, a connection to itself through it (client 3 <-> accepted 2)
    rs = reports(isk(1, "0.0.0.0", 80), isk(2, A, 80, A, 40000), isk(3, A, 40000, A, 80),
                 specs=[":80=:8080"])
    assert ends(rs[1]) == ("0.0.0.0:8080", None, "rewritten")
    assert ends(rs[2]) == (f"{A}:8080", None, "needs-address")  # A: no address rule
    assert "with its listener 0.0.0.0:80" in rs[2].reason
    assert ends(rs[3]) == (None, f"{A}:8080", "needs-address")  # A: no address rule
    assert "dst port 80->8080 (its peer socket is in this checkpoint)" in rs[3].reason


def test_self_connection_with_offset_moves_both_ends_both_ports():
    res = plan(isk(1, A, 80), isk(2, A, 80, A, 40000), isk(3, A, 40000, A, 80),
               specs=[f"{A}=10.77.0.3"], offset=1000)
    rs = {r.id: r for r in res["files.img"].reports}
    assert ends(rs[2]) == ("10.77.0.3:1080", "10.77.0.3:41000", "rewritten")
    assert ends(rs[3]) == ("10.77.0.3:41000", "10.77.0.3:1080", "rewritten")
    assert spliced(res) == {1: (1080, 0), 2: (1080, 41000), 3: (41000, 1080)}


def test_loopback_self_connection_follows_too():
    rs = reports(isk(1, "127.0.0.1", 5000), isk(2, "127.0.0.1", 5000, "127.0.0.1", 41000),
                 isk(3, "127.0.0.1", 41000, "127.0.0.1", 5000), specs=[":5000=:6000"])
    assert ends(rs[2]) == ("127.0.0.1:6000", None, "rewritten")
    assert ends(rs[3]) == (None, "127.0.0.1:6000", "rewritten")


def test_udp_connected_to_a_bound_socket_of_the_checkpoint_follows_it():
    rs = reports(isk(1, "0.0.0.0", 53, proto="udp"), isk(2, A, 4000, A, 53, proto="udp"),
                 specs=[":53=:5353"])
    assert ends(rs[2])[:2] == (None, f"{A}:5353")


@pytest.mark.parametrize("fate, verdict", [("close", "closed"), ("fail", "refused"),
                                           ("keep", "needs-address")])
def test_accepted_connection_from_outside_gets_the_outside_fate(fate, verdict):
    rs = reports(isk(1, A, 80), isk(2, A, 80, "10.77.9.9", 50000), specs=[f"{A}:80=:8080"],
                 fate=fate)
    assert rs[2].verdict == verdict
    assert "10.77.9.9:50000 is outside the map" in rs[2].reason


def test_peer_in_the_group_gets_the_same_rules():
    # B moves with the group; A's port rule names A by address: B's side will follow
    rs = reports(isk(1, A, 80), isk(2, A, 80, B, 50000),
                 specs=[f"{B}=10.77.0.4", f"{A}:80=:8080", f"{B}:50000=:50001"])
    assert ends(rs[2]) == (f"{A}:8080", "10.77.0.4:50001", "rewritten")
    assert "peer moves with the group" in rs[2].reason


def test_a_split_of_a_group_connection_is_refused_with_the_socket_named():
    # A's port moves by an any-address rule but A's address is not in the map: B, restored
    # with the same map, sees A as outside and keeps A:80
    res = plan(isk(1, A, 80), isk(2, A, 80, B, 50000), specs=[f"{B}=10.77.0.4", ":80=:8080"])
    rs = {r.id: r for r in res["files.img"].reports}
    assert rs[2].verdict == "refused"
    assert "would split the connection with 10.77.0.2:50000" in rs[2].reason
    assert f"name this end by address ({A}:80=:PORT)" in rs[2].reason
    with pytest.raises(RewriteError, match=r"files.img: socket id 2 tcp 10.77.0.1:80 -> "
                                           r"10.77.0.2:50000: refused: would split"):
        raise_problems(res, RewriteOptions())


def test_accepted_on_a_specific_address_rule_but_listener_on_any_is_refused_for_the_group():
    # the rule names A:80 but the socket was accepted by 0.0.0.0:80, which stays: the
    # connection stays with its listener, and B would look for it at :8080
    rs = reports(isk(1, "0.0.0.0", 80), isk(2, A, 80, B, 50000),
                 specs=[f"{B}=10.77.0.4", f"{A}:80=:8080"])
    assert rs[2].verdict == "refused"
    assert "will look for it at 10.77.0.1:8080" in rs[2].reason


def test_two_sockets_onto_one_port_are_refused_naming_each_other():
    rs = reports(isk(1, A, 80), isk(2, A, 81), specs=[":80=:81"])
    assert rs[1].verdict == rs[2].verdict == "refused"
    assert rs[1].reason == ("two sockets onto one port: 10.77.0.1:80 goes to 10.77.0.1:81 by "
                            "--map :80=:81, where files.img: socket id 2 (10.77.0.1:81) also "
                            "goes (stays)")
    # onto a wildcard socket's port
    rs = reports(isk(1, A, 80), isk(2, "0.0.0.0", 81), specs=[f"{A}:80=:81"])
    assert rs[1].verdict == "refused"
    # a swap is fine, and so is another protocol or family on that port
    rs = reports(isk(1, A, 80), isk(2, A, 81), isk(3, A, 81, proto="udp"),
                 isk(4, "fd77::1", 81), specs=[":80=:81", f"{A}:81=:80"])
    assert {r.verdict for r in rs.values()} <= {"needs-address", "rewritten"}


def test_sockets_that_shared_a_port_still_may():
    rs = reports(isk(1, "0.0.0.0", 53, proto="udp"), isk(2, A, 53, proto="udp"), offset=100)
    assert {r.new_sport for r in rs.values()} == {153}
    assert "refused" not in {r.verdict for r in rs.values()}


def test_offset_past_65535_refuses_that_socket_only():
    res = plan(isk(1, A, 80), isk(2, A, 65000, "10.77.9.9", 443), offset=1000, fate="keep")
    rs = {r.id: r for r in res["files.img"].reports}
    assert rs[1].new_sport == 1080
    assert rs[2].verdict == "refused"
    assert rs[2].reason == "port 65000 +1000 = 66000 is out of range (1-65535) (--port-offset 1000)"
    with pytest.raises(RewriteError, match="socket id 2 tcp 10.77.0.1:65000"):
        raise_problems(res, RewriteOptions())


def test_client_connection_to_outside_under_offset_is_closed_by_default():
    rs = reports(isk(1, A, 40000, "10.77.9.9", 443), offset=1000)
    assert rs[1].verdict == "closed"


def test_unbound_and_zero_ports_stay():
    rs = reports(isk(1, "0.0.0.0", 0, state=7), offset=5)
    assert ends(rs[1]) == (None, None, "kept")


def test_address_only_maps_decide_as_before():
    rs = reports(isk(1, A, 80), isk(2, A, 80, A, 40000), isk(3, A, 40000, A, 80),
                 specs=[f"{A}=10.77.0.3"])
    assert all(r.new_sport is None and r.new_dport is None for r in rs.values())
    assert rs[3].reason == "src by --map 10.77.0.1=10.77.0.3; dst by --map " \
                           "10.77.0.1=10.77.0.3; connected to itself"
