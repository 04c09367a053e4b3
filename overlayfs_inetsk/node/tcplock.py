"""The lock of a group restore's TCP connections (app/barrier.py runs it at pre-restore).

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

When CRIU restores the tasks in a network namespace of their own (runc hands it one; see
core/netnsmask.py) the rules go there instead (`netns`: run through `nsenter --net`), and
CRIU's unlock does not delete them: app/barrier.py does, at `network-unlock`.

The rules are CRIU's own (netfilter.c IPTABLES_CONN_CMD); `iptables -w`, one
`iptables-restore --noflush` batch per family to remove them.
"""

from __future__ import annotations

import os
import subprocess

from ..errors import BarrierError

SOCCR_MARK = "0xC114"  # CRIU's mark for its own packets (soccr.h), let through the lock

Conn = tuple[int, str, int, str, int]  # (4 or 6, src, sport, dst, dport)


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


def _in(netns: str | None) -> list[str]:
    return [] if netns is None else ["nsenter", f"--net={netns}"]


def _iptables(version: int, op: str, rule: list[str], netns: str | None = None
              ) -> subprocess.CompletedProcess[str]:
    cmd = "iptables" if version == 4 else "ip6tables"
    chain_at = rule.index("filter") + 1
    argv = [*_in(netns), cmd, "-w", *rule[:chain_at], op, *rule[chain_at:]]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BarrierError(f"{' '.join(argv)}: {exc}") from None


def lock(conns: list[Conn], netns: str | None = None) -> list[Conn]:
    """Add CRIU's lock rules for each connection (in the network namespace at path `netns`,
    None: this process's) unless present; returns the connections whose rules were added.
    On a failure the rules added are removed before the error is raised."""
    added: list[Conn] = []
    try:
        for conn in conns:
            fresh = False
            for rule in lock_rules(conn):
                if _iptables(conn[0], "-C", rule, netns).returncode == 0:
                    continue
                cp = _iptables(conn[0], "-I", rule, netns)
                if cp.returncode != 0:
                    raise BarrierError(f"cannot lock {_fmt(conn)}: {cp.stderr.strip()}")
                fresh = True
            if fresh:
                added.append(conn)
    except BarrierError as exc:
        _unlock_after(added, exc, netns)
        raise
    return added


def _restore(version: int, batch: str, netns: str | None
             ) -> subprocess.CompletedProcess[str]:
    argv = [*_in(netns), "iptables-restore" if version == 4 else "ip6tables-restore", "-w",
            "--noflush"]
    try:
        return subprocess.run(argv, input=batch, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BarrierError(f"{' '.join(argv)}: {exc}") from None


def unlock(conns: list[Conn], missing_ok: bool = False, netns: str | None = None) -> None:
    """Remove the lock rules of each connection (in `netns`, as lock()): the rules present
    are deleted in one
    atomic `iptables-restore --noflush` batch per family. Every rule that was not there
    (unless missing_ok) or could not be deleted is reported (BarrierError, one line) after
    the others are gone."""
    problems: list[str] = []
    for version in (4, 6):
        cmd = "iptables" if version == 4 else "ip6tables"
        present: list[tuple[Conn, list[str]]] = []
        for conn in (c for c in conns if c[0] == version):
            for rule in lock_rules(conn):
                cp = _iptables(version, "-C", rule, netns)
                if cp.returncode == 0:
                    present.append((conn, rule))
                elif not missing_ok:
                    why = cp.stderr.strip().splitlines()[-1:] or [f"exit {cp.returncode}"]
                    problems.append(f"{rule[2]} rule of {_fmt(conn)} not present ({why[0]})")
        if not present:
            continue
        batch = "*filter\n" + "".join(
            "-D " + " ".join(rule[2:]) + "\n" for _, rule in present) + "COMMIT\n"
        cp = _restore(version, batch, netns)
        if cp.returncode != 0:
            left = [f"{rule[2]} of {_fmt(conn)}" for conn, rule in present
                    if _iptables(version, "-C", rule, netns).returncode == 0]
            problems.append(f"{cmd}-restore failed ({' '.join(cp.stderr.split())}); rules "
                            f"left: {', '.join(left) or 'none'}")
    if problems:
        raise BarrierError("unlock: " + "; ".join(problems))


def _unlock_after(conns: list[Conn], exc: BarrierError, netns: str | None = None) -> None:
    """Unlock on a failure path: a failure of the unlock is added to the error raised."""
    try:
        unlock(conns, netns=netns)
    except BarrierError as more:
        exc.args = (f"{exc}; and {more}",)


def _fmt(conn: Conn) -> str:
    v, src, sport, dst, dport = conn

    def f(a: str, p: int) -> str:
        return f"[{a}]:{p}" if v == 6 else f"{a}:{p}"
    return f"{f(src, sport)} -> {f(dst, dport)}"


def _locked_path(directory: str, name: str) -> str:
    return os.path.join(directory, f"{name}.locked")


def _save_locked(directory: str, name: str, conns: list[Conn],
                 netns: tuple[int, str] | None = None) -> None:
    """DIR/NAME.locked: the connections locked, one a line, after a first line
    `netns PID net:[INODE]` when they were locked in the namespace of task PID."""
    with open(_locked_path(directory, name), "w") as f:
        if netns is not None:
            f.write(f"netns {netns[0]} {netns[1]}\n")
        for c in conns:
            f.write(" ".join(str(x) for x in c) + "\n")


def _load_locked(directory: str, name: str) -> tuple[list[Conn], tuple[int, str] | None]:
    """What _save_locked wrote (nothing locked: no file)."""
    path = _locked_path(directory, name)
    try:
        with open(path) as f:
            rows = [line.split() for line in f if line.strip()]
    except FileNotFoundError:
        return [], None
    except OSError as exc:
        raise BarrierError(f"{path}: {exc.strerror}") from None
    netns = None
    try:
        if rows and rows[0][0] == "netns":
            netns = (int(rows[0][1]), rows[0][2])
            rows = rows[1:]
        return [(int(r[0]), r[1], int(r[2]), r[3], int(r[4])) for r in rows], netns
    except (ValueError, IndexError):
        raise BarrierError(f"{path}: not a list of locked connections") from None
