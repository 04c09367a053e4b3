"""A barrier for restoring a group of checkpoints whose members hold TCP connections to each
other: no member's sockets go live before every member's sockets exist (docs/tcp.md).

Run as a CRIU action script. CRIU 4.2.1 runs `post-restore` once every task of the restore
has its files (sockets in TCP repair mode, bound and connected, sending nothing) and
before it switches the tasks to the stage in which they turn repair off (which sends a
window probe to the peer) and resume (the app sends). A member waiting there cannot be
reset by a host whose member is not back yet, and when it goes on, the peer's socket
already exists. `network-unlock` runs at almost the same point but only when the restore
includes a network namespace, so it is not the default.

The barrier is a directory every member can reach (local, or a shared filesystem with
atomic exclusive create and link: NFSv3+, CephFS, ...):

    DIR/<name>.arrived    made (O_EXCL) by each member when it reaches the barrier
    DIR/outcome           made once, atomically (link(2) of a complete temp file):
                          "released" by whoever sees every member arrived, or
                          "aborted: <reason>" by a member that gave up waiting
    DIR/<name>.passed     written by a member when it goes on

Whoever makes `outcome` first decides for everyone, so members never disagree: either all
go on, or every member that has not gone on yet fails (its restore is aborted by CRIU,
its tasks killed). A directory serves one group restore; a name that already arrived is
an error (a stale directory).

Pure but for the filesystem and the clock. The action script that waits here and locks
the connections around it (node/tcplock.py) is app/barrier.py; the CLI, cli/group.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import BarrierError

ACTIONS = ("pre-restore", "post-setup-namespaces", "post-restore", "network-unlock",
           "pre-resume", "post-resume")
DEFAULT_ACTION = "post-restore"
DEFAULT_TIMEOUT = 60.0
ENV_ACTION = "CRTOOLS_SCRIPT_ACTION"
OUTCOME = "outcome"
RELEASED = "released"
ABORTED = "aborted"


@dataclass(frozen=True)
class Passed:
    name: str
    members: int
    waited: float  # seconds from arriving to going on


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or name == OUTCOME or "\n" in name:
        raise BarrierError(f"bad member name {name!r}")


def arrived(directory: str) -> list[str]:
    """The names of the members that reached the barrier, sorted."""
    try:
        names = os.listdir(directory)
    except OSError as exc:
        raise BarrierError(f"barrier dir {directory}: {exc.strerror}") from None
    return sorted(n[: -len(".arrived")] for n in names if n.endswith(".arrived"))


def read_outcome(directory: str) -> str | None:
    try:
        with open(os.path.join(directory, OUTCOME)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def decide(directory: str, text: str, name: str) -> str:
    """Make DIR/outcome hold `text` unless it exists; return what it holds. Atomic: the file
    appears whole (link of a complete temp file), and only the first writer wins."""
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.outcome")
    with open(tmp, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, os.path.join(directory, OUTCOME))
    except FileExistsError:
        pass
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    got = read_outcome(directory)
    if got is None:  # pragma: no cover - outcome removed under us
        raise BarrierError(f"barrier dir {directory}: {OUTCOME} vanished")
    return got


def arrive(directory: str, name: str) -> None:
    _check_name(name)
    path = os.path.join(directory, f"{name}.arrived")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise BarrierError(f"{path} exists: member {name!r} already arrived (a barrier dir "
                           "serves one group restore: use a fresh one)") from None
    except OSError as exc:
        raise BarrierError(f"barrier dir {directory}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"pid={os.getpid()} host={socket.gethostname()} time={time.time():.6f}\n")


def wait(directory: str, name: str, members: int, timeout: float = DEFAULT_TIMEOUT,
         poll: float = 0.01, clock: Callable[[], float] = time.monotonic,
         sleep: Callable[[float], None] = time.sleep) -> Passed:
    """Arrive as `name`, then wait until all `members` arrived (Passed) or the group is
    aborted / `timeout` seconds pass (BarrierError naming who is missing)."""
    if members < 1:
        raise BarrierError(f"--members must be at least 1, got {members}")
    if not os.path.isdir(directory):
        raise BarrierError(f"barrier dir {directory} does not exist")
    start = clock()
    outcome = read_outcome(directory)
    if outcome is not None:
        raise BarrierError(f"member {name}: group already {outcome} (barrier dir "
                           f"{directory}: a barrier dir serves one group restore)")
    arrive(directory, name)
    deadline = start + timeout
    while True:
        if outcome is None:
            outcome = read_outcome(directory)
        if outcome is None:
            here = arrived(directory)
            if len(here) > members:
                outcome = decide(directory, f"{ABORTED}: {len(here)} members arrived "
                                 f"({', '.join(here)}), more than --members {members}", name)
            elif len(here) == members:
                outcome = decide(directory, RELEASED, name)
            elif clock() >= deadline:
                outcome = decide(directory, f"{ABORTED}: {name} gave up after {timeout:g} s "
                                 f"with {len(here)} of {members} members arrived "
                                 f"({', '.join(here)})", name)
        if outcome is not None:
            break
        sleep(poll)
    waited = clock() - start
    if outcome != RELEASED:
        raise BarrierError(f"member {name}: group {outcome}")
    with contextlib.suppress(OSError), open(os.path.join(directory, f"{name}.passed"), "w") as f:
        f.write(f"time={time.time():.6f} waited={waited:.3f}\n")
    return Passed(name, members, waited)


SCRIPT_TEMPLATE = """#!/bin/sh
# CRIU action script made by `overlayfs-inetsk barrier-script`: group restore barrier.
# CRIU runs it (with no arguments) at every action; it waits at {action}{lock_doc}.
# Python starts only for those actions (and when run by hand: it just waits).
case "$CRTOOLS_SCRIPT_ACTION" in
""|{actions})
    exec {python} -m overlayfs_inetsk.cli barrier --dir {dir} --members {members} \\
        --name {name} --timeout {timeout:g} --action {action}{lock} ;;
esac
"""
LOCK_DOC = """, and locks the
# image's TCP connections where the restored sockets live: at pre-restore in criu's network
# namespace, or at post-setup-namespaces in the restored tasks' own (runc), removed at
# network-unlock"""
LOCK_ACTIONS = ("pre-restore", "post-setup-namespaces", "network-unlock")


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def write_script(path: str, directory: str, name: str, members: int,
                 timeout: float = DEFAULT_TIMEOUT, action: str = DEFAULT_ACTION,
                 python: str | None = None, lock_connections: bool = True) -> str:
    """Write an executable action script for `criu restore --action-script PATH` (CRIU
    runs an action script without arguments, so the barrier's settings live in it)."""
    _check_name(name)
    if action not in ACTIONS:
        raise BarrierError(f"--action {action!r}: one of {', '.join(ACTIONS)}")
    if members < 1:
        raise BarrierError(f"--members must be at least 1, got {members}")
    actions = sorted({action, *(LOCK_ACTIONS if lock_connections else ())},
                     key=ACTIONS.index)
    text = SCRIPT_TEMPLATE.format(
        python=_sh_quote(python or sys.executable), dir=_sh_quote(os.path.abspath(directory)),
        members=members, name=_sh_quote(name), timeout=timeout, action=action,
        actions="|".join(actions), lock_doc=LOCK_DOC if lock_connections else "",
        lock="" if lock_connections else " --no-lock")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise BarrierError(f"{path}: {exc.strerror or errno.errorcode.get(exc.errno or 0)}"
                           ) from None
    return os.path.abspath(path)
