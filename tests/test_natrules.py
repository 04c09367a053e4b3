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
    check_table,
    check_table_name,
    nat_connections,
    remove_script,
    ruleset,
    table_name,
)
from overlayfs_inetsk.core.plan import plan_checkpoint
from overlayfs_inetsk.errors import RewriteError

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
    key = "ip6 saddr . tcp sport . ip6 daddr . tcp dport"
    # the address first, then the port, looked up by the packet as the address left it
    assert ("\t\tip6 daddr set " + key + " map @to_new6 notrack tcp dport set " + key
            + " map @to_new6_port\n") in text
    assert ("\t\tip6 saddr set " + key + " map @from_old6 notrack tcp sport set " + key
            + " map @from_old6_port\n") in text
    assert "\t\t\tfd77::3 . 40000 . fd77::1 . 7800 : fd77::2,\n" in text
    assert "\t\t\tfd77::3 . 40000 . fd77::2 . 7800 : 8800,\n" in text
    assert "\t\t\tfd77::2 . 8800 . fd77::3 . 40000 : fd77::1,\n" in text
    assert "\t\t\tfd77::1 . 8800 . fd77::3 . 40000 : 7800,\n" in text


def test_ipv4_mapped_connections_get_ipv4_rules():
    [r] = plan(isk(2, "::ffff:10.77.0.1", 7800, "::ffff:10.77.0.3", 40000),
               specs=["10.77.0.1=10.77.0.2"])
    assert r.peer_nat
    assert nat_connections([r]) == [
        NatConn(4, a("10.77.0.3"), 40000, a("10.77.0.1"), 7800, a("10.77.0.2"), 7800)]


def test_a_connection_with_mixed_families_is_refused_naming_the_file_and_socket():
    """An IPv6 socket from an IPv4-mapped address to a plain IPv6 peer (a crafted image:
    no kernel connects one) has no family for its table: RewriteError, not a crash."""
    [r] = plan(isk(2, "::ffff:10.77.0.1", 7800, "fd77::3", 40000), specs=["10.77.0.1=10.77.0.2"])
    assert r.peer_nat
    with pytest.raises(RewriteError, match=r"^files\.img: socket id 2: mixed IPv4 and IPv6 "
                       r"endpoints \(\[::ffff:10\.77\.0\.1\]:7800 -> \[fd77::3\]:40000, new "
                       r"10\.77\.0\.2:7800\): no nftables table of one family"):
        nat_connections([r])


V4 = NatConn(4, a("10.77.0.3"), 40000, a("10.77.0.1"), 7800, a("10.77.0.2"), 7800)
V6 = NatConn(6, a("fd77::3"), 40001, a("fd77::1"), 7800, a("fd77::2"), 7800)


KEY4 = "ip saddr . tcp sport . ip daddr . tcp dport"
MAPTYPE4 = "ipv4_addr . inet_service . ipv4_addr . inet_service"


def test_the_ruleset_rewrites_both_directions_where_the_client_traffic_passes():
    name = table_name([V4])
    assert ruleset([V4], "/srv/ckpt") == (
        "# overlayfs-inetsk nat-rules: /srv/ckpt\n"
        "# 1 connection(s) of fate nat, keyed by the packet's saddr . sport . daddr . dport:\n"
        "# to_new: the client's packets to the old address go to the new one; from_old: the "
        "replies come from the old one\n"
        f"table inet {name} {{\n"
        "\tmap to_new4 {\n"
        f"\t\ttype {MAPTYPE4} : ipv4_addr\n"
        "\t\telements = {\n"
        "\t\t\t10.77.0.3 . 40000 . 10.77.0.1 . 7800 : 10.77.0.2,\n"
        "\t\t}\n"
        "\t}\n"
        "\tmap from_old4 {\n"
        f"\t\ttype {MAPTYPE4} : ipv4_addr\n"
        "\t\telements = {\n"
        "\t\t\t10.77.0.2 . 7800 . 10.77.0.3 . 40000 : 10.77.0.1,\n"
        "\t\t}\n"
        "\t}\n"
        "\tchain prerouting {\n"
        "\t\ttype filter hook prerouting priority raw; policy accept;\n"
        f"\t\tip daddr set {KEY4} map @to_new4 notrack\n"
        f"\t\tip saddr set {KEY4} map @from_old4 notrack\n"
        "\t}\n"
        "\tchain output {\n"
        "\t\ttype route hook output priority raw; policy accept;\n"
        f"\t\tip daddr set {KEY4} map @to_new4 notrack\n"
        "\t}\n"
        "}\n")


