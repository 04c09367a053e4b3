"""`overlayfs-inetsk inspect` and `rewrite`: the commands that read an image dir offline."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from ..options import REWRITE_OPTIONS, add_map_options, add_options

if TYPE_CHECKING:  # imported where used: inspect's start-up stays small
    from ..planner.planner import Planner


def add_image_parsers(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "inspect", help="list the inet sockets of an image (and a map's effect)")
    p.add_argument("image_dir", metavar="IMAGE_DIR")
    p.add_argument("--json", action="store_true", help="machine-readable output (docs/json.md)")
    add_map_options(p)
    p.set_defaults(func=cmd_inspect)

    p = subparsers.add_parser(
        "rewrite", help="write a restorable view dir with rewritten sockets")
    p.add_argument("image_dir", metavar="IMAGE_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new or empty directory")
    add_map_options(p)
    add_options(p, REWRITE_OPTIONS, "output")
    p.set_defaults(func=cmd_rewrite)


def planner_of(args: argparse.Namespace) -> Planner:
    from ..planner.planner import Planner

    return Planner.from_cli(args.map, args.map_file, os.environ, args.port_offset, args.strict,
                            args.tcp_outside, args.netns, args.iface)[0]


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..host.files import check_image_dir
    from .render import render_json, render_table

    planner = planner_of(args)
    # inspect reads socket images only, and serves nothing: an outside `parent` link is a
    # warning; the ports the restore would bind are checked when --netns names a namespace
    plan = planner.plan(check_image_dir(args.image_dir), "inspect", warn=_warn)
    if args.json:
        sys.stdout.write(render_json(args.image_dir, planner.amap, plan.results,
                                     plan.ports_taken or []))
    else:
        sys.stdout.write(render_table(args.image_dir, plan.results,
                                      with_map=not planner.amap.is_empty()))
    return 0


def _warn(line: str) -> None:
    sys.stderr.write(f"overlayfs-inetsk: warning: {line}\n")


def cmd_rewrite(args: argparse.Namespace) -> int:
    """Prints the rows of the sockets that need attention (or with --table, of every socket
    that changes), the summary line, and where the view is. Without --table the plan keeps
    no per-socket reports (for 10,000 sockets, reports and table took about 35 ms of a
    155 ms run: docs/design.md)."""
    from ..offline import check_out_dir, write_view_dir
    from .render import render_table

    planner = planner_of(args)
    root = check_out_dir(args.image_dir, args.out_dir)  # before anything is planned
    plan = planner.plan(root, "rewrite", reports=args.table)
    write_view_dir(args.image_dir, args.out_dir, plan.tree, plan.results)
    sys.stdout.write(render_table(args.image_dir, plan.results, with_map=True,
                                  only_changes=args.table, only_problems=not args.table))
    sys.stdout.write(f"view written to {os.path.abspath(args.out_dir)}\n")
    return 0
