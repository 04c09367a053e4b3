"""Podman + runc + CRIU 4.2.1 with the overlayfs-inetsk CRIU plugin (issue 10).

Real `podman container checkpoint --export` / `restore --import --ignore-static-ip` of
containers whose servers are bound to their own (fixed) addresses, on a private podman
network (testbed/podman.py). runc's CRIU gets its options from the org.criu.config
annotation: `lib DIR` with only the plugin, installed there by `overlayfs-inetsk plugin
install --libdir DIR` (nothing under /usr/lib/criu or /etc is touched). With no map
configured the plugin applies the default `local=auto` in the container's new namespace.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from inetsk_testbed import probe
from inetsk_testbed.podman import PodmanNet, podman, sha256

from .runtimes import base_image, plugin_lib  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.podman]

VIEW_ROOT = Path("/run/overlayfs-inetsk/plugin")
PLUGIN_LINE = re.compile(r"overlayfs-inetsk: (.*)")


@pytest.fixture
def net(base_image: str, plugin_lib: Path, tmp_path: Path):  # noqa: F811
    with PodmanNet(criu_lib=plugin_lib, workdir=tmp_path, image=base_image) as n:
        yield n


def bound_service(v4: str, v6: str) -> list[str]:
    """TCP listeners and bound UDP sockets on the container's own IPv4 and IPv6, plus a
    wildcard listener (which needs no change)."""
    return ["--tcp-listen", f"t4@{v4}:7001", "--udp-bind", f"u4@{v4}:7002",
            "--tcp-listen", f"t6@[{v6}]:7004", "--udp-bind", f"u6@[{v6}]:7005",
            "--tcp-listen", "any@0.0.0.0:7006"]


def assert_answers(net: PodmanNet, v4: str, v6: str) -> None:
    """Every socket of bound_service answers at v4/v6 (each TCP hello names the local
    address the server's socket is bound to: which copy answered)."""
    c = net.client
    assert probe.tcp_hello(c, v4, 7001) == f"t4 {v4} 7001"
    assert probe.udp_echo(c, v4, 7002, "p4") == "u4 p4"
    assert probe.tcp_hello(c, v6, 7004) == f"t6 {v6} 7004"
    assert probe.udp_echo(c, v6, 7005, "p6") == "u6 p6"
    assert probe.tcp_hello(c, v4, 7006) == f"any {v4} 7006"


def plugin_lines(log: str) -> list[str]:
    return [m.group(1) for ln in log.splitlines() if (m := PLUGIN_LINE.search(ln))]


def our_views() -> list[str]:
    return sorted(os.listdir(VIEW_ROOT)) if VIEW_ROOT.is_dir() else []


def test_copy_answers_on_its_new_address_beside_the_original(net: PodmanNet, tmp_path: Path):
    a4, a6 = net.ipv4(10), net.ipv6(10)
    orig = net.run("srv", 10, bound_service(a4, a6))
    assert_answers(net, a4, a6)
    archive = tmp_path / "srv.tar.gz"
    net.checkpoint(orig, archive, leave_running=True)
    digest = sha256(archive)
    views_before = our_views()

    r = net.restore(archive, "copy", ignore_static_ip=True, keep=True)
    copy = r.container
    copy.inspect()
    assert copy.state == "running"
    assert copy.ipv4 and copy.ipv4 != a4 and copy.ipv6 and copy.ipv6 != a6
    assert_answers(net, copy.ipv4, copy.ipv6)
    assert_answers(net, a4, a6)  # the original still runs, on its own address
    lines = plugin_lines(r.log)
    assert any(ln.startswith("CRIU reads the per-node view") for ln in lines), lines
    assert any(ln.startswith("removed the view") for ln in lines), lines
    assert sha256(archive) == digest
    assert our_views() == views_before


def test_one_archive_restored_three_times_side_by_side(net: PodmanNet, tmp_path: Path):
    a4, a6 = net.ipv4(20), net.ipv6(20)
    orig = net.run("srv", 20, bound_service(a4, a6))
    archive = tmp_path / "srv.tar.gz"
    net.checkpoint(orig, archive)  # the original stops: its address is free again
    digest = sha256(archive)
    copies = [net.restore(archive, f"copy{i}", ignore_static_ip=True).container
              for i in range(3)]
    addrs = []
    for c in copies:
        c.inspect()
        assert c.state == "running"
        addrs.append((c.ipv4, c.ipv6))
    assert len({a[0] for a in addrs}) == 3 and len({a[1] for a in addrs}) == 3
    for v4, v6 in addrs:
        assert_answers(net, v4, v6)
    assert sha256(archive) == digest


def test_nothing_to_change_restores_as_before_without_a_view(net: PodmanNet, tmp_path: Path):
    args = ["--tcp-listen", "any@0.0.0.0:7006", "--tcp-listen", "any6@[::]:7007",
            "--udp-bind", "uany@0.0.0.0:7002"]
    orig = net.run("srv", 30, args)
    archive = tmp_path / "srv.tar.gz"
    net.checkpoint(orig, archive, leave_running=True)
    views_before = our_views()
    r = net.restore(archive, "copy", ignore_static_ip=True, keep=True)
    copy = r.container
    copy.inspect()
    assert copy.ipv4 != net.ipv4(30)
    c = net.client
    assert probe.tcp_hello(c, copy.ipv4, 7006) == f"any {copy.ipv4} 7006"
    assert probe.tcp_hello(c, copy.ipv6, 7007) == f"any6 {copy.ipv6} 7007"
    assert probe.udp_echo(c, copy.ipv4, 7002, "q") == "uany q"
    lines = plugin_lines(r.log)
    assert any(ln.startswith("nothing to change") for ln in lines), lines
    assert not any("per-node view" in ln and "reads" in ln for ln in lines), lines
    assert our_views() == views_before


def _assert_refused(net: PodmanNet, archive: Path, name: str | None, want: str) -> None:
    digest = sha256(archive)
    views_before = our_views()
    r = net.restore(archive, name, ignore_static_ip=True, check=False)
    assert r.returncode != 0, "the restore should have failed"
    errors = [ln for ln in r.log.splitlines()
              if "Error (" in ln and "): overlayfs-inetsk: " in ln]
    assert len(errors) == 1 and re.search(want, errors[0]), r.log[-3000:]
    assert 'Failed in init(2) of "overlayfs-inetsk"' in r.log
    assert "Can't bind inet socket" not in r.log  # it stopped before restoring anything
    assert our_views() == views_before
    assert sha256(archive) == digest
    # Podman leaves the failed container in Created; nothing of it runs
    assert r.container.state in ("created", "configured", "exited", "stopped")


def test_refused_when_auto_finds_no_address(base_image: str, plugin_lib: Path,  # noqa: F811
                                            tmp_path: Path):
    """An --internal network gives the container no default route: `local=auto` cannot
    tell which interface is the node's (the plugin's one line says what to pass)."""
    with PodmanNet(criu_lib=plugin_lib, workdir=tmp_path, image=base_image,
                   internal=True) as net:
        a4, a6 = net.ipv4(40), net.ipv6(40)
        orig = net.run("srv", 40, bound_service(a4, a6))
        archive = tmp_path / "srv.tar.gz"
        net.checkpoint(orig, archive, leave_running=True)
        _assert_refused(net, archive, "copy", r"default route|--iface|no address")
        names = podman(["ps", "-a", "--format", "{{.Names}}"]).stdout.split()
        assert f"{net.name}-copy" in names  # until the cleanup below
    names = podman(["ps", "-a", "--format", "{{.Names}}"]).stdout.split()
    assert not [n for n in names if n.startswith(net.name)]


def test_refused_tcp_fate_travels_with_the_archive(net: PodmanNet, tmp_path: Path):
    """An established connection to a peer that stays where it is, with
    `--tcp-outside fail` in the archive's overlayfs-inetsk.options: the restore fails."""
    p4 = net.ipv4(51)
    peer = net.run("peer", 51, ["--tcp-listen", f"peer@{p4}:7100"])
    a4, a6 = net.ipv4(50), net.ipv6(50)
    orig = net.run("srv", 50, [*bound_service(a4, a6), "--tcp-connect", f"up@{p4}:7100"])
    assert peer.state == "running"
    archive = tmp_path / "srv.tar.gz"
    net.checkpoint(orig, archive, tcp_established=True)  # the original stops
    with_options = tmp_path / "srv-fail.tar.zst"
    add_to_archive(archive, with_options, {"checkpoint/overlayfs-inetsk.options":
                                           "--tcp-outside fail\n"})
    # Podman refuses --name with --tcp-established: the copy takes the original's name
    podman(["rm", "-f", "-t", "0", orig.name])
    _assert_refused_tcp(net, with_options, orig.name)


def _assert_refused_tcp(net: PodmanNet, archive: Path, name: str) -> None:
    digest = sha256(archive)
    views_before = our_views()
    r = net.restore(archive, None, ignore_static_ip=True, check=False,
                    extra=["--tcp-established"])
    assert r.returncode != 0, "the restore should have failed"
    errors = [ln for ln in r.log.splitlines()
              if "Error (" in ln and "): overlayfs-inetsk: " in ln]
    assert len(errors) == 1 and "tcp" in errors[0].lower(), r.log[-3000:]
    assert "overlayfs-inetsk.options" in errors[0], errors
    assert our_views() == views_before
    assert sha256(archive) == digest
    assert name in podman(["ps", "-a", "--format", "{{.Names}}"]).stdout.split()


def add_to_archive(src: Path, dest: Path, files: dict[str, str]) -> None:
    """A copy of a Podman checkpoint archive (zstd tar) with extra files."""
    tree = dest.with_suffix(".d")
    tree.mkdir()
    subprocess.run(["tar", "-C", str(tree), "-xf", str(src)], check=True)
    for rel, text in files.items():
        (tree / rel).write_text(text)
    subprocess.run(["tar", "--zstd", "-C", str(tree), "-cf", str(dest), "."], check=True)
