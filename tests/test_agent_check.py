"""`agent --check` (issue 20): it proves that the agent ANSWERS, within one deadline, where a
connect alone proves nothing (a frozen agent's socket still accepts into its backlog); and
`--same-pidns`, the DaemonSet's readiness probe: the answering agent is this pid
namespace's. The probes in the pod itself: tests/integration/test_daemonset_rollout.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inetsk_testbed.agentproc import ROOT, AgentProc, tree_env
from overlayfs_inetsk import __version__
from overlayfs_inetsk.plugin import check as chk
from overlayfs_inetsk.plugin.wire import PROTOCOL


def cli_check(sock: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "overlayfs_inetsk.cli", "agent", "--check",
                           "--socket", str(sock), *extra], capture_output=True, text=True,
                          timeout=60, env=tree_env(), cwd=ROOT)


@pytest.fixture
def agent(tmp_path: Path):  # type: ignore[no-untyped-def]
    a = AgentProc(tmp_path / "agent.sock", tmp_path / "views", tmp_path / "agent.log")
    a.wait_listening()
    yield a
    a.stop()


def test_a_live_agent_answers_with_its_version_and_pid(agent: AgentProc) -> None:
    r = chk.check(str(agent.sock))
    assert r.ok and r.state == chk.ANSWERING, r
    assert (r.version, r.pid) == (__version__, agent.pid)
    cp = cli_check(agent.sock)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.startswith(f"the agent at {agent.sock} answers: overlayfs-inetsk "
                                f"{__version__}, protocol {PROTOCOL}, pid {agent.pid} (in ")
    assert cp.stderr == ""
    # a probe is no request: nothing at INFO in the agent's log for it
    assert "check" not in agent.text()


def test_a_frozen_agent_fails_the_check_within_its_deadline(agent: AgentProc) -> None:
    """SIGSTOP: the kernel still accepts connections into its backlog. Before, doctor's and
    the plugin's probe (a connect) said the agent answers."""
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        cp = cli_check(agent.sock, "--timeout-ms", "700")
        took = time.monotonic() - t0
        assert cp.returncode == 1
        assert cp.stderr.splitlines() == [
            f"overlayfs-inetsk: error: the agent at {agent.sock} took the connection but gave "
            "no answer within 700 ms (stopped or overloaded?)"]
        assert took < 10, took
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    assert chk.check(str(agent.sock)).ok  # thawed, it answers again


def test_no_agent_a_dead_socket_and_a_full_backlog(tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    r = chk.check(str(sock), 500)
    assert (r.state, r.detail) == (chk.NOT_RUNNING, f"no agent at {sock}")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dead.bind(str(sock))
    dead.close()
    r = chk.check(str(sock), 500)
    assert (r.state, r.detail) == (chk.NOT_RUNNING,
                                   f"no agent at {sock} (a socket nobody listens on)")
    sock.unlink()
    full = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    full.bind(str(sock))
    full.listen(0)
    fillers = []
    try:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK)
            try:
                s.connect(str(sock))
            except BlockingIOError:
                s.close()
                break
            fillers.append(s)
            assert len(fillers) < 100
        t0 = time.monotonic()
        r = chk.check(str(sock), 400)
        assert r.state == chk.NOT_ACCEPTING and "took no connection within 400 ms" in r.detail
        assert 0.35 < time.monotonic() - t0 < 5
    finally:
        for s in fillers:
            s.close()
        full.close()


def test_an_older_agent_that_answers_err_still_answers(tmp_path: Path) -> None:
    """An agent from before the check request answers it with ERR (it wants 2 fds): that is
    an answer; the version is not known."""
    sock = tmp_path / "agent.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(str(sock))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        conn.recv(100)
        conn.send(b"ERR the agent needs 2 fds (images dir, netns), got 0")
        conn.close()

    import threading

    t = threading.Thread(target=serve)
    t.start()
    try:
        r = chk.check(str(sock))
    finally:
        t.join(10)
        srv.close()
    assert r.ok and r.version is None and "an older agent?" in r.detail, r


def test_same_pidns_tells_this_namespaces_agent_from_another(tmp_path: Path) -> None:
    """The readiness probe runs in the pod: during a rolling update the path may be served
    by the other pod's agent. SO_PEERCRED gives 0 for a pid of a namespace we cannot see,
    and a pid of our own namespace otherwise."""
    own = AgentProc(tmp_path / "own.sock", tmp_path / "views", tmp_path / "own.log")
    other = AgentProc(tmp_path / "other.sock", tmp_path / "views", tmp_path / "other.log",
                      prefix=("unshare", "--pid", "--fork", "--mount-proc", "--kill-child"))
    try:
        own.wait_listening()
        other.wait_listening()
        assert chk.check(str(own.sock), same_pidns=True).ok
        # from here (the host) the other agent's pid is visible, but not in our namespace
        r = chk.check(str(other.sock), same_pidns=True)
        assert r.state == chk.REFUSED and "not this pid namespace's agent" in r.detail, r
        assert chk.check(str(other.sock)).ok  # without the flag: it answers
        # from inside a pid namespace of its own, our agent is not visible at all (pid 0)
        cp = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable,
                             "-m", "overlayfs_inetsk.cli", "agent", "--check", "--socket",
                             str(own.sock), "--same-pidns"], capture_output=True, text=True,
                            timeout=60, env=tree_env())
        assert cp.returncode == 1 and "not this pid namespace's agent" in cp.stderr, cp.stderr
    finally:
        own.stop()
        other.stop()


def test_the_check_is_cheap_to_run(agent: AgentProc) -> None:
    """A probe every 2 s: `agent --check` loads neither the planner nor pycriu nor
    prometheus_client."""
    cp = subprocess.run([sys.executable, "-X", "importtime", "-m", "overlayfs_inetsk.cli",
                         "agent", "--check", "--socket", str(agent.sock)], capture_output=True,
                        text=True, timeout=60, env=tree_env(), cwd=ROOT)
    assert cp.returncode == 0, cp.stderr
    loaded = {ln.rsplit("|", 1)[-1].strip() for ln in cp.stderr.splitlines() if "|" in ln}
    assert "overlayfs_inetsk.plugin.check" in loaded
    heavy = {m for m in loaded if m.split(".")[0] in ("pycriu", "google", "prometheus_client")
             or m in ("overlayfs_inetsk.app.plugin_view", "overlayfs_inetsk.app.agent",
                      "overlayfs_inetsk.core")}
    assert heavy == set(), heavy
