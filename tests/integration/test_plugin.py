"""The CRIU plugin (plugin/overlayfs_inetsk_plugin.c) with real `criu restore` runs.

Each restore loads the plugin with criu's `-L DIR`, DIR a temporary dir holding only our
.so and its config file (both written by `overlayfs-inetsk plugin install --libdir DIR
--agent-socket TMP/agent.sock --cli WRAPPER`: never the default agent socket). Both routes
to the planner are used: the node agent on that socket and, with no agent there, the CLI
run as a child. criu runs through nsenter in host B, so the restore's network namespace is
criu's own. More of the protocol (hostile replies, deadlines, the agent in a pid namespace
of its own): test_plugin_protocol.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from overlayfs_inetsk.host.proctables import read_tables
from overlayfs_inetsk.plugin.wire import TEMP_NAME, VIEW_NAME, VIEW_ROOT
from inetsk_testbed import criu, probe
from inetsk_testbed.mount import mounted, overlayfs_inetsk
from inetsk_testbed.probe import ProbeError

pytestmark = [pytest.mark.root, pytest.mark.criu]

ROOT = Path(__file__).resolve().parents[2]
A4, A6 = "10.77.0.1", "fd77::1"
SERVICE = ["--tcp-listen", f"tcp4@{A4}:7001", "--udp-bind", f"udp4@{A4}:7002",
           "--tcp-listen", f"tcp6@[{A6}]:7004"]
ENV_KEYS = ("OVERLAYFS_INETSK_MAP", "OVERLAYFS_INETSK_OPTIONS", "OVERLAYFS_INETSK_CONF_DIR",
            "INETSK_LOCAL_IPV4", "INETSK_LOCAL_IPV6", "OVERLAYFS_INETSK_CLI",
            "OVERLAYFS_INETSK_AGENT_SOCK", "OVERLAYFS_INETSK_TIMEOUT_MS")
VIEW_LINE = re.compile(r"CRIU reads the per-node view (\S+)/(view-[0-9a-f]{32})$")


def build_plugin(out: Path) -> Path:
    subprocess.run(["make", "-s", "-C", str(ROOT / "plugin"), f"OUT={out}"], check=True,
                   capture_output=True)
    return out / "overlayfs_inetsk_plugin.so"


def cli_wrapper(path: Path) -> Path:
    """This tree's CLI (the venv's console script would run the main checkout)."""
    path.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} "
                    "-m overlayfs_inetsk.cli \"$@\"\n")
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def built_so(tmp_path_factory) -> Path:
    return build_plugin(tmp_path_factory.mktemp("plugin-build"))


class Plugin:
    """A plugin dir for `criu -L`, and the route the plugin takes to the planner."""

    def __init__(self, root: Path, so: Path, route: str, install: tuple[str, ...] = ()):
        self.libdir = root / "criu-lib"
        self.route = route
        self.sock = root / "agent.sock"
        self.agent: subprocess.Popen[bytes] | None = None
        self.cli = cli_wrapper(root / "overlayfs-inetsk")
        cp = overlayfs_inetsk("plugin", "install", "--libdir", str(self.libdir), "--so", str(so),
                              "--agent-socket", str(self.sock),
                              *(install or ("--cli", str(self.cli))))
        assert f"installed {self.libdir}" in cp.stdout
        if route == "agent":
            self.agent = start_agent(self.sock, root / "agent.log")

    def env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for k in ENV_KEYS:
            monkeypatch.delenv(k, raising=False)

    def close(self) -> None:
        if self.agent is not None:
            self.agent.terminate()
            self.agent.wait(10)
            assert not self.sock.exists()


def start_agent(sock: Path, log: Path, argv: tuple[str, ...] = (),
                **kw: object) -> subprocess.Popen[bytes]:
    """`agent --socket SOCK` of this tree (after argv, e.g. an unshare), its log in `log`;
    returns once it listens."""
    with open(log, "ab") as f:
        agent = subprocess.Popen(
            [*argv, sys.executable, "-m", "overlayfs_inetsk.cli", "agent", "--socket",
             str(sock)], env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=f, **kw)
    end = time.monotonic() + 20
    while not sock.exists():
        if agent.poll() is not None:
            raise AssertionError(f"agent exited {agent.returncode}: {log.read_text()}")
        assert time.monotonic() < end, "agent never listened"
        time.sleep(0.02)
    return agent


@pytest.fixture(params=["agent", "exec"])
def plugin(request, tmp_path, built_so, monkeypatch):
    p = Plugin(tmp_path, built_so, request.param)
    p.env(monkeypatch)
    yield p
    p.close()


def restore(host, images, work: Path, plugin: Plugin, **kw) -> int:
    return criu.restore(host, images, work, extra=["-L", str(plugin.libdir)], **kw)


def plugin_lines(work: Path) -> list[str]:
    log = (work / "restore.log").read_text(errors="replace")
    return [ln for ln in log.splitlines() if "overlayfs-inetsk: " in ln]


def criu_pid(lines: list[str]) -> int:
    for ln in lines:
        m = re.search(r"criu pid (\d+): asking", ln)
        if m:
            return int(m.group(1))
    raise AssertionError("no 'asking' line:\n" + "\n".join(lines))


def view_of(lines: list[str]) -> str | None:
    """The view the plugin put in place for this restore (its name), or None."""
    for ln in lines:
        m = VIEW_LINE.search(ln)
        if m:
            assert m.group(1) == VIEW_ROOT, ln
            return m.group(2)
    return None


def views() -> set[str]:
    """The views (and their temporary dirs) under the view root now."""
    try:
        return {n for n in os.listdir(VIEW_ROOT) if VIEW_NAME.fullmatch(n) or TEMP_NAME.fullmatch(n)}
    except FileNotFoundError:
        return set()


def views_left(lines: list[str]) -> list[str]:
    """The view this restore used, if it is still there."""
    name = view_of(lines)
    return [name] if name is not None and name in views() else []


def checksums(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def ro_bind(src: Path, dst: Path) -> None:
    dst.mkdir()
    subprocess.run(["mount", "--bind", str(src), str(dst)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(dst)], check=True)


@pytest.fixture
def service(testnet, image_dirs):
    """The service on host A (TCP on A's IPv4 and IPv6, UDP bound to A's IPv4), dumped."""
    a = testnet.add_host("A")
    assert (str(a.ipv4), str(a.ipv6)) == (A4, A6)
    pid = criu.start_workload(a, SERVICE)
    criu.dump(a, pid, image_dirs.images)
    return testnet, image_dirs


def assert_answers(peer, v4: str, v6: str) -> None:
    assert probe.tcp_hello(peer, v4, 7001) == f"tcp4 {v4} 7001"
    assert probe.udp_echo(peer, v4, 7002, "ping") == "udp4 ping"
    assert probe.tcp_hello(peer, v6, 7004) == f"tcp6 {v6} 7004"


def dump_external_netns(host, dirs) -> None:
    """SERVICE started in host and dumped into dirs.images as runc dumps a container: its
    network namespace external (extRootNetNS), for a restore that hands over a new one."""
    pid = criu.start_workload(host, SERVICE)
    ino = os.stat(host.netns_path).st_ino
    cp = subprocess.run([criu.CRIU, "dump", "-t", str(pid), "-D", str(dirs.images), "-o",
                         "dump.log", "-v4", "--external", f"net[{ino}]:extRootNetNS"],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, (dirs.images / "dump.log").read_text()[-3000:]


def test_plain_restore_on_another_host_with_no_map(service, plugin):
    """local=auto, resolved in B; the images on a read-only bind, unchanged."""
    net, dirs = service
    b, c = net.add_host("B"), net.add_host("C")
    shared = dirs.root / "shared"
    ro_bind(dirs.images, shared)
    try:
        before = checksums(shared)
        work = dirs.work_for("B")
        rpid = restore(b, shared, work, plugin)
        assert_answers(c, str(b.ipv4), str(b.ipv6))
        with pytest.raises(ProbeError):
            probe.tcp_hello(c, A4, 7001)
        assert checksums(shared) == before
        lines = plugin_lines(work)
        assert view_of(lines) is not None, lines
        assert any("removed the view" in ln for ln in lines), lines
        if plugin.route == "exec":
            assert any("no agent at" in ln for ln in lines), lines
        else:
            assert not any("no agent at" in ln for ln in lines), lines
        assert views_left(lines) == []
        criu.kill_tree(rpid)
    finally:
        subprocess.run(["umount", str(shared)], check=False)


def test_the_new_netns_handed_over_as_runc_does(testnet, image_dirs, plugin):
    """As under runc: criu runs in the host's namespace; the checkpoint's network namespace
    was dumped as external (extRootNetNS) and the restore gets the new one (host B's) as an
    inherited fd. The plugin finds that fd and resolves `auto` inside it, not in criu's."""
    a, b, c = testnet.add_host("A"), testnet.add_host("B"), testnet.add_host("C")
    dirs = image_dirs
    dump_external_netns(a, dirs)
    work = dirs.work_for("B")
    fd = os.open(b.netns_path, os.O_RDONLY)
    criu.become_subreaper()
    try:
        cp = subprocess.run([criu.CRIU, "restore", "-D", str(dirs.images), "-W", str(work),
                             "-o", "restore.log", "-v4", "-d", "--pidfile", str(work / "pid"),
                             "-L", str(plugin.libdir), "--inherit-fd", f"fd[{fd}]:extRootNetNS"],
                            pass_fds=(fd,), capture_output=True, text=True, timeout=60)
    finally:
        os.close(fd)
    lines = plugin_lines(work)
    assert cp.returncode == 0, lines
    rpid = int((work / "pid").read_text())
    b.adopt(rpid)
    b_ino = os.stat(b.netns_path).st_ino
    assert any(re.search(rf"target network namespace: fd \d+ \(net:\[{b_ino}\]\)", ln)
               for ln in lines), lines
    assert_answers(c, str(b.ipv4), str(b.ipv6))
    criu.kill_tree(rpid)


def test_nothing_to_change_makes_no_view(testnet, image_dirs, plugin):
    """Listeners on 0.0.0.0 and 127.0.0.1 only: the planner answers NONE; no socket at all:
    the plugin's fast path, no planner asked."""
    a, b = testnet.add_host("A"), testnet.add_host("B")
    pid = criu.start_workload(a, ["--tcp-listen", "any@0.0.0.0:7006",
                                  "--tcp-listen", "lo@127.0.0.1:7007"])
    criu.dump(a, pid, image_dirs.images)
    work = image_dirs.work_for("B")
    rpid = restore(b, image_dirs.images, work, plugin)
    lines = plugin_lines(work)
    assert any("nothing to change: no socket to change (map: the default local=auto)" in ln
               for ln in lines), lines
    assert view_of(lines) is None
    assert probe.tcp_hello(testnet.add_host("C"), str(b.ipv4), 7006) == f"any {b.ipv4} 7006"
    criu.kill_tree(rpid)

    pid = criu.start_workload(a, [])
    empty = image_dirs.root / "empty"
    criu.dump(a, pid, empty)
    work = image_dirs.work_for("B-empty")
    criu.kill_tree(restore(b, empty, work, plugin))
    lines = plugin_lines(work)
    assert any("no inet socket in this checkpoint: nothing to do" in ln for ln in lines), lines
    assert not any("asking the planner" in ln for ln in lines), lines


def test_auto_with_no_address_fails_the_restore(service, plugin):
    net, dirs = service
    b = net.add_host("B", ipv4=None)  # IPv6 only: local=auto has no IPv4 address here
    work = dirs.work_for("B")
    before = views()
    with pytest.raises(criu.CriuError):
        restore(b, dirs.images, work, plugin)
    lines = plugin_lines(work)
    errors = [ln for ln in lines if "Error (" in ln]
    assert len(errors) == 1, lines
    assert ("auto target has no IPv4 address on this node (map: the default local=auto"
            in errors[0]), errors
    assert view_of(lines) is None and views() <= before
    assert b.pids() == []


def test_refused_tcp_fate_from_the_node_file_fails_the_restore(testnet, image_dirs, plugin,
                                                               monkeypatch):
    """A client connected to a server that stays, `--tcp-outside fail` in the node's options
    file: the restore fails with the plugin's line; nothing left behind."""
    a, p, b = testnet.add_host("A"), testnet.add_host("P"), testnet.add_host("B")
    criu.start_workload(p, ["--tcp-listen", f"srv@{p.ipv4}:7600"])
    pid = criu.start_workload(a, ["--tcp-connect", f"cli@{p.ipv4}:7600"])
    criu.dump(a, pid, image_dirs.images, tcp_established=True)
    conf = image_dirs.root / "conf"
    conf.mkdir()
    (conf / "plugin.options").write_text("--tcp-outside fail\n")
    monkeypatch.setenv("OVERLAYFS_INETSK_CONF_DIR", str(conf))
    work = image_dirs.work_for("B")
    before = views()
    with pytest.raises(criu.CriuError):
        restore(b, image_dirs.images, work, plugin)
    lines = plugin_lines(work)
    errors = [ln for ln in lines if "Error (" in ln]
    assert len(errors) == 1, lines
    assert "refused" in errors[0] and "outside the map" in errors[0], errors
    assert f"options: {conf}/plugin.options" in errors[0], errors
    assert view_of(lines) is None and views() <= before
    assert b.pids() == []


@pytest.mark.fuse
def test_fuse_view_and_plugin_at_once_rewrite_once(service, plugin, monkeypatch):
    """The mount moves A to B; the plugin's map (A->B, B->C) would move B on to C if it
    rewrote the view again. It answers NONE and the service answers on B."""
    net, dirs = service
    b, c = net.add_host("B"), net.add_host("C")
    monkeypatch.setenv("OVERLAYFS_INETSK_MAP", f"{A4}={b.ipv4},{b.ipv4}={c.ipv4},"
                                               f"{A6}={b.ipv6},{b.ipv6}={c.ipv6}")
    with mounted(dirs.images, dirs.root / "mnt",
                 ["--map", f"{A4}={b.ipv4}", "--map", f"{A6}={b.ipv6}"]) as mnt:
        work = dirs.work_for("B")
        rpid = restore(b, mnt, work, plugin)
    lines = plugin_lines(work)
    assert any("nothing to change: the images dir is an overlayfs-inetsk mount" in ln
               for ln in lines), lines
    assert_answers(c, str(b.ipv4), str(b.ipv6))
    criu.kill_tree(rpid)

    # the same with a view dir written by `rewrite`
    view = dirs.root / "view"
    overlayfs_inetsk("rewrite", str(dirs.images), str(view), "--map", f"{A4}={b.ipv4}",
                     "--map", f"{A6}={b.ipv6}")
    work = dirs.work_for("B2")
    rpid = restore(b, view, work, plugin)
    lines = plugin_lines(work)
    assert any("nothing to change: the images dir is a per-node view already" in ln
               for ln in lines), lines
    assert_answers(c, str(b.ipv4), str(b.ipv6))
    criu.kill_tree(rpid)


def test_map_from_environment_and_from_the_checkpoint(service, plugin, monkeypatch):
    """CRIU's environment wins over a map file in the images dir, which wins over local=auto."""
    net, dirs = service
    b, c = net.add_host("B"), net.add_host("C")
    b.add_addr("10.77.9.9/16")
    b.add_addr("fd77::9:9/64")
    (dirs.images / "overlayfs-inetsk.map").write_text(
        f'[map]\n"{A4}" = "10.77.9.9"\n"{A6}" = "fd77::9:9"\n')
    work = dirs.work_for("file")
    criu.kill_tree(restore(b, dirs.images, work, plugin))  # checked below, after the env run
    lines = plugin_lines(work)
    assert any("CRIU reads the per-node view" in ln for ln in lines), lines
    monkeypatch.setenv("INETSK_LOCAL_IPV4", str(b.ipv4))
    monkeypatch.setenv("INETSK_LOCAL_IPV6", str(b.ipv6))
    rpid = restore(b, dirs.images, dirs.work_for("env"), plugin)
    assert_answers(c, str(b.ipv4), str(b.ipv6))
    criu.kill_tree(rpid)
    monkeypatch.delenv("INETSK_LOCAL_IPV4")
    monkeypatch.delenv("INETSK_LOCAL_IPV6")
    rpid = restore(b, dirs.images, dirs.work_for("file2"), plugin)
    assert_answers(c, "10.77.9.9", "fd77::9:9")
    criu.kill_tree(rpid)


# ports (issue 13): a map carried in the checkpoint or on the node, through the view
PORT_MAP = 'port-offset = 1000\nrules = ["local=auto", ":7002=:9002"]\n'


def place_port_map(dirs, source: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PORT_MAP in the checkpoint (`overlayfs-inetsk.map` in the images dir) or on the node
    (`plugin.map` in $OVERLAYFS_INETSK_CONF_DIR)."""
    if source == "checkpoint":
        path = dirs.images / "overlayfs-inetsk.map"
    else:
        conf = dirs.root / "conf"
        conf.mkdir()
        monkeypatch.setenv("OVERLAYFS_INETSK_CONF_DIR", str(conf))
        path = conf / "plugin.map"
    path.write_text(PORT_MAP)
    return path


def bound_ports(host) -> set[tuple[str, int]]:
    """(proto, port) of every TCP listener and bound UDP socket in host's namespace."""
    return {(h.proto, h.port) for h in read_tables(host.netns_path)
            if (h.proto, h.state) in (("tcp", 10), ("udp", 7))}


def assert_on_new_ports_only(host, peer) -> None:
    """SERVICE moved by PORT_MAP: 7001 and 7004 by the offset, 7002 by its rule."""
    v4, v6 = str(host.ipv4), str(host.ipv6)
    assert probe.tcp_hello(peer, v4, 8001) == f"tcp4 {v4} 8001"
    assert probe.udp_echo(peer, v4, 9002, "ping") == "udp4 ping"
    assert probe.tcp_hello(peer, v6, 8004) == f"tcp6 {v6} 8004"
    assert bound_ports(host) == {("tcp", 8001), ("udp", 9002), ("tcp", 8004)}
    with pytest.raises(ProbeError):
        probe.tcp_hello(peer, v4, 7001, timeout=2)


@pytest.mark.parametrize("source", ["checkpoint", "node"])
def test_ports_moved_by_a_map_in_the_checkpoint_or_on_the_node(service, plugin, monkeypatch,
                                                               source):
    """Plain criu + the plugin: `port-offset` and a port rule from a map file (with
    local=auto): the listener and the bound UDP socket answer on their new ports only."""
    net, dirs = service
    b, c = net.add_host("B"), net.add_host("C")
    place_port_map(dirs, source, monkeypatch)
    work = dirs.work_for("B")
    rpid = restore(b, dirs.images, work, plugin)
    try:
        lines = plugin_lines(work)
        assert any("CRIU reads the per-node view" in ln for ln in lines), lines
        assert_on_new_ports_only(b, c)
    finally:
        criu.kill_tree(rpid)
    assert view_of(lines) is not None and views_left(lines) == []


def test_dump_with_the_plugin_loaded_is_untouched(testnet, image_dirs, plugin):
    a = testnet.add_host("A")
    pid = criu.start_workload(a, SERVICE)
    criu.dump(a, pid, image_dirs.images, extra=["-L", str(plugin.libdir)])
    log = (image_dirs.images / "dump.log").read_text(errors="replace")
    assert "overlayfs-inetsk" in log  # loaded ...
    assert "overlayfs-inetsk: " not in log  # ... and silent


def test_install_and_remove_in_criu_default_dir(built_so, tmp_path):
    """`plugin install` / `remove` without --libdir: /usr/lib/criu, restored afterwards."""
    libdir = Path("/usr/lib/criu")
    names = ("overlayfs_inetsk_plugin.so", "overlayfs-inetsk-plugin.conf",
             "overlayfs-inetsk-plugin.cli")
    existed = libdir.exists()
    saved = {p.name: p.read_bytes() for p in libdir.iterdir()} if existed else {}
    cli = cli_wrapper(tmp_path / "overlayfs-inetsk")
    sock = tmp_path / "agent.sock"  # never the default agent socket
    try:
        (libdir / "overlayfs-inetsk-plugin.cli").unlink(missing_ok=True)
        libdir.mkdir(exist_ok=True)
        (libdir / "overlayfs-inetsk-plugin.cli").write_text("/old/cli\n")  # an older install's
        cp = overlayfs_inetsk("plugin", "install", "--so", str(built_so), "--cli", str(cli),
                              "--agent-socket", str(sock))
        assert f"installed {libdir}/overlayfs_inetsk_plugin.so" in cp.stdout
        assert f"removed {libdir}/overlayfs-inetsk-plugin.cli" in cp.stdout
        assert (libdir / "overlayfs_inetsk_plugin.so").stat().st_mode & 0o777 == 0o755
        conf = (libdir / "overlayfs-inetsk-plugin.conf").read_text()
        assert f"\ncli {cli}\nagent-socket {sock}\ntimeout-ms 30000\n" in conf
        assert (libdir / "overlayfs-inetsk-plugin.conf").stat().st_mode & 0o777 == 0o644
        cp = overlayfs_inetsk("plugin", "install", "--so", str(built_so), "--cli", str(cli),
                              "--agent-socket", str(sock))
        assert cp.stdout == f"already installed in {libdir}\n"
        cp = overlayfs_inetsk("doctor", check=False)
        lines = {ln.split()[1]: ln for ln in cp.stdout.splitlines()
                 if ln[:4].strip() and len(ln.split()) > 2}
        line = lines["plugin"]
        assert f"{libdir}/overlayfs_inetsk_plugin.so, loaded by /usr/local/sbin/criu" in line
        assert line.endswith(f"; CLI fallback: {cli}"), line
        assert lines["agent"].endswith(f"no agent at {sock}"), lines["agent"]
        assert "restores run the CLI, one per restore" in lines["route"], lines["route"]
        cp = overlayfs_inetsk("plugin", "remove")
        assert cp.stdout.splitlines() == [f"removed {libdir}/overlayfs_inetsk_plugin.so",
                                          f"removed {libdir}/overlayfs-inetsk-plugin.conf"]
        cp = overlayfs_inetsk("plugin", "remove")
        assert cp.stdout == f"not installed in {libdir}\n"
    finally:
        for name in names:
            if name in saved:
                (libdir / name).write_bytes(saved[name])
            else:
                (libdir / name).unlink(missing_ok=True)
        if not existed and libdir.exists() and not any(libdir.iterdir()):
            libdir.rmdir()
