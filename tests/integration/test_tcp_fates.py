"""The fate of a TCP connection whose local end moves but whose peer stays (issue 6), and a
connection to itself, with real CRIU in namespaces made here, restored through the mount.

X on host A streams to and from Y on host P (the peer, which stays and keeps running). X is
dumped with --tcp-established and restored on host C through `overlayfs-inetsk mount
--map A=C --tcp-outside close|keep|fail`.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from inetsk_testbed import criu, probe
from inetsk_testbed.mount import mounted, overlayfs_inetsk
from inetsk_testbed.probe import wait_for
from inetsk_testbed.stream import start_stream, status

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.fuse]

A4, P4, C4 = "10.77.0.1", "10.77.0.2", "10.77.0.3"
PORT, CTL = 7500, 7501
MAP = ["--map", f"{A4}={C4}"]


@pytest.fixture
def moved(testnet, image_dirs):
    """Hosts A, P (the peer that stays), C; X (reconnecting client) on A streaming with Y
    (server) on P; X dumped. Yields (hosts, images dir, X's stream port before the dump)."""
    a, p, c = testnet.add_host("A"), testnet.add_host("P"), testnet.add_host("C")
    assert (str(a.ipv4), str(p.ipv4), str(c.ipv4)) == (A4, P4, C4)
    start_stream(p, ["--ctl", f"{P4}:{CTL}", "--listen", f"{P4}:{PORT}"])
    x = start_stream(a, ["--ctl", f"{A4}:{CTL}", "--connect", f"{P4}:{PORT}", "--reconnect"])
    s = wait_for(lambda: (st := status(a, A4, CTL)) and int(st["recv"]) > 5 and st,
                 what="the stream to flow")
    # X stops sending (Y does not): after the restore, X's first event is the restored
    # socket's own (what a read finds), not whichever of its read or its write came first
    status(a, A4, CTL, "STOP")
    criu.dump(a, x, image_dirs.images, tcp_established=True)
    yield {"A": a, "P": p, "C": c}, image_dirs, s["local"]


def inspect(images, *opts: str) -> dict:
    doc = json.loads(overlayfs_inetsk("inspect", str(images), *MAP, "--json", *opts).stdout)
    [sk] = [s for s in doc["sockets"] if s["proto"] == "tcp" and s["state"] != "LISTEN"]
    return sk


def test_close_restored_app_reads_eof_and_reconnects_to_the_peer(moved):
    h, dirs, old_local = moved
    sk = inspect(dirs.images)
    assert (sk["class"], sk["verdict"]) == ("tcp-peer-outside", "closed")
    assert f"{P4}:{PORT} is outside the map" in sk["reason"]
    with mounted(dirs.images, dirs.root / "mnt", [*MAP, "--tcp-outside", "close"]) as mnt:
        criu.restore(h["C"], mnt, dirs.work)
        # the restored socket is closed both ways: X reads EOF at once ...
        x = wait_for(lambda: (s := status(h["C"], C4, CTL)) and s["rd"] == "eof" and s,
                     what="X to read EOF")
        assert (x["events"], x["connects"], x["wr"]) == ("connected,eof", "1", "open"), x
        # ... and its first write gets EPIPE (then it reconnects)
        status(h["C"], C4, CTL, "GO")
        x = wait_for(lambda: (s := status(h["C"], C4, CTL)) and s["connects"] == "2" and s,
                     what="X to reconnect")
    assert x["events"] == "connected,eof,wr:EPIPE,connected", x
    assert x["local"].startswith(f"{C4}:") and x["peer"] == f"{P4}:{PORT}", x
    assert x["bad"] == "0" and x["conn"] == "open"
    # nothing of the old connection was bound on C: the only stream socket is the new one
    ss = h["C"].run(["ss", "-Htan", f"( sport = :{PORT} or dport = :{PORT} )"]).stdout
    assert A4 not in ss and old_local.split(":")[1] not in [
        line.split()[3].rsplit(":", 1)[1] for line in ss.splitlines()], ss
    # the peer (which stayed) has the new connection from C; its old one (to A) was never
    # reset: Y dropped it for the new one
    y = status(h["P"], P4, CTL)
    assert y["peer"] == x["local"] and y["conn"] == "open", y
    assert y["events"] == "connected,replaced,connected", y


def test_fail_refuses_the_restore_with_the_reason(moved):
    h, dirs, _ = moved
    sk = inspect(dirs.images, "--tcp-outside", "fail")
    assert (sk["class"], sk["verdict"]) == ("tcp-peer-outside", "refused")
    assert "cannot survive the move" in sk["reason"]
    cp = subprocess.run([*overlayfs_inetsk_argv(), "rewrite", str(dirs.images),
                         str(dirs.root / "out"), *MAP, "--tcp-outside", "fail"],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 5, cp.stderr
    assert f"{P4}:{PORT}: refused: peer {P4}:{PORT} is outside the map" in cp.stderr
    # the refusal is known before anything is mounted: `mount` refuses (exit 5, one line
    # naming the socket) instead of serving a view whose files.img fails inside CRIU
    mnt = dirs.root / "mnt"
    mnt.mkdir()
    cp = subprocess.run([*overlayfs_inetsk_argv(), "mount", str(dirs.images), str(mnt), *MAP,
                         "--tcp-outside", "fail"], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 5, cp.stderr
    assert cp.stderr.count("\n") == 1, cp.stderr
    assert f"{P4}:{PORT}: refused: peer {P4}:{PORT} is outside the map" in cp.stderr
    assert not os.path.ismount(mnt)
    assert h["C"].pids() == []


def test_keep_the_peer_resets_the_moved_connection(moved):
    """keep: the entry goes to C with the peer's address kept. P has no socket for the new
    4-tuple (its socket still names A): its answer to the first packet from C is a reset,
    the restored app sees ECONNRESET and reconnects."""
    h, dirs, old_local = moved
    sk = inspect(dirs.images, "--tcp-outside", "keep")
    assert (sk["verdict"], sk["new_src"], sk["new_dst"]) == ("rewritten", C4, None)
    assert "will reset the connection" in sk["reason"]
    with mounted(dirs.images, dirs.root / "mnt", [*MAP, "--tcp-outside", "keep"]) as mnt:
        criu.restore(h["C"], mnt, dirs.work)
        # X sends nothing: the reset answers the window probe the kernel sends when CRIU
        # turns repair mode off, and X's read gets it
        x = wait_for(lambda: (s := status(h["C"], C4, CTL)) and s["connects"] == "2" and s,
                     what="X to reconnect")
    assert x["events"] == "connected,rd:ECONNRESET,connected", x
    assert x["local"].startswith(f"{C4}:") and x["bad"] == "0", x
    # P's own socket (still naming A) is not touched by the reset it sent for the unknown
    # 4-tuple: it stays until the app drops it (here: for X's new connection)
    y = status(h["P"], P4, CTL)
    assert y["events"] == "connected,replaced,connected" and y["peer"] == x["local"], y


def overlayfs_inetsk_argv() -> list[str]:
    from inetsk_testbed.mount import BIN

    return [BIN]


def test_connection_to_itself_over_its_own_address_moves(testnet, image_dirs):
    a, p, c = testnet.add_host("A"), testnet.add_host("P"), testnet.add_host("C")
    pid = criu.start_workload(a, ["--tcp-listen", f"ctl@{A4}:7600",
                                  "--tcp-self", f"self@{A4}:7602"])
    assert probe.self_check(p, A4, 7600) == {"self": "OK"}
    criu.dump(a, pid, image_dirs.images, tcp_established=True)
    doc = json.loads(overlayfs_inetsk("inspect", str(image_dirs.images), *MAP,
                                      "--json").stdout)
    est = [s for s in doc["sockets"] if s["state"] == "ESTABLISHED"]
    assert [(s["class"], s["new_src"], s["new_dst"]) for s in est] == [
        ("tcp-self", C4, C4)] * 2
    with mounted(image_dirs.images, image_dirs.root / "mnt", MAP) as mnt:
        criu.restore(c, mnt, image_dirs.work)
        assert probe.self_check(p, C4, 7600) == {"self": "OK"}
        assert probe.self_check(p, C4, 7600) == {"self": "OK"}
    ss = c.run(["ss", "-Htn", "( sport = :7602 or dport = :7602 )"]).stdout.splitlines()
    assert len(ss) == 2 and all(ln.split()[0] == "ESTAB" and C4 in ln for ln in ss), ss
