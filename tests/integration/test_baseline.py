"""Baseline on real namespaces and CRIU 4.2.1, without overlayfs-inetsk: proves the testbed
and the problem the project solves.

(a) dump on host A, restore on A: every socket answers again;
(b) the same image restored on host B (other addresses): restore aborts with
    "Cannot assign requested address";
(c) an IPv6-only image restored on B: restore "succeeds", the listener is bound to A's
    stale address and nothing answers on B's address (the silent failure).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from inetsk_testbed import TestNet, criu, probe
from inetsk_testbed.netns import list_netns
from inetsk_testbed.probe import ProbeError

pytestmark = [pytest.mark.root, pytest.mark.criu]

# host addresses (auto-assigned in add_host order: A=.1, P=.2, B=.3)
A4, A6 = "10.77.0.1", "fd77::1"
P4 = "10.77.0.2"
B4, B6 = "10.77.0.3", "fd77::3"


def full_workload_args() -> list[str]:
    return [
        "--tcp-listen", f"tcp4@{A4}:7001",
        "--udp-bind", f"udp4@{A4}:7002",
        "--udp-connect", f"udpc@{A4}:7003={P4}:7103",
        "--tcp-listen", f"tcp6@[{A6}]:7004",
        "--tcp-listen", f"dual@[::ffff:{A4}]:7005",
        "--tcp-listen", "any@0.0.0.0:7006",
        "--tcp-listen", "lo@127.0.0.1:7007",
    ]


def assert_full_workload_answers(a, p) -> None:
    """Every socket of full_workload_args() answers, seen from P (and from A for lo)."""
    assert probe.tcp_hello(p, A4, 7001) == f"tcp4 {A4} 7001"
    assert probe.tcp_echo(p, A4, 7001, "echo me") == "echo me"
    assert probe.udp_echo(p, A4, 7002, "ping4") == "udp4 ping4"
    # the connected UDP socket answers its peer, and only its peer: a datagram from
    # another port matches no socket, and A answers with ICMP port unreachable
    assert probe.udp_echo(p, A4, 7003, "pingc", bind=f"{P4}:7103") == "udpc pingc"
    with pytest.raises(ProbeError) as ei:
        probe.udp_echo(p, A4, 7003, "stranger", bind=f"{P4}:7999", timeout=1)
    assert ei.value.kind == "refused"
    assert probe.tcp_hello(p, A6, 7004) == f"tcp6 {A6} 7004"
    assert probe.tcp_hello(p, A4, 7005) == f"dual ::ffff:{A4} 7005"
    assert probe.tcp_hello(p, A4, 7006) == f"any {A4} 7006"
    assert probe.tcp_hello(a, "127.0.0.1", 7007) == "lo 127.0.0.1 7007"
    with pytest.raises(ProbeError) as ei:  # loopback-only really is loopback-only
        probe.tcp_hello(p, A4, 7007)
    assert ei.value.kind == "refused"


def listeners(host) -> list[str]:
    return host.run(["ss", "-Hltnp"]).stdout.splitlines()


def test_dump_and_restore_on_same_host(testnet, image_dirs):
    a, p = testnet.add_host("A"), testnet.add_host("P")
    assert (str(a.ipv4), str(a.ipv6), str(p.ipv4)) == (A4, A6, P4)
    pid = criu.start_workload(a, full_workload_args())
    assert criu.nspid(pid)[-1] == 1, "the workload must be init of its own pid namespace"
    assert_full_workload_answers(a, p)

    criu.dump(a, pid, image_dirs.images)
    assert (image_dirs.images / "files.img").is_file()
    assert not criu.is_alive(pid), "criu dump kills the dumped tree"
    with pytest.raises(ProbeError) as ei:
        probe.tcp_hello(p, A4, 7001)
    assert ei.value.kind == "refused"

    rpid = criu.restore(a, image_dirs.images, image_dirs.work)
    assert criu.is_alive(rpid)
    assert criu.nspid(rpid)[-1] == 1, "restored into a fresh pid namespace"
    assert rpid in a.pids()
    assert not list((image_dirs.images).glob("restore*")), "restore writes into -W only"
    assert_full_workload_answers(a, p)
    assert probe.tcp_command(p, A4, 7001, "PID") == [f"PID 1 {rpid}"]


def test_restore_on_other_host_fails_to_bind(testnet, image_dirs):
    a, _p, b = testnet.add_host("A"), testnet.add_host("P"), testnet.add_host("B")
    assert (str(b.ipv4), str(b.ipv6)) == (B4, B6)
    pid = criu.start_workload(a, full_workload_args())
    criu.dump(a, pid, image_dirs.images)

    with pytest.raises(criu.CriuError) as ei:
        criu.restore(b, image_dirs.images, image_dirs.work_for("B"))
    log = ei.value.log
    assert "Can't bind inet socket" in log
    assert "Cannot assign requested address" in log
    assert "Cannot assign requested address" in str(ei.value)  # the tail carries it
    assert b.pids() == [], "a failed restore leaves no process behind"
    assert not any(":7001" in line for line in listeners(b))


def test_ipv6_only_restore_on_other_host_is_silently_broken(testnet, image_dirs):
    a, p, b = testnet.add_host("A"), testnet.add_host("P"), testnet.add_host("B")
    pid = criu.start_workload(a, ["--tcp-listen", f"tcp6@[{A6}]:7004",
                                  "--udp-bind", f"udp6@[{A6}]:7008"])
    assert probe.tcp_hello(p, A6, 7004) == f"tcp6 {A6} 7004"
    assert probe.udp_echo(p, A6, 7008, "x") == "udp6 x"
    criu.dump(a, pid, image_dirs.images)

    # CRIU binds AF_INET6 sockets with IP_FREEBIND: the stale address binds on B
    rpid = criu.restore(b, image_dirs.images, image_dirs.work_for("B"))
    assert criu.is_alive(rpid)
    stale = [ln for ln in listeners(b) if f"[{A6}]:7004" in ln]
    assert stale and f"pid={rpid}," in stale[0], listeners(b)
    for addr in (B6, A6):  # neither B's address nor (on A) the old one answers
        with pytest.raises(ProbeError) as ei:
            probe.tcp_hello(p, addr, 7004)
        assert ei.value.kind == "refused"
        with pytest.raises(ProbeError) as ei:
            probe.udp_echo(p, addr, 7008, "x", timeout=1)
        assert ei.value.kind == "refused"  # no socket on either: ICMPv6 port unreachable

    # control: the very same image restored on A answers (two copies can run at once)
    rpid_a = criu.restore(a, image_dirs.images, image_dirs.work_for("A"))
    assert rpid_a != rpid
    assert probe.tcp_hello(p, A6, 7004) == f"tcp6 {A6} 7004"
    assert probe.udp_echo(p, A6, 7008, "y") == "udp6 y"


def test_workload_self_connection_and_client_survive_restore_in_place(testnet, image_dirs):
    """--tcp-self and --tcp-connect hold ESTABLISHED sockets: dump and restore need
    --tcp-established; restored in place they carry on."""
    a, p = testnet.add_host("A"), testnet.add_host("P")
    server = criu.start_workload(p, ["--tcp-listen", f"srv@{P4}:7201"])
    pid = criu.start_workload(a, ["--tcp-listen", f"ctl@{A4}:7200",
                                  "--tcp-self", f"self@{A4}:7202",
                                  "--tcp-connect", f"cli@{P4}:7201"])
    assert probe.self_check(p, A4, 7200) == {"self": "OK"}
    ok = probe.tcp_command(p, A4, 7200, "CLIENT cli hello")
    assert ok[0].startswith(f"CLIENT cli OK {A4}:") and ok[0].endswith(f" {P4}:7201"), ok

    with pytest.raises(criu.CriuError) as ei:  # plain dump refuses established sockets
        criu.dump(a, pid, image_dirs.root / "plain", leave_running=True)
    assert "Connected TCP socket, consider using --tcp-established option" in ei.value.log
    assert criu.is_alive(pid)
    criu.dump(a, pid, image_dirs.images, tcp_established=True)
    with pytest.raises(criu.CriuError) as ei:  # restore needs --tcp-established too
        criu.restore(a, image_dirs.images, image_dirs.work_for("plain"), tcp_established=False)
    assert "Connected TCP socket in image" in ei.value.log
    assert a.pids() == []
    rpid = criu.restore(a, image_dirs.images, image_dirs.work)  # auto: tcp-stream-*.img
    assert probe.self_check(p, A4, 7200) == {"self": "OK"}
    assert probe.tcp_command(p, A4, 7200, "CLIENT cli again")[0].startswith("CLIENT cli OK")
    assert criu.is_alive(server) and criu.is_alive(rpid)


def test_testnet_cleanup_leaves_nothing_even_on_error(image_dirs):
    names: list[str] = []
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="boom"):
        with TestNet() as net:
            a = net.add_host("A")
            pids.append(criu.start_workload(a, ["--tcp-listen", f"{A4}:7300"]))
            criu.dump(a, pids[0], image_dirs.images)
            pids.append(criu.restore(a, image_dirs.images, image_dirs.work))
            pids.append(a.popen(["sleep", "300"]).pid)
            names = net.namespaces()
            assert len(names) == 2 and all(n in list_netns() for n in names)
            raise RuntimeError("boom")
    assert not set(names) & set(list_netns())
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"pid {pid} left behind (or unreaped)"


def test_addresses_outside_the_test_ranges_are_refused(testnet):
    for v4 in ("192.168.1.1/24", "10.78.0.1/16", "10.77.0.1/8"):
        with pytest.raises(ValueError):
            testnet.add_host("X", ipv4=v4)
    with pytest.raises(ValueError):
        testnet.add_host("X", ipv6="fd78::1/64")
    h = testnet.add_host("Y", ipv4="10.77.3.4/16", ipv6=None)
    assert str(h.ipv4) == "10.77.3.4" and h.ipv6 is None
    with pytest.raises(ValueError):
        h.add_addr("8.8.8.8/32")
    h.add_addr("fd77::42/64")
    assert "fd77::42/64" in h.run(["ip", "-6", "addr", "show", "dev", "eth0"]).stdout
    h.del_addr("fd77::42/64")
    assert "fd77::42" not in h.run(["ip", "-6", "addr", "show", "dev", "eth0"]).stdout
    assert subprocess.run(["ip", "link", "show", "p-Y"], capture_output=True).returncode != 0, \
        "nothing is created in the root namespace"
