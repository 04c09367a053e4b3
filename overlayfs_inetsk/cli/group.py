"""`overlayfs-inetsk barrier` and `barrier-script`: the group-restore barrier (docs/tcp.md).

cli/__init__.py calls add_group_parsers(subparsers). The work is in app/barrier.py
(the action script) and node/barrier.py (the protocol, the script it writes).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..options import BARRIER_ACTIONS as ACTIONS
from ..options import BARRIER_DEFAULT_ACTION as DEFAULT_ACTION
from ..options import BARRIER_DEFAULT_TIMEOUT as DEFAULT_TIMEOUT


def _barrier_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", required=True, metavar="DIR",
                   help="the barrier directory, one per group restore, reachable by every "
                        "member (local or a shared filesystem)")
    p.add_argument("--members", required=True, type=int, metavar="N",
                   help="how many members the group has")
    p.add_argument("--name", required=True, metavar="NAME",
                   help="this member's name, unique in the group")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"give up (and abort the group) after this long (default "
                        f"{DEFAULT_TIMEOUT:g})")
    p.add_argument("--action", choices=ACTIONS, default=DEFAULT_ACTION,
                   help=f"the CRIU action to wait at (default {DEFAULT_ACTION}; "
                        "network-unlock runs only when the restore includes a network "
                        "namespace)")
    p.add_argument("--no-lock", dest="lock", action="store_false",
                   help="do not lock the image's TCP connections (see "
                        "docs/tcp.md: without the lock, a member restored first may send "
                        "its unsent data to a host whose member is not back, and be reset)")


def add_group_parsers(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "barrier", help="wait until every member of a group restore got here (CRIU action "
                        "script)",
        description="As a CRIU action script: lock the image's TCP connections where the "
                    "restored sockets will live (at pre-restore in criu's own network "
                    "namespace, or at post-setup-namespaces in the restored tasks' own, "
                    "unlocked at network-unlock: runc, Podman); at the chosen action "
                    "(default post-restore: every socket exists, none sends yet) wait until "
                    "all --members members arrived; exit 0 at once for any other action. "
                    "Exit 7 on a timeout or "
                    "an aborted group: CRIU then aborts the restore. CRIU runs action "
                    "scripts without arguments: use barrier-script to write one.")
    _barrier_options(p)
    p.set_defaults(func=cmd_barrier)

    p = subparsers.add_parser(
        "barrier-script", help="write an action script running the barrier, for "
                               "`criu restore --action-script PATH`")
    p.add_argument("path", metavar="PATH", help="the script to write (made executable)")
    _barrier_options(p)
    p.set_defaults(func=cmd_barrier_script)


def cmd_barrier(args: argparse.Namespace) -> int:
    from ..app.barrier import Deferred, Locked, run_action
    from ..node.barrier import Passed

    for got in run_action(args.dir, args.name, args.members, args.timeout, args.action,
                          lock_connections=args.lock):
        where = "" if not isinstance(got, Locked) or got.netns is None else (
            f" in the restored tasks' network namespace {got.netns}")
        if isinstance(got, Passed):
            say = f"all {got.members} members arrived; released after {got.waited:.3f} s"
        elif isinstance(got, Deferred):
            say = ("the tasks get a network namespace of their own: their connections are "
                   "locked in it at post-setup-namespaces")
        elif got.unlocked:
            say = f"unlocked {len(got.conns)} TCP connection(s){where}"
        else:
            say = f"locked {len(got.conns)} TCP connection(s){where} until the network unlock"
        print(f"overlayfs-inetsk barrier: {args.name}: {say}", file=sys.stderr)
    return 0


def cmd_barrier_script(args: argparse.Namespace) -> int:
    from ..node.barrier import write_script

    path = write_script(args.path, args.dir, args.name, args.members, args.timeout,
                        args.action, lock_connections=args.lock)
    print(path)
    return 0
