"""`overlayfs-inetsk restore`: restore a shared checkpoint on this node in one command.
Long: one sequence (plan, mount, criu, unmount) and the signal handling around it.

    sweep     clear what a restore killed with SIGKILL left (node/stale.py)
    plan      the rewrite of every socket (what the summary shows; a refused socket or a
              --strict violation stops here, before anything is mounted)
    mount     a view of IMAGE_DIR on a temporary mountpoint,
              /run/overlayfs-inetsk/restore/<our pid>-XXXX/view (the `mount` daemon,
              detached, its log in the work dir)
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
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InetskError, RestoreError
from . import natrestore
from .criu import CRIU_DEFAULT, find_criu  # noqa: F401 (find_criu: the restore API)
from .stale import RESTORE_DIR, clear_stale

log = logging.getLogger(__name__)

DEFAULT_MAP = "local=auto"
# criu options restore sets itself: a second value would point criu elsewhere
RESERVED_CRIU_OPTIONS = ("-D", "--images-dir", "-W", "--work-dir", "-o", "--log-file")
TCP_OPTIONS = ("--tcp-established", "--tcp-close")
DETACH_OPTIONS = ("-d", "--restore-detached", "--daemon")
# --foreground: seconds between the stop signal passed on to the restored root task and its
# SIGKILL (`podman stop`'s default; a pid-namespace init without a handler ignores SIGTERM)
STOP_TIMEOUT = 10.0
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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
    nat_peer_netns: Sequence[str] = ()  # fate nat: apply the peers' table there (natrestore)
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


@dataclass
class RestoreOutcome:
    exit_code: int
    argv: list[str]
    work_dir: str | None  # None once removed
    log: str | None
    tcp_established_added: bool
    signal: int = 0
    nat_kept: bool = False  # the peers' NAT table stays (fate nat, criu resumed detached)


def criu_subdir(image_real: str) -> str:
    """Where inventory.img is: '' (a plain CRIU dir) or 'checkpoint' (an extracted Podman or
    CRI-O checkpoint archive)."""
    for rel in ("", "checkpoint"):
        if os.path.isfile(os.path.join(image_real, rel, "inventory.img")):
            return rel
    raise RestoreError(f"{image_real}: no inventory.img (nor checkpoint/inventory.img): "
                       "not a CRIU image dir")


def has_tcp_stream(criu_dir: str) -> bool:
    try:
        return any(n.startswith("tcp-stream-") and n.endswith(".img")
                   for n in os.listdir(criu_dir))
    except OSError:
        return False


def effective_maps(maps: Sequence[str], map_files: Sequence[str],
                   env: Mapping[str, str]) -> tuple[list[str], bool]:
    """The --map rules to use and whether `local=auto` was defaulted: with no --map, no
    --map-file and no INETSK_LOCAL_IPV4/6, every local address moves to this node's."""
    if maps or map_files or env.get("INETSK_LOCAL_IPV4") or env.get("INETSK_LOCAL_IPV6"):
        return list(maps), False
    return [DEFAULT_MAP], True


def check_criu_args(args: Sequence[str], foreground: bool = False) -> None:
    for a in args:
        name = a.split("=", 1)[0] if a.startswith("--") else a[:2]
        if name in RESERVED_CRIU_OPTIONS:
            raise RestoreError(f"criu option {a!r}: restore sets -D, -W and -o itself "
                               "(use --work-dir for the work dir)")
        if foreground and a in DETACH_OPTIONS:
            raise RestoreError(f"criu option {a!r} detaches: it contradicts --foreground")


def user_pidfile(args: Sequence[str]) -> str | None:
    """The --pidfile given among criu's options, if any (relative to the work dir)."""
    for i, a in enumerate(args):
        if a == "--pidfile" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--pidfile="):
            return a.split("=", 1)[1]
    return None


def criu_argv(criu: str, netns: str | None, images: str, work: str,
              extra: Sequence[str], tcp_established: bool, foreground: bool = False
              ) -> list[str]:
    argv = [] if netns is None else ["nsenter", f"--net={netns}", "--"]
    argv += [criu, "restore", "-D", images, "-W", work, "-o", os.path.join(work, "restore.log"),
             "-v4"]
    if not foreground and not any(a in DETACH_OPTIONS for a in extra):
        argv.append("-d")
    if foreground and user_pidfile(extra) is None:
        argv += ["--pidfile", os.path.join(work, "restored.pid")]
    if tcp_established:
        argv.append("--tcp-established")
    return argv + list(extra)


@dataclass
class Plan:
    image_real: str
    criu_dir: str  # relative to the image dir: '' or 'checkpoint'
    amap: Any
    results: dict[str, Any]
    maps: list[str]
    map_defaulted: bool
    tcp_established_added: bool
    ports_taken: list[Any] = field(default_factory=list)  # portcheck.Clash, warned about
    nat: list[Any] = field(default_factory=list)  # core.natrules.NatConn: fate nat


