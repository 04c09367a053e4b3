"""`overlayfs-inetsk plugin install|remove` and `agent` (the hidden `plugin-view`, which the
CRIU plugin runs when no agent answers, is cli/plugin_view.py: lean, no parser built)."""

from __future__ import annotations

import argparse

from ..plugin import DEFAULT_LIBDIR, DEFAULT_SOCKET, VIEW_ROOT
from ..plugin.wire import CHECK_MS, TIMEOUT_MAX_MS, TIMEOUT_MS


def _timeout_ms(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of milliseconds: {text!r}") from None
    if not 0 < v <= TIMEOUT_MAX_MS:
        raise argparse.ArgumentTypeError(f"must be 1 to {TIMEOUT_MAX_MS} ms, not {v}")
    return v


def _metrics_addr(text: str) -> tuple[str, int]:
    from ..plugin.metrics import parse_addr

    try:
        return parse_addr(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_plugin_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("plugin", help="install or remove the CRIU plugin (docs/plugin.md)")
    psub = p.add_subparsers(dest="plugin_command", required=True, metavar="ACTION")
    q = psub.add_parser("install", help="copy the plugin into CRIU's plugin dir and write its "
                                        "config file beside it (idempotent)")
    q.add_argument("--libdir", default=DEFAULT_LIBDIR,
                   help=f"CRIU's plugin dir (default: {DEFAULT_LIBDIR})")
    q.add_argument("--so", metavar="PATH", help="the built plugin (default: setup.sh's)")
    cli = q.add_mutually_exclusive_group()
    cli.add_argument("--cli", metavar="PATH",
                     help="the overlayfs-inetsk the plugin runs when no agent answers "
                          "(default: this one)")
    cli.add_argument("--no-cli", action="store_true",
                     help="no CLI fallback (the CLI is not on this node, e.g. inside the "
                          "agent's image): with no agent, a restore waits for one until "
                          "its timeout")
    q.add_argument("--agent-socket", metavar="PATH", default=DEFAULT_SOCKET,
                   help=f"the agent's socket (default: {DEFAULT_SOCKET})")
    q.add_argument("--timeout-ms", metavar="N", type=_timeout_ms, default=TIMEOUT_MS,
                   help=f"how long a restore waits for the planner (default: {TIMEOUT_MS})")
    q.add_argument("--no-agent", action="store_true",
                   help="do not install the agent's systemd units (by default they are "
                        "installed and the socket enabled when systemd runs this host)")
    q.set_defaults(func=_cmd_install)
    q = psub.add_parser("remove", help="remove the plugin and its config file from CRIU's "
                                       "plugin dir (idempotent)")
    q.add_argument("--libdir", default=DEFAULT_LIBDIR,
                   help=f"CRIU's plugin dir (default: {DEFAULT_LIBDIR})")
    q.add_argument("--no-agent", action="store_true",
                   help="leave the agent's systemd units as they are")
    q.set_defaults(func=_cmd_remove)

    p = sub.add_parser("agent", help="serve the CRIU plugin's requests (the node agent)")
    p.add_argument("--socket", default=DEFAULT_SOCKET,
                   help=f"unix socket to listen on (default: {DEFAULT_SOCKET})")
    p.add_argument("--view-root", default=VIEW_ROOT, metavar="DIR",
                   help=f"where views are made (default: {VIEW_ROOT}; the CRIU plugin "
                        "accepts views there only)")
    p.add_argument("--take-over", action="store_true",
                   help="take the socket path over from a live agent (a rolling update's new "
                        "agent; the old one drains on SIGTERM)")
    p.add_argument("--metrics", metavar="ADDR:PORT", type=_metrics_addr,
                   help="serve Prometheus metrics at http://ADDR:PORT/metrics (default: off)")
    p.add_argument("--check", action="store_true",
                   help="do not serve: ask the agent on --socket whether it answers (exit 0 "
                        "when it does, 1 with one line saying why not); for probes")
    p.add_argument("--timeout-ms", metavar="N", type=_timeout_ms, default=CHECK_MS,
                   help=f"--check's deadline for all of it (default: {CHECK_MS})")
    p.add_argument("--same-pidns", action="store_true",
                   help="--check: the agent that answers must be in this pid namespace (a "
                        "pod's own agent: the readiness probe)")
    p.set_defaults(func=_cmd_agent)


def _cmd_install(args: argparse.Namespace) -> int:
    from ..plugin.install import PluginConf, install

    conf = PluginConf(cli="none" if args.no_cli else args.cli,
                      agent_socket=args.agent_socket, timeout_ms=args.timeout_ms)
    done = install(args.libdir, args.so, conf)
    if not args.no_agent:
        from ..plugin.units import install_units

        done += install_units(conf)
    for line in done or [f"already installed in {args.libdir}"]:
        print(line)
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    from ..plugin.install import remove

    done = remove(args.libdir)
    if not args.no_agent:
        from ..plugin.units import remove_units

        done += remove_units()
    for line in done or [f"not installed in {args.libdir}"]:
        print(line)
    return 0


def _cmd_agent(args: argparse.Namespace) -> int:
    if args.check:
        from ..errors import InetskError
        from ..plugin.check import check

        r = check(args.socket, args.timeout_ms, args.same_pidns)
        if not r.ok:
            raise InetskError(r.detail)
        print(r.detail)
        return 0
    from ..app.agent import serve

    return serve(args.socket, args.view_root, take_over=args.take_over, metrics=args.metrics)
