"""The plugin through CRIU's UPDATE_INETSK hook (issue 11), with real CRIU.

The patched CRIU (tests/criu-hook/, test-only: the hook as upstream defines it, on 4.2.1)
calls the hook; stock 4.2.1 does not. One .so for both: on the patched CRIU the planner
answers a table and no view is made, on 4.2.1 the same plan comes as a view.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from inetsk_testbed import criu, probe
from inetsk_testbed.probe import ProbeError

from .test_criu_hook import HOOK_CRIU, build_plugin as build_test_plugin, calls, events
from .test_plugin import (  # noqa: F401  (fixtures)
    A4,
    A6,
    SERVICE as PLAIN_SERVICE,
    assert_on_new_ports_only,
    built_so,
    plugin,
    place_port_map,
    plugin_lines,
    restore,
    views_left,
)

pytestmark = [pytest.mark.root, pytest.mark.criu]

SERVICE = ["--tcp-listen", f"tcp4@{A4}:7001", "--udp-bind", f"udp4@{A4}:7002",
           "--tcp-listen", f"tcp6@[{A6}]:7004", "--tcp-listen", f"dual@[::ffff:{A4}]:7005",
           "--tcp-self", f"self@{A4}:7008"]
HOOK_LINE = "no view: the plan goes through CRIU's UPDATE_INETSK hook"
VIEW_LINE = "CRIU reads the per-node view"


@pytest.fixture
def hook_criu(monkeypatch) -> Path:
    if not os.access(HOOK_CRIU, os.X_OK):
        pytest.skip(f"patched CRIU not built ({HOOK_CRIU}): run tests/criu-hook/build.sh "
                    "(scripts/setup.sh does)")
    monkeypatch.setattr(criu, "CRIU", str(HOOK_CRIU))
    return HOOK_CRIU


@pytest.fixture
def service(testnet, image_dirs):
    a = testnet.add_host("A")
    assert (str(a.ipv4), str(a.ipv6)) == (A4, A6)
    pid = criu.start_workload(a, SERVICE)
    criu.dump(a, pid, image_dirs.images, tcp_established=True)
    return testnet, image_dirs


def assert_answers(peer, v4: str, v6: str) -> None:
    assert probe.tcp_hello(peer, v4, 7001) == f"tcp4 {v4} 7001"
    assert probe.udp_echo(peer, v4, 7002, "ping") == "udp4 ping"
    assert probe.tcp_hello(peer, v6, 7004) == f"tcp6 {v6} 7004"
    assert probe.tcp_hello(peer, v4, 7005) == f"dual ::ffff:{v4} 7005"
    assert probe.self_check(peer, v4, 7001) == {"self": "OK"}


def sockets(host) -> list[str]:
    """Every inet socket in the host's namespace: netid, state, local, peer."""
    out = host.run(["ss", "-Htuan"]).stdout
    return sorted(" ".join(ln.split()[:2] + ln.split()[4:6]) for ln in out.splitlines())


def test_moved_through_the_hook_alone(service, plugin, hook_criu):
    """local=auto on B: listener, bound UDP, dual-stack listener and the self-connection,
    IPv4 and IPv6, moved by the hook; no view made."""
    net, dirs = service
    b, c = net.add_host("B"), net.add_host("C")
    work = dirs.work_for("B")
    rpid = restore(b, dirs.images, work, plugin)
    try:
        lines = plugin_lines(work)
        assert any(HOOK_LINE in ln for ln in lines), lines
        assert not any(VIEW_LINE in ln for ln in lines), lines
        assert views_left(lines) == []
        log = (work / "restore.log").read_text()
        # tcp4, udp4, tcp6, dual, both ends of the self-connection
        assert log.count("Plugin updated the addresses of inet socket") == 6, lines
        assert_answers(c, str(b.ipv4), str(b.ipv6))
        with pytest.raises(ProbeError):
            probe.tcp_hello(c, A4, 7001)
    finally:
        criu.kill_tree(rpid)


def test_view_on_stock_criu_and_hook_on_patched_criu_restore_the_same(service, plugin,
                                                                       monkeypatch):
    net, dirs = service
    b = net.add_host("B")
    got = {}
    for name, binary in (("stock", criu.CRIU), ("hook", str(HOOK_CRIU))):
        if name == "hook" and not os.access(HOOK_CRIU, os.X_OK):
            pytest.skip(f"patched CRIU not built ({HOOK_CRIU}): run tests/criu-hook/build.sh")
        monkeypatch.setattr(criu, "CRIU", binary)
        work = dirs.work_for(name)
        rpid = restore(b, dirs.images, work, plugin)
        try:
            lines = plugin_lines(work)
            assert any((HOOK_LINE if name == "hook" else VIEW_LINE) in ln for ln in lines), lines
            got[name] = sockets(b)
        finally:
            criu.kill_tree(rpid)
    assert got["stock"] == got["hook"]
    assert any(f"{b.ipv4}:7001" in s for s in got["hook"]), got
    assert any(f"[{b.ipv6}]:7004" in s for s in got["hook"]), got
    assert not any(A4 in s or A6 in s for s in got["hook"]), got


