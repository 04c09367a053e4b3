"""Ports (issue 13) with real CRIU: listeners and bound UDP sockets moved to new ports, three
clones of one checkpoint in one namespace, a connection to itself whose listener port
moves, a port rule that would split an established pair, bad rules refused before mounting.

Every path is used once: the FUSE view (`mount`), the offline `rewrite`, `restore`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inetsk_testbed import criu, probe
from inetsk_testbed.mount import ismount, mounted, overlayfs_inetsk
from inetsk_testbed.probe import ProbeError
from overlayfs_inetsk.host.proctables import read_tables

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.fuse]

CLI = [sys.executable, "-m", "overlayfs_inetsk.cli"]
A4, A6 = "10.77.0.1", "fd77::1"


def checksums(d: Path) -> dict[str, str]:
    out = {}
    for root, _dirs, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[p] = hashlib.sha256(fh.read()).hexdigest()
    return out


def listening(host, proto: str = "tcp") -> set[int]:
    """The ports bound in host's namespace: TCP listeners, or bound UDP sockets."""
    want = 10 if proto == "tcp" else 7
    return {h.port for h in read_tables(host.netns_path) if h.proto == proto and h.state == want}


def cli(*args: str, tmp: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    (tmp / "tmpdir").mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp / "tmpdir"))
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL)


def our_mounts(under: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f if ln.split()[4].startswith(str(under))]


SERVICE = ["--tcp-listen", f"tcp4@{A4}:7001", "--udp-bind", f"udp4@{A4}:7002",
           "--tcp-listen", f"tcp6@[{A6}]:7004", "--udp-bind", f"udp6@[{A6}]:7005"]


# 1 ---------------------------------------------------------------------------------------
def test_listeners_and_bound_udp_move_to_new_ports_and_a_new_address(testnet, image_dirs):
    """Through the FUSE view: IPv4 and IPv6, TCP and UDP, new ports and a new address in one
    map (one port rule names the new address itself); they answer on the new ports only."""
    a, b, c = testnet.add_host("A"), testnet.add_host("B"), testnet.add_host("C")
    b4, b6 = str(b.ipv4), str(b.ipv6)
    pid = criu.start_workload(a, SERVICE)
    criu.dump(a, pid, image_dirs.images)
    before = checksums(image_dirs.images)
    opts = ["--map", f"{A4}={b4}", "--map", f"{A6}={b6}",
            "--map", f"{A4}:7001=:8001", "--map", ":7002=:8002",
            "--map", f"[{A6}]:7004=[{b6}]:8004", "--map", f"[{A6}]:7005=:8005"]
    with mounted(image_dirs.images, image_dirs.root / "mnt", opts) as mnt:
        criu.restore(b, mnt, image_dirs.work)
    assert probe.tcp_hello(c, b4, 8001) == f"tcp4 {b4} 8001"
    assert probe.udp_echo(c, b4, 8002, "ping") == "udp4 ping"
    assert probe.tcp_hello(c, b6, 8004) == f"tcp6 {b6} 8004"
    assert probe.udp_echo(c, b6, 8005, "ping6") == "udp6 ping6"
    for port in (7001, 7004):  # the old ports: nothing there
        with pytest.raises(ProbeError):
            probe.tcp_hello(c, b4 if port == 7001 else b6, port, timeout=2)
    with pytest.raises(ProbeError):
        probe.udp_echo(c, b4, 7002, "old", timeout=1)
    assert listening(b) == {8001, 8004} and listening(b, "udp") == {8002, 8005}
    assert checksums(image_dirs.images) == before


