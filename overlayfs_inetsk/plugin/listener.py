"""The agent's listening socket: made by systemd (activation.py), or bound here.

Bound here, the socket appears at its path only once it accepts connections: it is bound
to a temporary path beside it, listens, and is renamed over the path (rename(2) is atomic:
a client finds the old socket or the new one, never nothing). What may be at the path
already:
  - nothing, or a socket nobody answers on (an agent that died): replaced;
  - a live agent (or one whose backlog is full: stopped?): refused, unless take_over, the
    rolling update's new agent (the DaemonSet): then the path is renamed over it; the old
    agent keeps serving what is in its backlog and, on SIGTERM, drains it and stops
    (agent.serve), without removing a path that is no longer its own;
  - anything else (a file, a directory): refused, and left as it is.
A socket systemd made stays systemd's: never unlinked, and what waits in its backlog when
the agent stops is the next agent's.
"""

from __future__ import annotations

import logging
import os
import socket
import stat

from ..errors import InetskError
from . import viewroot
from .activation import activated_socket
from .wire import BACKLOG

log = logging.getLogger(__name__)


def answers(path: str) -> str | None:
    """What listens on the socket at path ("another agent", a full backlog), or None."""
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


class Listener:
    """sock: listening; path: where clients find it; ident: (dev, ino) of the path we made
    (None: systemd's socket)."""

    def __init__(self, sock: socket.socket, path: str, ident: tuple[int, int] | None,
                 took_over: str | None = None):
        self.sock, self.path, self.ident, self.took_over = sock, path, ident, took_over

    @property
    def activated(self) -> bool:
        return self.ident is None

    def still_ours(self) -> bool:
        """Whether the path is still the socket we bound (systemd's: always)."""
        if self.ident is None:
            return True
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.ident

    def unlink_if_ours(self) -> bool:
        """Remove the path if it is still the socket we bound (not systemd's, not the one
        that took it over); whether it was removed."""
        if self.ident is None or not self.still_ours():
            return False
        try:
            os.unlink(self.path)
        except OSError:
            return False
        return True


def open_listener(path: str, take_over: bool = False) -> Listener:
    """The agent's listening socket for path (see the module's docstring)."""
    path = os.path.abspath(path)
    activated = activated_socket(path)
    if activated is not None:
        return Listener(activated, path, None)
    dfd = viewroot.open_dir(os.path.dirname(path), mode=viewroot.PARENT_MODE,
                            what="agent socket dir")
    os.close(dfd)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    took_over = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise InetskError(f"{path}: exists and is not a socket: refusing to replace it")
        who = answers(path)
        if who is not None and not take_over:
            raise InetskError(f"{path}: {who} is listening there")
        took_over = who
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    tmp = f"{path}.{os.getpid()}"
    old = os.umask(0o177)  # the socket: 0600
    try:
        if os.path.lexists(tmp) and stat.S_ISSOCK(os.lstat(tmp).st_mode):
            os.unlink(tmp)
        s.bind(tmp)
    except OSError as e:
        s.close()
        raise InetskError(f"{tmp}: cannot bind: {e.strerror}") from None
    finally:
        os.umask(old)
    s.listen(BACKLOG)
    os.rename(tmp, path)  # the path appears (or moves to us) only once it accepts
    st = os.lstat(path)
    return Listener(s, path, (st.st_dev, st.st_ino), took_over)
