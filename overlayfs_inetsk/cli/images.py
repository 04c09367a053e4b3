"""`overlayfs-inetsk inspect` and `rewrite`: the commands that read an image dir offline."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from .options import REWRITE_OPTIONS, add_map_options, add_options

if TYPE_CHECKING:  # imported where used: inspect's start-up stays small
    from ..core.addrmap import AddressMap
    from ..core.boundmap import Resolver
    from ..core.decide import RewriteOptions


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


def build_map(args: argparse.Namespace) -> AddressMap:
    from ..planner.sources import load_map

    return load_map(args.map, args.map_file, env=os.environ,
                                port_offset=args.port_offset)


def build_options(args: argparse.Namespace) -> RewriteOptions:
    from ..core.decide import RewriteOptions

    return RewriteOptions(strict=args.strict, tcp_outside=args.tcp_outside)


def build_resolver(args: argparse.Namespace) -> Resolver | None:
    from ..host.nodeaddr import make_resolver

    return make_resolver(netns=args.netns, iface=args.iface)


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..host.files import check_image_dir
    from ..planner.planner import check_parents, merged, plan_tree
    from .render import render_json, render_table
    from ..host.listing import build_tree

    amap = build_map(args)
    resolver = build_resolver(args) if amap.auto_families() else None
    # inspect reads socket images only: files the tree leaves out change nothing it shows
    tree = build_tree(check_image_dir(args.image_dir), sockets_only=True)
    check_parents(tree, warn_only=True)  # inspect serves nothing: a warning
    results = merged(plan_tree(tree, amap, resolver, build_options(args)))
    taken = []
    if args.netns:  # which ports the restore would bind are taken there (warnings)
        from ..planner.ports import check_plan

        taken = check_plan(results, args.netns, False, _warn)
    if args.json:
        sys.stdout.write(render_json(args.image_dir, amap, results, taken))
    else:
        sys.stdout.write(render_table(args.image_dir, results, with_map=not amap.is_empty()))
    return 0


def _warn(line: str) -> None:
    sys.stderr.write(f"overlayfs-inetsk: warning: {line}\n")


def cmd_rewrite(args: argparse.Namespace) -> int:
    """Prints the rows of the sockets that need attention (or with --table, of every socket
    that changes), the summary line, and where the view is. Without --table the plan keeps
    no per-socket reports (for 10,000 sockets, reports and table took about 35 ms of a
    155 ms run: docs/design.md)."""
    from .render import render_table
    from ..offline import write_view_dir

    amap = build_map(args)
    resolver = build_resolver(args) if amap.auto_families() else None
    results = write_view_dir(args.image_dir, args.out_dir, amap, resolver, build_options(args),
                             reports=args.table)
    sys.stdout.write(render_table(args.image_dir, results, with_map=True,
                                  only_changes=args.table, only_problems=not args.table))
    sys.stdout.write(f"view written to {os.path.abspath(args.out_dir)}\n")
    return 0
