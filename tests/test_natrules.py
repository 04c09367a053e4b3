"""Fate nat and the peers' ruleset (core/decide.py, core/natrules.py; issue 22). Pure: no
nft here (tests/integration/test_tcp_nat.py applies the table in real namespaces)."""

from __future__ import annotations

import ipaddress

import pytest

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk
from overlayfs_inetsk.core.addrmap import AddressMap
from overlayfs_inetsk.core.decide import TCP_FATES, RewriteOptions
from overlayfs_inetsk.core.natrules import (
    NatConn,
    apply_script,
    check_table_name,
    nat_connections,
    remove_script,
    ruleset,
    table_name,
)
from overlayfs_inetsk.core.plan import plan_checkpoint

MAP = ["10.77.0.1=10.77.0.2", "fd77::1=fd77::2"]
a = ipaddress.ip_address


def plan(*entries, specs=MAP, fate="nat", offset=None):
    data = files_img(*(inet_file_entry(e) for e in entries))
    res = plan_checkpoint({"files.img": data},
                          AddressMap.from_args(specs, port_offset=offset), None,
                          RewriteOptions(tcp_outside=fate))
    return res["files.img"].reports


def test_nat_is_a_fate():
    assert "nat" in TCP_FATES
    RewriteOptions(tcp_outside="nat")


@pytest.mark.parametrize("state", [1, 4, 5, 8, 9, 11])  # ESTABLISHED and the closing states
def test_nat_restores_established_at_the_new_address_and_asks_the_peer(state):
    [r] = plan(isk(2, "10.77.0.1", 7800, "10.77.0.3", 40000, state=state))
    assert (r.verdict, str(r.new_src), r.new_dst, r.peer_nat) == ("rewritten", "10.77.0.2",
                                                                 None, True)
    assert "10.77.0.3:40000 is outside the map" in r.reason and "fate nat" in r.reason


@pytest.mark.parametrize("fate", ["close", "keep", "fail"])
def test_other_fates_ask_nothing_of_the_peer(fate):
    [r] = plan(isk(2, "10.77.0.1", 7800, "10.77.0.3", 40000), fate=fate)
    assert r.peer_nat is False
    assert nat_connections([r]) == []


def test_only_outside_connections_whose_local_end_moves_need_the_peer():
    reports = plan(
        isk(1, "10.77.0.1", 7800),  # a listener
        isk(2, "10.77.0.1", 7800, "10.77.0.3", 40000),  # outside, moved: nat
        isk(3, "10.77.0.1", 7800, "10.77.0.1", 40001),  # to itself
        isk(4, "10.77.0.5", 7800, "10.77.0.3", 40002),  # its end not moved by the map
        isk(5, "127.0.0.1", 7800, "127.0.0.1", 40003),  # loopback
    )
    assert [r.id for r in reports if r.peer_nat] == [2]
    assert nat_connections(reports) == [
        NatConn(4, a("10.77.0.3"), 40000, a("10.77.0.1"), 7800, a("10.77.0.2"), 7800)]


def test_a_port_move_is_in_the_connection_and_the_rules():
    [r] = plan(isk(2, "fd77::1", 7800, "fd77::3", 40000), offset=1000)
    assert (r.verdict, r.new_sport, r.peer_nat) == ("rewritten", 8800, True)
    [c] = nat_connections([r])
    assert c == NatConn(6, a("fd77::3"), 40000, a("fd77::1"), 7800, a("fd77::2"), 8800)
    text = ruleset([c])
    assert ("ip6 saddr fd77::3 tcp sport 40000 ip6 daddr fd77::1 tcp dport 7800 notrack "
            "ip6 daddr set fd77::2 tcp dport set 8800") in text
    assert ("ip6 saddr fd77::2 tcp sport 8800 ip6 daddr fd77::3 tcp dport 40000 notrack "
            "ip6 saddr set fd77::1 tcp sport set 7800") in text


def test_ipv4_mapped_connections_get_ipv4_rules():
    [r] = plan(isk(2, "::ffff:10.77.0.1", 7800, "::ffff:10.77.0.3", 40000),
               specs=["10.77.0.1=10.77.0.2"])
    assert r.peer_nat
    assert nat_connections([r]) == [
        NatConn(4, a("10.77.0.3"), 40000, a("10.77.0.1"), 7800, a("10.77.0.2"), 7800)]


V4 = NatConn(4, a("10.77.0.3"), 40000, a("10.77.0.1"), 7800, a("10.77.0.2"), 7800)
V6 = NatConn(6, a("fd77::3"), 40001, a("fd77::1"), 7800, a("fd77::2"), 7800)


def test_the_ruleset_rewrites_both_directions_where_the_client_traffic_passes():
    name = table_name([V4])
    assert ruleset([V4], "/srv/ckpt") == (
        "# overlayfs-inetsk nat-rules: /srv/ckpt\n"
        f"table inet {name} {{\n"
        "\tchain prerouting {\n"
        "\t\ttype filter hook prerouting priority raw; policy accept;\n"
        "\t\t# 10.77.0.3:40000 -> 10.77.0.1:7800 now at 10.77.0.2:7800\n"
        "\t\tip saddr 10.77.0.3 tcp sport 40000 ip daddr 10.77.0.1 tcp dport 7800 notrack "
        "ip daddr set 10.77.0.2\n"
        "\t\tip saddr 10.77.0.2 tcp sport 7800 ip daddr 10.77.0.3 tcp dport 40000 notrack "
        "ip saddr set 10.77.0.1\n"
        "\t}\n"
        "\tchain output {\n"
        "\t\ttype route hook output priority raw; policy accept;\n"
        "\t\t# 10.77.0.3:40000 -> 10.77.0.1:7800 now at 10.77.0.2:7800\n"
        "\t\tip saddr 10.77.0.3 tcp sport 40000 ip daddr 10.77.0.1 tcp dport 7800 notrack "
        "ip daddr set 10.77.0.2\n"
        "\t}\n"
        "}\n")


def test_one_table_for_both_families_named_by_its_connections():
    both = ruleset([V6, V4])
    assert both.count("table inet ") == 1 and "ip6 daddr set fd77::2" in both
    assert table_name([V4, V6]) == table_name([V6, V4])  # the plan's order does not matter
    assert table_name([V4]) != table_name([V4, V6]) != table_name([V6])
    check_table_name(table_name([V4]))
    for bad in ("filter", "overlayfs_inetsk_nat_", "overlayfs_inetsk_nat_XYZ123456789",
                table_name([V4]) + "0"):
        with pytest.raises(ValueError, match="is not a table of overlayfs-inetsk nat-rules"):
            check_table_name(bad)


def test_apply_replaces_its_own_table_and_remove_takes_only_it():
    name = table_name([V4])
    text = apply_script([V4])
    assert text.startswith(f"table inet {name}\ndelete table inet {name}\n")
    assert text.endswith(ruleset([V4]))
    assert remove_script(name) == f"table inet {name}\ndelete table inet {name}\n"
    with pytest.raises(ValueError):
        remove_script("filter")


def test_no_connection_no_table():
    assert "no connection of fate nat" in ruleset([])
    assert "table" not in ruleset([]).replace("# ", "").split("\n", 1)[1]
    assert apply_script([]) == ""
