"""What a killed restore or plugin request leaves, and clearing it: the ONE sweeper, for the
plugin's views (VIEW_ROOT/<view>, plugin/viewroot.py) and the restores' temporary dirs
(RESTORE_DIR/<pid>-XXXX, app/restore.py) alike.

No pid numbers: an entry lives while someone holds flock(LOCK_SH) on an open file of it. A
view's lock goes with the reply into CRIU (its images dir fd); a restore's is held by the
restore and inherited by the criu it runs (a criu that outlived a killed restore, still
restoring or, --foreground, still serving, keeps it), not by the mount daemon. Whatever
pid or mount namespace the holder runs in, flock works on the shared inode:
  - creators hold LOCK_SH on the root dir from before their entry is made until it is
    locked (hold_new); the sweeper takes LOCK_EX on it (non-blocking: a busy root is swept
    by a later caller), so it never sees a fresh entry unlocked;
  - the sweeper clears an entry only when flock(LOCK_EX|LOCK_NB) on it succeeds: nobody
    can use it any more (a killed criu or restore, a request that timed out, a reply that
    was never received);
  - every open is relative to the root fd, O_NOFOLLOW.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable

from .. import lazylog
from ..errors import InetskError, RestoreError
from .mounts import find_mount, mounts, unmount

log = lazylog.getLogger(__name__)

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
RESTORE_DIR = "/run/overlayfs-inetsk/restore"  # <pid>-XXXX/{view,work} of each restore


def flock_until(fd: int, op: int, deadline: float | None, what: str) -> None:
    """flock(fd, op), waiting until `deadline` (time.monotonic(); None: for ever)."""
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                raise InetskError(f"{what}: still locked at the request's deadline") from None
            time.sleep(0.002)


def hold_new(root_fd: int, make: Callable[[], str], deadline: float | None = None,
             what: str = "") -> tuple[str, int]:
    """Make an entry of the root dir (make() returns its name) and hold it: (name, an fd of
    it on which this process holds LOCK_SH, inheritable only where the caller says)."""
    flock_until(root_fd, fcntl.LOCK_SH, deadline, what)
    try:
        name = make()
        fd = os.open(name, DIR_FLAGS, dir_fd=root_fd)
        fcntl.flock(fd, fcntl.LOCK_SH)  # never blocks: only the sweeper takes LOCK_EX
    finally:
        fcntl.flock(root_fd, fcntl.LOCK_UN)
    return name, fd


def remove_tree_at(parent_fd: int, name: str, depth: int = 0) -> bool:
    """Remove the dir `name` of parent_fd and what is in it, every open and unlink relative
    to an fd, O_NOFOLLOW (a symlink is unlinked, never followed), at most 8 levels down, as
    the C plugin's fini does (shutil.rmtree would do the same but costs 16 ms to import on
    the plugin's CLI route); whether it is gone. Errors leave what could not be removed."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except OSError:
        return False
    try:
        with os.scandir(fd) as it:
            names = [e.name for e in it]
        for sub in names:
            try:
                os.unlink(sub, dir_fd=fd)
            except (IsADirectoryError, PermissionError):  # (EPERM: Linux for a dir)
                if depth < 8:
                    remove_tree_at(fd, sub, depth + 1)
            except OSError:
                pass
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=parent_fd)
    except OSError:
        return False
    return True


def sweep(root_fd: int, ours: Callable[[str], bool], clear: Callable[[str], bool]
          ) -> list[str]:
    """clear(name) every entry of the root dir that ours(name) says is one of ours and that
    nobody holds; the names cleared (those clear() says it cleared). A busy root (an entry
    being made) is left for a later sweep."""
    gone: list[str] = []
    try:
        fcntl.flock(root_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return gone
    try:
        for name in os.listdir(root_fd):
            if not ours(name):
                continue
            try:
                fd = os.open(name, DIR_FLAGS, dir_fd=root_fd)
            except OSError:
                continue  # gone, or not a directory: not ours
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # in use (or being handed over)
                if clear(name):
                    gone.append(name)
            finally:
                os.close(fd)
    finally:
        fcntl.flock(root_fd, fcntl.LOCK_UN)
    return gone


# -- restores ---------------------------------------------------------------------------
# Each restore works in RESTORE_DIR/<its pid>-XXXX/ (`view`: the mountpoint, `work`: criu's
# work dir unless --work-dir). A restore that ends removes `view` (and `work` unless it
# failed, for its logs). One killed with SIGKILL cannot: its view stays mounted, its daemon
# running. clear_restores() clears those; the next `restore` and every `umount` call it.

def _lexists(path: str) -> bool:
    try:
        os.lstat(path)
        return True
    except OSError as e:
        return e.errno == errno.ENOTCONN  # a FUSE mount whose daemon is gone


def _clear_restore(restore_dir: str, name: str, also: Callable[[str], None] | None) -> bool:
    base = os.path.join(restore_dir, name)
    view = os.path.join(base, "view")
    if not _lexists(view):
        return False  # a failed restore's work dir, kept for its logs
    try:
        if find_mount(view) is not None:
            unmount(view)
        if any(m.point == base or m.point.startswith(base + "/") for m in mounts()):
            raise RestoreError(f"{base}: something is still mounted in it")
    except InetskError as e:
        log.error("cannot clear the view of killed restore %s: %s", name.partition("-")[0], e)
        return False
    if also is not None:
        also(base)  # what else the restore left (its peers' NAT table: app/restore.py)
    import shutil

    shutil.rmtree(base, ignore_errors=True)
    log.warning("cleared %s, left by restore pid %s (killed)", view, name.partition("-")[0])
    return True


def clear_restores(restore_dir: str = RESTORE_DIR,
                   also: Callable[[str], None] | None = None) -> list[str]:
    """Clear what a restore killed with SIGKILL left: its view (the mount, its read-only
    bind, and so its daemon, which ends when unmounted) and its temporary dir, once nobody
    holds it (see above); also(its dir) first, for what else it left. Returns the views
    cleared; failures are logged, never raised."""
    try:
        root_fd = os.open(restore_dir, DIR_FLAGS)
    except OSError:
        return []
    try:
        names = sweep(root_fd, lambda n: n.partition("-")[0].isdigit(),
                      lambda n: _clear_restore(restore_dir, n, also))
    finally:
        os.close(root_fd)
    return [os.path.join(restore_dir, n, "view") for n in names]
