"""A barrier for restoring a group of checkpoints whose members hold TCP connections to each
other: no member's sockets go live before every member's sockets exist (docs/tcp.md).
Long: the barrier protocol (arrive, release, abort) and the TCP lock around it are one
state machine on one directory; split, neither half could be read alone.

Run as a CRIU action script. CRIU 4.2.1 runs `post-restore` once every task of the restore
has its files (sockets in TCP repair mode, bound and connected, sending nothing) and
before it switches the tasks to the stage in which they turn repair off (which sends a
window probe to the peer) and resume (the app sends). A member waiting there cannot be
reset by a host whose member is not back yet, and when it goes on, the peer's socket
already exists. `network-unlock` runs at almost the same point but only when the restore
includes a network namespace, so it is not the default.

Waiting at post-restore is not enough on its own: CRIU restores a socket's not-yet-sent data
by turning repair off and sending it for real, while the socket is being restored, long
before post-restore (soccr.c, "not-sent send queue data"). A member restored first that
holds such data sends it to a host whose member is not back: that host answers with a
reset (seen: the second restore then failed with "Can't restore not-sent send queue data
... Connection reset by peer"). So at `pre-restore` (files.img is read by then; the script
reads the view CRIU restores from, CRTOOLS_IMAGE_DIR) the barrier script also LOCKS every
connection of the image with the very iptables rules CRIU's own dump-time lock uses
(DROP in INPUT and OUTPUT for the 4-tuple, except packets marked 0xC114, which CRIU's
own FIN injection uses). Nothing leaves or enters the connection during the restore.
CRIU 4.2.1 removes exactly these rules itself at network unlock ("Unlock network before
disabling repair mode on sockets"), which comes right after post-restore: after every
member has arrived. Whatever the rules dropped is retransmitted by TCP. When the barrier
fails, the script removes the rules it added before CRIU aborts the restore.

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

Pure but for the filesystem and the clock; the CLI adapter is in cli/group.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
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


# ------------------------------------------------------------------ connection lock
SOCCR_MARK = "0xC114"  # CRIU's mark for its own packets (soccr.h), let through the lock
LOCK_ACTION = "pre-restore"
ENV_IMAGE_DIR = "CRTOOLS_IMAGE_DIR"

Conn = tuple[int, str, int, str, int]  # (4 or 6, src, sport, dst, dport)


def image_connections(image_dir: str) -> list[Conn]:
    """The 4-tuples of every TCP socket with a peer in the checkpoint(s) under image_dir, as
    the images say (for a view: after the rewrite). Sockets the rewrite closed are in state
    CLOSE and not listed."""
    from ..core.addrmap import AddressMap
    from ..core.imagedir import check_image_dir
    from ..core.plan import merged, plan_tree
    from ..core.sockaddr import SOCK_STREAM, TCP_CONNECTED_STATES, TCP_TIME_WAIT
    from ..core.tree import ImageTree

    out: list[Conn] = []
    tree = ImageTree.build(check_image_dir(image_dir))
    results = merged(plan_tree(tree, AddressMap.from_args([])))
    for res in results.values():
        for r in res.reports:
            if (r.type != SOCK_STREAM or r.state not in TCP_CONNECTED_STATES
                    or r.state == TCP_TIME_WAIT):
                continue
            src, dst = r.src, r.dst
            v4src, v4dst = getattr(src, "ipv4_mapped", None), getattr(dst, "ipv4_mapped", None)
            if v4src is not None and v4dst is not None:  # CRIU locks these with iptables
                src, dst = v4src, v4dst
            conn = (src.version, str(src), r.sport, str(dst), r.dport)
            if conn not in out:
                out.append(conn)
    return out


def lock_rules(conn: Conn) -> list[list[str]]:
    """CRIU's per-connection lock (netfilter.c IPTABLES_CONN_CMD), without the command
    and the -I/-D/-C: INPUT drops what comes from the peer, OUTPUT what goes to it."""
    version, src, sport, dst, dport = conn
    common = ["-t", "filter"]
    mark = ["--protocol", "tcp", "-m", "mark", "!", "--mark", SOCCR_MARK]
    return [
        [*common, "INPUT", *mark, "--source", dst, "--sport", str(dport),
         "--destination", src, "--dport", str(sport), "-j", "DROP"],
        [*common, "OUTPUT", *mark, "--source", src, "--sport", str(sport),
         "--destination", dst, "--dport", str(dport), "-j", "DROP"],
    ]


def _iptables(version: int, op: str, rule: list[str]) -> subprocess.CompletedProcess[str]:
    cmd = "iptables" if version == 4 else "ip6tables"
    chain_at = rule.index("filter") + 1
    argv = [cmd, "-w", *rule[:chain_at], op, *rule[chain_at:]]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BarrierError(f"{' '.join(argv)}: {exc}") from None


def lock(conns: list[Conn]) -> list[Conn]:
    """Add CRIU's lock rules for each connection (in this process's network namespace)
    unless present; returns the connections whose rules were added."""
    added: list[Conn] = []
    try:
        for conn in conns:
            fresh = False
            for rule in lock_rules(conn):
                if _iptables(conn[0], "-C", rule).returncode == 0:
                    continue
                cp = _iptables(conn[0], "-I", rule)
                if cp.returncode != 0:
                    raise BarrierError(f"cannot lock {_fmt(conn)}: {cp.stderr.strip()}")
                fresh = True
            if fresh:
                added.append(conn)
    except BarrierError as exc:
        _unlock_after(added, exc)
        raise
    return added


def _restore(version: int, batch: str) -> subprocess.CompletedProcess[str]:
    argv = ["iptables-restore" if version == 4 else "ip6tables-restore", "-w", "--noflush"]
    try:
        return subprocess.run(argv, input=batch, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BarrierError(f"{' '.join(argv)}: {exc}") from None


def unlock(conns: list[Conn], missing_ok: bool = False) -> None:
    """Remove the lock rules of each connection: the rules present are deleted in one
    atomic `iptables-restore --noflush` batch per family. Every rule that was not there
    (unless missing_ok) or could not be deleted is reported (BarrierError, one line) after
    the others are gone."""
    problems: list[str] = []
    for version in (4, 6):
        cmd = "iptables" if version == 4 else "ip6tables"
        present: list[tuple[Conn, list[str]]] = []
        for conn in (c for c in conns if c[0] == version):
            for rule in lock_rules(conn):
                cp = _iptables(version, "-C", rule)
                if cp.returncode == 0:
                    present.append((conn, rule))
                elif not missing_ok:
                    why = cp.stderr.strip().splitlines()[-1:] or [f"exit {cp.returncode}"]
                    problems.append(f"{rule[2]} rule of {_fmt(conn)} not present ({why[0]})")
        if not present:
            continue
        batch = "*filter\n" + "".join(
            "-D " + " ".join(rule[2:]) + "\n" for _, rule in present) + "COMMIT\n"
        cp = _restore(version, batch)
        if cp.returncode != 0:
            left = [f"{rule[2]} of {_fmt(conn)}" for conn, rule in present
                    if _iptables(version, "-C", rule).returncode == 0]
            problems.append(f"{cmd}-restore failed ({' '.join(cp.stderr.split())}); rules "
                            f"left: {', '.join(left) or 'none'}")
    if problems:
        raise BarrierError("unlock: " + "; ".join(problems))


def _unlock_after(conns: list[Conn], exc: BarrierError) -> None:
    """Unlock on a failure path: a failure of the unlock is added to the error raised."""
    try:
        unlock(conns)
    except BarrierError as more:
        exc.args = (f"{exc}; and {more}",)


def _fmt(conn: Conn) -> str:
    v, src, sport, dst, dport = conn

    def f(a: str, p: int) -> str:
        return f"[{a}]:{p}" if v == 6 else f"{a}:{p}"
    return f"{f(src, sport)} -> {f(dst, dport)}"


def _locked_path(directory: str, name: str) -> str:
    return os.path.join(directory, f"{name}.locked")


def _save_locked(directory: str, name: str, conns: list[Conn]) -> None:
    with open(_locked_path(directory, name), "w") as f:
        for c in conns:
            f.write(" ".join(str(x) for x in c) + "\n")


def _load_locked(directory: str, name: str) -> list[Conn]:
    try:
        with open(_locked_path(directory, name)) as f:
            rows = [line.split() for line in f if line.strip()]
    except FileNotFoundError:
        return []
    return [(int(r[0]), r[1], int(r[2]), r[3], int(r[4])) for r in rows]


def run_action(directory: str, name: str, members: int, timeout: float = DEFAULT_TIMEOUT,
               action: str = DEFAULT_ACTION, env: dict[str, str] | None = None,
               lock_connections: bool = True) -> Passed | list[Conn] | None:
    """The action-script entry. At `pre-restore` (with lock_connections) lock the image's
    connections (returns them); at `action` wait at the barrier (returns Passed; on failure
    remove our lock rules, then raise); do nothing (None) for every other action. With
    CRTOOLS_SCRIPT_ACTION unset (run by hand) just wait."""
    if action not in ACTIONS:
        raise BarrierError(f"--action {action!r}: one of {', '.join(ACTIONS)}")
    environ = os.environ if env is None else env
    current = environ.get(ENV_ACTION)
    if lock_connections and current == LOCK_ACTION and action != LOCK_ACTION:
        image_dir = environ.get(ENV_IMAGE_DIR)
        if not image_dir:
            raise BarrierError(f"{ENV_ACTION}={current} but {ENV_IMAGE_DIR} is not set")
        if not os.path.isdir(directory):
            raise BarrierError(f"barrier dir {directory} does not exist")
        added = lock(image_connections(image_dir))
        _save_locked(directory, name, added)
        return added
    if current is not None and current != action:
        return None
    try:
        return wait(directory, name, members, timeout)
    except BarrierError as exc:
        if current is not None:
            _unlock_after(_load_locked(directory, name), exc)
        raise


SCRIPT_TEMPLATE = """#!/bin/sh
# CRIU action script made by `overlayfs-inetsk barrier-script`: group restore barrier.
# CRIU runs it (with no arguments) at every action; it locks the image's TCP connections
# at pre-restore and waits at {action}.
exec {python} -m overlayfs_inetsk.cli barrier --dir {dir} --members {members} \\
    --name {name} --timeout {timeout:g} --action {action}{lock}
"""


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
    text = SCRIPT_TEMPLATE.format(
        python=_sh_quote(python or sys.executable), dir=_sh_quote(os.path.abspath(directory)),
        members=members, name=_sh_quote(name), timeout=timeout, action=action,
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
