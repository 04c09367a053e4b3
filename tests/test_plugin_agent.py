"""The plugin <-> planner protocol on the Python side, without CRIU: the request's parser
(versions, absurd pids, deadlines), the view root (modes, owners, links) and the views'
lifetime (flock, the sweeper), and the agent as a process (replies and their fds, bad
requests, deadlines, its socket path, fd exhaustion). The C side and real restores:
tests/integration/test_plugin_protocol.py."""

from __future__ import annotations

import fcntl
import os
import resource
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk, reg_file_entry
from overlayfs_inetsk.errors import InetskError
from overlayfs_inetsk.app import agent as agent_mod
from overlayfs_inetsk.app import plugin_view as viewmaker
from overlayfs_inetsk.plugin import viewroot, wire
from overlayfs_inetsk.plugin.wire import RequestError, encode_request, parse_request

ROOT = Path(__file__).resolve().parents[1]
A4, B4 = "10.0.0.1", "10.0.0.2"
ENV = {"INETSK_LOCAL_IPV4": B4}


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    (d / "files.img").write_bytes(files_img(reg_file_entry(1), inet_file_entry(isk(2, A4, 7001))))
    (d / "pages-1.img").write_bytes(b"\0" * 4096)
    return d


@pytest.fixture
def fds(images: Path) -> Iterator[tuple[int, int]]:
    img = os.open(images, os.O_RDONLY | os.O_DIRECTORY)
    ns = os.open("/proc/self/ns/net", os.O_RDONLY)
    yield img, ns
    os.close(img)
    os.close(ns)


def request(env: dict[str, str] = ENV, pid: int | str = 9, ms: int = 20000,
            hook: bool = False) -> bytes:
    if isinstance(pid, str):
        return encode_request(9, wire.monotonic_ms() + ms, env, hook).replace(
            b"pid=9", f"pid={pid}".encode(), 1)
    return encode_request(pid, wire.monotonic_ms() + ms, env, hook)


def ask(sock: Path | socket.socket, data: bytes, fdl: list[int], timeout: float = 20
        ) -> tuple[str, list[int]]:
    """One request; the reply's text and the fds that came with it ("" when the planner
    closed the connection without a reply)."""
    if isinstance(sock, socket.socket):
        s = sock
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(str(sock))
    with s:
        s.settimeout(timeout)
        socket.send_fds(s, [data], fdl)
        msg, got, _flags, _addr = socket.recv_fds(s, wire.REPLY_MAX, 4)
    return msg.decode(), got


def close_all(fdl: list[int]) -> None:
    for fd in fdl:
        os.close(fd)


def names(d: Path) -> list[str]:
    return sorted(os.listdir(d)) if d.exists() else []


# -- the request ----------------------------------------------------------------------------
def test_parse_request() -> None:
    now = wire.monotonic_ms()
    data = (f"OVERLAYFS-INETSK-VIEW 2 pid=77 deadline={now + 5000}\0INETSK_LOCAL_IPV4=10.0.0.2\0"
            "PATH=/bin\0OVERLAYFS_INETSK_MAP=a=b\0").encode()
    req = parse_request(data, now)
    assert (req.pid, req.env, req.hook) == (77, {"INETSK_LOCAL_IPV4": "10.0.0.2",
                                                 "OVERLAYFS_INETSK_MAP": "a=b"}, False)
    assert 4.5 < req.deadline - time.monotonic() <= 5.0
    assert req.who == "criu pid 77"
    assert parse_request(encode_request(78, now + 10, {}, hook=True), now).hook is True
    with pytest.raises(RequestError, match="not a plugin request"):
        parse_request(b"GET / HTTP/1.0")
    with pytest.raises(RequestError, match=r"^the plugin speaks protocol 1, this planner 2: "):
        parse_request(b"OVERLAYFS-INETSK-VIEW 1 pid=9\0")
    with pytest.raises(RequestError, match="bad deadline"):
        parse_request(b"OVERLAYFS-INETSK-VIEW 2 pid=9\0")
    # a deadline is never believed beyond TIMEOUT_MAX_MS from now
    far = parse_request(encode_request(1, now + 10**15, {}), now)
    assert far.deadline - time.monotonic() <= wire.TIMEOUT_MAX_MS / 1000


@pytest.mark.parametrize("pid", [str(2**80), "-1", "abc", "", "0", "99999999999"])
def test_an_absurd_pid_is_only_not_known(pid: str) -> None:
    data = f"OVERLAYFS-INETSK-VIEW 2 pid={pid} deadline={wire.monotonic_ms() + 99}\0".encode()
    req = parse_request(data)
    assert req.pid is None and req.who == "criu pid ?"


