"""The images dir CRIU hands the plugin: its path as this planner sees it, and whether it
is a per-node view already (rewriting a view again would move its addresses twice)."""

from __future__ import annotations

import os
import stat

from ..errors import InetskError
from ..host.mounts import FSTYPE as FUSE_FSTYPE
from ..host.mounts import mounts
from ..offline import VIEW_MARKER
from .wire import VIEW_ROOT


def images_root(images_fd: int) -> str:
    """The path of the images dir fd, checked to be that very directory from here."""
    link = f"/proc/self/fd/{images_fd}"
    try:
        path = os.readlink(link)
        fst = os.fstat(images_fd)
    except OSError as e:
        raise InetskError(f"images dir fd {images_fd}: {e.strerror}") from None
    if not stat.S_ISDIR(fst.st_mode):
        raise InetskError(f"images dir fd {images_fd} ({path}) is not a directory")
    try:
        pst = os.stat(path)
    except OSError:
        pst = None
    if pst is None or (pst.st_dev, pst.st_ino) != (fst.st_dev, fst.st_ino):
        raise InetskError(f"images dir {path} is not reachable by that path from the planner "
                          "(another mount namespace?)")
    return path


def _fstype(images_fd: int, root: str) -> str:
    """The file system type of the mount holding the images dir, as this planner's mount
    namespace has it: from an fd of our own of `root` (the fd criu sent may be on a mount of
    another namespace, whose id means nothing here). InetskError when it cannot be told:
    guessing "not a FUSE view" could rewrite a view twice."""
    why = "cannot tell which file system it is on"
    try:
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if (os.fstat(fd).st_ino, os.fstat(fd).st_dev) != (os.fstat(images_fd).st_ino,
                                                              os.fstat(images_fd).st_dev):
                raise InetskError(f"images dir {root}: changed while being looked at")
            with open(f"/proc/self/fdinfo/{fd}") as f:
                mnt_id = next((ln.split()[1] for ln in f if ln.startswith("mnt_id:")), None)
        finally:
            os.close(fd)
        if mnt_id is None:
            raise InetskError(f"images dir {root}: {why}: no mnt_id in /proc/self/fdinfo")
        found = next((m.fstype for m in mounts() if m.id == int(mnt_id)), None)
    except (OSError, ValueError, IndexError) as e:
        raise InetskError(f"images dir {root}: {why}: {e}") from None
    if found is None:
        raise InetskError(f"images dir {root}: {why}: mount {mnt_id} is not in "
                          "/proc/self/mountinfo")
    return found


def already_a_view(images_fd: int, root: str, view_root: str = VIEW_ROOT) -> str | None:
    """Why the images dir must not be rewritten again, or None."""
    for vr in {VIEW_ROOT, os.path.normpath(view_root)}:
        if root == vr or root.startswith(vr + "/"):
            return "the images dir is a view the plugin made"
    if os.path.lexists(os.path.join(root, VIEW_MARKER)):
        return f"the images dir is a per-node view already ({VIEW_MARKER})"
    if _fstype(images_fd, root) == FUSE_FSTYPE:
        return "the images dir is an overlayfs-inetsk mount (a per-node view already)"
    return None
