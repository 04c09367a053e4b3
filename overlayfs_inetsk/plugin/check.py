"""`overlayfs-inetsk agent --check`: does the agent ANSWER (not only accept)?

A frozen agent's socket still takes connections into its backlog, so connecting proves
nothing: the check sends the protocol's check request (wire.py) and waits, by one deadline
for everything, for `OK overlayfs-inetsk <version> protocol <n> pid <pid>`. The DaemonSet's
probes run it, and doctor. `same_pidns`: the agent that answers must also be in this pid
namespace (a pod's own agent, not the one of another pod that took the path over: the
readiness probe of a rolling update). Cheap: socket and struct, no other module of ours
but wire.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from dataclasses import dataclass

from .wire import CHECK_MS, CHECK_REPLY, REPLY_MAX, encode_check

_UCRED = struct.Struct("3i")

# states
ANSWERING = "answering"
NOT_RUNNING = "not-running"  # no socket, or nobody listens on it
NOT_ACCEPTING = "not-accepting"  # its backlog is full: stopped or overloaded
NOT_ANSWERING = "not-answering"  # took the connection, no answer by the deadline
REFUSED = "refused"  # not root, or not in this pid namespace (same_pidns)
BROKEN = "broken"  # another error


@dataclass(frozen=True)
class CheckResult:
    state: str
    detail: str  # one line
    version: str | None = None  # None: an agent that answers, but not the check (older)
    pid: int | None = None  # the agent's pid as it says (in its own pid namespace)
    ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.state == ANSWERING


def _wait(s: socket.socket, events: int, deadline: float) -> bool:
    p = select.poll()
    p.register(s, events)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if p.poll(max(1, int(left * 1000))):
            return True


def _same_pidns(pid: int) -> bool:
    if pid <= 0:
        return False  # SO_PEERCRED gives 0 for a process of a pid namespace we cannot see
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") == os.readlink("/proc/self/ns/pid")
    except OSError:
        return False


def check(path: str, timeout_ms: int = CHECK_MS, same_pidns: bool = False) -> CheckResult:
    t0 = time.monotonic()
    deadline = t0 + timeout_ms / 1000
    at = f"the agent at {path}"

    def result(state: str, detail: str, version: str | None = None,
               pid: int | None = None) -> CheckResult:
        return CheckResult(state, detail, version, pid, (time.monotonic() - t0) * 1000)

    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK
                      | socket.SOCK_CLOEXEC)
    try:
        while True:
            try:
                s.connect(path)
                break
            except FileNotFoundError:
                return result(NOT_RUNNING, f"no agent at {path}")
            except ConnectionRefusedError:
                return result(NOT_RUNNING, f"no agent at {path} (a socket nobody listens on)")
            except BlockingIOError:  # a full backlog: retry until the deadline
                if time.monotonic() >= deadline:
                    return result(NOT_ACCEPTING, f"{at} took no connection within "
                                  f"{timeout_ms} ms (its backlog is full: stopped or "
                                  "overloaded?)")
                time.sleep(0.01)
                s.close()
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK
                                  | socket.SOCK_CLOEXEC)
            except OSError as e:
                return result(BROKEN, f"cannot connect to {at}: {e.strerror}")
        peer_pid, uid, _gid = _UCRED.unpack(s.getsockopt(socket.SOL_SOCKET,
                                                         socket.SO_PEERCRED, _UCRED.size))
        if uid != 0:
            return result(REFUSED, f"{at} runs as uid {uid}, not root: the plugin refuses it")
        if same_pidns and not _same_pidns(peer_pid):
            return result(REFUSED, f"{at} is not this pid namespace's agent (another took "
                          "the path over?)")
        try:
            s.send(encode_check())
        except OSError as e:
            return result(BROKEN, f"{at}: cannot send the check: {e.strerror}")
        if not _wait(s, select.POLLIN, deadline):
            return result(NOT_ANSWERING, f"{at} took the connection but gave no answer "
                          f"within {timeout_ms} ms (stopped or overloaded?)")
        try:
            data = s.recv(REPLY_MAX)
        except OSError as e:
            return result(BROKEN, f"{at}: cannot read its answer: {e.strerror}")
    finally:
        s.close()
    text = data.decode("utf-8", "replace")
    if not text:
        return result(BROKEN, f"{at} closed the connection without an answer")
    m = CHECK_REPLY.fullmatch(text)
    ms = (time.monotonic() - t0) * 1000
    if m is None:  # an agent from before the check: it answers ERR (no fds came)
        return result(ANSWERING, f"{at} answers, but not the check (an older agent? it said "
                      f"{text[:120]!r}) in {ms:.0f} ms")
    return result(ANSWERING, f"{at} answers: overlayfs-inetsk {m.group(1)}, protocol "
                  f"{m.group(2)}, pid {m.group(3)} (in {ms:.0f} ms)", m.group(1),
                  int(m.group(3)))
