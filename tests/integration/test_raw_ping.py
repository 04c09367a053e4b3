"""Raw and ping sockets dumped by CRIU 4.2.1 (issue 14): inspect shows their type and class,
a raw socket on an address the node lacks fails the restore (so rewriting it is right), the
rewritten image restores on the new host with the raw sockets bound to their new address;
ICMP sockets (raw or ping) come back unbound, as CRIU 4.2.1 binds none."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from inetsk_testbed import criu
from overlayfs_inetsk.cli import main
from overlayfs_inetsk.host.netns import in_netns

pytestmark = [pytest.mark.root, pytest.mark.criu]

A4, A6 = "10.77.0.1", "fd77::1"
B4, B6 = "10.77.0.2", "fd77::2"
MAP = ["--map", f"{A4}={B4}", "--map", f"{A6}={B6}"]


def test_raw_and_ping_sockets_dumped_by_criu(testnet, image_dirs, capsys):
    a, b = testnet.add_host("a"), testnet.add_host("b")
    for h in (a, b):  # ping sockets need the group in the range, per network namespace
        h.run(["sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 0"])
    pid = criu.start_workload(a, ["--raw", f"{A4}/17", "--raw", f"{A6}/17", "--raw", f"{A6}/58",
                                  "--ping", A4, "--ping", A6], module="inetsk_testbed.rawsocks")
    criu.dump(a, pid, image_dirs.images)

    assert main(["inspect", str(image_dirs.images), "--json", *MAP]) == 0
    doc = json.loads(capsys.readouterr().out)
    got = sorted((s["type"], s["proto"], s["family"], s["class"], s["src"], s["new_src"],
                  s["verdict"]) for s in doc["sockets"])
    assert got == [
        ("dgram", "icmp", "ipv4", "ping", A4, B4, "rewritten"),
        ("dgram", "icmpv6", "ipv6", "ping", A6, B6, "rewritten"),
        ("raw", "icmpv6", "ipv6", "raw", A6, B6, "rewritten"),
        ("raw", "udp", "ipv4", "raw", A4, B4, "rewritten"),
        ("raw", "udp", "ipv6", "raw", A6, B6, "rewritten"),
    ]
    raw4 = [s for s in doc["sockets"] if s["type"] == "raw" and s["family"] == "ipv4"]
    assert raw4[0]["src_port"] == 17  # the protocol, where CRIU keeps a port

    # as dumped, on B: CRIU binds the raw socket to A's address, and fails
    with pytest.raises(criu.CriuError, match="Can't bind inet socket"):
        criu.restore(b, image_dirs.images, image_dirs.work_for("plain"))

    out = image_dirs.root / "rewritten"
    assert main(["rewrite", str(image_dirs.images), str(out), *MAP]) == 0
    capsys.readouterr()
    rpid = criu.restore(b, out, image_dirs.work_for("moved"))
    try:
        ss = sorted(line.split()[3] for line in
                    b.run(["ss", "-H", "-w", "-a", "-n"]).stdout.splitlines())
        # raw UDP bound to B's addresses; raw ICMPv6 comes back unbound: CRIU 4.2.1 binds
        # no ICMP socket (open_inet_sk), which is why inspect calls such a socket `kept`
        assert ss == ["*:58", f"{B4}:17", f"[{B6}]:17"], ss
    finally:
        criu.kill_tree(rpid)


def test_a_ping_socket_id_is_no_udp_port_for_the_port_check(testnet, image_dirs, capsys):
    """Issue 18: the port check took a ping socket's echo id for a UDP port, so a ping
    socket with id 5353 on a node running avahi (UDP 5353) failed `restore --strict`. A
    ping socket binds nothing on restore; a UDP socket of the image still clashes."""
    a, b = testnet.add_host("a"), testnet.add_host("b")
    for h in (a, b):
        h.run(["sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 0"])
    pid = criu.start_workload(a, ["--ping", f"{A4}/5353", "--ping", f"{A6}/5354",
                                  "--udp", f"{A4}/7353"], module="inetsk_testbed.rawsocks")
    criu.dump(a, pid, image_dirs.images)
    assert main(["inspect", str(image_dirs.images), "--json", *MAP]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert sorted((s["class"], s["src_port"]) for s in doc["sockets"]) == [
        ("ping", 5353), ("ping", 5354), ("udp-bound", 7353)]

    def bound(family: int, addr: str, port: int) -> socket.socket:
        def make() -> socket.socket:
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.bind((addr, port))
            return s
        return in_netns(b.netns_path, make)

    # on B, as avahi: UDP 5353 on every address, and 5354 over IPv6 (dual-stack)
    with bound(socket.AF_INET, "0.0.0.0", 5353), bound(socket.AF_INET6, "::", 5354):
        with bound(socket.AF_INET, "0.0.0.0", 7353):  # the image's own UDP port: taken
            assert main(["inspect", str(image_dirs.images), "--json", *MAP,
                         "--netns", b.netns_path]) == 0
            out, err = capsys.readouterr()
            taken = [(t["proto"], t["port"]) for t in json.loads(out)["ports_taken"]]
            assert taken == [("udp", 7353)], taken
            assert err.count("warning: ") == 1 and "7353 is taken" in err
        pidfile = image_dirs.root / "r.pid"
        try:
            cp = subprocess.run([sys.executable, "-m", "overlayfs_inetsk.cli", "restore",
                                 str(image_dirs.images), "--netns", b.netns_path, *MAP,
                                 "--strict", "--", "-d", "--pidfile", str(pidfile)],
                                capture_output=True, text=True, timeout=90,
                                stdin=subprocess.DEVNULL)
            assert cp.returncode == 0, cp.stdout + cp.stderr
            assert "taken" not in cp.stderr, cp.stderr
        finally:
            if pidfile.exists():
                rpid = int(pidfile.read_text())
                b.adopt(rpid)
                criu.kill_tree(rpid)
