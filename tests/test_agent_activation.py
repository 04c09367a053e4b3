"""The agent started by socket activation (issue 20): sd_listen_fds() semantics, what the
agent refuses to take, and the agent under systemd's own `systemd-socket-activate`, which
hands the socket over as systemd does (LISTEN_FDS/LISTEN_PID, fd 3): started by the first
connection, served, stopped without removing what is systemd's. A real restore through it:
tests/integration/test_agent_activated.py."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from inetsk_testbed.agentproc import AgentProc, ask, close_all, request, request_fds
from overlayfs_inetsk.errors import InetskError
from overlayfs_inetsk.plugin import activation
from overlayfs_inetsk.plugin.check import check

SSA = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"


# -- sd_listen_fds --------------------------------------------------------------------------
def test_listen_fds_follows_sd_listen_fds() -> None:
    me = os.getpid()
    env = {"LISTEN_PID": str(me), "LISTEN_FDS": "0", "LISTEN_FDNAMES": "x", "OTHER": "1"}
    assert activation.listen_fds(env) == [] and env == {"OTHER": "1"}  # unset, as sd does
    env = {"LISTEN_PID": str(me + 1), "LISTEN_FDS": "1"}  # a parent's: not ours
    assert activation.listen_fds(env) == [] and env == {}
    assert activation.listen_fds({}) == []
    for bad, what in (({"LISTEN_PID": "x1", "LISTEN_FDS": "1"}, "LISTEN_PID='x1' is not a pid"),
                      ({"LISTEN_PID": str(me), "LISTEN_FDS": "-1"},
                       "LISTEN_FDS='-1' is not a number of fds"),
                      ({"LISTEN_PID": str(me)}, "LISTEN_FDS='' is not a number")):
        with pytest.raises(InetskError, match=what):
            activation.listen_fds(dict(bad))


def test_listen_fds_sets_cloexec_and_checks_the_fds_are_open(monkeypatch) -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
    r, w = os.pipe()
    try:
        monkeypatch.setattr(activation, "SD_LISTEN_FDS_START", r)  # fd 3 is pytest's here
        os.set_inheritable(r, True)
        assert activation.listen_fds(dict(env)) == [r]
        assert not os.get_inheritable(r)
        monkeypatch.setattr(activation, "SD_LISTEN_FDS_START", 4000)
        with pytest.raises(InetskError, match=r"^LISTEN_FDS=1: fd 4000 is not open"):
            activation.listen_fds(dict(env))
    finally:
        os.close(r)
        os.close(w)


@pytest.fixture
def sockdir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir(mode=0o755)
    return d


def _why(fd_maker, path: Path) -> str:  # type: ignore[no-untyped-def]
    s = fd_maker(path)
    try:
        return activation._why_not(s.fileno(), str(path)) or ""
    finally:
        s.close()


def test_only_a_listening_unix_seqpacket_socket_on_our_path_is_taken(sockdir: Path) -> None:
    path = sockdir / "agent.sock"

    def make(kind: int, family: int = socket.AF_UNIX, listen: bool = True,
             at: Path | None = None):  # type: ignore[no-untyped-def]
        def f(p: Path) -> socket.socket:
            s = socket.socket(family, kind)
            if family == socket.AF_UNIX:
                (at or p).unlink(missing_ok=True)
                s.bind(str(at or p))
            else:
                s.bind(("127.0.0.1", 0))
            if listen and kind != socket.SOCK_DGRAM:
                s.listen(1)
            return s
        return f

    assert _why(make(socket.SOCK_SEQPACKET), path) == ""
    assert _why(make(socket.SOCK_STREAM), path) == \
        "is a SOCK_STREAM socket, not SOCK_SEQPACKET (ListenSequentialPacket=)"
    assert _why(make(socket.SOCK_DGRAM), path) == \
        "is a SOCK_DGRAM socket, not SOCK_SEQPACKET (ListenSequentialPacket=)"
    assert _why(make(socket.SOCK_SEQPACKET, listen=False), path) == "is not listening"
    assert _why(make(socket.SOCK_STREAM, socket.AF_INET), path) == \
        "is an AF_INET socket, not AF_UNIX"
    assert _why(make(socket.SOCK_SEQPACKET, at=sockdir / "other.sock"), path) == \
        f"is bound to {sockdir / 'other.sock'}, not to the agent's --socket {path}"
    r, w = os.pipe()
    try:
        assert activation._why_not(r, str(path)) == "is not a socket"
    finally:
        os.close(r)
        os.close(w)


# -- the agent under systemd-socket-activate ------------------------------------------------
@pytest.fixture
def fds(tmp_path: Path) -> Iterator[tuple[int, int]]:
    with request_fds(tmp_path) as f:
        yield f


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _activated(sockdir: Path, tmp_path: Path, kind: str = "--seqpacket",
               listen: Path | None = None) -> AgentProc:
    """The agent on sockdir/agent.sock, under systemd-socket-activate listening on `listen`
    (default: the same path)."""
    sock = sockdir / "agent.sock"
    a = AgentProc(sock, tmp_path / "views", tmp_path / "agent.log",
                  prefix=(SSA, *([kind] if kind else []), "-l", str(listen or sock)))
    end = time.monotonic() + 20
    while "Listening on" not in a.text():
        assert a.proc.poll() is None and time.monotonic() < end, a.text()
        time.sleep(0.02)
    return a


def test_the_first_connection_starts_the_agent_which_takes_the_socket(
        sockdir: Path, tmp_path: Path, fds: tuple[int, int]) -> None:
    a = _activated(sockdir, tmp_path)
    try:
        st = os.lstat(a.sock)
        assert stat.S_ISSOCK(st.st_mode)
        assert _comm(a.pid) == "systemd-socket-"  # no agent yet: systemd's stand-in listens
        text, got = ask(a.sock, request({"INETSK_LOCAL_IPV4": "10.0.0.2"}), list(fds))
        close_all(got)
        assert text.startswith("VIEW view-"), text  # the first request, served by it
        log = a.wait_listening().text()
        assert f"listening on {a.sock} (systemd's socket)" in log
        assert _comm(a.pid) != "systemd-socket-"  # the same pid, now the agent
        r = check(str(a.sock))
        assert r.ok and r.pid == a.pid, r
        assert os.lstat(a.sock).st_ino == st.st_ino  # the agent did not rebind it
        assert a.stop() == 0
        # systemd's socket: left where it is (systemd removes it, RemoveOnStop=)
        assert os.lstat(a.sock).st_ino == st.st_ino
        assert "removed" not in a.text().splitlines()[-1]
        assert "systemd keeps the socket" in a.text()
    finally:
        a.stop()


@pytest.mark.parametrize("kind", ["", "--datagram"])
def test_a_socket_that_is_not_seqpacket_is_refused_with_one_line(kind: str, sockdir: Path,
                                                                 tmp_path: Path) -> None:
    a = _activated(sockdir, tmp_path, kind)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM if not kind else socket.SOCK_DGRAM)
        if kind:
            s.sendto(b"x", str(a.sock))
        else:
            s.connect(str(a.sock))
        assert a.proc.wait(30) == 1
        s.close()
        name = "SOCK_STREAM" if not kind else "SOCK_DGRAM"
        lines = [ln for ln in a.text().splitlines() if "overlayfs-inetsk" in ln]
        assert lines == [f"overlayfs-inetsk: error: the socket systemd passed (fd 3) is a "
                         f"{name} socket, not SOCK_SEQPACKET (ListenSequentialPacket=): "
                         "refusing it"], a.text()
    finally:
        a.stop()


def test_a_socket_on_another_path_is_refused(sockdir: Path, tmp_path: Path) -> None:
    other = sockdir / "other.sock"
    a = _activated(sockdir, tmp_path, listen=other)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(str(other))
            assert a.proc.wait(30) == 1
        lines = [ln for ln in a.text().splitlines() if "overlayfs-inetsk" in ln]
        assert lines == [
            f"overlayfs-inetsk: error: the socket systemd passed (fd 3) is bound to {other}, "
            f"not to the agent's --socket {sockdir / 'agent.sock'}: refusing it"], a.text()
        assert not (sockdir / "agent.sock").exists()
    finally:
        a.stop()