# -- the view root and the views' lifetime --------------------------------------------------
def test_the_view_root_is_made_with_its_modes_whatever_the_umask(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "views"
    old = os.umask(0)
    try:
        os.close(viewroot.open_dir(str(root)))
    finally:
        os.umask(old)
    assert stat.S_IMODE(root.stat().st_mode) == 0o711
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o755


def test_a_view_root_others_may_write_is_refused(tmp_path: Path, images: Path, fds) -> None:
    root = tmp_path / "views"
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(InetskError, match=rf"^view root {root}: {root} is writable by group "
                                          r"or others \(mode 0777\): refusing it"):
        viewroot.open_dir(str(root))
    reply = viewmaker.make_view(*fds, ENV, 1, str(root))
    assert reply.text.startswith(f"ERR view root {root}: {root} is writable by group or others")
    assert names(root) == []
    root.chmod(0o711)
    parent = tmp_path / "p"
    (parent / "views").mkdir(parents=True)
    parent.chmod(0o775)  # a parent: the same, unless sticky and root's
    with pytest.raises(InetskError, match=r"writable by group or others \(mode 0775\)"):
        viewroot.open_dir(str(parent / "views"))


def test_a_symlink_in_the_view_root_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(InetskError, match=r"link is not a directory \(a symlink is not "
                                          r"followed\)"):
        viewroot.open_dir(str(tmp_path / "link" / "views"))
    assert names(tmp_path / "real") == []


@pytest.mark.root
def test_a_view_root_of_another_user_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "views"
    root.mkdir(mode=0o711)
    os.chown(root, 65534, 65534)
    with pytest.raises(InetskError, match=r"views is owned by uid 65534, not root: refusing"):
        viewroot.open_dir(str(root))


def _made(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "files.img").write_bytes(b"x")
    return d


def test_the_sweeper_removes_only_views_nobody_holds(tmp_path: Path) -> None:
    root = tmp_path / "views"
    held, dead, temp = (viewroot.new_name() for _ in range(3))
    for n in (held, dead):
        _made(root, n)
    _made(root, f".{temp}.ab1_cd")  # a view half written by a planner that died
    foreign = ["view-123-abcdef01", "other", ".hidden"]  # an older release's, and not views
    for n in foreign:
        _made(root, n)
    (root / viewroot.new_name()).write_text("a file, not a view dir")
    lock = os.open(root / held, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(lock, fcntl.LOCK_SH)
    try:
        # a creator holds the root: nothing is swept (a fresh view may not be locked yet)
        busy = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(busy, fcntl.LOCK_SH)
        assert viewroot.sweep(str(root)) == []
        os.close(busy)
        assert sorted(viewroot.sweep(str(root))) == sorted([dead, f".{temp}.ab1_cd"])
        assert held in names(root) and all(n in names(root) for n in foreign)
    finally:
        os.close(lock)
    assert viewroot.sweep(str(root)) == [held]
    assert len(names(root)) == len(foreign) + 1
    assert viewroot.sweep(str(tmp_path / "absent")) == []


def test_a_view_being_made_is_never_swept(tmp_path: Path) -> None:
    root = tmp_path / "views"
    seen: list[list[str]] = []

    def write(path: str) -> None:
        os.mkdir(path + ".tmp-not-a-view")  # whatever the writer does meanwhile
        tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".xyz")
        os.mkdir(tmp)
        seen.append(viewroot.sweep(str(root)))  # another request's sweep, from here
        os.rename(tmp, path)

    view = viewroot.create_view(str(root), write)
    try:
        assert seen == [[]] and view.name in names(root)
        assert viewroot.sweep(str(root)) == []  # locked: a restore may hold it
    finally:
        view.close()
    assert viewroot.sweep(str(root)) == [view.name]


def test_a_reply_that_cannot_be_sent_leaves_no_view(tmp_path: Path, images: Path, fds) -> None:
    """The plugin gave up (its socket closed): the agent removes the view it made."""
    root = tmp_path / "views"
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    socket.send_fds(a, [request()], list(fds))
    a.close()
    agent_mod.handle(b, str(root))
    assert names(root) == []


def test_a_view_finished_after_the_deadline_is_removed(tmp_path: Path, images: Path, fds,
                                                      monkeypatch) -> None:
    """The plugin's timeout passed while the view was written: no reply, no view."""
    root = tmp_path / "views"
    real = viewmaker.write_view_dir

    def slow(*a, **k):  # type: ignore[no-untyped-def]
        real(*a, **k)
        time.sleep(0.5)

    monkeypatch.setattr(viewmaker, "write_view_dir", slow)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    t = threading.Thread(target=agent_mod.handle, args=(b, str(root)))
    t.start()
    text, got = ask(a, request(ms=300), list(fds))
    t.join(10)
    assert (text, got) in (("", []), ("ERR the request's deadline passed before the reply", []))
    assert names(root) == []


# -- the agent as a process -----------------------------------------------------------------
class Agent:
    def __init__(self, tmp: Path, view_root: Path | None = None, limit: int | None = None):
        self.sock, self.root, self.log = tmp / "agent.sock", view_root or tmp / "views", \
            tmp / "agent.log"
        def lower() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "overlayfs_inetsk.cli", "agent", "--socket",
                 str(self.sock), "--view-root", str(self.root)],
                env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=f, preexec_fn=lower)

    def wait_listening(self) -> Agent:
        end = time.monotonic() + 20
        while not self.sock.exists():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < end, "agent never listened"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(10)

    def logged(self, text: str, timeout: float = 10) -> bool:
        """Whether text shows in the log within timeout (a request's line is written
        once its reply is sent: the client may read the reply first)."""
        end = time.monotonic() + timeout
        while text not in self.log.read_text():
            if time.monotonic() > end:
                return False
            time.sleep(0.02)
        return True


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path).wait_listening()
    yield a
    a.stop()
    assert not a.sock.exists()


