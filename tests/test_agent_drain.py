"""The agent's hand-over and stop (issue 20): a new agent takes the socket path over from a
live one (`--take-over`: bound beside it, renamed over it), the old one serves what it had
and, on SIGTERM, drains (its backlog and its requests in flight are answered) without
removing a path that is another agent's; a stream of requests across the hand-over loses
none and waits for nothing. The same through the DaemonSet's pods:
tests/integration/test_daemonset_rollout.py."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from inetsk_testbed.agentproc import AgentProc, ask, close_all, connect, exchange, request, request_fds
from overlayfs_inetsk.plugin.check import check

ENV = {"INETSK_LOCAL_IPV4": "10.0.0.2"}


@pytest.fixture
def fds(tmp_path: Path) -> Iterator[tuple[int, int]]:
    with request_fds(tmp_path) as f:
        yield f


def agent(tmp: Path, name: str, *extra: str) -> AgentProc:
    return AgentProc(tmp / "agent.sock", tmp / "views", tmp / f"{name}.log", extra=extra)


def view(sock: Path, fds: tuple[int, int], s: socket.socket | None = None) -> str:
    text, got = exchange(s, request(ENV), fds) if s is not None else ask(sock, request(ENV),
                                                                         fds)
    close_all(got)
    return text


def test_a_new_agent_takes_the_path_over_and_the_old_one_leaves_it(tmp_path: Path, fds
                                                                   ) -> None:
    old = agent(tmp_path, "old").wait_listening()
    new = None
    try:
        ino = os.lstat(old.sock).st_ino
        new = agent(tmp_path, "new", "--take-over").wait_listening()
        assert "(took it over from another agent)" in new.text()
        assert os.lstat(old.sock).st_ino != ino
        r = check(str(old.sock))
        assert r.ok and r.pid == new.pid, r  # the path is the new agent's
        old.wait_log("is another agent's socket now: serving what came before it")
        assert old.stop() == 0
        assert f"left {old.sock} (another agent's socket now)" in old.text()
        assert check(str(old.sock)).pid == new.pid  # not removed by the old one
        assert view(new.sock, fds).startswith("VIEW view-")
    finally:
        old.stop()
        if new is not None:
            new.stop()
    assert not old.sock.exists()  # the new one removed its own


def test_sigterm_answers_what_waits_in_the_backlog(tmp_path: Path, fds) -> None:
    """Requests sent to a stopped agent wait in its backlog; SIGTERM then. Before, the
    agent closed its socket at once: each of those restores got a reset (and then waited
    for another agent, or ran the CLI). Now each is answered, and then the path goes."""
    a = agent(tmp_path, "a").wait_listening()
    try:
        os.kill(a.pid, signal.SIGSTOP)
        queued = [connect(a.sock) for _ in range(5)]
        for s in queued:
            socket.send_fds(s, [request(ENV)], list(fds))
        os.kill(a.pid, signal.SIGTERM)
        os.kill(a.pid, signal.SIGCONT)
        replies = []
        for s in queued:
            with s:
                msg, got, _f, _a = socket.recv_fds(s, 4096, 4)
                close_all(got)
                replies.append(msg.decode())
        assert all(r.startswith("VIEW view-") for r in replies), replies
        assert a.proc.wait(30) == 0
        assert "served 5 request(s) from the backlog" in a.text(), a.text()
        assert not a.sock.exists()
    finally:
        a.stop()


def test_sigterm_lets_a_request_in_flight_finish(tmp_path: Path, fds) -> None:
    """A client connected and accepted, its request not yet sent when SIGTERM comes. Before,
    the agent exited under it (its threads are daemons): the client read nothing."""
    a = agent(tmp_path, "a").wait_listening()
    try:
        s = connect(a.sock)
        time.sleep(0.3)  # accepted by now (it polls, and accepts at once)
        os.kill(a.pid, signal.SIGTERM)
        a.wait_log("SIGTERM: stopping")
        assert a.proc.poll() is None  # waiting for its request in flight
        assert view(a.sock, fds, s).startswith("VIEW view-")
        assert a.proc.wait(30) == 0
        assert "1 were in flight" in a.text()
    finally:
        a.stop()


def test_a_stream_of_requests_across_the_hand_over_loses_none_and_waits_for_nothing(
        tmp_path: Path, fds) -> None:
    old = agent(tmp_path, "old").wait_listening()
    new = None
    results: list[tuple[float, str]] = []
    stop = threading.Event()

    def lane() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                text = view(old.sock, fds)
            except OSError as e:
                text = f"{type(e).__name__}: {e}"
            results.append((time.monotonic() - t0, text))

    try:
        with ThreadPoolExecutor(3) as ex:
            futs = [ex.submit(lane) for _ in range(3)]
            time.sleep(0.5)
            new = agent(tmp_path, "new", "--take-over").wait_listening()
            time.sleep(0.5)
            old.stop()  # SIGTERM: drains
            time.sleep(0.5)
            stop.set()
            for f in futs:
                f.result(60)
        bad = [t for _, t in results if not t.startswith("VIEW view-")]
        assert bad == [] and len(results) > 10, (bad, len(results))
        assert max(d for d, _ in results) < 5, sorted(d for d, _ in results)[-3:]
        assert new.stop() == 0  # every line written
        served_old = old.text().count(": VIEW view-")
        served_new = new.text().count(": VIEW view-")
        assert served_old and served_new and served_old + served_new == len(results)
    finally:
        stop.set()
        old.stop()
        if new is not None:
            new.stop()