# 2 ---------------------------------------------------------------------------------------
def test_three_clones_in_one_namespace_each_on_its_own_ports(testnet, image_dirs):
    """`restore --port-offset` three times at once into B, from one read-only image; a
    fourth copy on ports already taken is named before anything is restored (--strict)."""
    a, b, c = testnet.add_host("A"), testnet.add_host("B"), testnet.add_host("C")
    b4, b6 = str(b.ipv4), str(b.ipv6)
    pid = criu.start_workload(a, SERVICE)
    criu.dump(a, pid, image_dirs.images)
    shared = image_dirs.root / "shared"
    shared.mkdir()
    subprocess.run(["mount", "--bind", str(image_dirs.images), str(shared)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(shared)], check=True)
    pids: list[int] = []
    try:
        before = checksums(shared)

        def clone(n: int) -> subprocess.CompletedProcess[str]:
            pidfile = image_dirs.root / f"clone{n}.pid"
            return cli("restore", str(shared), "--netns", b.netns_path,
                       "--port-offset", str(n * 1000), "--", "-d", "--pidfile", str(pidfile),
                       tmp=image_dirs.root)

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            results = list(pool.map(clone, (1, 2, 3)))
        for n, cp in zip((1, 2, 3), results):
            assert cp.returncode == 0, cp.stdout + cp.stderr
            rpid = int((image_dirs.root / f"clone{n}.pid").read_text())
            b.adopt(rpid)
            pids.append(rpid)
            assert f"{b4}:{7001 + n * 1000}" in cp.stdout  # the summary shows the new ports
        for n in (1, 2, 3):
            off = n * 1000
            assert probe.tcp_hello(c, b4, 7001 + off) == f"tcp4 {b4} {7001 + off}"
            assert probe.udp_echo(c, b4, 7002 + off, f"c{n}") == f"udp4 c{n}"
            assert probe.tcp_hello(c, b6, 7004 + off) == f"tcp6 {b6} {7004 + off}"
            assert probe.udp_echo(c, b6, 7005 + off, f"c{n}") == f"udp6 c{n}"
        assert listening(b) == {8001, 8004, 9001, 9004, 10001, 10004}
        assert len(set(pids)) == 3
        assert checksums(shared) == before

        # a fourth copy onto clone 1's ports: named before anything is restored
        cp = cli("restore", str(shared), "--netns", b.netns_path, "--port-offset", "1000",
                 "--strict", "--", "-d", tmp=image_dirs.root)
        assert cp.returncode == 5, cp.stdout + cp.stderr
        assert f"tcp {b4}:8001 is taken in netns {b.netns_path} by tcp {b4}:8001 LISTEN" \
            in cp.stderr
        assert "(--strict)" in cp.stderr and len(cp.stderr.strip().splitlines()) <= 5
        assert sorted(b.pids()) == sorted(pids)  # nothing more was restored
        # inspect --netns names them too, as warnings, and in its JSON
        cp = cli("inspect", str(shared), "--map", f"local={b4}", "--map", f"local6={b6}",
                 "--port-offset", "2000", "--netns", b.netns_path, "--json",
                 tmp=image_dirs.root)
        assert cp.returncode == 0, cp.stderr
        doc = json.loads(cp.stdout)
        assert sorted((t["proto"], t["port"]) for t in doc["ports_taken"]) == [
            ("tcp", 9001), ("tcp", 9004), ("udp", 9002), ("udp", 9005)]
        assert cp.stderr.count("warning: ") == 4
        assert our_mounts(image_dirs.root) == [str(shared)]
    finally:
        for p in pids:
            criu.kill_tree(p)
        subprocess.run(["umount", str(shared)], check=False)


# 3 ---------------------------------------------------------------------------------------
def test_connection_to_itself_keeps_working_when_its_listener_port_moves(testnet, image_dirs):
    """Offline rewrite: the kept listener of a self-connection moves 7008 -> 9008 (and the
    address A -> B); the accepted end takes the listener's port, the client end's
    destination follows; the connection carries on after the restore."""
    a, b, c = testnet.add_host("A"), testnet.add_host("B"), testnet.add_host("C")
    b4 = str(b.ipv4)
    pid = criu.start_workload(a, ["--tcp-listen", f"ctl@{A4}:7001",
                                  "--tcp-self", f"self@{A4}:7008,keep_listener=1"])
    assert probe.self_check(a, A4, 7001) == {"self": "OK"}
    criu.dump(a, pid, image_dirs.images, tcp_established=True)
    view = image_dirs.root / "view"
    cp = overlayfs_inetsk("rewrite", str(image_dirs.images), str(view),
                          "--map", f"{A4}={b4}", "--map", ":7008=:9008", "--table")
    assert f"{b4}:9008" in cp.stdout
    doc = json.loads(overlayfs_inetsk("inspect", str(image_dirs.images), "--json",
                                      "--map", f"{A4}={b4}", "--map", ":7008=:9008").stdout)
    conns = [s for s in doc["sockets"] if s["state"] == "ESTABLISHED"]
    assert len(conns) == 2
    for s in conns:  # both ends: the one on 7008 moves its source, the other its dest
        if s["src_port"] == 7008:
            assert (s["new_src_port"], s["new_dst_port"]) == (9008, None)
        else:
            assert (s["dst_port"], s["new_dst_port"]) == (7008, 9008)
        assert s["verdict"] == "rewritten"
    criu.restore(b, view, image_dirs.work)
    assert probe.self_check(c, b4, 7001) == {"self": "OK"}
    status = probe.status(c, b4, 7001)
    line = next(x for x in status if x.startswith("tcp-self self "))
    assert line.split()[3] == f"{b4}:9008" and line.endswith("ESTABLISHED")
    assert 9008 in listening(b) and 7008 not in listening(b)


