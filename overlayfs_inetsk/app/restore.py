"""`overlayfs-inetsk restore`: restore a shared checkpoint on this node in one command.

    sweep     clear what a restore killed with SIGKILL left (host/stale.py)
    plan      the planner (planner/planner.py, purpose "restore"): every socket (what the
              summary shows; a refused socket, a --strict violation, a `parent` link out of
              IMAGE_DIR stop here, before anything is mounted), the ports it binds
    mount     a view of IMAGE_DIR on a temporary mountpoint,
              /run/overlayfs-inetsk/restore/<our pid>-XXXX/view (the `mount` daemon,
              detached, its log in the work dir), handed the plan (it plans nothing)
    criu      [nsenter --net=NETNS] CRIU restore -D VIEW -W WORK -o WORK/restore.log -v4
              -d [--tcp-established] CRIU_ARGS...
              (--foreground: no -d, and --pidfile WORK/restored.pid unless given)
    unmount   always: after criu returns, on an error, on SIGINT/SIGTERM/SIGHUP

Detached (the default, as `podman container restore`): criu -d returns once the tree runs,
the view is unmounted at once. --foreground: criu stays the restored tree's parent until it
exits, the view stays mounted that long; SIGINT/SIGTERM/SIGHUP go to the restored root task
once it is restored (the service stops, criu returns, the view is unmounted), to criu while
it is still restoring. Detached, they go to criu.

The exit status is criu's once criu ran (128+N when a signal N killed it); before that, our
own codes (docs/cli.md). The work dir (criu's log, the view's log) is removed after a
successful restore unless --work-dir named it, and kept, its path printed, on failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..core.addrmap import AddressMap
from ..core.plan import RewriteResult
from ..core.portcheck import Clash
from ..core.natrules import NatConn, nat_connections
from ..errors import InetskError, RestoreError
from ..host.stale import DIR_FLAGS, RESTORE_DIR, hold_new
from .stale import clear_restores
from ..node import natrestore
from ..node.criu import (
    STOP_TIMEOUT,
    TCP_OPTIONS,
    CriuSignals,
    check_criu_args,
    criu_argv,
    criu_subdir,
    find_criu,
    has_tcp_stream,
    user_pidfile,
)
from ..planner.sources import DEFAULT_MAP

log = logging.getLogger(__name__)


@dataclass
class RestoreConfig:
    image_dir: str
    netns: str | None = None
    maps: Sequence[str] = ()
    map_files: Sequence[str] = ()
    iface: str | None = None
    strict: bool = False
    tcp_outside: str = "close"
    port_offset: int | None = None
    serve: str = "symlink"
    criu_args: Sequence[str] = ()
    work_dir: str | None = None  # kept; default: a temporary dir, removed on success
    foreground: bool = False  # criu without -d: until the restored tree exits
    stop_timeout: float = STOP_TIMEOUT  # --foreground: a stop signal's SIGKILL after this
    nat_peer_netns: Sequence[str] = ()  # fate nat: apply the peers' table there (natrestore)
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    stdout_is_ours: bool = False  # `--json`: criu's stdout goes to our stderr


@dataclass
class RestoreOutcome:
    exit_code: int
    argv: list[str]
    work_dir: str | None  # None once removed
    log: str | None
    tcp_established_added: bool
    signal: int = 0
    nat_kept: bool = False  # the peers' NAT table stays (fate nat, criu resumed detached)


@dataclass
class Plan:
    image_real: str
    criu_dir: str  # relative to the image dir: '' or 'checkpoint'
    amap: AddressMap
    results: dict[str, RewriteResult]
    maps: list[str]
    map_defaulted: bool
    tcp_established_added: bool
    ports_taken: list[Clash]  # warned about
    handover: bytes  # the plan, for the view's daemon (planner/view.py): it plans nothing
    nat: list[NatConn]  # fate nat: the connections the peers' side rewrites


def plan(cfg: RestoreConfig) -> Plan:
    """Everything that can fail for a user reason, before anything is mounted: the planner
    (purpose "restore": the tree and its `parent` links, every socket, the refusals, the
    ports the restore binds, checked in --netns)."""
    from ..host.files import check_image_dir
    from ..host.netns import check_netns
    from ..planner.planner import Planner
    from ..planner.view import encode_handover

    image_real = check_image_dir(cfg.image_dir)
    sub = criu_subdir(image_real)
    check_criu_args(cfg.criu_args, cfg.foreground)
    if cfg.netns:
        check_netns(cfg.netns)
    if cfg.nat_peer_netns and cfg.tcp_outside != "nat":
        raise RestoreError("--nat-peer-netns applies the rules of fate nat: it needs "
                           "--tcp-outside nat")
    for peer in cfg.nat_peer_netns:
        check_netns(peer)
    planner, m = Planner.from_cli(cfg.maps, cfg.map_files, cfg.env, cfg.port_offset,
                                  cfg.strict, cfg.tcp_outside, cfg.netns, cfg.iface,
                                  default=DEFAULT_MAP)
    got = planner.plan(image_real, "restore")
    handover = encode_handover({
        got.tree.display(cp.dir_inode): (got.stamps.get(cp.dir_inode), got.depends,
                                         {name: bytes(d) for name, d in cp.data().items()})
        for cp in got.checkpoints})
    add_tcp = (has_tcp_stream(os.path.join(image_real, sub))
               and not any(a in TCP_OPTIONS for a in cfg.criu_args))
    nat = nat_connections(r for res in got.results.values() for r in res.reports)
    return Plan(image_real, sub, m.amap, got.results, m.specs, m.defaulted, add_tcp,
                got.ports_taken or [], handover, nat)


def _new_base() -> tuple[str, int]:
    """RESTORE_DIR/<our pid>-XXXX, made and held (host/stale.py: the sweeper leaves it
    alone while we, or the criu we run, live)."""
    os.makedirs(RESTORE_DIR, mode=0o700, exist_ok=True)
    root_fd = os.open(RESTORE_DIR, DIR_FLAGS)
    try:
        name, fd = hold_new(root_fd, lambda: os.path.basename(
            tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=RESTORE_DIR)))
    finally:
        os.close(root_fd)
    return os.path.join(RESTORE_DIR, name), fd


def _handover_fd(data: bytes) -> int:
    fd = os.memfd_create("overlayfs-inetsk-plan")
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return fd


def run(cfg: RestoreConfig, prepared: Plan | None = None,
        on_start: Callable[[Plan, list[str]], None] | None = None) -> RestoreOutcome:
    """Mount the view, run criu restore, unmount. `on_start(plan, argv)` is called once the
    view serves, right before criu starts (to print the summary)."""
    p = prepared or plan(cfg)
    criu = find_criu(cfg.env)
    clear_restores()
    base, held = _new_base()
    try:
        return _run(cfg, p, criu, base, held, on_start)
    finally:
        os.close(held)


def _run(cfg: RestoreConfig, p: Plan, criu: str, base: str, held: int,
         on_start: Callable[[Plan, list[str]], None] | None) -> RestoreOutcome:
    from ..fuse.daemon import MountConfig
    from ..fuse.spawn import spawn_background
    from ..host.mounts import unmount

    mountpoint = os.path.join(base, "view")
    os.mkdir(mountpoint)
    if cfg.work_dir:
        work = os.path.abspath(cfg.work_dir)
        os.makedirs(work, exist_ok=True)
    else:
        work = os.path.join(base, "work")
        os.mkdir(work)
    images = os.path.join(mountpoint, p.criu_dir) if p.criu_dir else mountpoint
    argv = criu_argv(criu, cfg.netns, images, work, cfg.criu_args, p.tcp_established_added,
                     cfg.foreground)
    nat_dir = os.path.join(base, "nat") if p.nat and cfg.nat_peer_netns else None
    if nat_dir is not None:
        argv += ["--action-script", natrestore.prepare(
            nat_dir, p.nat, list(cfg.nat_peer_netns), p.image_real, cfg.netns)]
    restore_log = os.path.join(work, "restore.log")
    outcome = RestoreOutcome(1, argv, work, restore_log, p.tcp_established_added)
    mounted = False
    ok = criu_ok = False
    with CriuSignals(cfg.stop_timeout) as sigs:
        try:
            plan_fd = _handover_fd(p.handover)
            mcfg = MountConfig(
                image_dir=p.image_real, mountpoint=mountpoint, maps=p.maps,
                map_files=list(cfg.map_files), netns=cfg.netns, iface=cfg.iface,
                strict=cfg.strict, tcp_outside=cfg.tcp_outside, serve=cfg.serve,
                port_offset=cfg.port_offset, no_port_check=True,
                log_file=os.path.join(work, "mount.log"),
                verbose=log.isEnabledFor(logging.DEBUG), env=dict(cfg.env), plan_fd=plan_fd)
            try:
                daemon_pid, _ = spawn_background(mcfg)
            finally:
                os.close(plan_fd)
            mounted = True
            log.info("view of %s on %s (daemon pid %d)", p.image_real, mountpoint, daemon_pid)
            if on_start is not None:
                on_start(p, argv)
            if sigs.signum == 0:
                log.info("running: %s", " ".join(argv))
                if cfg.foreground:
                    pidfile = user_pidfile(cfg.criu_args) or "restored.pid"
                    sigs.pidfile = os.path.join(work, pidfile)
                # a process group of its own (a terminal's ^C reaches us, and we decide),
                # except for a shell job, which criu restores into our terminal's session
                shell_job = any(a in ("-j", "--shell-job") for a in cfg.criu_args)
                # criu holds our dir too: a criu that outlives us keeps its view
                # (a shell job keeps our stdio: criu restores the terminal from it)
                to_err = cfg.stdout_is_ours and not shell_job
                sigs.child = subprocess.Popen(argv, cwd=work, env=dict(cfg.env),
                                              process_group=None if shell_job else 0,
                                              pass_fds=(held,),
                                              stdout=sys.stderr.fileno() if to_err else None)
                rc = sigs.wait()
                outcome.exit_code = 128 - rc if rc < 0 else rc
                ok = criu_ok = rc == 0
            else:
                outcome.exit_code = 128 + sigs.signum
                log.error("%s: restore interrupted before criu ran",
                          signal.Signals(sigs.signum).name)
            outcome.signal = sigs.signum
        finally:
            if sigs.child is not None and sigs.child.poll() is None:  # an exception above
                sigs.child.kill()
                sigs.child.wait()
            if nat_dir is not None:  # the table stays only with a detached service running
                outcome.nat_kept = natrestore.finish(nat_dir, criu_ok and not cfg.foreground)
            if mounted:
                try:
                    unmount(mountpoint)
                    _reap(daemon_pid)  # it ends once unmounted: no daemon outlives us
                except InetskError as e:
                    log.error("%s (the view stays mounted; `overlayfs-inetsk umount %s`)",
                              e, mountpoint)
                    ok = False
            elif os.path.ismount(mountpoint):  # cannot happen, but never leave a mount
                with contextlib.suppress(InetskError):
                    unmount(mountpoint)
            if not os.path.ismount(mountpoint):
                _rmdir(mountpoint)
            # kept for its logs after a failure, not after a stop the user asked for
            if (ok or sigs.signum) and not cfg.work_dir:
                shutil.rmtree(work, ignore_errors=True)
                outcome.work_dir = outcome.log = None
            if not os.path.ismount(mountpoint):
                _rmdir(base)  # empty unless the work dir is kept in it
            if not ok and (sigs.child is None or criu_ok) and outcome.work_dir is not None:
                log.warning("work dir kept: %s", work)
    if sigs.child is not None and not criu_ok and outcome.work_dir is None:
        log.error("restore stopped by %s (criu exit %d)",
                  signal.Signals(sigs.signum).name if sigs.signum else "a signal",
                  outcome.exit_code)
    elif sigs.child is not None and not criu_ok and not os.path.exists(restore_log):
        # criu (or nsenter) stopped before opening its log: a bad option, a missing netns
        outcome.log = None
        log.error("criu restore failed (exit %d) before it wrote its log (its message is "
                  "above); work dir kept: %s", outcome.exit_code, work)
    elif sigs.child is not None and not criu_ok:
        log.error("criu restore failed (exit %d); log: %s; work dir kept: %s",
                  outcome.exit_code, restore_log, work)
    return outcome


def _reap(pid: int, timeout: float = 10.0) -> None:
    """Wait for our child `pid` (the view's daemon) to exit; a warning if it does not."""
    end = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done or time.monotonic() >= end:
            if not done:
                log.warning("the view's daemon %d is still running after unmount", pid)
            return
        time.sleep(0.02)


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass
