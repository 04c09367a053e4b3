"""The mount daemon's foreground lifecycle: validate, mount, serve, unmount.
Long: validate() (what `mount` refuses or warns about before mounting) and the lifecycle it
guards are read together.

    validate()          everything that can fail for a user reason, BEFORE mounting
    serve_foreground()  pyfuse3.init -> trio.run(main loop + signals + readiness) -> close

The background start is spawn.py; the read-only bind of IMAGE_DIR and `umount` are
host/mounts.py (docs/security.md).

Readiness means "serving": after pyfuse3.init a worker thread stat()s the mountpoint, which
only returns once our main loop answered; then READY=1 goes to $NOTIFY_SOCKET (--systemd)
and the ready byte to --ready-fd.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import InetskError, MountError
from ..host.mounts import (
    FSNAME,
    FSTYPE,
    RUN_DIR,
    clear_ro_bind,
    find_mount,
    make_ro_bind,
    ro_bind_path,
)

if TYPE_CHECKING:  # imported where used: `umount` and the parent of a spawn stay small
    from ..core.boundmap import Resolver
    from ..core.sockaddr import IPAddress
    from ..core.plan import RewriteResult
    from ..core.tree import ImageTree
    from .ops import CurrentFn, GenerateFn

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
READY_TIMEOUT = 30.0  # seconds the background parent waits for the daemon
EXIT_SIGNAL_OK = 0


@dataclass
class MountConfig:
    """What `mount` was asked to do; the attribute names are cli/options.py's (`attr`)."""

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
    tree: ImageTree
    generate: GenerateFn
    mountpoint: str
    groups: int
    ro_bind: str | None = None  # where IMAGE_DIR is to be bind-mounted read-only (symlink mode)
    # with `auto` in the map: () -> (the node's auto addresses now, the generator for them);
    # ops.py calls it at every open of a socket image (fuse/ops.py CurrentFn)
    current: CurrentFn | None = None
    warnings: list[str] = field(default_factory=list)  # one line each, shown by `mount`
    # dir inode -> (imagedir.stamp of the originals, what the bytes depend on (None, or the
    # `auto` addresses as `current` describes them), image name -> bytes): the socket images
    # validation already rewrote, what the first open would generate from the same files
    # and addresses, so it need not
    generated: dict[int, tuple[Hashable, Hashable, dict[str, bytes]]] = field(
        default_factory=dict)


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


class _NoAutoYet(Exception):
    """An `auto` target with no address at mount (the plan falls back to checking only)."""


