"""`overlayfs-inetsk agent`: the node agent the CRIU plugin asks first.

Long-running, so the imports (protobuf, pycriu) and the interpreter start are paid
once, not at every restore. One SOCK_SEQPACKET unix socket (default
/run/overlayfs-inetsk/agent.sock, mode 0600); only root and the agent's own uid are
served (SO_PEERCRED). A request is one
message: `OVERLAYFS-INETSK-VIEW 1 pid=N [hook=1]` then NUL-separated KEY=VALUE (CRIU's
OVERLAYFS_INETSK_* and INETSK_* variables), with SCM_RIGHTS [images dir fd, netns fd]. The
answer is one message: viewmaker.make_view()'s line. Each request runs in a thread of its
own (the netns lookup setns()es only a short-lived thread of its own).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import threading
from collections.abc import Callable

from . import DEFAULT_SOCKET, VIEW_ROOT
from .viewmaker import make_view, remove_stale_views

log = logging.getLogger(__name__)

HEADER = b"OVERLAYFS-INETSK-VIEW 1"
MAX_REQUEST = 65536
_UCRED = struct.Struct("3i")


class RequestError(Exception):
    pass


def parse_request(data: bytes) -> tuple[int, dict[str, str], bool]:
    """(criu pid, environment, CRIU calls UPDATE_INETSK) from a request's bytes."""
    parts = data.split(b"\0")
    head = parts[0].split()
    if b" ".join(head[:2]) != HEADER or len(head) < 3 or not head[2].startswith(b"pid="):
        raise RequestError(f"not a plugin request: {parts[0][:80]!r}")
    try:
        pid = int(head[2][4:])
    except ValueError:
        raise RequestError(f"bad pid in {parts[0][:80]!r}") from None
    env: dict[str, str] = {}
    for item in parts[1:]:
        if not item:
            continue
        key, eq, value = item.decode("utf-8", "replace").partition("=")
        if eq and (key.startswith("OVERLAYFS_INETSK_") or key.startswith("INETSK_")):
            env[key] = value
    return pid, env, b"hook=1" in head[3:]


def handle(conn: socket.socket, view_root: str = VIEW_ROOT) -> None:
    fds: list[int] = []
    try:
        conn.settimeout(10)
        _pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        _UCRED.size))
        data, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, 4)
        if uid not in (0, os.geteuid()):
            reply = f"ERR the agent serves root and uid {os.geteuid()} only, not uid {uid}"
        elif len(fds) != 2:
            reply = f"ERR the agent needs 2 fds (images dir, netns), got {len(fds)}"
        else:
            try:
                pid, env, hook = parse_request(data)
            except RequestError as e:
                reply = f"ERR {e}"
            else:
                reply = make_view(fds[0], fds[1], env, pid, view_root, hook=hook)
        conn.send(reply.encode("utf-8", "replace"))
    except OSError as e:
        log.warning("request failed: %s", e)
    finally:
        for fd in fds:
            os.close(fd)
        conn.close()


def _warm_up() -> None:
    """Import what a request needs now, not during the first restore."""
    from ..node import rtnl  # noqa: F401
    from . import planning  # noqa: F401


def _listen(path: str) -> socket.socket:
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(path)
    except OSError:
        if os.path.lexists(path):
            os.unlink(path)  # a socket left by an agent that died
    else:
        probe.close()
        from ..errors import InetskError

        raise InetskError(f"{path}: another agent is listening there")
    probe.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    tmp = f"{path}.{os.getpid()}"
    old = os.umask(0o177)  # the socket: 0600
    try:
        s.bind(tmp)
    finally:
        os.umask(old)
    s.listen(64)
    os.rename(tmp, path)  # the path appears only once it accepts connections
    return s


def _notify_ready() -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1", addr)


def serve(path: str = DEFAULT_SOCKET, view_root: str = VIEW_ROOT,
          on_ready: Callable[[], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT (run it in the main thread)."""
    _warm_up()
    s = _listen(path)

    def stop(_sig: int, _frame: object) -> None:
        raise SystemExit(0)

    old_term = signal.signal(signal.SIGTERM, stop)
    removed = remove_stale_views(view_root)
    if removed:
        log.info("removed %d stale view(s)", len(removed))
    log.info("agent listening on %s", path)
    _notify_ready()
    if on_ready is not None:
        on_ready()
    try:
        while True:
            conn, _ = s.accept()
            threading.Thread(target=handle, args=(conn, view_root), daemon=True,
                             name="overlayfs-inetsk-request").start()
    except (SystemExit, KeyboardInterrupt):
        return 0
    finally:
        signal.signal(signal.SIGTERM, old_term)
        s.close()
        try:
            os.unlink(path)
        except OSError:
            pass
