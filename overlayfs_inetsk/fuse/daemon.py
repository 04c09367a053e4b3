"""The mount daemon's foreground lifecycle: mount, serve, unmount.

    start()   umask, logging, the ready fd (app/mount.py then validates: the planner)
    serve()   the read-only bind, pyfuse3.init -> trio.run(main loop + signals +
              readiness + with `auto`, the address watch) -> close
    fail()    a failure before serving, as one line (stderr, log, ready fd)

app/mount.py strings them together (serve_foreground). The background start is spawn.py;
the read-only bind of IMAGE_DIR and `umount` are host/mounts.py (docs/security.md).

Readiness means "serving": after pyfuse3.init a worker thread stat()s the mountpoint, which
only returns once our main loop answered; then READY=1 goes to $NOTIFY_SOCKET (--systemd)
and the ready byte to --ready-fd.

With `auto` in the map the daemon watches --netns (or its own namespace) for address and
route changes (host/rtnl.AddressWatch) and generates the socket images for the new
addresses as soon as one is announced (fuse/images.SocketImages.warm): the node that gets
its address after the mount has them made before CRIU opens files.img.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import InetskError, MountError
from ..host.mounts import FSNAME, RUN_DIR, clear_ro_bind, make_ro_bind

if TYPE_CHECKING:  # imported where used: `umount` and the parent of a spawn stay small
    from ..core.tree import ImageTree
    from ..planner.view import Generated
    from .images import CurrentFn, GenerateFn, SocketImages

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
READY_TIMEOUT = 30.0  # seconds the background parent waits for the daemon
EXIT_SIGNAL_OK = 0


@dataclass
class MountConfig:
    """What `mount` was asked to do; the attribute names are options.py's (`attr`)."""

    image_dir: str
    mountpoint: str
    maps: Sequence[str] = ()
    map_files: Sequence[str] = ()
    netns: str | None = None
    iface: str | None = None
    strict: bool = False
    tcp_outside: str = "close"
    port_offset: int | None = None
    no_port_check: bool = False  # the caller checked the ports to bind (restore, spawn)
    plan_fd: int | None = None  # restore's plan, handed over (planner/view.py): serve it
    serve: str = "symlink"
    allow_other: bool = False
    systemd: bool = False
    ready_fd: int | None = None
    log_file: str | None = None
    verbose: bool = False
    foreground: bool = False
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


@dataclass
class Prepared:
    """What the daemon serves: app/mount.py's validate() makes it (the planner's view of
    IMAGE_DIR, planner/view.py, with where it is mounted)."""

    tree: ImageTree
    generate: GenerateFn
    mountpoint: str
    groups: int
    ro_bind: str | None = None  # where IMAGE_DIR is to be bind-mounted read-only (symlink mode)
    # with `auto` in the map: () -> (the node's auto addresses now, the generator for them);
    # ops.py calls it at every open of a socket image (fuse/ops.py CurrentFn)
    current: CurrentFn | None = None
    warnings: list[str] = field(default_factory=list)  # one line each, shown by `mount`
    # dir inode -> planner.view.Made: the socket images validation already rewrote, what the
    # first open would generate from the same files and addresses, so it need not
    generated: Generated = field(default_factory=dict)


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


def default_log_file(mountpoint: str) -> str:
    """/run/overlayfs-inetsk/<mountpoint, systemd-escape style>.log"""
    real = os.path.realpath(mountpoint).strip("/") or "-"
    name = "".join(c if (c.isalnum() or c in "_.") else ("-" if c == "/" else f"\\x{ord(c):02x}")
                   for c in real)
    return os.path.join(RUN_DIR, name + ".log")


class _LogState(logging.Filter):
    """Remembers the worst level logged, and whether the default log file is ours to remove
    at a clean end (docs/logging.md: kept when the daemon warned, failed or was killed, or
    when an earlier daemon's lines are in it)."""

    def __init__(self) -> None:
        super().__init__()
        self.worst = logging.NOTSET
        self.removable: tuple[str, int, int] | None = None  # (path, st_dev, st_ino)

    def filter(self, record: logging.LogRecord) -> bool:
        self.worst = max(self.worst, record.levelno)
        return True

    def remove_if_clean(self) -> None:
        if self.removable is None or self.worst >= logging.WARNING:
            return
        path, dev, ino = self.removable
        logging.shutdown()  # flush and close the file handler
        try:
            st = os.stat(path, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == (dev, ino):
                os.unlink(path)
        except OSError:
            pass


def _setup_logging(cfg: MountConfig) -> _LogState:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    state = _LogState()
    handler: logging.Handler
    if cfg.log_file:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.log_file)), exist_ok=True)
        fd = os.open(cfg.log_file, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o640)  # created 0640 (FileHandler would use 0666 & ~umask)
        st = os.fstat(fd)
        os.close(fd)
        if (os.path.abspath(cfg.log_file) == default_log_file(cfg.mountpoint)
                and st.st_size == 0):  # the default log, and no earlier daemon's lines in it
            state.removable = (os.path.abspath(cfg.log_file), st.st_dev, st.st_ino)
        handler = logging.FileHandler(cfg.log_file)
        fmt = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        # systemd's journal adds time and pid itself
        fmt = ("%(levelname)s %(name)s: %(message)s" if cfg.systemd
               else "%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..logsetup import formatter_for  # `<N>` priorities when stderr is the journal

    handler.setFormatter(formatter_for(handler.stream, fmt))
    handler.addFilter(state)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if cfg.verbose else logging.INFO)
    logging.getLogger("pyfuse3").setLevel(logging.INFO if cfg.verbose else logging.WARNING)
    return state