def validate(cfg: MountConfig) -> Prepared:
    """Everything that can fail for a user reason, before anything is mounted. Raises
    InetskError subclasses with one-line messages.

    Where the outcome is already known (no `auto` in the map, or `auto` resolves now), every
    socket is planned here, so a refusal (--strict, --tcp-outside fail) stops the mount with
    the socket named instead of an EIO inside CRIU later. Where a socket needs an `auto`
    address the node does not have yet, the images are only checked, and a warning naming
    the family and the namespace goes into Prepared.warnings (the node may get its address
    before CRIU opens files.img; the open fails with EIO until then)."""
    from ..core.decide import RewriteOptions
    from ..host.files import check_image_dir, stamp
    from ..planner.sources import load_map
    from ..core.plan import raise_problems
    from ..planner.planner import check_parents, generator, plan_tree
    from ..core.tree import SERVE_MODES
    from ..host.listing import build_tree
    from ..host.netns import check_netns
    from ..host.nodeaddr import describe, snapshot

    if cfg.serve not in SERVE_MODES:
        raise MountError(f"--serve must be one of {', '.join(SERVE_MODES)}")
    image_real = check_image_dir(cfg.image_dir)
    mp = check_mountpoint(cfg.mountpoint, image_real)
    amap = load_map(cfg.maps, cfg.map_files, env=cfg.env,
                                port_offset=cfg.port_offset)
    try:
        options = RewriteOptions(strict=cfg.strict, tcp_outside=cfg.tcp_outside)
    except ValueError as e:
        raise MountError(str(e)) from None
    if cfg.netns:
        check_netns(cfg.netns)
    ro_bind = ro_bind_path(mp) if cfg.serve == "symlink" else None
    # relative links: they resolve in a container's mount namespace too (runc restore)
    tree = build_tree(image_real, cfg.serve, ro_bind, link_from=mp)
    check_parents(tree)
    families = amap.auto_families()
    warnings: list[str] = []
    resolve: Resolver | None = None
    depends: Hashable = None  # what the planned bytes depend on, as `current` describes it
    if families:
        snap, found = snapshot(families, cfg.netns, cfg.iface)
        depends = describe(snap)
        where = f"netns {cfg.netns}" if cfg.netns else "our network namespace"
        on = f" on {cfg.iface}" if cfg.iface else ""
        missing = {fam: v for fam, v in snap if v == "none" or v.startswith("error: ")}

        def resolve_or_wait(family: int) -> IPAddress | None:
            if family in missing:
                raise _NoAutoYet(family)
            return found(family)
        resolve = resolve_or_wait

    groups = 0
    port_check = not cfg.no_port_check
    results: dict[str, RewriteResult] = {}
    generated: dict[int, tuple[Hashable, Hashable, dict[str, bytes]]] = {}
    # taken before the files are read: a file changed since shows at the first open
    stamps = {d: stamp(g) for d, g in tree.iter_socket_groups()}
    try:
        # the port check needs every socket's report; a refusal known now stops the mount
        for cp in plan_tree(tree, amap, resolve, options, reports=port_check):
            raise_problems(cp.results, options)
            results.update(cp.results)
            groups += 1
            # the bytes the first open would generate (same files, same addresses): kept
            generated[cp.dir_inode] = (stamps.get(cp.dir_inode), depends,
                                       {name: bytes(d) for name, d in cp.data().items()})
    except _NoAutoYet as e:
        fam = e.args[0]
        why = missing[fam]
        why = (f"no IPv{fam} address in {where}{on} yet" if why == "none"
               else f"IPv{fam}: {why[len('error: '):]}")
        warnings.append(f"auto: {why}; the view mounts, and files.img fails to open (EIO) "
                        "until there is one")
        groups = sum(1 for _ in plan_tree(tree, amap, mode="check"))  # every image parses
        generated.clear()
    if groups == 0:
        log.warning("%s holds no files.img or inetsk.img: the view is a plain mirror",
                    cfg.image_dir)
    elif not warnings and port_check:
        from ..planner.ports import check_plan

        check_plan(results, cfg.netns, cfg.strict, warnings.append)
    if not families:
        return Prepared(tree, generator(amap, None, options), mp, groups, ro_bind,
                        warnings=warnings, generated=generated)

    def current() -> tuple[Hashable, GenerateFn]:
        snap, resolve = snapshot(families, cfg.netns, cfg.iface)
        return describe(snap), generator(amap, resolve, options)

    return Prepared(tree, generator(amap, None, options), mp, groups, ro_bind, current,
                    warnings, generated)


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


def serve_foreground(cfg: MountConfig) -> int:
    """Validate, mount, serve until unmounted or SIGTERM/SIGINT, unmount. Returns the exit
    code; a failure before serving is reported as one line (stderr, log, ready fd)."""
    import pyfuse3
    import trio

    from .ops import ViewOperations

    os.umask(0o022)  # nothing the daemon creates is group- or world-writable
    log_state = _setup_logging(cfg)
    ready_fd = cfg.ready_fd
    if ready_fd is not None:
        os.set_inheritable(ready_fd, False)
    try:
        prep = validate(cfg)
    except InetskError as e:
        return _fail(cfg, ready_fd, e)
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
             cfg.image_dir, prep.mountpoint, len(prep.tree), prep.groups, cfg.serve)
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