def plan(cfg: RestoreConfig) -> Plan:
    """Everything that can fail for a user reason, before anything is mounted."""
    from ..core.addrmap import AddressMap
    from ..core.decide import RewriteOptions
    from ..core.imagedir import check_image_dir
    from ..core.natrules import nat_connections
    from ..core.plan import merged, plan_tree, raise_problems
    from ..core.tree import ImageTree
    from .nodeaddr import check_netns, make_resolver
    from .portcheck import check_plan

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
    maps, defaulted = effective_maps(cfg.maps, cfg.map_files, cfg.env)
    amap = AddressMap.from_args(maps, cfg.map_files, env=cfg.env, port_offset=cfg.port_offset)
    options = RewriteOptions(strict=cfg.strict, tcp_outside=cfg.tcp_outside)
    resolver = make_resolver(cfg.netns, cfg.iface) if amap.auto_families() else None
    results = merged(plan_tree(ImageTree.build(image_real), amap, resolver, options))
    raise_problems(results, options)
    # a port the restore binds that is taken there: named now, not by CRIU halfway through
    taken = check_plan(results, cfg.netns, cfg.strict, log.warning)
    add_tcp = (has_tcp_stream(os.path.join(image_real, sub))
               and not any(a in TCP_OPTIONS for a in cfg.criu_args))
    nat = nat_connections(r for res in results.values() for r in res.reports)
    return Plan(image_real, sub, amap, results, maps, defaulted, add_tcp, taken, nat)


class _Signals:
    """While installed: SIGINT/SIGTERM/SIGHUP are passed on to criu while it runs (with
    `pidfile`, a foreground restore: to the restored root task named there, once criu wrote
    it); before that they are noted and acted on at the next step (never raised in the
    middle of starting the view, which could leave a mount nobody unmounts)."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.pidfile: str | None = None
        self.signum = 0
        self.kill_at: float | None = None  # when to SIGKILL the root task that was signalled
        self.root = 0
        self._prev: dict[int, Any] = {}

    def _root_pid(self) -> int | None:
        if self.pidfile is None:
            return None
        try:
            with open(self.pidfile, encoding="ascii") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None  # not restored yet

    def _handle(self, signum: int, _frame: object) -> None:
        self.signum = signum
        if self.child is not None and self.child.poll() is None:
            name = signal.Signals(signum).name
            root = self._root_pid()
            if root is not None:
                try:
                    os.kill(root, signum)
                    log.info("%s: passed on to the restored root task %d (SIGKILL in %.0f s "
                             "if it is still there)", name, root, STOP_TIMEOUT)
                    self.root = root
                    if self.kill_at is None:
                        self.kill_at = time.monotonic() + STOP_TIMEOUT
                    return
                except ProcessLookupError:
                    pass
            log.info("%s: passed on to criu", name)
            self.child.send_signal(signum)

    def wait(self) -> int:
        """Wait for criu; SIGKILL the signalled root task when STOP_TIMEOUT has passed."""
        assert self.child is not None
        while True:
            try:
                return self.child.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                if self.kill_at is not None and time.monotonic() >= self.kill_at:
                    self.kill_at = float("inf")
                    log.warning("the restored root task %d did not stop within %.0f s: "
                                "SIGKILL", self.root, STOP_TIMEOUT)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.root, signal.SIGKILL)

    def __enter__(self) -> _Signals:
        try:
            for s in SIGNALS:
                self._prev[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._prev.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._prev.items():
            signal.signal(s, h)


def run(cfg: RestoreConfig, prepared: Plan | None = None,
        on_start: Callable[[Plan, list[str]], None] | None = None) -> RestoreOutcome:
    """Mount the view, run criu restore, unmount. `on_start(plan, argv)` is called once the
    view serves, right before criu starts (to print the summary)."""
    from ..fuse.daemon import MountConfig
    from ..fuse.robind import unmount
    from ..fuse.spawn import spawn_background

    p = prepared or plan(cfg)
    criu = find_criu(cfg.env)
    clear_stale()
    os.makedirs(RESTORE_DIR, mode=0o700, exist_ok=True)
    base = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=RESTORE_DIR)
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
    with _Signals() as sigs:
        try:
            mcfg = MountConfig(
                image_dir=p.image_real, mountpoint=mountpoint, maps=p.maps,
                map_files=list(cfg.map_files), netns=cfg.netns, iface=cfg.iface,
                strict=cfg.strict, tcp_outside=cfg.tcp_outside, serve=cfg.serve,
                port_offset=cfg.port_offset, no_port_check=True,
                log_file=os.path.join(work, "mount.log"),
                verbose=log.isEnabledFor(logging.DEBUG), env=dict(cfg.env))
            daemon_pid, _ = spawn_background(mcfg)
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
                sigs.child = subprocess.Popen(argv, cwd=work, env=dict(cfg.env),
                                              process_group=None if shell_job else 0)
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


def render_json(p: Plan, cfg: RestoreConfig, out: RestoreOutcome) -> str:
    """`restore --json`: inspect's document (docs/json.md) plus what restore did."""
    from ..core.render import render_json as inspect_json

    doc = json.loads(inspect_json(p.image_real, p.amap, p.results, p.ports_taken))
    doc["netns"] = cfg.netns
    doc["map_defaulted"] = p.map_defaulted
    doc["restore"] = {
        "exit_code": out.exit_code,
        "criu_argv": out.argv,
        "tcp_established_added": out.tcp_established_added,
        "work_dir": out.work_dir,
        "log": out.log,
        "signal": signal.Signals(out.signal).name if out.signal else None,
        "nat_peer_netns": list(cfg.nat_peer_netns),
        "nat_kept": out.nat_kept,
    }
    return json.dumps(doc, indent=2) + "\n"
