"""A service checkpointed on host A and restored on other hosts, through `rewrite` (offline)
and through the FUSE view (`mount`), with real CRIU in namespaces made here.

Socket kinds (issue 2): (a) TCP listener on A's IPv4, (b) UDP bound to A's IPv4, (c) UDP
connected to a peer that stays, (d) TCP listener on A's IPv6, (e) dual-stack socket bound
to ::ffff:A, (f) a 0.0.0.0 listener and a 127.0.0.1 listener, which stay as they are; and
(g) a TCP connection to itself over A's address.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from inetsk_testbed import criu, probe
from inetsk_testbed.mount import ismount, mounted, overlayfs_inetsk
from inetsk_testbed.probe import ProbeError
from overlayfs_inetsk.fuse.daemon import default_log_file

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.fuse]

A4, A6 = "10.77.0.1", "fd77::1"
P4 = "10.77.0.2"


def service_args() -> list[str]:
    return [
        "--tcp-listen", f"tcp4@{A4}:7001",
        "--udp-bind", f"udp4@{A4}:7002",
        "--udp-connect", f"udpc@{A4}:7003={P4}:7103",
        "--tcp-listen", f"tcp6@[{A6}]:7004",
        "--tcp-listen", f"dual@[::ffff:{A4}]:7005",
        "--tcp-listen", "any@0.0.0.0:7006",
        "--tcp-listen", "lo@127.0.0.1:7007",
        "--tcp-self", f"self@{A4}:7008",
    ]


def assert_answers_on(host, peer, v4: str, v6: str) -> None:
    """Every socket of service_args() answers at host's addresses v4/v6, seen from peer."""
    assert probe.tcp_hello(peer, v4, 7001) == f"tcp4 {v4} 7001"
    assert probe.udp_echo(peer, v4, 7002, "ping") == "udp4 ping"
    assert probe.udp_echo(peer, v4, 7003, "c", bind=f"{P4}:7103") == "udpc c"
    assert probe.tcp_hello(peer, v6, 7004) == f"tcp6 {v6} 7004"
    assert probe.tcp_hello(peer, v4, 7005) == f"dual ::ffff:{v4} 7005"
    assert probe.tcp_hello(peer, v4, 7006) == f"any {v4} 7006"
    assert probe.tcp_hello(host, "127.0.0.1", 7007) == "lo 127.0.0.1 7007"
    assert probe.self_check(peer, v4, 7001) == {"self": "OK"}


