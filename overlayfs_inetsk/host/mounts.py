"""The read-only bind of IMAGE_DIR, /proc/self/mountinfo, and `umount`.

In the default symlink mode the view's symlinks do not point at IMAGE_DIR itself but into a
read-only bind mount of it, /run/overlayfs-inetsk/ro/<name of the mountpoint>, made before
the FUSE mount and removed after it: a write through a symlink of the view (open O_WRONLY,
truncate, chmod, setxattr of MNT/pages-1.img) gets EROFS from the kernel. docs/security.md.

    make_ro_bind / clear_ro_bind   the bind syscalls (new mount API, old one as fallback)
    mounts()                       THE mountinfo parser (bind clearing and umount use it)
    unmount()                      `umount MOUNTPOINT`: fusermount3 -u, falling back to lazy
                                   unmount (clears the mount of a killed daemon and its bind)
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from ..record import Record
from ..errors import MountError

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:  # hashlib, subprocess and ctypes are imported where used: the plugin's
    import ctypes  # CLI route reads mountinfo only (tests/test_startup.py)
    import subprocess

FSNAME = "overlayfs-inetsk"
FSTYPE = "fuse." + FSNAME
RUN_DIR = "/run/overlayfs-inetsk"
RO_DIR = os.path.join(RUN_DIR, "ro")  # read-only binds of image dirs, one per mountpoint


# -- /proc/self/mountinfo -----------------------------------------------------------------
class Mount(Record):  # a Record, not a dataclass: record.py
    __slots__ = ("id", "point", "fstype", "source")
    id: int
    point: str  # unescaped
    fstype: str
    source: str  # unescaped

    def __init__(self, id: int, point: str, fstype: str, source: str) -> None:
        self.id, self.point, self.fstype, self.source = id, point, fstype, source


def _unescape(field_: str) -> str:
    out, i = [], 0
    while i < len(field_):
        if field_[i] == "\\" and field_[i + 1:i + 4].isdigit() and i + 4 <= len(field_):
            out.append(chr(int(field_[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a mountinfo text, in its order (later lines are on top)."""
    out = []
    for line in text.splitlines():
        pre, _, post = line.partition(" - ")
        fields = pre.split(" ")
        if len(fields) < 5:
            continue
        tail = post.split(" ")
        out.append(Mount(int(fields[0]), _unescape(fields[4]), tail[0],
                         _unescape(tail[1]) if len(tail) > 1 else ""))
    return out