def test_agent_view_reply_carries_the_locked_view(agent: Agent, fds) -> None:
    text, got = ask(agent.sock, request(), list(fds))
    try:
        assert text.startswith("VIEW view-") and wire.VIEW_NAME.fullmatch(text[5:]), text
        assert len(got) == 1
        assert os.path.samestat(os.fstat(got[0]), os.stat(agent.root / text[5:]))
        probe = os.open(agent.root / text[5:], os.O_RDONLY | os.O_DIRECTORY)
        with pytest.raises(BlockingIOError):  # shared-locked, by the fd we hold
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(probe)
    finally:
        close_all(got)
    # once we let go, the next request's sweep removes it
    text2, got2 = ask(agent.sock, request(), list(fds))
    close_all(got2)
    assert names(agent.root) == [text2[5:]]


def test_agent_bad_requests_get_an_err_and_extra_fds_are_closed(agent: Agent, fds,
                                                                 tmp_path: Path) -> None:
    def err(data: bytes, fdl: list[int]) -> str:
        text, got = ask(agent.sock, data, fdl)
        assert got == [], text
        return text

    assert err(b"hello", list(fds)).startswith("ERR not a plugin request")
    assert err(request(), [fds[0]]) == "ERR the agent needs 2 fds (images dir, netns), got 1"
    r, w = os.pipe()
    try:
        assert err(request(), [*fds, w]) == "ERR the agent needs 2 fds (images dir, netns), got 3"
        os.close(w)
        w = -1
        assert os.read(r, 1) == b""  # the agent closed its copy of the extra fd
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert err(request(), [fds[0], fds[0]]) == "ERR the second fd is not a network namespace"
    assert err(request(), [fds[1], fds[1]]) == ("ERR the first fd is not a directory (the "
                                                "images dir)")
    huge = request({"OVERLAYFS_INETSK_MAP": "x" * wire.REQUEST_MAX})
    assert err(huge, list(fds)) == f"ERR the request is larger than {wire.REQUEST_MAX} bytes"
    assert err(b"OVERLAYFS-INETSK-VIEW 1 pid=9\0", list(fds)).startswith(
        "ERR the plugin speaks protocol 1, this planner 2")
    assert names(agent.root) == []


def test_agent_absurd_pids_break_nothing(tmp_path: Path, fds) -> None:
    """Before: the pid was trusted as a number (a view named view-<pid>-..., kill(pid, 0) by
    the sweeper): pid=2**80 made every later request fail, and the agent's start too."""
    root = tmp_path / "views"
    (root / f"view-{2**80}-aa").mkdir(parents=True)  # what the old agent made of one
    a = Agent(tmp_path, root).wait_listening()
    try:
        for pid in (str(2**80), "-1", "abc", str(2**31)):
            text, got = ask(a.sock, request(pid=pid), list(fds))
            close_all(got)
            assert text.startswith("VIEW view-"), (pid, text)
        text, got = ask(a.sock, request(pid=4242), list(fds))
        close_all(got)
        assert text.startswith("VIEW view-")
        assert a.logged("criu pid ?: VIEW view-"), a.log.read_text()
    finally:
        a.stop()
    assert f"view-{2**80}-aa" in names(root)  # not ours: left alone


def test_agent_drops_a_request_whose_deadline_passed(agent: Agent, fds) -> None:
    assert ask(agent.sock, request(ms=-1), list(fds)) == (
        "ERR the request's deadline passed before the planner read it", [])
    assert names(agent.root) == []
    assert agent.logged("deadline had passed before it was read: dropped"), \
        agent.log.read_text()


