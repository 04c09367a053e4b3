"""`overlayfs-inetsk nat-rules`: the peers' side of fate nat (docs/tcp.md), and the hidden
`nat-action DIR` that `restore --nat-peer-netns` hands CRIU as its action script.

cli/__init__.py calls add_nat_parsers(subparsers). The rules come from core/natrules.py,
applying them from node/nat.py, the restore's order from node/natrestore.py.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..options import MAP_OPTIONS, add_options

# every map option but --tcp-outside: nat-rules plans with fate nat
NAT_MAP_OPTIONS = tuple(o for o in MAP_OPTIONS if o.attr != "tcp_outside")


def add_nat_parsers(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "nat-rules", help="the nftables table that keeps outside clients' connections "
                          "(fate nat) on the peers' side",
        description="Plan IMAGE_DIR with the map as `restore --tcp-outside nat` does and "
                    "print, for every connection of fate nat (local end moved by the map, "
                    "peer outside it), an nftables table (`nft -f` input, IPv4 and IPv6) "
                    "that rewrites it where the client's traffic passes: packets from the "
                    "client to the old address go to the new one, replies come back from "
                    "the old one. --apply adds the table (one of our own, replaced if "
                    "there), --remove deletes exactly it; both in --peer-netns, default "
                    "this network namespace. docs/tcp.md gives the order that keeps the "
                    "connections (apply after the restored sockets exist, before they "
                    "send).")
    p.add_argument("image_dir", metavar="IMAGE_DIR")
    add_options(p, NAT_MAP_OPTIONS, "address map")
    g = p.add_argument_group("the peers' side")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--apply", action="store_true",
                     help="add the table in every --peer-netns (atomic; a table of the same "
                          "plan already there is replaced)")
    how.add_argument("--remove", action="store_true",
                     help="delete the table of this plan from every --peer-netns (nothing "
                          "else is touched)")
    g.add_argument("--peer-netns", action="append", default=[], metavar="PATH",
                   help="a network namespace on the client's path (repeatable; default: "
                        "this one)")
    p.set_defaults(func=cmd_nat_rules)

    p = subparsers.add_parser("nat-action")  # no help: CRIU's action script only
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=cmd_nat_action)


def cmd_nat_rules(args: argparse.Namespace) -> int:
    import os

    from ..core.natrules import nat_connections, ruleset, table_name
    from ..errors import InetskError
    from ..host.files import check_image_dir
    from ..host.netns import check_netns
    from ..planner.planner import Planner

    if args.peer_netns and not (args.apply or args.remove):
        raise InetskError("--peer-netns names where to --apply or --remove the table")
    for peer in args.peer_netns:
        check_netns(peer)
    planner = Planner.from_cli(args.map, args.map_file, os.environ, args.port_offset,
                               args.strict, "nat", args.netns, args.iface)[0]
    image_dir = check_image_dir(args.image_dir)
    # what the restore would refuse, refused here too
    results = planner.plan(image_dir, "nat-rules").results
    conns = nat_connections(r for res in results.values() for r in res.reports)
    if not (args.apply or args.remove):
        sys.stdout.write(ruleset(conns, image_dir))
        return 0
    from ..node import nat

    peers: list[str | None] = list(args.peer_netns) or [None]
    where = [p or "this network namespace" for p in peers]
    name = table_name(conns)
    if args.apply:
        if not conns:
            print("no connection of fate nat: nothing to apply")
            return 0
        nat.apply(peers, conns, image_dir)
        for w in where:
            print(f"added table inet {name} ({len(conns)} connection(s)) in {w}")
        return 0
    removed = nat.remove(peers, name)
    for p, w in zip(peers, where):
        state = "removed" if p in removed else "not there"
        print(f"table inet {name}: {state} in {w}")
    return 0


def cmd_nat_action(args: argparse.Namespace) -> int:
    from ..node.natrestore import run_action

    did = run_action(args.dir)
    if did:
        print(f"overlayfs-inetsk nat-action: {did}", file=sys.stderr)
    return 0
