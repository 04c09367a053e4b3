"""The mount daemon's lifecycle: validate, mount, serve, unmount.

    validate()          everything that can fail for a user reason, BEFORE mounting
    serve_foreground()  pyfuse3.init -> trio.run(main loop + signals + readiness) -> close
    spawn_background()  re-executes `mount --foreground --ready-fd N` detached and waits for
                        its ready byte or its one-line failure (forking after pyfuse3.init
                        is not safe, so the child is a fresh interpreter)
    unmount()           `umount MOUNTPOINT`: fusermount3 -u, falling back to lazy unmount
                        (clears the mount of a killed daemon and its read-only bind)

In the default symlink mode the view's symlinks do not point at IMAGE_DIR itself but into a
read-only bind mount of it, /run/overlayfs-inetsk/ro/<name of the mountpoint>, made before
the FUSE mount and removed after it: a write through a symlink of the view (open O_WRONLY,
truncate, chmod, setxattr of MNT/pages-1.img) gets EROFS from the kernel. docs/security.md.

Readiness means "serving": after pyfuse3.init a worker thread stat()s the mountpoint, which
only returns once our main loop answered; then READY=1 goes to $NOTIFY_SOCKET (--systemd)
and the ready byte to --ready-fd.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import logging
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .errors import InetskError

log = logging.getLogger(__name__)

FSNAME = "overlayfs-inetsk"
FSTYPE = "fuse." + FSNAME
RUN_DIR = "/run/overlayfs-inetsk"
RO_DIR = os.path.join(RUN_DIR, "ro")  # read-only binds of image dirs, one per mountpoint
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
READY_TIMEOUT = 30.0  # seconds the background parent waits for the daemon
EXIT_SIGNAL_OK = 0


class MountError(InetskError):
    """The mount cannot be made or found (mountpoint, fuse, not our mount): exit code 6."""

    exit_code = 6


@dataclass
class MountConfig:
    image_dir: str
    mountpoint: str
    maps: Sequence[str] = ()
    map_files: Sequence[str] = ()
    netns: str | None = None
    iface: str | None = None
    strict: bool = False
    tcp_outside: str = "close"
    serve: str = "symlink"
    allow_other: bool = False
    systemd: bool = False
    ready_fd: int | None = None
    log_file: str | None = None
    verbose: bool = False
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    def child_argv(self, ready_fd: int, log_file: str) -> list[str]:
        """The command line of the detached foreground daemon."""
        argv = [sys.executable, "-m", "overlayfs_inetsk.cli_mount", "mount",
                self.image_dir, self.mountpoint, "--foreground", "--ready-fd", str(ready_fd),
                "--log-file", log_file, "--serve", self.serve, "--tcp-outside",
                self.tcp_outside]
        for m in self.maps:
            argv += ["--map", m]
        for f in self.map_files:
            argv += ["--map-file", f]
        if self.netns:
            argv += ["--netns", self.netns]
        if self.iface:
            argv += ["--iface", self.iface]
        if self.strict:
            argv.append("--strict")
        if self.allow_other:
            argv.append("--allow-other")
        if self.verbose:
            argv.append("--verbose")
        return argv


@dataclass
class Prepared:
    view: object  # view.View
    generate: Callable[[Mapping[str, bytes]], Mapping[str, object]]
    mountpoint: str
    groups: int
    ro_bind: str | None = None  # where IMAGE_DIR is to be bind-mounted read-only (symlink mode)


# -- validation --------------------------------------------------------------------------
def _overlaps(a: str, b: str) -> bool:
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def check_mountpoint(mountpoint: str, image_dir_real: str) -> str:
    mp = os.path.abspath(mountpoint)
    try:
        st = os.stat(mp)
    except OSError as e:
        raise MountError(f"{mountpoint}: mountpoint: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"{mountpoint}: mountpoint is not a directory")
    if os.path.ismount(mp):
        m = find_mount(mp)
        if m is not None and (m[1] == FSTYPE or m[2] == FSNAME):
            raise MountError(f"{mountpoint}: an overlayfs-inetsk view is already mounted there "
                             "(a stale one is cleared by `overlayfs-inetsk umount`)")
        raise MountError(f"{mountpoint}: something is already mounted there")
    real = os.path.realpath(mp)
    if _overlaps(real, image_dir_real):
        raise MountError(f"{mountpoint}: mountpoint and image dir {image_dir_real} overlap")
    return real


def validate(cfg: MountConfig) -> Prepared:
    """Everything that can fail for a user reason, before anything is mounted. Raises
    InetskError subclasses with one-line messages."""
    from .addrmap import AddressMap
    from .imagedir import check_image_dir, read_group
    from .nodeaddr import check_netns, make_resolver
    from .rewrite import RewriteOptions, rewrite_group, validate_group
    from .view import SERVE_MODES, View, ViewError

    if cfg.serve not in SERVE_MODES:
        raise MountError(f"--serve must be one of {', '.join(SERVE_MODES)}")
    image_real = check_image_dir(cfg.image_dir)
    mp = check_mountpoint(cfg.mountpoint, image_real)
    amap = AddressMap.from_args(cfg.maps, cfg.map_files, env=cfg.env)
    try:
        options = RewriteOptions(strict=cfg.strict, tcp_outside=cfg.tcp_outside)
    except ValueError as e:
        raise MountError(str(e)) from None
    if cfg.netns:
        check_netns(cfg.netns)
    ro_bind = ro_bind_path(mp) if cfg.serve == "symlink" else None
    try:
        view = View.build(image_real, cfg.serve, ro_bind)  # type: ignore[arg-type]
    except ViewError as e:
        raise InetskError(str(e)) from None
    groups = 0
    for _dino, group in view.iter_socket_groups():
        validate_group(read_group(group.values()), amap)
        groups += 1
    if groups == 0:
        log.warning("%s holds no files.img or inetsk.img: the view is a plain mirror",
                    cfg.image_dir)
    resolver = make_resolver(cfg.netns, cfg.iface) if amap.auto_families() else None
    generate = functools.partial(rewrite_group, amap=amap, resolve=resolver, options=options)
    return Prepared(view, generate, mp, groups, ro_bind)


# -- the read-only bind of IMAGE_DIR -----------------------------------------------------
# Symlinks of the view point into it, so nothing written through the view reaches IMAGE_DIR.
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_PRIVATE = 0x20, 0x1000, 0x40000
MNT_DETACH, UMOUNT_NOFOLLOW = 0x2, 0x8
# the new mount API (Linux >= 5.12); syscall numbers >= 424 are the same on every arch
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
AT_FDCWD, AT_EMPTY_PATH = -100, 0x1000
OPEN_TREE_CLONE, MOVE_MOUNT_F_EMPTY_PATH = 0x1, 0x4
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 0x1, 0x2, 0x4, 0x8

_libc_handle: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _libc_handle
    if _libc_handle is None:
        _libc_handle = ctypes.CDLL(None, use_errno=True)
    return _libc_handle


def _check(ret: int, what: str, path: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return ret


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def ro_bind_path(mountpoint_real: str) -> str:
    """/run/overlayfs-inetsk/ro/<basename>-<hash of the mountpoint's real path>: one per
    mountpoint, so `umount MOUNTPOINT` finds the bind of a daemon that was killed."""
    base = os.path.basename(mountpoint_real.rstrip("/"))
    name = "".join(c if (c.isascii() and (c.isalnum() or c in "_.-")) else "_"
                   for c in base)[:48].lstrip(".") or "root"
    digest = hashlib.sha256(os.fsencode(mountpoint_real)).hexdigest()[:16]
    return os.path.join(RO_DIR, f"{name}-{digest}")


def _mount_ids_at(path: str) -> list[int]:
    """Mount ids of the mounts at `path`, bottom first (from /proc/self/mountinfo)."""
    ids = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" ", 5)
            if _unescape(fields[4]) == path:
                ids.append(int(fields[0]))
    return ids


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
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    fd = _check(syscall(SYS_OPEN_TREE, AT_FDCWD, ctypes.c_char_p(src),
                        OPEN_TREE_CLONE | os.O_CLOEXEC), "open_tree", os.fsdecode(src))
    try:
        attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
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

# -- the foreground daemon ---------------------------------------------------------------
def sd_notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send a datagram to $NOTIFY_SOCKET (systemd's protocol, no libsystemd). False if
    there is no socket to notify."""
    addr = (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(addr)
        s.sendall(message.encode())
    return True


def _setup_logging(cfg: MountConfig) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if cfg.log_file:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.log_file)), exist_ok=True)
        os.close(os.open(cfg.log_file, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o640))  # created 0640 (FileHandler would use 0666 & ~umask)
        handler = logging.FileHandler(cfg.log_file)
        fmt = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        # systemd's journal adds time and pid itself
        fmt = ("%(levelname)s %(name)s: %(message)s" if cfg.systemd
               else "%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .logsetup import formatter_for  # `<N>` priorities when stderr is the journal

    handler.setFormatter(formatter_for(handler.stream, fmt))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if cfg.verbose else logging.INFO)
    logging.getLogger("pyfuse3").setLevel(logging.INFO if cfg.verbose else logging.WARNING)