def test_enotsup_leaves_a_socket_to_another_plugin(service, plugin, hook_criu, monkeypatch):
    """Our map moves IPv4 only; a second plugin in the same dir moves IPv6. Ours answers
    -ENOTSUP for the sockets its plan leaves alone, so the other one gets them."""
    net, dirs = service
    b, c = net.add_host("B"), net.add_host("C")
    build_test_plugin(plugin.libdir, "b")
    log = dirs.root / "events"
    monkeypatch.setenv("OVERLAYFS_INETSK_MAP", f"{A4}={b.ipv4}")
    monkeypatch.setenv("HOOKTEST_B_LOG", str(log))
    monkeypatch.setenv("HOOKTEST_B_RULES", f"{A6}={b.ipv6}")
    work = dirs.work_for("B")
    rpid = restore(b, dirs.images, work, plugin)
    try:
        lines = plugin_lines(work)
        assert any(HOOK_LINE in ln for ln in lines), lines
        moved_by_b = [x[:4] for x in calls(events(log), "hooktest-b") if x[4] == 0]
        assert moved_by_b == [(10, 10, A6, "::")]
        assert_answers(c, str(b.ipv4), str(b.ipv6))
    finally:
        criu.kill_tree(rpid)


@pytest.mark.parametrize("which", ["stock", "hook"])
def test_inetsk_local_ipv4_alone_moves_a_listener(testnet, image_dirs, plugin, monkeypatch,
                                                  which):
    """The sample plugin's contract: INETSK_LOCAL_IPV4 in CRIU's environment = local4=."""
    if which == "hook":
        if not os.access(HOOK_CRIU, os.X_OK):
            pytest.skip(f"patched CRIU not built ({HOOK_CRIU}): run tests/criu-hook/build.sh")
        monkeypatch.setattr(criu, "CRIU", str(HOOK_CRIU))
    a, b, c = testnet.add_host("A"), testnet.add_host("B"), testnet.add_host("C")
    pid = criu.start_workload(a, ["--tcp-listen", f"tcp4@{A4}:7001"])
    criu.dump(a, pid, image_dirs.images)
    b.add_addr("10.77.0.99/16")
    monkeypatch.setenv("INETSK_LOCAL_IPV4", "10.77.0.99")  # not B's first address: no auto
    work = image_dirs.work_for("B")
    rpid = restore(b, image_dirs.images, work, plugin)
    try:
        lines = plugin_lines(work)
        assert any((HOOK_LINE if which == "hook" else VIEW_LINE) in ln for ln in lines), lines
        assert probe.tcp_hello(c, "10.77.0.99", 7001) == "tcp4 10.77.0.99 7001"
    finally:
        criu.kill_tree(rpid)


def test_a_connection_restored_closed_still_needs_the_view(testnet, image_dirs, plugin,
                                                           hook_criu):
    """--tcp-outside close (the default) rewrites state and ports: the hook cannot, so the
    patched CRIU gets the view, and nothing is applied twice."""
    a, p, b = testnet.add_host("A"), testnet.add_host("P"), testnet.add_host("B")
    srv = criu.start_workload(p, ["--tcp-listen", f"srv@{p.ipv4}:7600"])
    pid = criu.start_workload(a, ["--tcp-listen", f"tcp4@{A4}:7001",
                                  "--tcp-connect", f"cli@{p.ipv4}:7600"])
    criu.dump(a, pid, image_dirs.images, tcp_established=True)
    work = image_dirs.work_for("B")
    rpid = restore(b, image_dirs.images, work, plugin)
    try:
        lines = plugin_lines(work)
        assert any(VIEW_LINE in ln for ln in lines), lines
        assert not any(HOOK_LINE in ln for ln in lines), lines
        log = (work / "restore.log").read_text()
        assert "Plugin updated the addresses" not in log  # the hook answered -ENOTSUP
        assert probe.tcp_hello(p, str(b.ipv4), 7001) == f"tcp4 {b.ipv4} 7001"
    finally:
        criu.kill_tree(rpid)
        criu.kill_tree(srv)




@pytest.mark.parametrize("source", ["checkpoint", "node"])
def test_a_map_that_moves_ports_goes_through_the_view(testnet, image_dirs, plugin, hook_criu,
                                                      monkeypatch, source):
    """The hook sees no ports: a map with `port-offset` and a port rule is never a hook table
    on the patched CRIU either; the view moves addresses and ports, the hook changes nothing."""
    a, b, c = testnet.add_host("A"), testnet.add_host("B"), testnet.add_host("C")
    pid = criu.start_workload(a, PLAIN_SERVICE)
    criu.dump(a, pid, image_dirs.images)
    place_port_map(image_dirs, source, monkeypatch)
    work = image_dirs.work_for("B")
    rpid = restore(b, image_dirs.images, work, plugin)
    try:
        lines = plugin_lines(work)
        assert any(VIEW_LINE in ln for ln in lines), lines
        assert not any(HOOK_LINE in ln for ln in lines), lines
        assert "Plugin updated the addresses" not in (work / "restore.log").read_text()
        assert_on_new_ports_only(b, c)
    finally:
        criu.kill_tree(rpid)
    assert views_left(lines) == []
