"""`overlayfs-inetsk agent`: the node agent the CRIU plugin asks first, and the one request
handler (handle()) that the CLI route (`plugin-view --socket-fd 3`) runs too.

Long-running, so the imports (protobuf, pycriu) and the interpreter start are paid once,
not at every restore. One SOCK_SEQPACKET unix socket (default
/run/overlayfs-inetsk/agent.sock, mode 0600), bound here or passed by systemd, and taken
over from a live agent on --take-over (listener.py); only root and the agent's own uid are
served (SO_PEERCRED). The protocol (wire.py): one request with [images dir, netns] fds, one
reply, for VIEW with the view's locked fd; a check request (`agent --check`) gets OK and
the version. Each request runs in a thread of its own (the netns lookup setns()es only a
short-lived thread of its own), at most MAX_IN_FLIGHT at once; a client gets READ_MS to
send its request; each is logged once, with its outcome and time, and counted
(metrics.py). SIGTERM drains (drain.py).
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import _socket
import stat
import struct
import time
from collections.abc import Callable

from .. import __version__, lazylog
from ..errors import InetskError
from ..plugin import DEFAULT_SOCKET, VIEW_ROOT, viewroot
from ..plugin.metrics import Outcome
from ..plugin.wire import (
    DEADLINE_PASSED,
    MAX_IN_FLIGHT,
    PROTOCOL,
    READ_MS,
    REPLY_MAX,
    REQUEST_FDS,
    REQUEST_MAX,
    RequestError,
    check_reply,
    is_check,
    parse_request,
)

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from .plugin_view import Reply

log = lazylog.getLogger(__name__)

__all__ = ["DEFAULT_SOCKET", "RequestError", "handle", "parse_request", "serve"]

_UCRED = struct.Struct("3i")
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)
CLONE_NEWNET = 0x40000000
_FD_SPACE = _socket.CMSG_SPACE((REQUEST_FDS + 2) * 4)  # room to see that too many came


def peer_uid(conn: _socket.socket) -> int:
    _pid, uid, _gid = _UCRED.unpack(conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED,
                                                    _UCRED.size))
    return int(uid)


def recv_request(conn: _socket.socket) -> tuple[bytes, list[int], int]:
    """(data, every fd that came, msg_flags) of one message."""
    data, ancdata, flags, _addr = conn.recvmsg(REQUEST_MAX, _FD_SPACE,
                                               getattr(_socket, "MSG_CMSG_CLOEXEC", 0))
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
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


def _refusal(uid: int, flags: int, fds: list[int]) -> tuple[str, str] | None:
    """(reason, ERR text) for a request refused before it is read, or None."""
    if uid not in (0, os.geteuid()):
        return "peer_uid", f"ERR the agent serves root and uid {os.geteuid()} only, not uid {uid}"
    if flags & _socket.MSG_TRUNC:
        return "too_large", f"ERR the request is larger than {REQUEST_MAX} bytes"
    if flags & _socket.MSG_CTRUNC or len(fds) != REQUEST_FDS:
        return "fd_count", (f"ERR the agent needs {REQUEST_FDS} fds (images dir, netns), got "
                            f"{len(fds)}{' or more' if flags & _socket.MSG_CTRUNC else ''}")
    if (bad := _fd_kinds(fds)) is not None:
        return "fd_kind", f"ERR {bad}"
    return None


def _kind(text: str) -> tuple[str, str]:
    """(outcome, detail) of a reply the planner made."""
    word = text.split(" ", 1)[0]
    if word == "ERR":
        if text.startswith(f"ERR {DEADLINE_PASSED}"):
            return "timeout", "planning"
        return "refused", "plan"
    return {"VIEW": "view", "TABLE": "table"}.get(word, "none"), ""


class _Record:
    """What handle() logs and counts of one request, filled in as it goes."""

    __slots__ = ("who", "kind", "detail", "line", "level", "fds", "reply")

    def __init__(self) -> None:
        self.who, self.kind, self.detail, self.line = "a client", "failed", "", ""
        self.level = lazylog.INFO
        self.fds: list[int] = []
        self.reply: Reply | None = None

    def set(self, kind: str, detail: str = "", line: str = "", level: int = lazylog.INFO
            ) -> None:
        self.kind, self.detail, self.line, self.level = kind, detail, line, level


def handle(conn: _socket.socket, view_root: str = VIEW_ROOT) -> Outcome:
    """Serve one request on conn (the agent's connection, or the CLI's fd 3), close it, and
    log it once: who, the outcome, the time from here to the reply. Never raises for what a
    client sends."""
    t0 = time.monotonic()
    r = _Record()
    try:
        _serve(conn, view_root, r)
    except OSError as e:
        r.set("failed", line=f"request failed: {e}", level=lazylog.WARNING)
    except Exception:  # a bug: this request is lost (the plugin says so), the agent goes on
        log.exception("%s: request failed", r.who)
        r.set("failed")
    finally:
        for fd in r.fds:
            os.close(fd)
        if r.reply is not None:
            r.reply.close()
        conn.close()
    took = time.monotonic() - t0
    if r.line:
        log.log(r.level, "%s: %s (%.0f ms)", r.who, r.line, took * 1000)
    return Outcome(r.kind, r.detail, took)


def _serve(conn: _socket.socket, view_root: str, r: _Record) -> None:
    from .plugin_view import make_view

    conn.settimeout(READ_MS / 1000)
    uid = peer_uid(conn)
    try:
        data, r.fds, flags = recv_request(conn)
    except TimeoutError:
        return r.set("timeout", "read", f"sent no request within {READ_MS} ms: dropped")
    if not data and not r.fds:  # connected and went away (a probe, a starting agent)
        return r.set("idle", line="connected and sent nothing", level=lazylog.DEBUG)
    if not r.fds and is_check(data) and uid in (0, os.geteuid()):
        _send_reply(conn, check_reply(__version__, os.getpid()), None, None)
        return r.set("check", line="check: OK", level=lazylog.DEBUG)
    deadline = None
    refused = _refusal(uid, flags, r.fds)
    if refused is not None:
        r.who = f"a client (uid {uid})"
        r.kind, r.detail, text = "refused", *refused
    else:
        try:
            req = parse_request(data)
        except RequestError as e:
            r.who = f"a client (uid {uid})"
            r.kind, r.detail, text = "refused", e.reason, f"ERR {e}"
        else:
            r.who, deadline = req.who, req.deadline
            if time.monotonic() >= deadline:
                _late(conn, "before the planner read it")
                return r.set("timeout", "before_read", "the request's deadline had passed "
                             "before it was read: dropped")
            r.reply = make_view(r.fds[0], r.fds[1], req.env, req.pid, view_root,
                                hook=req.hook, deadline=deadline)
            text = r.reply.text
            r.kind, r.detail = _kind(text)
    first = text.split("\n", 1)[0]
    r.line = first + (f" ({r.reply.note})" if r.reply is not None and r.reply.note else "")
    late = _send_reply(conn, text, r.reply.view if r.reply is not None else None, deadline)
    if late:
        r.set("timeout", "reply", f"{late} (it was {first})")


def _send_reply(conn: _socket.socket, text: str, view: viewroot.View | None,
                deadline: float | None) -> str | None:
    """Send the reply (with the view's fd) by the deadline; a view whose reply cannot be
    sent is removed (what stays locked in a dead client's queue, the sweeper gets). None
    when sent, else what went wrong."""
    data = text.encode("utf-8", "replace")
    if len(data) > REPLY_MAX:
        data = f"ERR the reply would be {len(data)} bytes, over {REPLY_MAX}".encode()
        _drop(view)
        view = None
    left = READ_MS / 1000 if deadline is None else deadline - time.monotonic()
    if left <= 0:
        _drop(view)
        _late(conn, "before the reply")
        return f"{DEADLINE_PASSED} before the reply" + (": view removed" if view else "")
    try:
        conn.settimeout(left)
        conn.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF, REPLY_MAX + 4096)
        anc = [] if view is None else [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                                        array.array("i", [view.fd]).tobytes())]
        conn.sendmsg([data], anc, _socket.MSG_NOSIGNAL)
    except OSError as e:
        _drop(view)
        return f"the reply could not be sent ({e})" + (": view removed" if view else "")
    return None


def _late(conn: _socket.socket, when: str) -> None:
    """Tell a client whose deadline passed (it has most likely gone: then nothing)."""
    try:
        conn.settimeout(0.1)
        conn.sendmsg([f"ERR {DEADLINE_PASSED} {when}".encode()], [], _socket.MSG_NOSIGNAL)
    except OSError:
        pass


def _drop(view: viewroot.View | None) -> None:
    if view is not None:
        view.remove()


# -- serving ------------------------------------------------------------------------------
def _warm_up() -> None:
    """Import what a request needs now, not during the first restore."""
    from ..host import rtnl  # noqa: F401
    from . import plugin_view  # noqa: F401


def _notify_ready() -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    import socket  # (the module, only here: the request path needs _socket alone)

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1", addr)


_SHORT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def serve(path: str = DEFAULT_SOCKET, view_root: str = VIEW_ROOT,
          on_ready: Callable[[], None] | None = None, take_over: bool = False,
          metrics: tuple[str, int] | None = None) -> int:
    """Serve until SIGTERM/SIGINT (run it in the main thread), then drain (drain.py)."""
    import threading  # (not at import: the plugin's CLI route runs handle() alone)

    from ..plugin import drain
    from ..plugin.listener import open_listener
    from ..plugin.metrics import Stats

    path = os.path.abspath(path)
    os.close(viewroot.open_dir(os.path.normpath(view_root)))  # refused before listening
    stats = Stats()
    server, at = None, ""
    if metrics is not None:
        from ..plugin.metrics import serve_http

        host = f"[{metrics[0]}]" if ":" in metrics[0] else metrics[0]
        at = f"{host}:{metrics[1]}"
        try:
            server, _ = serve_http(stats, *metrics, __version__, PROTOCOL)
        except OSError as e:
            raise InetskError(f"--metrics {at}: cannot serve there: {e.strerror}") from None
    _warm_up()
    stop = drain.Stopper()  # from here on SIGTERM drains, whenever it comes
    try:
        lst = open_listener(path, take_over)
    except BaseException:
        stop.restore()
        raise
    slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)
    threads: set[threading.Thread] = set()

    def run(conn: _socket.socket) -> None:
        try:
            stats.record(handle(conn, view_root))
        finally:
            slots.release()
            threads.discard(threading.current_thread())

    def start(conn: _socket.socket) -> bool:
        stats.started()
        t = threading.Thread(target=run, args=(conn,), daemon=True,
                             name="overlayfs-inetsk-request")
        threads.add(t)
        try:
            t.start()
        except RuntimeError:  # can't start new thread
            threads.discard(t)
            stats.record(Outcome("failed"))
            slots.release()
            conn.close()
            return False
        return True

    try:
        removed = viewroot.sweep(view_root)
        if removed:
            log.info("removed %d view(s) no restore holds", len(removed))
        how = ("systemd's socket" if lst.activated else
               f"took it over from {lst.took_over}" if lst.took_over else "")
        log.info("agent %s listening on %s%s%s", __version__, path, f" ({how})" if how else "",
                 f"; metrics on http://{at}/metrics" if at else "")
        _notify_ready()
        if on_ready is not None:
            on_ready()
        drain.accept_loop(lst, stop, slots, start, _SHORT_OF_FDS)
        drain.finish(lst, stop, slots, start, threads)
    finally:
        stop.restore()
        lst.sock.close()
        lst.unlink_if_ours()
        if server is not None:
            server.shutdown()
    return 0
