"""Checking an image dir and reading its socket images safely.

Which files of a tree are socket images, and which directory (checkpoint) each belongs to,
is decided once, by tree.ImageTree, for mount, inspect and rewrite alike. Every directory
holding a socket image is one checkpoint, rewritten as a group (its files.img and legacy
inetsk.img together).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping

from ..errors import ImageError, InetskError

SOCKET_IMAGE_NAMES = ("files.img", "inetsk.img")


def check_image_dir(path: str) -> str:
    """The absolute real path of a readable image directory, or InetskError."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as exc:
        raise InetskError(f"{path}: cannot access image dir: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InetskError(f"{path}: not a directory")
    if not os.access(real, os.R_OK | os.X_OK):
        raise InetskError(f"{path}: image dir is not readable")
    return real


# The largest socket image read (bytes): a bigger one is refused, not read into memory. The
# plugin's C fast path has the same limit (plugin/inetsk_scan.h INETSK_SOCKET_IMAGE_MAX;
# tests/test_scan.py checks that they agree). 256 MiB is about 2.4 million inet sockets.
SOCKET_IMAGE_MAX = 256 << 20


def read_socket_image(path: str) -> bytes:
    """Read a socket image, refusing anything but a regular file (no symlink followed, no
    FIFO or device opened) and anything over SOCKET_IMAGE_MAX bytes."""
    try:
        lst = os.lstat(path)
    except OSError as exc:
        raise ImageError(path, f"cannot open: {exc.strerror}") from None
    if stat.S_ISLNK(lst.st_mode):
        raise ImageError(path, "socket image is a symlink; refusing to follow it")
    if not stat.S_ISREG(lst.st_mode):
        raise ImageError(path, "socket image is not a regular file")
    _check_size(path, lst.st_size)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: the last component became a symlink
            raise ImageError(path, "socket image is a symlink; refusing to follow it") from None
        raise ImageError(path, f"cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (lst.st_dev, lst.st_ino):
            raise ImageError(path, "socket image was replaced while it was opened")
        _check_size(path, st.st_size)
        chunks = []
        size = 0
        while size <= SOCKET_IMAGE_MAX:
            chunk = os.read(fd, min(1 << 20, SOCKET_IMAGE_MAX + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        _check_size(path, size)  # it grew while read
        return b"".join(chunks)
    except OSError as exc:
        raise ImageError(path, f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)


def _check_size(path: str, size: int) -> None:
    if size > SOCKET_IMAGE_MAX:
        raise ImageError(path, f"socket image is {size} bytes, over the limit of "
                         f"{SOCKET_IMAGE_MAX} bytes")


def read_group(paths: Iterable[str | bytes]) -> dict[str, bytes]:
    """Read the socket images of one checkpoint: path (as messages name it) -> bytes."""
    return {os.fsdecode(p): read_socket_image(os.fsdecode(p)) for p in paths}


def stamp(group: Mapping[str, str | bytes]) -> tuple[object, ...]:
    """What says a checkpoint's socket images are still the ones read (name -> path): each
    file's inode, size and mtime (None for one that cannot be stat'ed)."""
    out: list[object] = []
    for name in sorted(group):
        try:
            st = os.lstat(group[name])
        except OSError:
            out.append((name, None))
        else:
            out.append((name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)
