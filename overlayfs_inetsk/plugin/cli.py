"""`overlayfs-inetsk plugin install|remove`, `agent`, and the hidden `plugin-view` the CRIU
plugin runs when no agent answers."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import DEFAULT_LIBDIR, DEFAULT_SOCKET, VIEW_ROOT


def add_plugin_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("plugin", help="install or remove the CRIU plugin (docs/plugin.md)")
    psub = p.add_subparsers(dest="plugin_command", required=True, metavar="ACTION")
    q = psub.add_parser("install", help="copy the plugin into CRIU's plugin dir (idempotent)")
    q.add_argument("--libdir", default=DEFAULT_LIBDIR,
                   help=f"CRIU's plugin dir (default: {DEFAULT_LIBDIR})")
    q.add_argument("--so", metavar="PATH", help="the built plugin (default: setup.sh's)")
    q.add_argument("--cli", metavar="PATH",
                   help="the overlayfs-inetsk the plugin runs when no agent answers "
                        "(default: this one)")
    q.set_defaults(func=_cmd_install)
    q = psub.add_parser("remove", help="remove the plugin from CRIU's plugin dir (idempotent)")
    q.add_argument("--libdir", default=DEFAULT_LIBDIR,
                   help=f"CRIU's plugin dir (default: {DEFAULT_LIBDIR})")
    q.set_defaults(func=_cmd_remove)

    p = sub.add_parser("agent", help="serve the CRIU plugin's requests (the node agent)")
    p.add_argument("--socket", default=DEFAULT_SOCKET,
                   help=f"unix socket to listen on (default: {DEFAULT_SOCKET})")
    p.add_argument("--view-root", default=VIEW_ROOT, metavar="DIR",
                   help=f"where views are made (default: {VIEW_ROOT}; the CRIU plugin "
                        "accepts views there only)")
    p.set_defaults(func=_cmd_agent)


def _cmd_install(args: argparse.Namespace) -> int:
    from .install import install

    for line in install(args.libdir, args.so, args.cli) or [f"already installed in {args.libdir}"]:
        print(line)
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    from .install import remove

    for line in remove(args.libdir) or [f"not installed in {args.libdir}"]:
        print(line)
    return 0


def _cmd_agent(args: argparse.Namespace) -> int:
    from .agent import serve

    return serve(args.socket, args.view_root)


def plugin_view_main(argv: Sequence[str]) -> int:
    """`plugin-view --images-fd N --netns-fd M`: the reply line on stdout, always exit 0
    (the line says what happened; the CRIU plugin reads it)."""
    p = argparse.ArgumentParser(prog="overlayfs-inetsk plugin-view")
    p.add_argument("--images-fd", type=int, required=True)
    p.add_argument("--netns-fd", type=int, required=True)
    p.add_argument("--hook", action="store_true",
                   help="CRIU calls UPDATE_INETSK: answer a table where the hook is exact")
    args = p.parse_args(argv)
    from .viewmaker import make_view

    reply = make_view(args.images_fd, args.netns_fd, os.environ, os.getppid(), hook=args.hook)
    sys.stdout.write(reply + "\n")
    sys.stdout.flush()
    return 0
