"""The plugin <-> planner protocol with real CRIU restores (issue 18): the agent in a pid
namespace of its own (as the DaemonSet runs it), views of killed and timed-out restores,
hostile replies and a planner that is not root (fake_planner.py, in a private
/run/overlayfs-inetsk), every wait's deadline (a stopped agent with a full backlog, a CLI
that hangs with a child that hangs), a request that does not fit, and a restore that
waits for an agent that is (re)starting."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from inetsk_testbed import criu, probe
from overlayfs_inetsk.plugin.wire import VIEW_ROOT

from .test_plugin import (
    ENV_KEYS,
    ROOT,
    SERVICE,
    Plugin,
    assert_answers,
    build_plugin,
    criu_pid,
    plugin_lines,
    restore,
    start_agent,
    view_of,
    views,
)

pytestmark = [pytest.mark.root, pytest.mark.criu]


@pytest.fixture(scope="module")
def so(tmp_path_factory) -> Path:
    return build_plugin(tmp_path_factory.mktemp("plugin-build"))


@pytest.fixture
def dumped(testnet, image_dirs):
    a = testnet.add_host("A")
    criu.dump(a, criu.start_workload(a, SERVICE), image_dirs.images)
    return testnet, image_dirs, a


@pytest.fixture
def clean_env(monkeypatch):
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def errors(lines: list[str]) -> list[str]:
    return [ln for ln in lines if "Error (" in ln]


def one_error(work: Path) -> str:
    lines = plugin_lines(work)
    errs = errors(lines)
    assert len(errs) == 1, lines
    return errs[0]


def ns_children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def gone(pid: int) -> bool:
    return criu._state(pid) in (None, "Z")


# -- the agent in a pid namespace of its own ------------------------------------------------
def test_eight_restores_at_once_through_an_agent_in_its_own_pid_namespace(
        dumped, tmp_path, so, clean_env):
    """As the DaemonSet runs it: `unshare --pid --fork --mount-proc ... agent`. Before, every
    request's sweep took the views of the restores still running for stale (kill(pid, 0) on
    a host pid says "no such process" there): some of 8 failed. Now 8 of 8 come up, each on
    its own address, and no view is left."""
    net, dirs, _a = dumped
    p = Plugin(tmp_path, so, "none", install=("--no-cli",))
    log = tmp_path / "agent.log"
    unshare = start_agent(p.sock, log, ("unshare", "--pid", "--fork", "--mount-proc",
                                        "--kill-child"))
    try:
        hosts = [net.add_host(f"B{i}") for i in range(8)]
        c = net.add_host("C")
        before = views()

        def one(h):
            try:
                return restore(h, dirs.images, dirs.work_for(h.name), p)
            except criu.CriuError as e:
                return e

        with ThreadPoolExecutor(len(hosts)) as ex:
            results = list(ex.map(one, hosts))
        failed = [(h.name, errors(plugin_lines(dirs.work_for(h.name))) or str(r)[-800:])
                  for h, r in zip(hosts, results) if isinstance(r, Exception)]
        assert failed == [], failed
        names = set()
        for h in hosts:
            lines = plugin_lines(dirs.work_for(h.name))
            names.add(view_of(lines))
            assert any("removed the view" in ln for ln in lines), lines
            assert probe.tcp_hello(c, str(h.ipv4), 7001) == f"tcp4 {h.ipv4} 7001"
            assert probe.udp_echo(c, str(h.ipv4), 7002, "p") == "udp4 p"
        assert len(names) == 8 and None not in names
        assert not names & views() and views() <= before
        assert log.read_text().count(": VIEW view-") == 8
        for r in results:
            criu.kill_tree(r)
    finally:
        agent = ns_children(unshare.pid)
        for pid in agent:  # the agent is pid 1 there; its SIGTERM handler removes its socket
            os.kill(pid, signal.SIGTERM)
        unshare.wait(10)
    assert not p.sock.exists()


def test_a_view_left_by_a_killed_criu_is_swept_by_the_next_request(dumped, tmp_path,
                                                                     so, clean_env):
    """criu killed after init (its pre-restore action script kills it): its view stays, no
    longer locked by anyone; the next request sweeps it, whatever pid namespace it is in."""
    net, dirs, _a = dumped
    b = net.add_host("B")
    p = Plugin(tmp_path, so, "agent")
    try:
        script = tmp_path / "kill-criu.sh"
        # at pre-restore (after the plugin's init), SIGKILL the criu this script runs under
        script.write_text('#!/bin/sh\n[ "$CRTOOLS_SCRIPT_ACTION" = pre-restore ] || exit 0\n'
                          'p=$PPID\nwhile [ "$(cat /proc/$p/comm)" != criu ]; do\n'
                          "  p=$(sed 's/.*) //' /proc/$p/stat | cut -d' ' -f2)\n"
                          '  [ "$p" -gt 1 ] || exit 1\ndone\nkill -9 "$p"\n')
        script.chmod(0o755)
        work = dirs.work_for("killed")
        with pytest.raises(criu.CriuError):
            criu.restore(b, dirs.images, work,
                         extra=["-L", str(p.libdir), "--action-script", str(script)])
        left = view_of(plugin_lines(work))
        assert left is not None and left in views()
        assert not any("removed the view" in ln for ln in plugin_lines(work))
        rpid = restore(b, dirs.images, dirs.work_for("next"), p)
        assert left not in views()
        assert f"{left}" in (tmp_path / "agent.log").read_text()  # "removed ... view(s)"
        assert_answers(net.add_host("C"), str(b.ipv4), str(b.ipv6))
        criu.kill_tree(rpid)
    finally:
        p.close()


# -- hostile replies, in a private /run/overlayfs-inetsk ------------------------------------
def fake_planner(case: str, dirs, host, libdir: Path, tmp: Path, timeout_ms: int = 10000
                 ) -> dict:
    sockdir = tmp / f"sock-{case}"
    sockdir.mkdir(mode=0o755)
    work = dirs.work_for(case)
    spec = {"case": case, "criu": criu.CRIU, "netns": host.netns_path,
            "images": str(dirs.images), "work": str(work), "libdir": str(libdir),
            "sock": str(sockdir / "agent.sock"), "timeout_ms": timeout_ms}
    path = tmp / f"spec-{case}.json"
    path.write_text(json.dumps(spec))
    cp = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                         str(Path(__file__).with_name("fake_planner.py")), str(path)],
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'testbed'}"})
    assert cp.returncode == 0, cp.stderr[-3000:]
    return json.loads(cp.stdout.splitlines()[-1])


HOSTILE = {
    "root-slash": "is not an entry view-XXX of /run/overlayfs-inetsk/plugin",
    "trailing-dot": "is not an entry view-XXX of /run/overlayfs-inetsk/plugin",
    "relative-dot": "'.' is not an entry view-XXX",
    "dotdot": "'..' is not an entry view-XXX",
    "outside": "'/run/overlayfs-inetsk/outside' is not an entry view-XXX",
    "empty": "'' is not an entry view-XXX",
    "symlink": r"cannot open /run/overlayfs-inetsk/plugin/view-d+: Not a directory \(a symlink "
               r"is not followed\)",
    "no-fd": "refused the planner's VIEW reply: it came with 0 fds, not 1",
    "two-fds": "refused the planner's VIEW reply: it came with 2 fds, not 1",
    "wrong-fd": "the fd that came with it is not /run/overlayfs-inetsk/plugin/view-b+$",
    "second-entry": "is not an entry view-XXX",
    "root-0777": r"view root /run/overlayfs-inetsk/plugin: plugin is writable by group or "
                 r"others \(mode 0777\): refused",
    "not-root": r"refused the agent at \S+: it runs as uid 65534, not root",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_reply_fails_the_restore_and_deletes_nothing(case, dumped, tmp_path,
                                                               so, clean_env):
    """Before, the plugin took any `VIEW <dir>` without `/../` (`VIEW <root>/` made its fini
    delete the whole view root) and never asked who answered. Now each fails the restore
    with one line, and nothing under /run/overlayfs-inetsk goes (the agent socket, a view
    another restore holds, the named dirs)."""
    net, dirs, _a = dumped
    b = net.add_host("B")
    p = Plugin(tmp_path, so, "none")
    got = fake_planner(case, dirs, b, p.libdir, tmp_path)
    assert got["rc"] != 0
    errs = errors(got["lines"])
    assert len(errs) == 1 and re.search(HOSTILE[case], errs[0]), got["lines"]
    assert got["gone"] == [], got
    assert not any("CRIU reads the per-node view" in ln for ln in got["lines"])
    if case != "not-root":
        assert got["request"].startswith("OVERLAYFS-INETSK-VIEW 2 pid=")


def test_the_fake_planner_is_heard(dumped, tmp_path, so, clean_env):
    """The same set-up with replies the plugin takes: NONE restores as it is; a valid VIEW
    is put in place (its decoy files.img then fails the restore) and removed at fini."""
    net, dirs, a = dumped
    p = Plugin(tmp_path, so, "none")
    got = fake_planner("none", dirs, a, p.libdir, tmp_path)
    assert got["rc"] == 0, got["lines"]
    assert any("nothing to change: the fake planner changes nothing" in ln for ln in got["lines"])
    got = fake_planner("valid", dirs, net.add_host("B"), p.libdir, tmp_path)
    assert got["rc"] != 0
    assert any(f"CRIU reads the per-node view {VIEW_ROOT}/view-{'b' * 32}" in ln
               for ln in got["lines"]), got["lines"]
    assert got["gone"] == [f"plugin/view-{'b' * 32}", f"plugin/view-{'b' * 32}/files.img"]


# -- deadlines ------------------------------------------------------------------------------
def test_a_stopped_agent_with_a_full_backlog_fails_the_restore_in_time(dumped, tmp_path,
                                                                         so, clean_env):
    """Before, connect() blocked with no deadline: every restore hung. Now the plugin gives
    up at its timeout with one line."""
    net, dirs, _a = dumped
    b = net.add_host("B")
    p = Plugin(tmp_path, so, "agent", install=("--no-cli", "--timeout-ms", "1500"))
    fillers: list[socket.socket] = []
    try:
        assert p.agent is not None
        os.kill(p.agent.pid, signal.SIGSTOP)
        end = time.monotonic() + 5
        while criu._state(p.agent.pid) != "T":  # stopped: it accepts nothing from now on
            assert time.monotonic() < end
            time.sleep(0.01)
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK)
            try:
                s.connect(str(p.sock))
            except BlockingIOError:
                s.close()
                break
            fillers.append(s)
            assert len(fillers) < 1000
        work = dirs.work_for("B")
        t0 = time.monotonic()
        with pytest.raises(criu.CriuError):
            restore(b, dirs.images, work, p, timeout=30)
        took = time.monotonic() - t0
        assert took < 10, took
        assert re.search(r"the agent at \S+ took no connection within 1500 ms \(its backlog is "
                         r"full: stopped or overloaded\?\)", one_error(work))
    finally:
        for s in fillers:
            s.close()
        if p.agent is not None:
            os.kill(p.agent.pid, signal.SIGCONT)
        p.close()


def test_a_cli_that_hangs_is_killed_with_its_children_at_the_timeout(dumped, tmp_path,
                                                                      so, clean_env):
    """Before, on timeout the CLI was killed but not its children, and waitpid() had no
    deadline. Now its whole process group goes."""
    net, dirs, _a = dumped
    b = net.add_host("B")
    pids = tmp_path / "pids"
    hang = tmp_path / "hanging-cli"
    hang.write_text(f"#!/bin/sh\necho $$ > {pids}.tmp\nsleep 600 &\necho $! >> {pids}.tmp\n"
                    f"mv {pids}.tmp {pids}\nwait\n")
    hang.chmod(0o755)
    p = Plugin(tmp_path, so, "exec", install=("--cli", str(hang), "--timeout-ms", "1500"))
    work = dirs.work_for("B")
    t0 = time.monotonic()
    with pytest.raises(criu.CriuError):
        restore(b, dirs.images, work, p, timeout=30)
    assert time.monotonic() - t0 < 10
    assert re.search(rf"{re.escape(str(hang))} plugin-view gave no answer within 1500 ms",
                     one_error(work))
    shell, child = (int(x) for x in pids.read_text().split())
    end = time.monotonic() + 5
    while not (gone(shell) and gone(child)):
        assert time.monotonic() < end, (criu._state(shell), criu._state(child))
        time.sleep(0.02)


def test_a_timed_out_request_leaves_no_view(dumped, tmp_path, so, clean_env):
    """The plugin gave up before the agent answered (timeout-ms 1): before, the agent went
    on and left its view; now it drops the request, writes no view, or removes it."""
    net, dirs, _a = dumped
    b = net.add_host("B")
    p = Plugin(tmp_path, so, "agent", install=("--no-cli", "--timeout-ms", "1"))
    try:
        before = views()
        work = dirs.work_for("B")
        with pytest.raises(criu.CriuError):
            restore(b, dirs.images, work, p)
        # the plugin's line, or the agent's if it came while the plugin was still polling
        assert re.search(r"gave no answer within 1 ms|the request's deadline passed before",
                         one_error(work))
        pid = criu_pid(plugin_lines(work))
        log = tmp_path / "agent.log"
        end = time.monotonic() + 20
        while f"criu pid {pid}: " not in log.read_text():
            assert time.monotonic() < end, log.read_text()
            time.sleep(0.05)
        time.sleep(0.2)  # the agent's last step after its log line
        assert views() <= before, log.read_text()
    finally:
        p.close()


def test_a_request_that_does_not_fit_fails_with_one_line(dumped, tmp_path, so,
                                                         clean_env):
    """Before, a request over 16 KiB silently lost the rest of the environment (here the
    map: the default local=auto would have been applied instead)."""
    net, dirs, _a = dumped
    b = net.add_host("B")
    p = Plugin(tmp_path, so, "agent")
    rules = ",".join(f"10.77.{i // 250}.{i % 250 + 1}=10.77.9.{i % 250 + 1}"
                     for i in range(3500))
    clean_env.setenv("OVERLAYFS_INETSK_MAP", rules)
    work = dirs.work_for("B")
    with pytest.raises(criu.CriuError):
        restore(b, dirs.images, work, p)
    assert (f"the request to the planner does not fit in 65536 bytes: $OVERLAYFS_INETSK_MAP is "
            f"{len(rules)} bytes") in one_error(work)
    assert not any("asking the planner" in ln for ln in plugin_lines(work))
    p.close()


# -- no agent --------------------------------------------------------------------------------
def test_with_no_cli_a_restore_waits_for_the_agent(dumped, tmp_path, so, clean_env):
    """`cli none` (a Kubernetes node: the CLI is in the agent's image): a restore that starts
    while the agent (re)starts waits for it; with none by the timeout, one line says what to
    do."""
    net, dirs, _a = dumped
    b = net.add_host("B")
    p = Plugin(tmp_path, so, "none", install=("--no-cli", "--timeout-ms", "15000"))
    box: dict[str, object] = {}
    work = dirs.work_for("B")
    t = threading.Thread(target=lambda: box.update(
        r=restore(b, dirs.images, work, p, timeout=60)))
    t.start()
    agent = None
    try:
        time.sleep(1.5)
        assert t.is_alive()  # waiting
        agent = start_agent(p.sock, tmp_path / "agent.log")
        t.join(60)
        assert not t.is_alive() and "r" in box, plugin_lines(work)
        lines = plugin_lines(work)
        assert any("and no CLI to run (cli none): waiting for the agent" in ln
                   for ln in lines), lines
        assert view_of(lines) is not None
        assert_answers(net.add_host("C"), str(b.ipv4), str(b.ipv6))
        criu.kill_tree(int(box["r"]))  # type: ignore[arg-type]
    finally:
        t.join(60)
        if agent is not None:
            agent.terminate()
            agent.wait(10)
    (tmp_path / "q").mkdir()
    q = Plugin(tmp_path / "q", so, "none", install=("--no-cli", "--timeout-ms", "1000"))
    work = dirs.work_for("nothing")
    with pytest.raises(criu.CriuError):
        restore(b, dirs.images, work, q)
    assert re.search(r"no agent answered at \S+ within 1000 ms, and no CLI can run instead "
                     r"\(cli none\): start the agent \(its systemd unit or DaemonSet\), or "
                     r"install the plugin with --cli PATH", one_error(work))


# -- the CLI's fds ---------------------------------------------------------------------------
def _no_close_range() -> None:
    """preexec_fn: a seccomp filter that makes close_range(2) fail with ENOSYS (as on a
    kernel before 5.9) for this process and what it runs (x86_64; others untouched)."""
    import ctypes
    import struct

    ld, jeq, ret = 0x20, 0x15, 0x06
    audit_arch_x86_64, nr_close_range = 0xC000003E, 436
    prog = [(ld, 0, 0, 4), (jeq, 0, 3, audit_arch_x86_64), (ld, 0, 0, 0),
            (jeq, 0, 1, nr_close_range), (ret, 0, 0, 0x00050000 | 38), (ret, 0, 0, 0x7FFF0000)]
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *f) for f in prog))
    fprog = struct.pack("HxxxxxxP", len(prog), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


@pytest.mark.parametrize("kernel", ["close_range", "no close_range"])
def test_the_cli_gets_only_its_socket(kernel, dumped, tmp_path, so, clean_env):
    """CRIU's service fds must not reach the CLI: the child keeps 0, 1, 2 and its socket (3).
    Without close_range(2) (a seccomp filter here) the plugin closes fds one by one."""
    net, dirs, _a = dumped
    b = net.add_host("B")
    seen = tmp_path / "fds"
    real = tmp_path / "overlayfs-inetsk"
    (tmp_path / "spy.py").write_text(
        "import os, sys\n"
        "fds = [f for f in os.listdir('/proc/self/fd') if os.path.exists('/proc/self/fd/' + f)]\n"
        "open(sys.argv[1], 'w').write(' '.join(fds))\n"
        "os.execv(sys.argv[2], sys.argv[2:])\n")
    spy = tmp_path / "spy-cli"  # records its fds, then runs the real CLI
    spy.write_text(f'#!/bin/sh\nexec {sys.executable} {tmp_path}/spy.py {seen} {real} "$@"\n')
    spy.chmod(0o755)
    p = Plugin(tmp_path, so, "exec", install=("--cli", str(spy)))
    work = dirs.work_for("B")
    argv = ["nsenter", f"--net={b.netns_path}", "--", criu.CRIU, "restore", "-D",
            str(dirs.images), "-W", str(work), "-o", "restore.log", "-v4", "-d", "--pidfile",
            str(work / "pid"), "-L", str(p.libdir)]
    criu.become_subreaper()
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/",
                        preexec_fn=_no_close_range if kernel != "close_range" else None)
    rpid = int((work / "pid").read_text()) if (work / "pid").exists() else None
    if rpid is not None:
        b.adopt(rpid)
    assert cp.returncode == 0, plugin_lines(work)
    assert sorted(int(x) for x in seen.read_text().split()) == [0, 1, 2, 3]
    assert_answers(net.add_host("C"), str(b.ipv4), str(b.ipv6))
    criu.kill_tree(rpid)  # type: ignore[arg-type]


# -- the plugin's config file ------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["group-writable", "symlink", "unknown-setting", "not-root"])
def test_a_config_file_the_plugin_may_not_trust_fails_the_restore(bad, dumped, tmp_path, so,
                                                                  clean_env):
    """It names a program the plugin runs as root: read only when a regular root-owned file
    that neither group nor others may write, never through a symlink; a bad line is named."""
    net, dirs, _a = dumped
    b = net.add_host("B")
    p = Plugin(tmp_path, so, "exec")
    conf = p.libdir / "overlayfs-inetsk-plugin.conf"
    want = {"group-writable": r"must be owned by root and not writable by group or others "
                              r"\(uid 0, mode 0664\)$",
            "not-root": r"must be owned by root and not writable by group or others "
                        r"\(uid 65534, mode 0644\)$",
            "symlink": r"Too many levels of symbolic links \(a symlink is not followed\)$",
            "unknown-setting": r"overlayfs-inetsk-plugin.conf:6: unknown setting 'clii' "
                               r"\(cli, agent-socket, timeout-ms\)$"}[bad]
    if bad == "group-writable":
        conf.chmod(0o664)
    elif bad == "not-root":
        os.chown(conf, 65534, 65534)
    elif bad == "symlink":
        real = tmp_path / "real.conf"
        conf.rename(real)
        conf.symlink_to(real)
    else:
        conf.write_text(conf.read_text() + "clii /bin/sh\n")
    work = dirs.work_for("B")
    with pytest.raises(criu.CriuError):
        restore(b, dirs.images, work, p)
    err = one_error(work)
    assert f"overlayfs-inetsk: {conf}" in err and re.search(want, err), err
    assert not any("asking the planner" in ln for ln in plugin_lines(work))


def test_a_cli_that_is_not_on_this_node_is_waited_out_like_none(dumped, tmp_path, so,
                                                               clean_env):
    """The DaemonSet's init container names the CLI of its image, which the node does not
    have: the plugin does not try to run it; it waits for the agent, then says so."""
    net, dirs, _a = dumped
    b = net.add_host("B")
    p = Plugin(tmp_path, so, "none", install=("--cli", "/nonexistent/overlayfs-inetsk",
                                              "--timeout-ms", "800"))
    work = dirs.work_for("B")
    with pytest.raises(criu.CriuError):
        restore(b, dirs.images, work, p)
    lines = plugin_lines(work)
    assert any("no CLI to run (/nonexistent/overlayfs-inetsk is not executable here): "
               "waiting for the agent" in ln for ln in lines), lines
    assert re.search(r"no agent answered at \S+ within 800 ms, and no CLI can run instead "
                     r"\(/nonexistent/overlayfs-inetsk is not executable here\)",
                     one_error(work))
