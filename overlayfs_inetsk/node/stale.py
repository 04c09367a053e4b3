"""What a `restore` killed with SIGKILL leaves, and clearing it.

Each restore works in RESTORE_DIR/<its pid>-XXXX/ (`view`: the mountpoint, `work`: criu's
work dir unless --work-dir). A restore that ends removes `view` (and `work` unless it failed,
for its logs). One killed with SIGKILL cannot: its view stays mounted, its daemon running.
clear_stale() clears those; the next `restore` and every `umount` call it.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil

from ..errors import InetskError, RestoreError

log = logging.getLogger(__name__)

RESTORE_DIR = "/run/overlayfs-inetsk/restore"  # <pid>-XXXX/{view,work} of each restore


def _cwd_users(base: str) -> list[int]:
    """Pids of live processes whose working directory is under `base` (criu runs in the
    work dir: a criu that outlived a killed restore still needs its view)."""
    out = []
    prefix = base.rstrip("/") + "/"
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cwd = os.readlink(f"/proc/{d}/cwd")
            except OSError:
                continue
            if cwd == base or cwd.startswith(prefix):
                out.append(int(d))
    return out


def clear_stale(restore_dir: str = RESTORE_DIR) -> list[str]:
    """Clear what a restore killed with SIGKILL left: its view (the mount, its read-only
    bind, and so its daemon, which ends when unmounted) and its temporary dir. A dir is
    stale when its owner pid (the name's prefix) is gone, it still holds `view` (a restore
    that finished removed it; a failed one keeps only its work dir, for its logs), and no
    process runs in it (a criu still restoring or, --foreground, still serving). Returns
    the views cleared; failures are logged, never raised."""
    from ..fuse.robind import find_mount, unmount

    cleared: list[str] = []
    try:
        names = os.listdir(restore_dir)
    except OSError:
        return cleared
    for name in names:
        owner, _, _ = name.partition("-")
        base = os.path.join(restore_dir, name)
        view = os.path.join(base, "view")
        if not owner.isdigit() or os.path.exists(f"/proc/{owner}") or not _lexists(view):
            continue
        if _cwd_users(base):
            continue
        try:
            if find_mount(view) is not None:
                unmount(view)
            if any(m == base or m.startswith(base + "/") for m in _mount_points()):
                raise RestoreError(f"{base}: something is still mounted in it")
        except InetskError as e:
            log.error("cannot clear the view of killed restore %s: %s", owner, e)
            continue
        from .natrestore import sweep

        sweep(os.path.join(base, "nat"))  # its peers' NAT table, unless criu resumed
        shutil.rmtree(base, ignore_errors=True)
        log.warning("cleared %s, left by restore pid %s (killed)", view, owner)
        cleared.append(view)
    return cleared


def _lexists(path: str) -> bool:
    try:
        os.lstat(path)
        return True
    except OSError as e:
        return e.errno == errno.ENOTCONN  # a FUSE mount whose daemon is gone


def _mount_points() -> list[str]:
    from ..fuse.robind import mounts

    return [m.point for m in mounts()]
