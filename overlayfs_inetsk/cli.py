"""Command-line entry point: `overlayfs-inetsk inspect|rewrite|mount|umount ...`.

Thin adapter: parses arguments, calls the core, prints. User errors are one line on stderr
with the exit code of their InetskError class (docs/cli.md); no tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from .errors import InetskError

EXIT_INTERNAL = 70
EXIT_MISSING = 69  # EX_UNAVAILABLE: a module the install should have provided is missing
# third-party modules we need, and how to get each (docs/cli.md, README)
MISSING_FIX = {
    "pycriu": "CRIU's Python bindings, not on PyPI: run scripts/setup.sh, or pip install the "
              "lib/ dir of CRIU 4.2.1's source tree after `make lib` there",
    "google": "protobuf: run scripts/setup.sh, or pip install protobuf",
    "pyfuse3": "run scripts/setup.sh, or pip install pyfuse3 (needs libfuse3-dev, pkg-config)",
    "trio": "run scripts/setup.sh, or pip install trio",
    "pyroute2": "run scripts/setup.sh, or pip install pyroute2",
}


def add_map_options(p: argparse.ArgumentParser) -> None:
    """The address-map options shared by every command that rewrites."""
    g = p.add_argument_group("address map")
    g.add_argument("--map", action="append", default=[], metavar="OLD=NEW",
                   help="a rule: ADDR=ADDR, PREFIX=PREFIX, ADDR=auto, local=ADDR|auto "
                        "(repeatable; see docs/map.md)")
    g.add_argument("--map-file", action="append", default=[], metavar="FILE",
                   help="TOML or JSON file of rules (repeatable)")
    g.add_argument("--strict", action="store_true",
                   help="fail when a socket keeps a specific address no rule covers")
    g.add_argument("--tcp-outside", choices=("close", "keep", "fail"), default="close",
                   help="fate of a TCP connection whose local end moves but whose peer is "
                        "outside the map (default: close; see docs/tcp.md)")
    g.add_argument("--netns", metavar="PATH",
                   help="network namespace whose address `auto` means "
                        "(/run/netns/NAME or /proc/PID/ns/net; default: our own)")
    g.add_argument("--iface", metavar="NAME",
                   help="interface whose address `auto` means (default: the default route's)")


def build_map(args: argparse.Namespace):  # -> AddressMap
    from .addrmap import AddressMap

    return AddressMap.from_args(args.map, args.map_file, env=os.environ)


def build_options(args: argparse.Namespace):  # -> RewriteOptions
    from .rewrite import RewriteOptions

    return RewriteOptions(strict=args.strict, tcp_outside=args.tcp_outside)


def build_resolver(args: argparse.Namespace):  # -> Resolver | None
    from .nodeaddr import make_resolver

    return make_resolver(netns=args.netns, iface=args.iface)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .report import collect, render_json, render_table

    amap = build_map(args)
    resolver = build_resolver(args) if amap.auto_families() else None
    results = collect(args.image_dir, amap, resolver, build_options(args))
    if args.json:
        sys.stdout.write(render_json(args.image_dir, amap, results))
    else:
        sys.stdout.write(render_table(args.image_dir, results, with_map=not amap.is_empty()))
    return 0


def _cmd_rewrite(args: argparse.Namespace) -> int:
    from .report import render_table
    from .viewdir import write_view_dir

    amap = build_map(args)
    resolver = build_resolver(args) if amap.auto_families() else None
    results = write_view_dir(args.image_dir, args.out_dir, amap, resolver, build_options(args))
    sys.stdout.write(render_table(args.image_dir, results, with_map=True, only_changes=True))
    return 0


def make_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="overlayfs-inetsk",
        description="Serve a CRIU checkpoint with inet socket addresses rewritten for this node.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="list the inet sockets of an image (and a map's effect)")
    p.add_argument("image_dir", metavar="IMAGE_DIR")
    p.add_argument("--json", action="store_true", help="machine-readable output (docs/json.md)")
    add_map_options(p)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("rewrite", help="write a restorable view dir with rewritten sockets")
    p.add_argument("image_dir", metavar="IMAGE_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new or empty directory")
    add_map_options(p)
    p.set_defaults(func=_cmd_rewrite)

    from .cli_mount import add_mount_parsers

    add_mount_parsers(sub)
    from .cli_group import add_group_parsers; add_group_parsers(sub)  # noqa: E702
    from .cli_restore import add_restore_parsers

    add_restore_parsers(sub)
    from .logsetup import add_log_options

    add_log_options(parser, sub)  # -v/-q before and after COMMAND (docs/logging.md)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # file names are bytes: one that is not UTF-8 (decoded with surrogateescape) goes out
    # as the same bytes in every locale, as in the C locale, instead of a UnicodeEncodeError
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")
    parser = make_parser()
    args = parser.parse_args(argv)
    from .logsetup import setup_from_args

    setup_from_args(args)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except InetskError as exc:
        from .logsetup import error_prefix

        print(f"{error_prefix()}overlayfs-inetsk: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        top = (exc.name or "").partition(".")[0]
        if top not in MISSING_FIX:
            return _internal_error()
        from .logsetup import error_prefix

        print(f"{error_prefix()}overlayfs-inetsk: error: Python module {top} is missing "
              f"({MISSING_FIX[top]})", file=sys.stderr)
        return EXIT_MISSING
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception:  # a bug: show it in full, with a code of its own
        return _internal_error()


def _internal_error() -> int:
    import traceback

    traceback.print_exc()
    print("overlayfs-inetsk: internal error (a bug; please report it)", file=sys.stderr)
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
