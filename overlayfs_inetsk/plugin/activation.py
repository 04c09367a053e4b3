"""The agent's socket when systemd (or `systemd-socket-activate`) made it: sd_listen_fds().

A socket-activated service gets its listening sockets as fds 3, 4, ... with LISTEN_FDS=n and
LISTEN_PID=<its pid> in its environment (sd_listen_fds(3)): LISTEN_PID unset or another
process's pid means "not for us" (a child that inherited the variables), and the variables
are removed from our environment so that our children never take them for theirs. The fds
get FD_CLOEXEC. The agent takes exactly one socket, and only a listening AF_UNIX
SOCK_SEQPACKET socket bound to the path the plugin asks (`--socket`): anything else is
refused with one line (overlayfs-inetsk-agent.socket sets it up so: units.py).
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
from collections.abc import MutableMapping

from ..errors import InetskError

SD_LISTEN_FDS_START = 3
_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds(env: MutableMapping[str, str] | None = None, pid: int | None = None
               ) -> list[int]:
    """The fds systemd passed to this process (none: []), as sd_listen_fds(1) finds them;
    the variables are removed from env (default os.environ) whatever they said."""
    env = os.environ if env is None else env
    pid = os.getpid() if pid is None else pid
    raw_pid, raw_n = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    for k in _VARS:
        env.pop(k, None)
    if raw_pid is None:
        return []
    if not raw_pid.isdigit() or int(raw_pid) <= 0:
        raise InetskError(f"LISTEN_PID={raw_pid[:40]!r} is not a pid (socket activation)")
    if int(raw_pid) != pid:
        return []  # meant for the process that got it from systemd, not for us
    if raw_n is None or not raw_n.isdigit() or len(raw_n) > 6:
        raise InetskError(f"LISTEN_FDS={(raw_n or '')[:40]!r} is not a number of fds "
                          "(socket activation)")
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(raw_n)))
    for fd in fds:
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            raise InetskError(f"LISTEN_FDS={raw_n}: fd {fd} is not open (socket "
                              "activation)") from None
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    return fds


def _why_not(fd: int, path: str) -> str | None:
    """Why fd is not the agent's listening socket at path, or None."""
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        return "is not a socket"
    s = socket.socket(fileno=os.dup(fd))
    try:
        if s.family != socket.AF_UNIX:
            return f"is an {s.family.name} socket, not AF_UNIX"
        if s.type != socket.SOCK_SEQPACKET:
            return f"is a {s.type.name} socket, not SOCK_SEQPACKET (ListenSequentialPacket=)"
        if not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "is not listening"
        name = s.getsockname()
    finally:
        s.close()
    if not isinstance(name, str) or not name.startswith("/"):
        return f"is bound to {name!r}, not to a path"
    if os.path.abspath(name) != os.path.abspath(path):
        return f"is bound to {name}, not to the agent's --socket {path}"
    return None


def activated_socket(path: str, env: MutableMapping[str, str] | None = None
                     ) -> socket.socket | None:
    """The listening socket systemd passed for path, or None when not socket-activated;
    InetskError (one line) when what was passed is not that."""
    fds = listen_fds(env)
    if not fds:
        return None
    if len(fds) != 1:
        raise InetskError(f"socket activation passed {len(fds)} fds (LISTEN_FDS); the agent "
                          "takes one: its SOCK_SEQPACKET socket")
    why = _why_not(fds[0], path)
    if why is not None:
        raise InetskError(f"the socket systemd passed (fd {fds[0]}) {why}: refusing it")
    return socket.socket(fileno=fds[0])