def _send_warning(fd: int | None, line: str) -> None:
    """A warning for the background parent to show (`W<line>\n` before the ready byte)."""
    if fd is None:
        return
    try:
        os.write(fd, b"W" + line.replace("\n", " ").encode(errors="replace") + b"\n")
    except OSError:
        pass


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


def start(cfg: MountConfig) -> tuple[_LogState, int | None]:
    """The daemon's process set up before anything can fail: umask, logging, the ready fd
    (not inherited). Returns the log state and the ready fd."""
    os.umask(0o022)  # nothing the daemon creates is group- or world-writable
    log_state = _setup_logging(cfg)
    ready_fd = cfg.ready_fd
    if ready_fd is not None:
        os.set_inheritable(ready_fd, False)
    return log_state, ready_fd


def serve(cfg: MountConfig, prep: Prepared, log_state: _LogState, ready_fd: int | None) -> int:
    """Mount the validated view, serve until unmounted or SIGTERM/SIGINT, unmount. Returns
    the exit code; a failure before serving is reported as one line (stderr, log, ready
    fd)."""
    import pyfuse3
    import trio

    from .ops import ViewOperations

    for w in prep.warnings:
        log.warning("%s", w)
        _send_warning(ready_fd, w)
    ops = ViewOperations(prep.tree, prep.generate, current=prep.current,
                         generated=prep.generated)
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
            bind_id = make_ro_bind(prep.tree.image_dir, prep.ro_bind)
        except OSError as e:
            return fail(cfg, ready_fd, MountError(
                f"{cfg.image_dir}: cannot bind it read-only on {prep.ro_bind}: "
                f"{e.strerror} (needs root; --serve read needs no bind)"))
        log.info("%s bound read-only on %s", cfg.image_dir, prep.ro_bind)
    try:
        pyfuse3.init(ops, prep.mountpoint, options)
    except Exception as e:  # RuntimeError('fuse_session_mount failed'), bad option, ...
        _drop_ro_bind(prep.ro_bind, bind_id)
        return fail(cfg, ready_fd, MountError(f"{cfg.mountpoint}: cannot mount: {e}"))
    log.info("mounted %s on %s (%d inodes, %d checkpoint dir(s), serve=%s)",
             cfg.image_dir, prep.mountpoint, len(prep.tree), prep.groups, cfg.serve)
    state = {"ready": False, "signal": 0}
    clean = False
    try:
        trio.run(_main, prep.mountpoint, cfg, ready_fd, state, early,
                 ops.images if prep.current is not None else None)
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
        return fail(cfg, ready_fd, MountError(f"{cfg.mountpoint}: the mount never became ready"))
    log_state.remove_if_clean()
    return 0


def _drop_ro_bind(path: str | None, mount_id: int | None) -> None:
    """Remove our read-only bind on the way out; a failure is logged, never raised."""
    if path is None or mount_id is None:
        return
    try:
        clear_ro_bind(path, mount_id)
    except OSError as e:
        log.error("cannot remove the read-only bind %s: %s", path, e.strerror)


def fail(cfg: MountConfig, ready_fd: int | None, err: InetskError) -> int:
    """Report a failure before serving: to the background parent through the ready fd, or
    (foreground) by raising it for the CLI to print as one line; also to the log file."""
    if cfg.log_file or ready_fd is not None:
        log.error("%s", err)
    if ready_fd is None:
        raise err
    _write_ready(ready_fd, b"E" + str(err).encode(errors="replace"))
    return err.exit_code


async def _main(mountpoint: str, cfg: MountConfig, ready_fd: int | None,
                state: dict[str, int | bool], early: list[int],
                images: SocketImages | None = None) -> None:
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
        if images is not None:
            from .addrwatch import watch_addresses

            nursery.start_soon(watch_addresses, images, cfg.netns)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
