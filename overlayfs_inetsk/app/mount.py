"""`mount` in the foreground (the daemon, also what the background start re-executes):
validate, then serve.

    serve_foreground(cfg)  fuse/daemon.start -> validate -> fuse/daemon.serve
    validate(cfg)          everything that can fail for a user reason, BEFORE mounting:
                           the mountpoint, the namespace, then ONE call into the planner
                           (planner/view.prepare_view: the tree, the plan, the port check,
                           the bytes the first opens serve)
"""

from __future__ import annotations

import os
import stat

from ..core.decide import RewriteOptions
from ..core.tree import SERVE_MODES
from ..errors import InetskError, MountError
from ..fuse.daemon import MountConfig, Prepared, fail, serve, start
from ..host.files import check_image_dir
from ..host.mounts import FSNAME, FSTYPE, find_mount, ro_bind_path
from ..host.netns import check_netns
from ..planner.planner import Planner
from ..planner.sources import load_map
from ..planner.view import decode_handover, prepare_view

HANDOVER_MAX = 512 << 20  # a plan handed over: the checkpoint's socket images and a header


def serve_foreground(cfg: MountConfig) -> int:
    """Validate, mount, serve until unmounted or SIGTERM/SIGINT, unmount. Returns the exit
    code; a failure before serving is reported as one line (stderr, log, ready fd)."""
    log_state, ready_fd = start(cfg)
    try:
        prep = validate(cfg)
    except InetskError as e:
        return fail(cfg, ready_fd, e)
    return serve(cfg, prep, log_state, ready_fd)


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


def _read_fd(fd: int) -> bytes:
    """All of a handed-over plan (the fd restore passed), from its start."""
    chunks = []
    size = 0
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > HANDOVER_MAX:
                raise MountError(f"--plan-fd {fd}: more than {HANDOVER_MAX} bytes")
            chunks.append(chunk)
    except OSError as e:
        raise MountError(f"--plan-fd {fd}: {e.strerror}") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def validate(cfg: MountConfig) -> Prepared:
    """Everything that can fail for a user reason, before anything is mounted (InetskError
    subclasses, one-line messages); see planner/view.py for what the plan refuses or warns
    about."""
    if cfg.serve not in SERVE_MODES:
        raise MountError(f"--serve must be one of {', '.join(SERVE_MODES)}")
    image_real = check_image_dir(cfg.image_dir)
    mp = check_mountpoint(cfg.mountpoint, image_real)
    amap = load_map(cfg.maps, cfg.map_files, env=cfg.env, port_offset=cfg.port_offset)
    try:
        options = RewriteOptions(strict=cfg.strict, tcp_outside=cfg.tcp_outside)
    except ValueError as e:
        raise MountError(str(e)) from None
    if cfg.netns:
        check_netns(cfg.netns)
    planned = None
    if cfg.plan_fd is not None:
        planned = decode_handover(_read_fd(cfg.plan_fd), f"--plan-fd {cfg.plan_fd}")
    ro_bind = ro_bind_path(mp) if cfg.serve == "symlink" else None
    view = prepare_view(Planner(amap, options, cfg.netns, cfg.iface), image_real, mp,
                        cfg.serve,  # checked above
                        ro_bind, port_check=not cfg.no_port_check, planned=planned)
    return Prepared(view.tree, view.generate, mp, view.groups, ro_bind, view.current,
                    view.warnings, view.generated)