def _write_ready(fd: int | None, payload: bytes) -> None:
    if fd is None:
        return
    try:
        os.write(fd, payload)
    except OSError:
        pass
    try:
        os.close(fd)
    except OSError:
        pass


def serve_foreground(cfg: MountConfig) -> int:
    """Validate, mount, serve until unmounted or SIGTERM/SIGINT, unmount. Returns the exit
    code; a failure before serving is reported as one line (stderr, log, ready fd)."""
    import pyfuse3
    import trio

    from .fuse_ops import ViewOperations

    os.umask(0o022)  # nothing the daemon creates is group- or world-writable
    _setup_logging(cfg)
    ready_fd = cfg.ready_fd
    if ready_fd is not None:
        os.set_inheritable(ready_fd, False)
    try:
        prep = validate(cfg)
    except InetskError as e:
        return _fail(cfg, ready_fd, e)
    ops = ViewOperations(prep.view, prep.generate)  # type: ignore[arg-type]
    options = set(pyfuse3.default_options)  # default_permissions
    options |= {"ro", f"fsname={FSNAME}", f"subtype={FSNAME}"}
    if cfg.allow_other:
        options.add("allow_other")
    # From here a SIGTERM/SIGINT/SIGHUP must never kill the daemon between mounting and the
    # loop's own signal receiver (that would leave a mount without a daemon): until then
    # they are only recorded, and the loop acts on them first thing.
    early: list[int] = []
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda n, _frame: early.append(n))
    bind_id: int | None = None
    if prep.ro_bind is not None:
        try:
            bind_id = make_ro_bind(prep.view.image_dir, prep.ro_bind)  # type: ignore[attr-defined]
        except OSError as e:
            return _fail(cfg, ready_fd, MountError(
                f"{cfg.image_dir}: cannot bind it read-only on {prep.ro_bind}: "
                f"{e.strerror} (needs root; --serve read needs no bind)"))
        log.info("%s bound read-only on %s", cfg.image_dir, prep.ro_bind)
    try:
        pyfuse3.init(ops, prep.mountpoint, options)
    except Exception as e:  # RuntimeError('fuse_session_mount failed'), bad option, ...
        _drop_ro_bind(prep.ro_bind, bind_id)
        return _fail(cfg, ready_fd, MountError(f"{cfg.mountpoint}: cannot mount: {e}"))
    log.info("mounted %s on %s (%d inodes, %d checkpoint dir(s), serve=%s)",
             cfg.image_dir, prep.mountpoint, len(prep.view), prep.groups, cfg.serve)  # type: ignore[arg-type]
    state = {"ready": False, "signal": 0}
    clean = False
    try:
        trio.run(_main, prep.mountpoint, cfg, ready_fd, state, early)
        clean = True
    except BaseException:
        log.exception("main loop failed")
        raise
    finally:
        if cfg.systemd:
            try:
                sd_notify("STOPPING=1")
            except OSError:
                pass
        pyfuse3.close(unmount=True)
        log.info("unmounted %s%s", prep.mountpoint, "" if clean else " after an error")
        _drop_ro_bind(prep.ro_bind, bind_id)
    if not state["ready"] and not state["signal"]:  # a stop asked for is not a failure
        return _fail(cfg, ready_fd, MountError(f"{cfg.mountpoint}: the mount never became ready"))
    return 0


