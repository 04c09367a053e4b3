"""The view root (/run/overlayfs-inetsk/plugin) and the lifetime of the views in it.

No pid numbers: a view lives while someone holds flock(LOCK_SH) on an open file of its
directory (host/stale.py: the one sweeper, for views and restores). The planner takes that
lock when it makes the view and sends that very fd with its reply; the C plugin dup2()s it
onto CRIU's images dir fd, so the restore holds the lock until criu exits (its restored
tasks close the fd). The sweeper removes an entry named like a view (or its temporary dir)
nobody holds; every open is relative to the root fd, O_NOFOLLOW; removal never follows a
link.

The root and its parents are made root-owned (the planner's uid), 0755 and 0711 whatever
the umask; an existing one that is owned by another user or writable by group or others
is refused (a sticky, root-owned dir such as /tmp is accepted as a parent).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from ..errors import InetskError
from ..host.stale import DIR_FLAGS as _DIR_FLAGS
from ..host.stale import hold_new, remove_tree_at
from ..host.stale import sweep as sweep_unheld
from .wire import TEMP_NAME, VIEW_HEX, VIEW_NAME, VIEW_PREFIX

PARENT_MODE = 0o755
ROOT_MODE = 0o711


class ViewRootError(InetskError):
    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing  # a component does not exist (create=False)


def _check(fd: int, here: str, last: bool, what: str) -> None:
    """what: e.g. "view root /run/overlayfs-inetsk/plugin"; here: the component checked."""
    st = os.fstat(fd)
    if st.st_uid not in (0, os.geteuid()):
        raise ViewRootError(f"{what}: {here} is owned by uid {st.st_uid}, not root: "
                            "refusing it")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022 and (last or not mode & stat.S_ISVTX or st.st_uid != 0):
        raise ViewRootError(f"{what}: {here} is writable by group or others (mode "
                            f"{mode:04o}): refusing it (chmod go-w, or remove it)")


def open_dir(path: str, create: bool = True, mode: int = ROOT_MODE, what: str = "view root"
             ) -> int:
    """An fd of the directory `path` (absolute), opened component by component without
    following links, each component checked (see the module's docstring); missing ones are
    made (parents PARENT_MODE, the last `mode`) when `create`. ViewRootError says why not."""
    what = f"{what} {path}"
    if not os.path.isabs(path):
        raise ViewRootError(f"{what}: not an absolute path")
    parts = [p for p in os.path.normpath(path).split("/") if p]
    fd = os.open("/", _DIR_FLAGS)
    try:
        _check(fd, "/", not parts, what)
        here = ""
        for k, name in enumerate(parts):
            here += "/" + name
            last = k == len(parts) - 1
            try:
                made = False
                try:
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(name, 0o700, dir_fd=fd)  # its mode is set below, umask aside
                        made = True
                    except FileExistsError:
                        pass
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                if made:
                    os.fchmod(nfd, mode if last else PARENT_MODE)
            except FileNotFoundError:
                raise ViewRootError(f"{what}: {here} does not exist", missing=True) from None
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ViewRootError(f"{what}: {here} is not a directory (a symlink is "
                                        "not followed)") from None
                raise
            os.close(fd)
            fd = nfd
            _check(fd, here, last, what)
        return fd
    except ViewRootError:
        os.close(fd)
        raise
    except OSError as e:
        os.close(fd)
        raise ViewRootError(f"{what}: {e.strerror}") from None


class View:
    """A view made for one request: its name in the view root, and an fd of it on which
    this process holds LOCK_SH (send it with the reply, then close()). remove() deletes
    it (a reply that could not be sent)."""

    def __init__(self, root_fd: int, name: str, fd: int, path: str):
        self.root_fd, self.name, self.fd, self.path = root_fd, name, fd, path

    def close(self) -> None:
        for fd in (self.fd, self.root_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.root_fd = -1

    def remove(self) -> None:
        if self.root_fd >= 0:
            remove_tree_at(self.root_fd, self.name)
        self.close()


def new_name() -> str:
    # os.urandom is what secrets.token_hex reads; the secrets module loads hashlib and hmac
    # (about 4 ms of the plugin's CLI route)
    return VIEW_PREFIX + os.urandom(VIEW_HEX // 2).hex()


def create_view(view_root: str, write: Callable[[str], None], name: str | None = None,
                deadline: float | None = None) -> View:
    """Call write(path) to fill a new view at `path` (whole or absent: offline's writer
    renames a finished temporary dir into place) and return it, locked (host/stale.py)."""
    root = os.path.normpath(view_root)
    root_fd = open_dir(root)
    try:
        view = name or new_name()

        def make() -> str:
            write(os.path.join(root, view))
            return view

        got, fd = hold_new(root_fd, make, deadline, f"view root {root}")
    except BaseException:
        os.close(root_fd)
        raise
    return View(root_fd, got, fd, os.path.join(root, got))


def sweep(view_root: str) -> list[str]:
    """Remove every view (and temporary view dir) nobody holds a lock on (host/stale.py's
    sweeper); the names removed. A root that is missing gives []; one that is busy (a view
    being made) too: a later request sweeps it."""
    try:
        root_fd = open_dir(os.path.normpath(view_root), create=False)
    except ViewRootError as e:
        if e.missing:
            return []
        raise

    def ours(name: str) -> bool:  # not an older release's view-<pid>-<hex>: left alone
        return bool(VIEW_NAME.fullmatch(name) or TEMP_NAME.fullmatch(name))

    def clear(name: str) -> bool:
        remove_tree_at(root_fd, name)  # (what it could not remove: a later sweep's)
        return True

    try:
        return sweep_unheld(root_fd, ours, clear)
    finally:
        os.close(root_fd)
