"""The node agent as a process, for tests: this tree's `overlayfs-inetsk agent` (or anything
put before it: `systemd-socket-activate ...`, `unshare ...`), its stderr in a log file, and
requests sent to it as the C plugin sends them.

    a = AgentProc(sock, views, log, extra=("--metrics", "127.0.0.1:9999"))
    a.wait_listening()
    text, fds = ask(sock, request({"INETSK_LOCAL_IPV4": "10.77.0.2"}), [img_fd, netns_fd])
    a.stop()                      # SIGTERM, waited for; killed if it does not go
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from overlayfs_inetsk.plugin import wire

ROOT = Path(__file__).resolve().parents[2]


def agent_argv(sock: Path, view_root: Path, extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "overlayfs_inetsk.cli", "agent", "--socket", str(sock),
            "--view-root", str(view_root), *extra]


def tree_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment that runs this tree's package."""
    return {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'testbed'}", **(extra or {})}


class AgentProc:
    def __init__(self, sock: Path, view_root: Path, log: Path, extra: Sequence[str] = (),
                 prefix: Sequence[str] = (), env: Mapping[str, str] | None = None):
        self.sock, self.view_root, self.log = sock, view_root, log
        with open(log, "ab") as f:
            self.proc = subprocess.Popen([*prefix, *agent_argv(sock, view_root, extra)],
                                         env=tree_env(env), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=f)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_listening(self, timeout: float = 30) -> AgentProc:
        self.wait_log(r"listening on ", timeout)
        return self

    def wait_log(self, pattern: str, timeout: float = 30, count: int = 1) -> str:
        end = time.monotonic() + timeout
        while len(re.findall(pattern, self.text(), re.M)) < count:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}: {self.text()}")
            if time.monotonic() > end:
                raise AssertionError(f"no {pattern!r} in the agent's log within {timeout} s: "
                                     f"{self.text()[-3000:]}")
            time.sleep(0.02)
        return self.text()

    def tree(self) -> list[int]:
        """Its pid and its descendants' (the agent under `unshare --fork`)."""
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    todo += [int(x) for x in f.read().split()]
            except OSError:
                pass
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 45) -> int:
        """Signal it and what it runs (if it runs) and wait; SIGKILL when it outlives
        timeout."""
        if self.proc.poll() is None:
            for pid in reversed(self.tree()):
                try:
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise


def request(env: Mapping[str, str], pid: int = 9, ms: int = 20000, hook: bool = False
            ) -> bytes:
    return wire.encode_request(pid, wire.monotonic_ms() + ms, env, hook)


def connect(sock: Path, timeout: float = 20) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(timeout)
    s.connect(str(sock))
    return s


def exchange(s: socket.socket, data: bytes, fds: Sequence[int]) -> tuple[str, list[int]]:
    """Send one request on a connected socket; the reply's text and fds ("" when the
    planner closed without a reply). Closes s."""
    with s:
        socket.send_fds(s, [data], list(fds))
        msg, got, _flags, _addr = socket.recv_fds(s, wire.REPLY_MAX, 4)
    return msg.decode(), got


def ask(sock: Path, data: bytes, fds: Sequence[int], timeout: float = 20
        ) -> tuple[str, list[int]]:
    return exchange(connect(sock, timeout), data, fds)


def close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


@contextmanager
def request_fds(tmp: Path) -> Iterator[tuple[int, int]]:
    """The two fds of a request (an images dir holding one bound UDP socket, this netns),
    closed again at the end."""
    from .imagefactory import files_img, inet_file_entry, isk

    d = tmp / "images"
    d.mkdir()
    (d / "files.img").write_bytes(files_img(inet_file_entry(isk(2, "10.0.0.1", 7001))))
    img = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ns = os.open("/proc/self/ns/net", os.O_RDONLY)
        try:
            yield img, ns
        finally:
            os.close(ns)
    finally:
        os.close(img)