def mounts() -> list[Mount]:
    """Every mount of our mount namespace, bottom first."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def _mount_ids_at(path: str) -> list[int]:
    """Mount ids of the mounts at `path`, bottom first."""
    return [m.id for m in mounts() if m.point == path]


def find_mount(mountpoint: str) -> tuple[str, str, str] | None:
    """(mount point, fs type, source) of the topmost mount at `mountpoint`, or None."""
    candidates = {os.path.abspath(mountpoint), os.path.realpath(mountpoint)}
    found = None
    for m in mounts():
        if m.point in candidates:
            found = (m.point, m.fstype, m.source)  # later lines are on top
    return found


# -- the read-only bind of IMAGE_DIR -----------------------------------------------------
# Symlinks of the view point into it, so nothing written through the view reaches IMAGE_DIR.
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_PRIVATE = 0x20, 0x1000, 0x40000
MNT_DETACH, UMOUNT_NOFOLLOW = 0x2, 0x8
# the new mount API (Linux >= 5.12). Since 5.1 new system calls get one number on the
# architectures that share the generic table (x86_64, arm64, riscv, ...), but not on all:
# alpha, ia64 and mips add offsets of their own. The numbers are used only on machines
# known to share it; elsewhere the old API serves (as on a kernel without the new one).
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
SHARED_SYSCALL_TABLE = ("x86_64", "i386", "i686", "aarch64", "armv7l", "armv8l", "riscv64",
                        "ppc64le", "ppc64", "s390x", "loongarch64")
AT_FDCWD, AT_EMPTY_PATH = -100, 0x1000
OPEN_TREE_CLONE, MOVE_MOUNT_F_EMPTY_PATH = 0x1, 0x4
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 0x1, 0x2, 0x4, 0x8

# ctypes (1.4 ms to import) is loaded by what mounts and unmounts, not by a reader of the
# mount table (the plugin's CLI route: plugin/imagesdir.py)
_libc_handle: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    import ctypes

    global _libc_handle
    if _libc_handle is None:
        _libc_handle = ctypes.CDLL(None, use_errno=True)
    return _libc_handle


def _check(ret: int, what: str, path: str) -> int:
    if ret < 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return ret


def ro_bind_path(mountpoint_real: str) -> str:
    """/run/overlayfs-inetsk/ro/<basename>-<hash of the mountpoint's real path>: one per
    mountpoint, so `umount MOUNTPOINT` finds the bind of a daemon that was killed."""
    base = os.path.basename(mountpoint_real.rstrip("/"))
    name = "".join(c if (c.isascii() and (c.isalnum() or c in "_.-")) else "_"
                   for c in base)[:48].lstrip(".") or "root"
    import hashlib

    digest = hashlib.sha256(os.fsencode(mountpoint_real)).hexdigest()[:16]
    return os.path.join(RO_DIR, f"{name}-{digest}")


def make_ro_bind(image_dir: str | bytes, target: str) -> int:
    """Bind-mount IMAGE_DIR read-only (and nosuid, nodev, noexec) on `target`; returns the
    new mount's id. With the new mount API the tree is made read-only before it is attached,
    so no copy of it is ever writable (a copy propagated to a peer namespace keeps the flags
    it had); older kernels fall back to bind + remount. Raises OSError."""
    clear_ro_bind(target)  # a leftover of a killed daemon for this same mountpoint
    os.makedirs(RO_DIR, mode=0o755, exist_ok=True)
    os.mkdir(target, 0o700)
    src = os.fsencode(image_dir)
    libc = _libc()
    try:
        try:
            _bind_new_api(libc, src, target)
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EPERM) or _mount_ids_at(target):
                raise
            _bind_old_api(libc, src, target)
        st = os.statvfs(target)
        ids = _mount_ids_at(target)
        if not st.f_flag & os.ST_RDONLY or not ids:  # never serve through a writable bind
            raise OSError(errno.EIO, "the bind is not read-only", target)
        return ids[-1]
    except BaseException:
        clear_ro_bind(target)
        raise


def _bind_new_api(libc: ctypes.CDLL, src: bytes, target: str) -> None:
    if os.uname().machine not in SHARED_SYSCALL_TABLE:  # other syscall numbers there
        raise OSError(errno.ENOSYS, "the new mount API's numbers are unknown here", target)
    import ctypes

    class MountAttr(ctypes.Structure):  # struct mount_attr (linux/mount.h)
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    fd = _check(syscall(SYS_OPEN_TREE, AT_FDCWD, ctypes.c_char_p(src),
                        OPEN_TREE_CLONE | os.O_CLOEXEC), "open_tree", os.fsdecode(src))
    try:
        attr = MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
                         | MOUNT_ATTR_NOEXEC, 0, MS_PRIVATE, 0)
        _check(syscall(SYS_MOUNT_SETATTR, fd, ctypes.c_char_p(b""), AT_EMPTY_PATH,
                       ctypes.byref(attr), ctypes.sizeof(attr)), "mount_setattr", target)
        _check(syscall(SYS_MOVE_MOUNT, fd, ctypes.c_char_p(b""), AT_FDCWD,
                       ctypes.c_char_p(os.fsencode(target)), MOVE_MOUNT_F_EMPTY_PATH),
               "move_mount", target)
    finally:
        os.close(fd)


def _bind_old_api(libc: ctypes.CDLL, src: bytes, target: str) -> None:
    t = os.fsencode(target)
    _check(libc.mount(src, t, None, MS_BIND, None), "bind mount", target)
    _check(libc.mount(None, t, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
                      | MS_NOEXEC, None), "remount read-only", target)
    _check(libc.mount(None, t, None, MS_PRIVATE, None), "make private", target)


def clear_ro_bind(target: str, mount_id: int | None = None) -> bool:
    """Detach the mounts at `target` and remove the directory; True if there was anything.
    With `mount_id`, only that mount (the daemon's own: a new daemon for the same
    mountpoint may already have made its bind there). Only ever used under RO_DIR."""
    assert target.startswith(RO_DIR + "/")
    libc = _libc()
    ids = _mount_ids_at(target)
    if mount_id is not None and mount_id not in ids:
        return False
    found = bool(ids)
    for _ in range(len(ids)):
        if libc.umount2(os.fsencode(target), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
            import ctypes

            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOENT):  # not (or no longer) mounted
                raise OSError(err, f"umount: {os.strerror(err)}", target)
    if _mount_ids_at(target):
        raise OSError(errno.EBUSY, "still mounted", target)
    try:
        os.rmdir(target)
        found = True
    except FileNotFoundError:
        pass
    return found


# -- umount ------------------------------------------------------------------------------
def unmount(mountpoint: str,
            run: Callable[..., subprocess.CompletedProcess[bytes]] | None = None) -> str:
    """Unmount our mount at `mountpoint`; returns how ("fusermount3 -u" etc.). MountError
    if nothing or something else is mounted there. run: subprocess.run (tests: a fake)."""
    import subprocess

    if run is None:
        run = subprocess.run
    m = find_mount(mountpoint)
    if m is None:
        # the view may be gone (fusermount3 -u by hand) with a killed daemon's bind left
        if _clear_bind_of(os.path.realpath(mountpoint)):
            return "removed the read-only bind left by a killed daemon"
        raise MountError(f"{mountpoint}: not mounted")
    mp, fstype, source = m
    if fstype != FSTYPE and source != FSNAME:
        raise MountError(f"{mountpoint}: not an overlayfs-inetsk mount "
                         f"(it is {fstype} from {source})")
    errors = []
    for cmd in (["fusermount3", "-u", mp], ["fusermount3", "-u", "-z", mp], ["umount", "-l", mp]):
        try:
            p = run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            errors.append(f"{cmd[0]}: {e}")
            continue
        if p.returncode == 0 and find_mount(mp) != m:
            # a live daemon removes its bind itself once unmounted, a killed one cannot:
            # whichever comes first does it
            _clear_bind_of(mp)
            return " ".join(cmd[:-1])
        errors.append((p.stderr or b"").decode(errors="replace").strip() or
                      f"{' '.join(cmd[:-1])} exited {p.returncode}")
    raise MountError(f"{mountpoint}: cannot unmount: {'; '.join(errors)}")


def _clear_bind_of(mountpoint_real: str) -> bool:
    """Remove the read-only bind belonging to the view at `mountpoint_real`, if any.
    MountError if it cannot be removed."""
    path = ro_bind_path(mountpoint_real)
    try:
        return clear_ro_bind(path)
    except OSError as e:
        raise MountError(f"{mountpoint_real}: cannot remove the read-only bind {path}: "
                         f"{e.strerror}") from None
