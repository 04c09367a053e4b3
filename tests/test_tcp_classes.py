"""Classes and verdicts of connected TCP sockets (core/decide.py, issue 6)."""

from __future__ import annotations

import pytest

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk
from overlayfs_inetsk.core.addrmap import AddressMap
from overlayfs_inetsk.core.decide import RewriteOptions
from overlayfs_inetsk.core.plan import plan_checkpoint

GROUP = ["10.77.0.1=10.77.0.3", "10.77.0.2=10.77.0.4", "fd77::1=fd77::3"]


def plan(*entries, specs=GROUP, fate="close"):
    data = files_img(*(inet_file_entry(e) for e in entries))
    res = plan_checkpoint({"files.img": data}, AddressMap.from_args(specs), None,
                     RewriteOptions(tcp_outside=fate))
    return res["files.img"].reports


@pytest.mark.parametrize("state, klass", [
    (1, "tcp-peer-moved"), (2, "tcp-syn-sent"), (3, "tcp-syn-sent"), (4, "tcp-half-closed"),
    (5, "tcp-half-closed"), (6, "tcp-time-wait"), (8, "tcp-half-closed"),
    (9, "tcp-half-closed"), (11, "tcp-half-closed"), (7, "unconnected"), (10, "listener"),
])
def test_class_by_state_peer_in_the_group(state, klass):
    [r] = plan(isk(2, "10.77.0.1", 40000, "10.77.0.2", 7400, state=state))
    assert r.klass == klass
    if state in (1, 2, 3, 4, 5, 6, 8, 9, 11):  # both ends follow the one map
        assert (str(r.new_src), str(r.new_dst), r.verdict) == ("10.77.0.3", "10.77.0.4",
                                                               "rewritten")
        assert "peer moves with the group" in r.reason


@pytest.mark.parametrize("state", [1, 4, 5, 8, 9, 11, 2])
@pytest.mark.parametrize("fate, verdict", [("close", "closed"), ("keep", "rewritten"),
                                           ("fail", "refused")])
def test_fates_apply_to_every_connected_state(state, fate, verdict):
    [r] = plan(isk(2, "10.77.0.1", 40000, "10.77.9.9", 443, state=state), fate=fate)
    assert r.verdict == verdict
    assert "10.77.9.9:443 is outside the map" in r.reason
    if state == 1:
        assert r.klass == "tcp-peer-outside"
    if fate == "keep":
        assert (str(r.new_src), r.new_dst) == ("10.77.0.3", None)


def test_self_connection_and_its_reason():
    [r] = plan(isk(2, "10.77.0.1", 40000, "10.77.0.1", 7400))
    assert (r.klass, str(r.new_src), str(r.new_dst)) == ("tcp-self", "10.77.0.3", "10.77.0.3")
    assert r.reason.endswith("connected to itself")


def test_half_closed_self_connection_keeps_its_reason():
    [r] = plan(isk(2, "10.77.0.1", 40000, "10.77.0.1", 7400, state=5))
    assert r.klass == "tcp-half-closed" and r.reason.endswith("connected to itself")


def test_loopback_connection_is_left_alone():
    [r] = plan(isk(2, "127.0.0.1", 40000, "127.0.0.1", 7400), fate="fail")
    assert (r.klass, r.verdict) == ("loopback", "kept")


def test_ipv6_group_connection():
    [r] = plan(isk(2, "fd77::1", 40000, "fd77::2", 7400),
               specs=["fd77::1=fd77::3", "fd77::2=fd77::4"])
    assert (r.klass, str(r.new_src), str(r.new_dst)) == ("tcp-peer-moved", "fd77::3", "fd77::4")


def test_member_restored_in_place_follows_a_moved_peer():
    """Its own address has no rule (it stays), its peer moves: only dst changes."""
    [r] = plan(isk(2, "10.77.0.5", 40000, "10.77.0.1", 7400))
    assert (r.klass, r.new_src, str(r.new_dst)) == ("tcp-peer-moved", None, "10.77.0.3")


def test_fail_reason_says_what_to_do():
    [r] = plan(isk(2, "10.77.0.1", 40000, "10.77.9.9", 443), fate="fail")
    assert "cannot survive the move" in r.reason and "close or keep" in r.reason
