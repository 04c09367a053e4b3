"""The UPDATE_INETSK hook (issue 11) against real CRIU, with a tiny test plugin.

What this proves about our patched CRIU (tests/criu-hook/update-inetsk.patch, built by
tests/criu-hook/build.sh into a private prefix) and about the load-time detection in
plugin/criu_hook_abi.h, with ONE .so built against stock 4.2.1's criu-plugin.h:
- stock 4.2.1 loads the plugin (max_hooks 0) and never calls the hook;
- the patched CRIU calls it once per inet socket with (family, state, src, dst) as in the
  image, before bind/connect; 0 = addresses changed, -ENOTSUP = next plugin, another
  value fails the restore with one line in restore.log.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from inetsk_testbed import criu, probe
from inetsk_testbed.probe import ProbeError

pytestmark = [pytest.mark.root, pytest.mark.criu]

HERE = Path(__file__).resolve().parent.parent / "criu-hook"
PLUGIN_SRC = HERE.parent.parent / "plugin"  # criu_hook_abi.h
CACHE = Path(os.environ.get("OVERLAYFS_INETSK_CACHE", "/var/cache/overlayfs-inetsk"))
HOOK_CRIU = CACHE / "criu-hook" / "prefix" / "sbin" / "criu"
STOCK_HEADERS = Path("/usr/local/include/criu")  # 4.2.1's criu-plugin.h: 13 hooks

A4, A6 = "10.77.0.1", "fd77::1"
ENOTSUP, EPERM = 95, 1


@pytest.fixture
def hook_criu() -> Path:
    if not os.access(HOOK_CRIU, os.X_OK):
        pytest.skip(f"patched CRIU not built ({HOOK_CRIU}): run tests/criu-hook/build.sh "
                    "(scripts/setup.sh does)")
    return HOOK_CRIU


def build_plugin(libdir: Path, letter: str) -> Path:
    """hooktest-<letter>.so, built against STOCK 4.2.1's header: the same .so must work on
    both CRIUs."""
    libdir.mkdir(exist_ok=True)
    out = libdir / f"hooktest-{letter}.so"
    subprocess.run(
        ["cc", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
         f'-DHT_NAME="hooktest-{letter}"', f'-DHT_ENV="HOOKTEST_{letter.upper()}_"',
         f"-I{PLUGIN_SRC}", f"-I{STOCK_HEADERS}", "-o", str(out), str(HERE / "hooktest.c")],
        check=True, capture_output=True, text=True)
    return out


def service_args() -> list[str]:
    return ["--tcp-listen", f"tcp4@{A4}:7001", "--udp-bind", f"udp4@{A4}:7002",
            "--tcp-listen", f"tcp6@[{A6}]:7004", "--tcp-self", f"self@{A4}:7008"]


def assert_answers_on(peer, v4: str, v6: str) -> None:
    assert probe.tcp_hello(peer, v4, 7001) == f"tcp4 {v4} 7001"
    assert probe.udp_echo(peer, v4, 7002, "ping") == "udp4 ping"
    assert probe.tcp_hello(peer, v6, 7004) == f"tcp6 {v6} 7004"
    assert probe.self_check(peer, v4, 7001) == {"self": "OK"}


@pytest.fixture
def dumped(testnet, image_dirs):
    a, p = testnet.add_host("A"), testnet.add_host("P")
    assert (str(a.ipv4), str(a.ipv6)) == (A4, A6)
    pid = criu.start_workload(a, service_args())
    assert_answers_on(p, A4, A6)
    criu.dump(a, pid, image_dirs.images, tcp_established=True)
    return testnet, a, p, image_dirs


def events(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def calls(lines: list[str], plugin: str) -> list[tuple[int, int, str, str, int]]:
    out = []
    for ln in lines:
        m = re.fullmatch(rf"{plugin} call family=(\d+) state=(\d+) src=(\S+) dst=(\S+) -> (-?\d+)",
                         ln)
        if m:
            out.append((int(m[1]), int(m[2]), m[3], m[4], int(m[5])))
    return out


def test_stock_criu_loads_the_plugin_and_never_calls_the_hook(dumped, monkeypatch):
    net, a, p, dirs = dumped
    libdir = dirs.root / "lib"
    build_plugin(libdir, "a")
    log = dirs.root / "events"
    monkeypatch.setenv("HOOKTEST_A_LOG", str(log))
    # applied, this rule would make the restore on A fail (B's address is not on A)
    monkeypatch.setenv("HOOKTEST_A_RULES", f"{A4}=10.77.0.9")
    rpid = criu.restore(a, dirs.images, dirs.work, extra=["-L", str(libdir)])
    try:
        assert events(log) == ["hooktest-a init stage=2 criu_hooks=13 hook=0"]
        assert_answers_on(p, A4, A6)
    finally:
        criu.kill_tree(rpid)


def test_patched_criu_calls_the_hook_per_socket_before_bind(dumped, hook_criu, monkeypatch):
    net, a, p, dirs = dumped
    b = net.add_host("B")
    b4, b6 = str(b.ipv4), str(b.ipv6)
    libdir = dirs.root / "lib"
    build_plugin(libdir, "a")
    log = dirs.root / "events"
    monkeypatch.setattr(criu, "CRIU", str(hook_criu))
    monkeypatch.setenv("HOOKTEST_A_LOG", str(log))
    monkeypatch.setenv("HOOKTEST_A_RULES", f"{A4}={b4};{A6}={b6}")
    rpid = criu.restore(b, dirs.images, dirs.work, extra=["-L", str(libdir)])
    try:
        lines = events(log)
        assert lines[0] == "hooktest-a init stage=2 criu_hooks=16 hook=1"
        got = sorted(calls(lines, "hooktest-a"))
        # (family, TCP state, src, dst as in the image, return value)
        assert got == sorted([
            (2, 10, A4, "0.0.0.0", 0),      # TCP listener
            (2, 7, A4, "0.0.0.0", 0),       # bound UDP (TCP_CLOSE)
            (10, 10, A6, "::", 0),          # TCP listener on IPv6
            (2, 1, A4, A4, 0),              # the self-connection, both ends
            (2, 1, A4, A4, 0),
        ])
        restore_log = (dirs.work / "restore.log").read_text()
        assert restore_log.count("Plugin updated the addresses of inet socket") == 5
        assert_answers_on(p, b4, b6)
        with pytest.raises(ProbeError):
            probe.tcp_hello(p, A4, 7001)
    finally:
        criu.kill_tree(rpid)


def test_enotsup_passes_the_socket_to_the_next_plugin(dumped, hook_criu, monkeypatch):
    """Two plugins in one lib dir: a moves IPv4, b moves IPv6; each answers -ENOTSUP for
    the other's sockets. Whatever order CRIU loads them in, every socket is moved once."""
    net, a, p, dirs = dumped
    b = net.add_host("B")
    b4, b6 = str(b.ipv4), str(b.ipv6)
    libdir = dirs.root / "lib"
    build_plugin(libdir, "a")
    build_plugin(libdir, "b")
    log = dirs.root / "events"
    monkeypatch.setattr(criu, "CRIU", str(hook_criu))
    for letter, rule in (("A", f"{A4}={b4}"), ("B", f"{A6}={b6}")):
        monkeypatch.setenv(f"HOOKTEST_{letter}_LOG", str(log))
        monkeypatch.setenv(f"HOOKTEST_{letter}_RULES", rule)
    rpid = criu.restore(b, dirs.images, dirs.work, extra=["-L", str(libdir)])
    try:
        lines = events(log)
        ca, cb = calls(lines, "hooktest-a"), calls(lines, "hooktest-b")
        assert sorted(c[:4] for c in ca if c[4] == 0) == sorted(
            [(2, 10, A4, "0.0.0.0"), (2, 7, A4, "0.0.0.0"), (2, 1, A4, A4), (2, 1, A4, A4)])
        assert [c[:4] for c in cb if c[4] == 0] == [(10, 10, A6, "::")]
        # the one that came first in the chain said -ENOTSUP for what the other then took
        passed = [c for c in ca + cb if c[4] == -ENOTSUP]
        assert passed, lines
        assert_answers_on(p, b4, b6)
    finally:
        criu.kill_tree(rpid)


def test_an_error_from_the_hook_fails_the_restore_with_one_line(dumped, hook_criu, monkeypatch):
    net, a, p, dirs = dumped
    b = net.add_host("B")
    libdir = dirs.root / "lib"
    build_plugin(libdir, "a")
    log = dirs.root / "events"
    monkeypatch.setattr(criu, "CRIU", str(hook_criu))
    monkeypatch.setenv("HOOKTEST_A_LOG", str(log))
    monkeypatch.setenv("HOOKTEST_A_RULES", f"!{A6}")
    with pytest.raises(criu.CriuError) as ei:
        criu.restore(b, dirs.images, dirs.work, extra=["-L", str(libdir)])
    assert calls(events(log), "hooktest-a")[-1] == (10, 10, A6, "::", -EPERM)
    errors = [ln for ln in ei.value.log.splitlines() if "Plugin failed to update" in ln]
    assert len(errors) == 1 and f"{-EPERM}" in errors[0], ei.value.log_tail