def test_agent_refuses_a_socket_path_that_is_not_a_stale_socket(tmp_path: Path) -> None:
    for kind in ("file", "dir", "live"):
        path = tmp_path / f"{kind}.sock"
        listener = None
        if kind == "file":
            path.write_text("keep me")
        elif kind == "dir":
            path.mkdir()
            (path / "x").write_text("keep me")
        else:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            listener.bind(str(path))
            listener.listen(1)
        cp = subprocess.run([sys.executable, "-m", "overlayfs_inetsk.cli", "agent", "--socket",
                             str(path), "--view-root", str(tmp_path / "views")],
                            capture_output=True, text=True, timeout=30,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert cp.returncode != 0
        want = {"file": "exists and is not a socket: refusing to replace it",
                "dir": "exists and is not a socket: refusing to replace it",
                "live": "another agent is listening there"}[kind]
        lines = cp.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].endswith(f"{path}: {want}"), cp.stderr
        if kind == "file":
            assert path.read_text() == "keep me"
        elif kind == "dir":
            assert (path / "x").read_text() == "keep me"
        else:
            assert listener is not None and stat.S_ISSOCK(path.lstat().st_mode)
            listener.close()


def test_agent_replaces_a_dead_agents_socket(tmp_path: Path, fds) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dead.bind(str(tmp_path / "agent.sock"))
    dead.close()  # bound, nobody listens: what a killed agent leaves
    a = Agent(tmp_path)
    try:
        end = time.monotonic() + 20
        while True:
            try:
                text, got = ask(a.sock, request(), list(fds))
                break
            except (ConnectionRefusedError, FileNotFoundError):
                assert a.proc.poll() is None and time.monotonic() < end, a.log.read_text()
                time.sleep(0.05)
        close_all(got)
        assert text.startswith("VIEW ")
    finally:
        a.stop()


def test_agent_refuses_to_start_on_a_view_root_others_may_write(tmp_path: Path) -> None:
    root = tmp_path / "views"
    root.mkdir()
    root.chmod(0o777)
    cp = subprocess.run([sys.executable, "-m", "overlayfs_inetsk.cli", "agent", "--socket",
                         str(tmp_path / "agent.sock"), "--view-root", str(root)],
                        capture_output=True, text=True, timeout=30,
                        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert cp.returncode != 0
    assert cp.stderr.strip().splitlines() == [
        f"overlayfs-inetsk: error: view root {root}: {root} is writable by group or others "
        "(mode 0777): refusing it (chmod go-w, or remove it)"]
    assert not (tmp_path / "agent.sock").exists()


def test_agent_keeps_serving_at_its_fd_limit(tmp_path: Path, fds) -> None:
    """RLIMIT_NOFILE low and more idle clients than fds: accept() fails with EMFILE. Before,
    the agent exited; now it logs once, pauses, and serves again once they go."""
    a = Agent(tmp_path, limit=20).wait_listening()  # it starts with 6 open fds
    idle: list[socket.socket] = []
    try:
        for _ in range(150):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK)
            try:
                s.connect(str(a.sock))
            except BlockingIOError:
                s.close()
                break  # the backlog is full too
            idle.append(s)
        end = time.monotonic() + 20
        while "pausing" not in a.log.read_text():
            assert a.proc.poll() is None and time.monotonic() < end, a.log.read_text()
            time.sleep(0.05)
        for s in idle:
            s.close()
        idle = []
        text, got = ask(a.sock, request(), list(fds), timeout=30)
        close_all(got)
        assert text.startswith("VIEW "), text
        assert a.proc.poll() is None
        log = a.log.read_text()
        assert log.count("Too many open files: pausing") == 1, log
    finally:
        for s in idle:
            s.close()
        a.stop()


def test_plugin_view_serves_one_request_on_its_socket_fd(tmp_path: Path, fds) -> None:
    """The CLI route: `plugin-view --socket-fd 3`, the agent's handler on a socketpair."""
    root = tmp_path / "views"
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    p = subprocess.Popen([sys.executable, "-m", "overlayfs_inetsk.cli", "plugin-view",
                          "--socket-fd", str(b.fileno()), "--view-root", str(root)],
                         pass_fds=(b.fileno(),), env={**os.environ, "PYTHONPATH": str(ROOT)},
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    b.close()
    text, got = ask(a, request(), list(fds))
    try:
        assert p.wait(20) == 0
        assert text.startswith("VIEW view-") and len(got) == 1, text
        assert os.path.samestat(os.fstat(got[0]), os.stat(root / text[5:]))
        assert p.stdout is not None and p.stdout.read() == b""
    finally:
        close_all(got)


def test_a_bug_in_a_request_loses_that_request_only(tmp_path: Path, fds, monkeypatch,
                                                   expect_log) -> None:
    def broken(*_a, **_k):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    expect_log(40, r"^criu pid 9: request failed$")
    monkeypatch.setattr(viewmaker, "make_view", broken)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    t = threading.Thread(target=agent_mod.handle, args=(b, str(tmp_path / "views")))
    t.start()
    assert ask(a, request(), list(fds)) == ("", [])
    t.join(10)
    assert not t.is_alive()