# 4 ---------------------------------------------------------------------------------------
def test_port_rule_that_would_split_an_established_pair_is_refused(testnet, image_dirs):
    """A server on A with a client on P connected to it; the group map moves P, and an
    any-address rule moves A's port while A's address stays out of the map: P, restored with
    the same map, would keep dialling A:7001. Refused, naming the socket, before anything
    is mounted; naming A's endpoint by address is the way that works."""
    a, p, b = testnet.add_host("A"), testnet.add_host("P"), testnet.add_host("B")
    p4 = str(p.ipv4)
    pid = criu.start_workload(a, ["--tcp-listen", f"srv@{A4}:7001"])
    client = criu.start_workload(p, ["--tcp-connect", f"cl@{A4}:7001"])
    probe.wait_for(lambda: any(h.port == 7001 and h.state == 1  # ESTABLISHED
                               for h in read_tables(a.netns_path)),
                   what="the server's end of P's connection")
    criu.dump(a, pid, image_dirs.images, tcp_established=True)
    criu.kill_tree(client)
    group = ["--map", f"{p4}=10.77.0.9", "--map", ":7001=:8001"]
    cp = cli("restore", str(image_dirs.images), "--netns", b.netns_path, *group,
             "--", "-d", tmp=image_dirs.root)
    assert cp.returncode == 5, cp.stdout + cp.stderr
    err = cp.stderr.strip()
    assert "\n" not in err
    assert "files.img: socket id " in err and f"tcp {A4}:7001 -> {p4}:" in err
    assert "refused: would split the connection with" in err
    assert f"name this end by address ({A4}:7001=:PORT)" in err
    assert our_mounts(image_dirs.root) == [] and b.pids() == []
    # the same through mount: refused before mounting
    mnt = image_dirs.root / "mnt"
    mnt.mkdir()
    cp = cli("mount", str(image_dirs.images), str(mnt), *group, tmp=image_dirs.root)
    assert cp.returncode == 5 and "would split the connection" in cp.stderr
    assert not ismount(mnt)
    # naming A's endpoint by address: P knows to follow it, the connection moves whole
    doc = json.loads(cli("inspect", str(image_dirs.images), "--json", "--map",
                         f"{p4}=10.77.0.9", "--map", f"{A4}:7001=:8001",
                         tmp=image_dirs.root).stdout)
    [conn] = [s for s in doc["sockets"] if s["state"] == "ESTABLISHED"]
    assert (conn["verdict"], conn["new_src_port"], conn["new_dst"]) == \
        ("rewritten", 8001, "10.77.0.9")


# 5 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule, code, fragment", [
    ([":0=:80"], 3, "--map :0=:80: rule ':0=:80': port 0 is no port"),
    ([":7001=:65536"], 3, "--map :7001=:65536: rule ':7001=:65536': port 65536 is out of range"),
    ([":7001=:8000", ":7002=:8000"], 3, "--map :7002=:8000: moves onto the port --map "
                                        ":7001=:8000 moves onto (8000)"),
    ([":7001=:8000", f"{A4}:7001=:9000"], 3, f"--map {A4}:7001=:9000: overlaps --map :7001=:8000"),
    (["--port-offset", "70000"], 3, "--port-offset 70000: port offset 70000 is out of range"),
    # two sockets onto one port (the map alone cannot tell: found in the checkpoint)
    ([f"{A4}:7001=:7003"], 5, f"tcp {A4}:7001 -> 0.0.0.0:0: refused: two sockets onto one "
                              f"port: {A4}:7001 goes to {A4}:7003 by --map {A4}:7001=:7003, "
                              f"where "),
    (["--port-offset", "60000"], 5, "port 7001 +60000 = 67001 is out of range (1-65535) "
                                    "(--port-offset 60000)"),
])
def test_bad_port_rules_are_refused_before_anything_is_mounted(testnet, image_dirs, rule,
                                                               code, fragment):
    a = testnet.add_host("A")
    pid = criu.start_workload(a, ["--tcp-listen", f"{A4}:7001", "--tcp-listen", f"{A4}:7003"])
    criu.dump(a, pid, image_dirs.images)
    args = [w for r in rule for w in ((r,) if r.startswith("--") or r.isdigit() else ("--map", r))]
    mnt = image_dirs.root / "mnt"
    mnt.mkdir()
    for fg in ((), ("--foreground",)):
        cp = cli("mount", str(image_dirs.images), str(mnt), *args, *fg, tmp=image_dirs.root)
        assert cp.returncode == code, cp.stdout + cp.stderr
        err = cp.stderr.strip()
        assert "\n" not in err and fragment in err, err
        assert not ismount(mnt)
    # a map file's rule is named by file and key
    f = image_dirs.root / "m.toml"
    f.write_text('[map]\n":7001" = ":0"\n')
    cp = cli("mount", str(image_dirs.images), str(mnt), "--map-file", str(f),
             tmp=image_dirs.root)
    assert cp.returncode == 3 and f"{f}: map[':7001']: rule ':7001=:0': port 0" in cp.stderr
    assert not ismount(mnt)
