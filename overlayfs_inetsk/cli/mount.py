"""`overlayfs-inetsk mount` and `umount`: argument parsing for the FUSE daemon.

cli.py calls add_mount_parsers(subparsers); `python -m overlayfs_inetsk.cli_mount` runs
the two commands on their own (the background daemon re-executes itself that way).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from .errors import InetskError


def add_mount_parsers(subparsers: Any) -> None:
    """Add `mount` and `umount` to the main parser's subparsers (handlers in `func`)."""
    from .cli import add_map_options

    p = subparsers.add_parser(
        "mount", help="serve IMAGE_DIR read-only on MOUNTPOINT with rewritten socket images",
        description="Mount a read-only view of IMAGE_DIR on MOUNTPOINT in which every "
                    "files.img / inetsk.img carries addresses rewritten by the map, generated "
                    "on first open. Returns once the view serves; the daemon stays in the "
                    "background unless --foreground.")
    p.add_argument("image_dir", metavar="IMAGE_DIR")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    add_map_options(p)
    g = p.add_argument_group("daemon")
    g.add_argument("--foreground", "-f", action="store_true",
                   help="serve in this process until unmounted or SIGTERM/SIGINT")
    g.add_argument("--systemd", action="store_true",
                   help="send READY=1 to $NOTIFY_SOCKET once serving (Type=notify units)")
    g.add_argument("--allow-other", action="store_true",
                   help="let other users than the mounting one see the view")
    g.add_argument("--serve", choices=("symlink", "read"), default="symlink",
                   help="how files other than socket images appear: symlinks to the "
                        "originals through a read-only bind of IMAGE_DIR (default; CRIU "
                        "follows them; see docs/security.md) or served through read()")
    g.add_argument("--log-file", metavar="PATH",
                   help="daemon log (default in the background: "
                        "/run/overlayfs-inetsk/<mountpoint>.log; in the foreground: stderr)")
    g.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    g.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = subparsers.add_parser(
        "umount", help="unmount a view (also clears the mount and the read-only bind a "
                       "killed daemon left)")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=cmd_umount)


def config_from_args(args: argparse.Namespace) -> Any:
    from .daemon import MountConfig

    return MountConfig(
        image_dir=args.image_dir, mountpoint=args.mountpoint, maps=list(args.map),
        map_files=list(args.map_file), netns=args.netns, iface=args.iface,
        strict=args.strict, tcp_outside=args.tcp_outside, serve=args.serve,
        allow_other=args.allow_other, systemd=args.systemd, ready_fd=args.ready_fd,
        log_file=args.log_file, verbose=args.verbose, env=dict(os.environ))


def cmd_mount(args: argparse.Namespace) -> int:
    from .daemon import serve_foreground, spawn_background

    cfg = config_from_args(args)
    if args.foreground or args.ready_fd is not None:
        return serve_foreground(cfg)
    pid, log_file = spawn_background(cfg)
    print(f"overlayfs-inetsk: {args.image_dir} mounted on {args.mountpoint} "
          f"(daemon pid {pid}, log {log_file})")
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from .daemon import unmount

    unmount(args.mountpoint)
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
