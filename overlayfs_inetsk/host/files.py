"""Reading what the planner reads, safely: image dirs, socket images, map and options files.

Nothing here follows a symlink to a file it reads or waits on a FIFO: every read is from
one fd, checked with fstat (what was checked is what is read). Which files of a tree are
socket images, and which directory (checkpoint) each belongs to, is decided by
core/tree.py from the listing host/listing.py makes.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Mapping

from ..core.imagedir import SOCKET_IMAGE_MAX
from ..errors import ImageError, InetskError


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
        if exc.errno == errno.ELOOP:  # the last component became a symlink
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


# -- map and options files --------------------------------------------------------------
NOT_REGULAR = "not a regular file (a symlink is not followed)"


def open_regular_file(path: str) -> int:
    """An fd of the regular file at path, opened without following a symlink in the last
    component (O_NOFOLLOW) and without waiting for a FIFO's writer (O_NONBLOCK), then
    checked with fstat: what was checked is what is read (an lstat and then an open could
    read a symlink swapped in between). OSError; for a symlink, a FIFO, a device or a
    socket its strerror is NOT_REGULAR."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a symlink; a socket
            raise OSError(exc.errno, NOT_REGULAR, path) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, NOT_REGULAR, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


# A map or options file may come with a checkpoint (the plugin reads the images dir's):
# one that says it is bigger is refused before it is read. 100,000 rules take 3.5 MB.
MAX_FILE_BYTES = 64 << 20


def read_regular_file(path: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a map or options file, read from open_regular_file's fd; OSError
    (EFBIG) for one of more than `limit` bytes (a sparse file of 100 GB, e.g., in a
    checkpoint), checked before reading and while reading (a file that grows)."""
    fd = open_regular_file(path)
    try:
        size = os.fstat(fd).st_size
        chunks = []
        got = 0
        while size <= limit and (chunk := os.read(fd, min(1 << 20, limit + 1 - got))):
            chunks.append(chunk)
            got += len(chunk)
            size = max(size, got)
        if size > limit:
            raise OSError(errno.EFBIG, f"{size} bytes or more, past the limit of {limit} "
                          "bytes for a map or options file", path)
        return b"".join(chunks)
    finally:
        os.close(fd)