def _drop_ro_bind(path: str | None, mount_id: int | None) -> None:
    """Remove our read-only bind on the way out; a failure is logged, never raised."""
    if path is None or mount_id is None:
        return
    try:
        clear_ro_bind(path, mount_id)
    except OSError as e:
        log.error("cannot remove the read-only bind %s: %s", path, e.strerror)


def _fail(cfg: MountConfig, ready_fd: int | None, err: InetskError) -> int:
    """Report a failure before serving: to the background parent through the ready fd, or
    (foreground) by raising it for the CLI to print as one line; also to the log file."""
    if cfg.log_file or ready_fd is not None:
        log.error("%s", err)
    if ready_fd is None:
        raise err
    _write_ready(ready_fd, b"E" + str(err).encode(errors="replace"))
    return err.exit_code


async def _main(mountpoint: str, cfg: MountConfig, ready_fd: int | None,
                state: dict[str, int | bool], early: list[int]) -> None:
    import pyfuse3
    import trio

    def stop(signum: int) -> None:
        log.info("%s: unmounting", signal.Signals(signum).name)
        state["signal"] = signum
        pyfuse3.terminate()

    async def watch_signals() -> None:
        with trio.open_signal_receiver(*STOP_SIGNALS) as sigs:
            if early:  # arrived while mounting
                stop(early[0])
                return
            async for signum in sigs:
                stop(signum)
                return

    async def announce_ready() -> None:
        # stat() from another thread returns only once our loop answered: we serve
        with trio.move_on_after(READY_TIMEOUT):
            await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
            state["ready"] = True
        if not state["ready"]:
            log.error("%s did not answer within %.0f s", mountpoint, READY_TIMEOUT)
            pyfuse3.terminate()
            return
        if cfg.systemd:
            try:
                sd_notify(f"READY=1\nSTATUS=serving {cfg.image_dir} on {mountpoint}")
            except OSError as e:
                log.warning("cannot notify systemd: %s", e)
        _write_ready(ready_fd, b"R")
        log.info("ready")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals)
        nursery.start_soon(announce_ready)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


