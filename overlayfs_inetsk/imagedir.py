"""Finding and reading the socket images of a checkpoint directory tree.

A plain CRIU image dir is flat; an extracted Podman or CRI-O checkpoint keeps the CRIU
images in `checkpoint/` beside other files. Every directory holding a socket image is one
checkpoint, rewritten as a group (its files.img and legacy inetsk.img together).
"""

from __future__ import annotations

import os
import stat

from .errors import ImageError, InetskError

SOCKET_IMAGE_NAMES = ("files.img", "inetsk.img")


def is_socket_image(name: str | bytes) -> bool:
    if isinstance(name, bytes):
        return name in (b"files.img", b"inetsk.img")
    return name in SOCKET_IMAGE_NAMES


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
    """Read a socket image, refusing anything but a regular file (no symlink, no device)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: the last component is a symlink
            raise ImageError(path, "socket image is a symlink; refusing to follow it") from None
        raise ImageError(path, f"cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(path, "socket image is not a regular file")
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise ImageError(path, f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)


def checkpoint_dirs(root: str) -> dict[str, list[str]]:
    """Directories (relative to root, '' for root itself) -> socket image names in them."""
    found: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root, onerror=_walk_error):
        dirnames.sort()
        names = sorted(n for n in filenames if is_socket_image(n))
        if names:
            rel = os.path.relpath(dirpath, root)
            found["" if rel == "." else rel] = names
    return found


def _walk_error(exc: OSError) -> None:
    raise InetskError(f"{exc.filename}: cannot list: {exc.strerror}")


def read_group(root: str, reldir: str, names: list[str]) -> dict[str, bytes]:
    """name (path as shown to users) -> bytes, for the socket images of one checkpoint."""
    base = os.path.join(root, reldir) if reldir else root
    return {os.path.join(base, n): read_socket_image(os.path.join(base, n)) for n in names}
