"""`overlayfs-inetsk mount` and `umount`: argument parsing for the FUSE daemon.

cli/__init__.py calls add_mount_parsers(subparsers); `python -m overlayfs_inetsk.cli.mount`
runs the two commands on their own (the background daemon re-executes itself that way).
The options are options.py's MOUNT_OPTIONS, from which the daemon's command line is derived.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import InetskError
from ..options import (
    DAEMON_OPTIONS,
    MAP_OPTIONS,
    MOUNT_OPTIONS,
    MOUNT_POSITIONALS,
    add_options,
    from_args,
)


def add_mount_parsers(subparsers: Any) -> None:
    """Add `mount` and `umount` to the main parser's subparsers (handlers in `func`)."""
    p = subparsers.add_parser(
        "mount", help="serve IMAGE_DIR read-only on MOUNTPOINT with rewritten socket images",
        description="Mount a read-only view of IMAGE_DIR on MOUNTPOINT in which every "
                    "files.img / inetsk.img carries addresses rewritten by the map, generated "
                    "on first open. Returns once the view serves; the daemon stays in the "
                    "background unless --foreground.")
    add_options(p, MOUNT_POSITIONALS)
    add_options(p, MAP_OPTIONS, "address map")
    add_options(p, DAEMON_OPTIONS, "daemon")
    p.set_defaults(func=cmd_mount)

    p = subparsers.add_parser(
        "umount", help="unmount a view (also clears the mount and the read-only bind a "
                       "killed daemon left, and the views of restores killed with SIGKILL)")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=cmd_umount)


def config_from_args(args: argparse.Namespace) -> Any:
    from ..fuse.daemon import MountConfig

    return MountConfig(**from_args(MOUNT_OPTIONS, args), env=dict(os.environ))


def cmd_mount(args: argparse.Namespace) -> int:
    from ..app.mount import serve_foreground
    from ..fuse.spawn import spawn_background

    cfg = config_from_args(args)
    if args.foreground or args.ready_fd is not None:
        return serve_foreground(cfg)
    pid, log_file = spawn_background(cfg)
    print(f"overlayfs-inetsk: {args.image_dir} mounted on {args.mountpoint} "
          f"(daemon pid {pid}, log {log_file})")
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from ..host.mounts import unmount
    from ..app.stale import clear_restores

    # views of restores killed with SIGKILL (held by nobody any more) go too
    cleared = clear_restores()
    if os.path.realpath(args.mountpoint) in {os.path.realpath(v) for v in cleared}:
        return 0
    how = unmount(args.mountpoint)
    if how.endswith("-z") or how == "umount -l":  # fusermount3 -u said busy
        print(f"overlayfs-inetsk: {args.mountpoint}: busy (a process holds a file or its cwd "
              f"in it): detached ({how}); the view and its daemon go when the last user lets "
              "go", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="overlayfs-inetsk")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_mount_parsers(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except InetskError as exc:
        print(f"overlayfs-inetsk: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