# -- the background parent ---------------------------------------------------------------
def default_log_file(mountpoint: str) -> str:
    """/run/overlayfs-inetsk/<mountpoint, systemd-escape style>.log"""
    real = os.path.realpath(mountpoint).strip("/") or "-"
    name = "".join(c if (c.isalnum() or c in "_.") else ("-" if c == "/" else f"\\x{ord(c):02x}")
                   for c in real)
    return os.path.join(RUN_DIR, name + ".log")


def spawn_background(cfg: MountConfig) -> tuple[int, str]:
    """Start the detached daemon and wait until it serves. Returns (pid, log file); raises
    InetskError carrying the daemon's own one-line message when it fails."""
    log_file = os.path.abspath(cfg.log_file or default_log_file(cfg.mountpoint))
    try:
        os.makedirs(os.path.dirname(log_file), mode=0o755, exist_ok=True)
        out = os.fdopen(os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                                | os.O_NOFOLLOW, 0o640), "ab")
    except OSError as e:
        raise MountError(f"{log_file}: cannot open log file: {e.strerror}") from None
    r, w = os.pipe()
    try:
        with out:
            proc = subprocess.Popen(
                cfg.child_argv(w, log_file), stdin=subprocess.DEVNULL, stdout=out,
                stderr=out, pass_fds=(w,), start_new_session=True, close_fds=True,
                env=dict(cfg.env), umask=0o022)
        os.close(w)
        w = -1
        msg = _read_ready(r, proc)
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)
    if msg == b"R":
        return proc.pid, log_file
    if msg.startswith(b"E"):
        code = proc.wait(5) if proc.poll() is None else proc.returncode
        err = InetskError(msg[1:].decode(errors="replace"))
        err.exit_code = code or 1
        raise err
    rc = proc.poll()
    if rc is None:  # no answer in time: do not leave a half-started daemon behind
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise MountError(f"{cfg.mountpoint}: the daemon did not become ready within "
                         f"{READY_TIMEOUT:.0f} s (log: {log_file})")
    raise MountError(f"{cfg.mountpoint}: the daemon exited with status {rc} before it was "
                     f"ready (log: {log_file})")


def _read_ready(fd: int, proc: subprocess.Popen[bytes]) -> bytes:
    deadline = time.monotonic() + READY_TIMEOUT
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return buf
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if not ready:
            if proc.poll() is not None:  # died without closing? (the pipe would be EOF)
                return buf
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return buf
        buf += chunk
        if buf == b"R":
            return buf


# -- umount ------------------------------------------------------------------------------
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


def find_mount(mountpoint: str) -> tuple[str, str, str] | None:
    """(mount point, fs type, source) of the topmost mount at `mountpoint`, or None."""
    candidates = {os.path.abspath(mountpoint), os.path.realpath(mountpoint)}
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields = pre.split()
            mp = _unescape(fields[4])
            if mp in candidates:
                ptype, source = post.split()[:2]
                found = (mp, ptype, _unescape(source))  # later lines are on top
    return found


def unmount(mountpoint: str, run: Callable[..., subprocess.CompletedProcess[bytes]]
            = subprocess.run) -> str:
    """Unmount our mount at `mountpoint`; returns how ("fusermount3 -u" etc.). MountError
    if nothing or something else is mounted there."""
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
