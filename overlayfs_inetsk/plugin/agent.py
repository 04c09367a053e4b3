"""`overlayfs-inetsk agent`: the node agent the CRIU plugin asks first, and the one request
handler (handle()) that the CLI route (`plugin-view --socket-fd 3`) runs too.

Long-running, so the imports (protobuf, pycriu) and the interpreter start are paid once,
not at every restore. One SOCK_SEQPACKET unix socket (default
/run/overlayfs-inetsk/agent.sock, mode 0600); only root and the agent's own uid are served
(SO_PEERCRED). The protocol (wire.py): one request with [images dir, netns] fds, one reply,
for VIEW with the view's locked fd. Each request runs in a thread of its own (the netns
lookup setns()es only a short-lived thread of its own), at most MAX_IN_FLIGHT at once; a
client gets READ_MS to send its request. accept() failing for lack of fds is logged once
and retried after a pause: the agent keeps serving.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable

from ..errors import InetskError
from . import DEFAULT_SOCKET, VIEW_ROOT, viewroot
from .wire import (
    BACKLOG,
    MAX_IN_FLIGHT,
    READ_MS,
    REPLY_MAX,
    REQUEST_FDS,
    REQUEST_MAX,
    RequestError,
    parse_request,
)

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_SOCKET", "RequestError", "handle", "parse_request", "serve"]

_UCRED = struct.Struct("3i")
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)
CLONE_NEWNET = 0x40000000
_FD_SPACE = socket.CMSG_SPACE((REQUEST_FDS + 2) * 4)  # room to see that too many came


def peer_uid(conn: socket.socket) -> int:
    _pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                    _UCRED.size))
    return int(uid)


def recv_request(conn: socket.socket) -> tuple[bytes, list[int], int]:
    """(data, every fd that came, msg_flags) of one message."""
    data, ancdata, flags, _addr = conn.recvmsg(REQUEST_MAX, _FD_SPACE,
                                               getattr(socket, "MSG_CMSG_CLOEXEC", 0))
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
            fds.extend(a)
    return data, fds, flags


def _fd_kinds(fds: list[int]) -> str | None:
    """Why the two fds are not [a directory, a network namespace], or None."""
    if not stat.S_ISDIR(os.fstat(fds[0]).st_mode):
        return "the first fd is not a directory (the images dir)"
    try:
        kind = fcntl.ioctl(fds[1], NS_GET_NSTYPE)
    except OSError:
        kind = -1
    if kind != CLONE_NEWNET:
        return "the second fd is not a network namespace"
    return None


def handle(conn: socket.socket, view_root: str = VIEW_ROOT) -> None:
    """Serve one request on conn (the agent's connection, or the CLI's fd 3) and close it.
    Never raises for what a client sends."""
    from .viewmaker import Reply, make_view

    fds: list[int] = []
    reply: Reply | None = None
    who = "a client"
    try:
        conn.settimeout(READ_MS / 1000)
        uid = peer_uid(conn)
        try:
            data, fds, flags = recv_request(conn)
        except TimeoutError:
            log.info("a client sent no request within %d ms: dropped", READ_MS)
            return
        if not data and not fds:
            return  # connected and went away (a probe: doctor, a starting agent)
        deadline = None
        if uid not in (0, os.geteuid()):
            text = f"ERR the agent serves root and uid {os.geteuid()} only, not uid {uid}"
        elif flags & socket.MSG_TRUNC:
            text = f"ERR the request is larger than {REQUEST_MAX} bytes"
        elif flags & socket.MSG_CTRUNC or len(fds) != REQUEST_FDS:
            text = (f"ERR the agent needs {REQUEST_FDS} fds (images dir, netns), got "
                    f"{len(fds)}{' or more' if flags & socket.MSG_CTRUNC else ''}")
        elif (bad := _fd_kinds(fds)) is not None:
            text = f"ERR {bad}"
        else:
            try:
                req = parse_request(data)
            except RequestError as e:
                text = f"ERR {e}"
            else:
                who, deadline = req.who, req.deadline
                if time.monotonic() >= deadline:
                    log.info("%s: the request's deadline had passed before it was read: "
                             "dropped", who)
                    _late(conn, "before the planner read it")
                    return
                reply = make_view(fds[0], fds[1], req.env, req.pid, view_root,
                                  hook=req.hook, deadline=deadline)
                text = reply.text
        _send_reply(conn, text, reply.view if reply is not None else None, deadline, who)
    except OSError as e:
        log.warning("%s: request failed: %s", who, e)
    except Exception:  # a bug: this request is lost (the plugin says so), the agent goes on
        log.exception("%s: request failed", who)
    finally:
        for fd in fds:
            os.close(fd)
        if reply is not None:
            reply.close()
        conn.close()


def _send_reply(conn: socket.socket, text: str, view: viewroot.View | None,
                deadline: float | None, who: str) -> None:
    """Send the reply (with the view's fd) by the deadline; a view whose reply cannot be
    sent is removed (what stays locked in a dead client's queue, the sweeper gets)."""
    data = text.encode("utf-8", "replace")
    if len(data) > REPLY_MAX:
        data = f"ERR the reply would be {len(data)} bytes, over {REPLY_MAX}".encode()
        _drop(view)
        view = None
    left = READ_MS / 1000 if deadline is None else deadline - time.monotonic()
    if left <= 0:
        log.info("%s: the request's deadline passed before the reply%s", who,
                 ": view removed" if view else "")
        _drop(view)
        _late(conn, "before the reply")
        return
    try:
        conn.settimeout(left)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, REPLY_MAX + 4096)
        anc = [] if view is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", [view.fd]).tobytes())]
        conn.sendmsg([data], anc, socket.MSG_NOSIGNAL)
    except OSError as e:
        log.info("%s: the reply could not be sent (%s)%s", who, e,
                 ": view removed" if view else "")
        _drop(view)


def _late(conn: socket.socket, when: str) -> None:
    """Tell a client whose deadline passed (it has most likely gone: then nothing)."""
    try:
        conn.settimeout(0.1)
        conn.sendmsg([f"ERR the request's deadline passed {when}".encode()], [],
                     socket.MSG_NOSIGNAL)
    except OSError:
        pass


def _drop(view: viewroot.View | None) -> None:
    if view is not None:
        view.remove()


# -- the socket -----------------------------------------------------------------------------
def _warm_up() -> None:
    """Import what a request needs now, not during the first restore."""
    from ..node import rtnl  # noqa: F401
    from . import planning, viewmaker  # noqa: F401


def _answers(path: str) -> str | None:
    """What listens on the socket at path ("an agent", "a full backlog"), or None."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK)
    try:
        probe.connect(path)
    except BlockingIOError:
        return "something whose backlog is full (a stopped agent?)"
    except (ConnectionRefusedError, FileNotFoundError):
        return None
    except OSError as e:
        raise InetskError(f"{path}: cannot probe it: {e.strerror}") from None
    finally:
        probe.close()
    return "another agent"


def _listen(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """Listen on path. It may exist only as a socket nobody answers on (an agent that
    died); anything else there is refused, and left as it is."""
    path = os.path.abspath(path)
    dfd = viewroot.open_dir(os.path.dirname(path), mode=viewroot.PARENT_MODE,
                            what="agent socket dir")
    os.close(dfd)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise InetskError(f"{path}: exists and is not a socket: refusing to replace it")
        who = _answers(path)
        if who is not None:
            raise InetskError(f"{path}: {who} is listening there")
        os.unlink(path)  # a socket left by an agent that died
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    tmp = f"{path}.{os.getpid()}"
    old = os.umask(0o177)  # the socket: 0600
    try:
        if os.path.lexists(tmp) and stat.S_ISSOCK(os.lstat(tmp).st_mode):
            os.unlink(tmp)
        s.bind(tmp)
    finally:
        os.umask(old)
    s.listen(BACKLOG)
    os.rename(tmp, path)  # the path appears only once it accepts connections
    st = os.lstat(path)
    return s, (st.st_dev, st.st_ino)


def _unlink_own(path: str, ident: tuple[int, int]) -> None:
    """Remove path if it is still the socket we bound (not one that replaced it)."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(path)
    except OSError:
        pass


def _notify_ready() -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1", addr)


_SHORT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def serve(path: str = DEFAULT_SOCKET, view_root: str = VIEW_ROOT,
          on_ready: Callable[[], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT (run it in the main thread)."""
    path = os.path.abspath(path)
    os.close(viewroot.open_dir(os.path.normpath(view_root)))  # refused before listening
    _warm_up()
    s, ident = _listen(path)

    def stop(_sig: int, _frame: object) -> None:
        raise SystemExit(0)

    old_term = signal.signal(signal.SIGTERM, stop)
    slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)

    def run(conn: socket.socket) -> None:
        try:
            handle(conn, view_root)
        finally:
            slots.release()

    try:
        removed = viewroot.sweep(view_root)
        if removed:
            log.info("removed %d view(s) no restore holds", len(removed))
        log.info("agent listening on %s", path)
        _notify_ready()
        if on_ready is not None:
            on_ready()
        pause, short = 0.05, False
        while True:
            while not slots.acquire(timeout=1):
                pass
            try:
                conn, _ = s.accept()
            except OSError as e:
                slots.release()
                if e.errno in _SHORT_OF_FDS:
                    if not short:
                        log.warning("accept on %s: %s: pausing (raise the agent's fd limit?)",
                                    path, e.strerror)
                        short = True
                    time.sleep(pause)
                    pause = min(pause * 2, 1.0)
                    continue
                if e.errno in (errno.ECONNABORTED, errno.EINTR, errno.EPROTO):
                    continue
                raise
            if short:
                log.info("accepting again on %s", path)
                short, pause = False, 0.05
            try:
                threading.Thread(target=run, args=(conn,), daemon=True,
                                 name="overlayfs-inetsk-request").start()
            except RuntimeError:  # can't start new thread
                slots.release()
                conn.close()
                time.sleep(pause)
    except (SystemExit, KeyboardInterrupt):
        return 0
    finally:
        signal.signal(signal.SIGTERM, old_term)
        s.close()
        _unlink_own(path, ident)
