"""Raw and ping sockets dumped by CRIU 4.2.1 (issue 14): inspect shows their type and class,
a raw socket on an address the node lacks fails the restore (so rewriting it is right), the
rewritten image restores on the new host with the raw sockets bound to their new address;
ICMP sockets (raw or ping) come back unbound, as CRIU 4.2.1 binds none."""

from __future__ import annotations

import json

import pytest

from inetsk_testbed import criu
from overlayfs_inetsk.cli import main

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
