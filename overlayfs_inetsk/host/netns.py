"""Running a function in another network namespace, from a thread of its own.

A netlink or /proc/thread-self/net reader belongs to the namespace of the thread that makes
it, and setns(CLONE_NEWNET) only moves the calling thread: so in_netns runs the function in
a short-lived thread that setns()es into the namespace, runs it, and exits; no pooled
thread ever changes namespace, and nothing forks (forking is not safe in the FUSE daemon:
threads, the /dev/fuse session). The node's `auto` address (nodeaddr.py) and the port
check's socket tables (proctables.py) are read this way.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..errors import InetskError, NodeAddressError

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from typing import TypeVar
else:
    from ..record import TypeVar

if TYPE_CHECKING:
    import ctypes

CLONE_NEWNET = 0x40000000
T = TypeVar("T")

_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    # ctypes (1.4 ms to import) only when a namespace is entered: Python 3.11 has no
    # os.setns (3.12 does)
    import ctypes

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run fn() with the network namespace at path `netns` (in a thread of its own, unless
    it is this thread's already)."""
    if netns is None or _ours(netns):
        return fn()
    value: list[T] = []  # fn()'s result, or
    error: list[BaseException] = []  # what it raised: handed to the caller

    def run() -> None:
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _setns(fd)
                finally:
                    os.close(fd)
                try:
                    value.append(fn())
                finally:
                    _setns(own)
            finally:
                os.close(own)
        except BaseException as e:  # handed to the caller
            error.append(e)

    import threading  # (only to enter another namespace: 1.3 ms on the plugin's CLI route)

    t = threading.Thread(target=run, name="overlayfs-inetsk-netns", daemon=True)
    t.start()
    t.join()
    if error:
        e = error[0]
        if isinstance(e, OSError) and not isinstance(e, InetskError):
            raise NodeAddressError(f"netns {netns}: {e.strerror or e}") from None
        raise e
    return value[0]


def _ours(netns: str) -> bool:
    """Whether `netns` is the namespace this thread is in (the same nsfs inode)."""
    try:
        there = os.stat(netns)
        here = os.stat("/proc/thread-self/ns/net")
    except OSError:
        return False  # in_netns names what is wrong
    return (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino)


def check_netns(netns: str) -> None:
    """NodeAddressError unless `netns` names a network namespace we can enter."""
    if not os.path.exists(netns):
        raise NodeAddressError(f"netns {netns}: no such file")
    try:
        in_netns(netns, lambda: None)
    except NodeAddressError as e:
        if "Invalid argument" in str(e):
            raise NodeAddressError(f"netns {netns}: not a network namespace") from None
        raise