def test_a_thousand_connections_are_a_thousand_elements_not_rules():
    conns = [NatConn(4, a(f"10.77.1.{1 + i % 200}"), 20000 + i, a("10.77.0.1"), 7800,
                     a("10.77.0.2"), 7800) for i in range(1000)]
    text = ruleset(conns)
    chains = text[text.index("\tchain prerouting"):]
    assert chains.count("\n\t\tip ") == 3  # two rules in prerouting, one in output
    assert text.count(" : 10.77.0.2,\n") == 1000 and text.count(" : 10.77.0.1,\n") == 1000
    assert "\t\t\t10.77.1.200 . 20199 . 10.77.0.1 . 7800 : 10.77.0.2,\n" in text
    assert "_port" not in text  # no port moves: no port maps


def test_with_one_port_move_every_connection_of_its_family_is_in_the_port_maps():
    """A miss in a port map would keep the port, so an unmoved connection has its element
    too (its own port): were another's key the same, the table would be refused."""
    moved = NatConn(4, a("10.77.0.3"), 40000, a("10.77.0.1"), 7800, a("10.77.0.2"), 8800)
    kept = NatConn(4, a("10.77.0.4"), 40000, a("10.77.0.1"), 7800, a("10.77.0.2"), 7800)
    text = ruleset([moved, kept, V6])
    assert "\t\t\t10.77.0.3 . 40000 . 10.77.0.2 . 7800 : 8800,\n" in text
    assert "\t\t\t10.77.0.4 . 40000 . 10.77.0.2 . 7800 : 7800,\n" in text
    assert "\t\t\t10.77.0.1 . 7800 . 10.77.0.4 . 40000 : 7800,\n" in text
    assert "map to_new4_port" in text and "map to_new6_port" not in text  # V6: no move
    # the same client endpoint to another old server, kept at the port the moved one's
    # packets have after the address rewrite: one lookup, two answers
    clash = NatConn(4, a("10.77.0.3"), 40000, a("10.77.0.5"), 7800, a("10.77.0.2"), 7800)
    with pytest.raises(RewriteError, match="would give 8800 and 7800"):
        ruleset([moved, clash])


def test_two_connections_one_lookup_cannot_tell_apart_are_refused():
    # one client endpoint to two old servers on one port, moved to one new address with
    # two ports: after the address rewrite both packets look alike
    x = NatConn(4, a("10.77.0.3"), 40000, a("10.77.0.1"), 80, a("10.77.0.9"), 8001)
    y = NatConn(4, a("10.77.0.3"), 40000, a("10.77.0.5"), 80, a("10.77.0.9"), 8002)
    for call in (lambda: ruleset([x, y]), lambda: check_table([y, x])):
        with pytest.raises(RewriteError, match=r"^connections 10\.77\.0\.3:40000 -> "
                           r"10\.77\.0\.1:80 now at 10\.77\.0\.9:8001 and .*: one "
                           r"nftables table cannot rewrite both"):
            call()
    check_table([x])
    # two connections restored at one 4-tuple: the replies cannot be told apart
    z = NatConn(4, a("10.77.0.3"), 40000, a("10.77.0.5"), 80, a("10.77.0.9"), 8001)
    with pytest.raises(RewriteError, match="cannot rewrite both"):
        check_table([x, z])


def test_one_table_for_both_families_named_by_its_connections():
    both = ruleset([V6, V4])
    assert both.count("table inet ") == 1
    assert "\t\t\tfd77::3 . 40001 . fd77::1 . 7800 : fd77::2,\n" in both
    assert "\t\ttype ipv6_addr . inet_service . ipv6_addr . inet_service : ipv6_addr\n" in both
    assert "\t\tip6 daddr set ip6 saddr . tcp sport . ip6 daddr . tcp dport map @to_new6 " \
        "notrack\n" in both
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


def test_the_plan_of_such_connections_is_refused_where_it_is_made():
    reports = plan(isk(2, "10.77.0.1", 80, "10.77.0.3", 40000),
                   isk(3, "10.77.0.5", 80, "10.77.0.3", 40000),
                   specs=["10.77.0.1:80=10.77.0.9:8001", "10.77.0.5:80=10.77.0.9:8002"])
    assert [(str(r.new_src), r.new_sport, r.peer_nat) for r in reports] == [
        ("10.77.0.9", 8001, True), ("10.77.0.9", 8002, True)]
    with pytest.raises(RewriteError, match="one nftables table cannot rewrite both"):
        nat_connections(reports)  # inspect, nat-rules and restore refuse it (exit 5)


def test_the_table_docs_tcp_md_shows_is_the_one_nat_rules_prints():
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "tcp.md").read_text()
    start = page.index("```text\n# overlayfs-inetsk nat-rules: /srv/ckpt/web\n") + len("```text\n")
    shown = page[start:page.index("```\n", start)]
    assert shown == ruleset([V4], "/srv/ckpt/web")
