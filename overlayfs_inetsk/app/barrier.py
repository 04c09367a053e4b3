"""The group barrier as a CRIU action script: lock the image's TCP connections where the
restored sockets will live (node/tcplock.py), wait at the chosen action (node/barrier.py),
and on a failure remove the lock before CRIU aborts the restore (docs/tcp.md). The
connections are the view's, as the planner reads them (purpose "barrier": the map is
empty, an outside `parent` link is a warning).

Where the sockets live is what CRIU decides from the images (core/netnsmask.py):

- in criu's own network namespace (`criu restore` run inside the target namespace): lock
  there at `pre-restore` (the last action before the sockets exist); CRIU's network unlock
  deletes the rules, right after `post-restore`;
- in a namespace of their own (runc, and so Podman and containerd, hands criu the
  container's new one; criu runs in the host's): lock at `post-setup-namespaces` in the
  namespace of the restored root task (CRTOOLS_INIT_PID, set from `setup-namespaces` on;
  the task is in its namespace by then, and no socket exists before the tasks fork, after
  this action); CRIU's unlock does not delete these rules, so the script does at
  `network-unlock` (the action CRIU runs instead, at the same point). Nothing is put into
  criu's own namespace (the host's, under runc).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import BarrierError, ImageError
from ..node.barrier import ACTIONS, DEFAULT_ACTION, DEFAULT_TIMEOUT, ENV_ACTION, Passed, wait
from ..node.tcplock import Conn, _load_locked, _save_locked, _unlock_after, lock, unlock

LOCK_ACTION = "pre-restore"
NETNS_LOCK_ACTION = "post-setup-namespaces"
NETNS_UNLOCK_ACTION = "network-unlock"
ENV_IMAGE_DIR = "CRTOOLS_IMAGE_DIR"
ENV_INIT_PID = "CRTOOLS_INIT_PID"


@dataclass(frozen=True)
class Locked:
    """What one action did to the lock: `conns` locked (unlocked: removed), in the
    namespace `netns` of the restored tasks ("net:[INODE]"; None: the script's own)."""

    conns: list[Conn]
    netns: str | None
    unlocked: bool = False


@dataclass(frozen=True)
class Deferred:
    """At pre-restore: the tasks get a network namespace of their own, locked later."""


def image_connections(image_dir: str) -> list[Conn]:
    """The 4-tuples of every TCP socket with a peer in the checkpoint(s) under image_dir, as
    the images say (for a view: after the rewrite). Sockets the rewrite closed are in state
    CLOSE and not listed."""
    from ..core.addrmap import AddressMap
    from ..core.sockaddr import SOCK_STREAM, TCP_CONNECTED_STATES, TCP_TIME_WAIT
    from ..host.files import check_image_dir
    from ..planner.planner import Planner

    out: list[Conn] = []
    results = Planner(AddressMap()).plan(check_image_dir(image_dir), "barrier").results
    for res in results.values():
        for r in res.reports:
            s = r.sock
            if (s.type != SOCK_STREAM or s.state not in TCP_CONNECTED_STATES
                    or s.state == TCP_TIME_WAIT):
                continue
            src, dst = s.src, s.dst
            v4src, v4dst = getattr(src, "ipv4_mapped", None), getattr(dst, "ipv4_mapped", None)
            if v4src is not None and v4dst is not None:  # CRIU locks these with iptables
                src, dst = v4src, v4dst
            conn = (src.version, str(src), r.sport, str(dst), r.dport)
            if conn not in out:
                out.append(conn)
    return out


def _read(image_dir: str, name: str) -> bytes:
    path = os.path.join(image_dir, name)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ImageError(path, exc.strerror or str(exc)) from None


def tasks_own_netns(image_dir: str) -> bool:
    """Whether CRIU restores the tasks of the checkpoint in image_dir in a network
    namespace other than its own (core/netnsmask.py)."""
    from ..core import netnsmask

    pid = netnsmask.root_pid(_read(image_dir, "pstree.img"), f"{image_dir}/pstree.img")
    ids = f"ids-{pid}.img"
    return netnsmask.tasks_own_netns(_read(image_dir, "inventory.img"),
                                     f"{image_dir}/inventory.img",
                                     _read(image_dir, ids), f"{image_dir}/{ids}")


def _task_netns(environ: Mapping[str, str]) -> tuple[int, str, str]:
    """(pid, /proc/PID/ns/net, net:[INODE]) of the restored root task."""
    raw = environ.get(ENV_INIT_PID, "")
    if not raw.isdigit() or int(raw) < 1:
        raise BarrierError(f"{ENV_ACTION}={environ.get(ENV_ACTION)} but {ENV_INIT_PID} is "
                           f"{raw or 'not set'!r}: not the restored root task's pid")
    path = f"/proc/{int(raw)}/ns/net"
    try:
        return int(raw), path, os.readlink(path)
    except OSError as exc:
        raise BarrierError(f"{path}: {exc.strerror} (the restored root task, "
                           f"{ENV_INIT_PID}={raw})") from None


def _where(environ: Mapping[str, str], recorded: tuple[int, str] | None
           ) -> str | None:
    """The namespace path our recorded lock is in (None: our own), checked to be it."""
    if recorded is None:
        return None
    pid, path, ident = _task_netns(environ)
    if (pid, ident) != recorded:
        raise BarrierError(f"the lock was put into task {recorded[0]}'s network namespace "
                           f"{recorded[1]}, but {ENV_INIT_PID}={pid} is in {ident}")
    return path


def _unlock_recorded(directory: str, name: str,
                     environ: Mapping[str, str]) -> Locked:
    conns, recorded = _load_locked(directory, name)
    if conns:
        unlock(conns, netns=_where(environ, recorded))
    with contextlib.suppress(OSError), \
            open(os.path.join(directory, f"{name}.unlocked"), "w") as f:
        f.write(f"time={time.time():.6f} conns={len(conns)}\n")
    return Locked(conns, None if recorded is None else recorded[1], unlocked=True)


def _lock(directory: str, name: str, environ: Mapping[str, str],
          current: str) -> Locked | Deferred | None:
    """The lock step of `current` (pre-restore or post-setup-namespaces), if it has one."""
    image_dir = environ.get(ENV_IMAGE_DIR)
    if not image_dir:
        raise BarrierError(f"{ENV_ACTION}={current} but {ENV_IMAGE_DIR} is not set")
    if not os.path.isdir(directory):
        raise BarrierError(f"barrier dir {directory} does not exist")
    own = tasks_own_netns(image_dir)
    if current == LOCK_ACTION:
        if own:
            return Deferred()
        return _locked(directory, name, lock(image_connections(image_dir)), None, None)
    if not own:
        return None
    pid, path, ident = _task_netns(environ)
    return _locked(directory, name, lock(image_connections(image_dir), netns=path), path,
                   (pid, ident))


def _locked(directory: str, name: str, added: list[Conn], path: str | None,
            where: tuple[int, str] | None) -> Locked:
    """Record the rules added (NAME.locked); if that fails, remove them and raise."""
    try:
        _save_locked(directory, name, added, where)
    except OSError as exc:
        err = BarrierError(f"{directory}/{name}.locked: {exc.strerror}")
        _unlock_after(added, err, path)
        raise err from None
    return Locked(added, None if where is None else where[1])


def run_action(directory: str, name: str, members: int, timeout: float = DEFAULT_TIMEOUT,
               action: str = DEFAULT_ACTION, env: dict[str, str] | None = None,
               lock_connections: bool = True) -> list[Passed | Locked | Deferred]:
    """The action-script entry; returns what it did, in order. With lock_connections: lock
    at pre-restore or post-setup-namespaces (see the module's doc), unlock at
    network-unlock what was locked in the tasks' namespace. At `action`, wait at the
    barrier (on failure remove our lock rules, then raise). Nothing for any other action.
    With CRTOOLS_SCRIPT_ACTION unset (run by hand) just wait."""
    if action not in ACTIONS:
        raise BarrierError(f"--action {action!r}: one of {', '.join(ACTIONS)}")
    environ = os.environ if env is None else env
    current = environ.get(ENV_ACTION)
    if current is None:
        return [wait(directory, name, members, timeout)]
    done: list[Passed | Locked | Deferred] = []
    locking = lock_connections and action != LOCK_ACTION
    if locking and current in (LOCK_ACTION, NETNS_LOCK_ACTION):
        step = _lock(directory, name, environ, current)
        if step is not None:
            done.append(step)
    if current == action:
        try:
            done.append(wait(directory, name, members, timeout))
        except BarrierError as exc:
            if locking:
                conns, recorded = _load_locked(directory, name)
                try:
                    _unlock_after(conns, exc, _where(environ, recorded))
                except BarrierError as more:
                    exc.args = (f"{exc}; and {more}",)
            raise
    if locking and current == NETNS_UNLOCK_ACTION:
        done.append(_unlock_recorded(directory, name, environ))
    return done