def checksums(d: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for root, _dirs, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[p] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


def assert_codec_identity(files_img: Path) -> None:
    criu.check_image_recode(files_img)  # decode + re-encode each entry, as crit-recode does


@pytest.fixture
def dumped(testnet, image_dirs):
    """Hosts A (the service), P (a peer that stays); the service dumped from A."""
    a, p = testnet.add_host("A"), testnet.add_host("P")
    assert (str(a.ipv4), str(a.ipv6), str(p.ipv4)) == (A4, A6, P4)
    pid = criu.start_workload(a, service_args())
    assert_answers_on(a, p, A4, A6)
    criu.dump(a, pid, image_dirs.images, tcp_established=True)
    assert_codec_identity(image_dirs.images / "files.img")
    return testnet, p, image_dirs


def test_rewrite_offline_then_restore_on_other_host(dumped):
    net, p, dirs = dumped
    b = net.add_host("B")
    before = checksums(dirs.images)
    view = dirs.root / "view-B"
    cp = overlayfs_inetsk("rewrite", str(dirs.images), str(view),
                          "--map", f"{A4}={b.ipv4}", "--map", f"{A6}={b.ipv6}", "--table")
    assert f"{b.ipv4}:7001" in cp.stdout
    # (a)(b)(c)(d)(e) and both ends of the self-connection; 0.0.0.0 and 127.0.0.1 stay
    assert cp.stdout.splitlines()[-2:] == ["9 inet socket(s): 7 rewritten, 2 kept",
                                           f"view written to {view}"]
    assert os.path.islink(view / "pages-1.img")
    assert_codec_identity(view / "files.img")
    criu.restore(b, view, dirs.work_for("B"))
    assert_answers_on(b, p, str(b.ipv4), str(b.ipv6))
    with pytest.raises(ProbeError):  # nothing is left on A's address
        probe.tcp_hello(p, A4, 7001)
    assert checksums(dirs.images) == before


def _ro_bind(src: Path, dst: Path) -> None:
    dst.mkdir()
    subprocess.run(["mount", "--bind", str(src), str(dst)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(dst)], check=True)


def test_restore_through_mount_of_read_only_image(dumped):
    net, p, dirs = dumped
    b = net.add_host("B")
    shared = dirs.root / "shared"
    _ro_bind(dirs.images, shared)
    try:
        before = checksums(shared)
        with mounted(shared, dirs.root / "mnt-B",
                     ["--map", "local=auto", "--netns", b.netns_path]) as mnt:
            assert_codec_identity(Path(mnt) / "files.img")
            criu.restore(b, mnt, dirs.work_for("B"))
        assert_answers_on(b, p, str(b.ipv4), str(b.ipv6))
        assert checksums(shared) == before
    finally:
        subprocess.run(["umount", str(shared)], check=False)


def test_mount_before_the_address_exists(dumped):
    """`auto` resolves after the mount: the daemon watches the namespace and makes files.img
    as soon as the node has its addresses, before CRIU opens it; the restore is served
    those bytes."""
    net, p, dirs = dumped
    b = net.add_host("B", ipv4=None, ipv6=None)
    with mounted(dirs.images, dirs.root / "mnt-B",
                 ["--map", "local=auto", "--netns", b.netns_path]) as mnt:
        log = Path(default_log_file(mnt))
        with pytest.raises(OSError) as ei:  # no address yet: EIO, and nothing cached
            (Path(mnt) / "files.img").read_bytes()
        assert ei.value.errno == 5
        b.add_addr("10.77.0.30/16")
        b.add_addr("fd77::30/64")
        ahead = "(IPv4 10.77.0.30, IPv6 fd77::30), ahead of its open"
        deadline = time.monotonic() + 20
        while ahead not in log.read_text():  # no open in between
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        criu.restore(b, mnt, dirs.work_for("B"))
        made = [ln for ln in log.read_text().splitlines() if ": generated " in ln]
        assert len(made) == 1 and ahead in made[0], made  # the open made none
    assert_answers_on(b, p, "10.77.0.30", "fd77::30")


def test_four_mounts_four_restores_at_once(dumped):
    """One image, four views with four kinds of map, four restores at the same time. (The
    prefix rules are /31 and /127 so that the peer P, 10.77.0.2, stays outside the map.)"""
    net, p, dirs = dumped
    hosts = [net.add_host(n) for n in ("B", "C", "D")]
    hosts.append(net.add_host("E", ipv4="10.77.5.1/16", ipv6="fd77::5:1/64"))
    maps = [
        ["--map", f"local={hosts[0].ipv4}", "--map", f"local6={hosts[0].ipv6}"],
        ["--map", f"{A4}={hosts[1].ipv4}", "--map", f"{A6}={hosts[1].ipv6}"],
        ["--map", "local=auto", "--netns", hosts[2].netns_path],
        ["--map", "10.77.0.0/31=10.77.5.0/31", "--map", "fd77::/127=fd77::5:0/127",
         "--serve", "read"],
    ]
    before = checksums(dirs.images)
    with contextlib.ExitStack() as stack:
        mnts = [stack.enter_context(mounted(dirs.images, dirs.root / f"m{i}", maps[i]))
                for i in range(4)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            pids = list(pool.map(lambda i: criu.restore(hosts[i], mnts[i],
                                                         dirs.work_for(f"r{i}")), range(4)))
        assert len(set(pids)) == 4
        for h in hosts:
            assert_answers_on(h, p, str(h.ipv4), str(h.ipv6))
    assert checksums(dirs.images) == before


def test_killed_daemon_fails_restore_then_umount_and_remount(dumped):
    net, p, dirs = dumped
    b = net.add_host("B")
    mnt = dirs.root / "mnt-B"
    opts = ["--map", f"local={b.ipv4}", "--map", f"local6={b.ipv6}"]
    with mounted(dirs.images, mnt, opts):
        pid = int(subprocess.run(["pgrep", "-f", f"overlayfs_inetsk.cli.mount mount .* {mnt} "],
                                 capture_output=True, text=True).stdout.split()[0])
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        with pytest.raises(criu.CriuError) as ei:
            criu.restore(b, mnt, dirs.work_for("dead"), tcp_established=True)
        assert "Transport endpoint is not connected" in ei.value.log
        assert b.pids() == []
        with pytest.raises(ProbeError):
            probe.tcp_hello(p, str(b.ipv4), 7001)
        overlayfs_inetsk("umount", str(mnt))
        assert not ismount(mnt)
    with mounted(dirs.images, mnt, opts):
        criu.restore(b, mnt, dirs.work_for("again"))
    assert_answers_on(b, p, str(b.ipv4), str(b.ipv6))
