"""`overlayfs-inetsk restore`: argument parsing and output.

cli/__init__.py calls add_restore_parsers(subparsers). The work is in app/restore.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..options import RESTORE_STOP_TIMEOUT as STOP_TIMEOUT
from ..options import SERVE_MODES, add_map_options

RESTORE_EPILOG = """\
Without --map or --map-file (and without $INETSK_LOCAL_IPV4/6), the map is
`--map local=auto`: every specific local address of the checkpoint moves to this node's
address of its family, looked up in --netns (on --iface, default: the interface of the
default route).

By default restore returns once the restored tree runs (criu -d, as `podman container
restore`), and the view is unmounted at once. With --foreground, criu stays the tree's
parent and restore returns when the restored service exits; the view stays mounted that
long, and SIGINT/SIGTERM/SIGHUP are passed on to the restored root task (to criu while it
is still restoring). A restore killed with SIGKILL leaves its view mounted: the next restore
(or `umount`) clears it.

Everything after `--` goes to `criu restore` as is, e.g. `-- --shell-job`,
`-- --pidfile /run/web.pid` (absolute paths: criu runs in the work dir); `-- -d` is the
default already. restore sets -D, -W and -o itself, adds -v4, -d (unless --foreground),
and --tcp-established when the images hold tcp-stream-*.img (dumped with
--tcp-established) unless --tcp-established or --tcp-close is given.

The exit status is criu's once criu ran (128+N if signal N killed it); before that: 1 usage,
3 map, 4 image, 5 rewrite refused, 6 mount (docs/cli.md). On failure the work dir (criu's
restore.log, the view's mount.log) is kept and its path printed.
"""


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= v <= 3600:
        raise argparse.ArgumentTypeError(f"must be 0 to 3600 seconds, not {text}")
    return v


class _SplitAtDashDash(argparse.ArgumentParser):
    """Parses what comes before the first `--` and keeps the rest, untouched, as
    `criu_args` (argparse alone would match a `*` positional too early and reject it)."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        tail: list[str] = []
        if "--" in args:
            i = args.index("--")
            args, tail = args[:i], args[i + 1:]
        ns, extras = super().parse_known_args(args, namespace)
        ns.criu_args = tail
        return ns, extras


def add_restore_parsers(subparsers: Any) -> None:
    """Add `restore` to the main parser's subparsers (handler in `func`)."""
    p = subparsers.add_parser(
        "restore", help="restore a checkpoint on this node: mount a view, criu restore -d, "
                        "unmount",
        description="Restore the CRIU checkpoint IMAGE_DIR in network namespace --netns "
                    "(default: ours) with its inet socket addresses rewritten for this node: "
                    "mounts a view on a temporary mountpoint, runs criu restore from it with "
                    "a writable work dir, unmounts, and reports what was rewritten.",
        epilog=RESTORE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s IMAGE_DIR [--netns PATH] [--map OLD=NEW ...] [options] "
              "[-- CRIU_OPTIONS...]")
    p.add_argument("image_dir", metavar="IMAGE_DIR",
                   help="CRIU image dir, or an extracted Podman/CRI-O checkpoint "
                        "(checkpoint/inventory.img)")
    p.__class__ = _SplitAtDashDash  # CRIU_OPTIONS: everything after the first `--`
    p.set_defaults(criu_args=[])
    add_map_options(p)
    g = p.add_argument_group("restore")
    g.add_argument("--work-dir", metavar="DIR",
                   help="criu's work dir (logs), kept afterwards (default: a temporary dir, "
                        "removed after a successful restore)")
    g.add_argument("--serve", choices=SERVE_MODES, default="symlink",
                   help="how the view shows files other than socket images (see mount)")
    g.add_argument("--foreground", action="store_true",
                   help="criu without -d: stay until the restored service exits, the view "
                        "mounted; SIGINT/SIGTERM/SIGHUP are passed on to its root task")
    g.add_argument("--stop-timeout", type=_seconds, default=STOP_TIMEOUT, metavar="SECONDS",
                   help="--foreground: SIGKILL the restored root task this long after a "
                        f"stop signal passed on to it, if it is still there (default "
                        f"{STOP_TIMEOUT:g})")
    g.add_argument("--nat-peer-netns", action="append", default=[], metavar="PATH",
                   help="with --tcp-outside nat: apply the peers' NAT table (nat-rules) in "
                        "this network namespace at the moment that keeps the connections, "
                        "remove it if the restore fails (repeatable; docs/tcp.md)")
    g.add_argument("--json", action="store_true",
                   help="print a JSON report after criu returns (docs/json.md)")
    p.set_defaults(func=cmd_restore)


def _print_summary(plan: Any, argv: list[str]) -> None:
    from .render import render_table

    table = render_table(plan.image_real, plan.results, with_map=True, only_changes=True)
    sys.stdout.write(table)
    if plan.map_defaulted:
        sys.stdout.write("map: --map local=auto (the default: no --map given)\n")
    if plan.tcp_established_added:
        sys.stdout.write("criu: --tcp-established added (the images hold tcp-stream-*.img)\n")
    if plan.nat:
        from ..core.natrules import table_name

        sys.stdout.write(f"nat: {len(plan.nat)} connection(s) of fate nat need the peers' "
                         f"side (table inet {table_name(plan.nat)}: "
                         "overlayfs-inetsk nat-rules)\n")
    sys.stdout.flush()


def cmd_restore(args: argparse.Namespace) -> int:
    from ..app.restore import RestoreConfig, plan, run

    cfg = RestoreConfig(
        image_dir=args.image_dir, netns=args.netns, maps=list(args.map),
        map_files=list(args.map_file), iface=args.iface, strict=args.strict,
        port_offset=args.port_offset,
        tcp_outside=args.tcp_outside, serve=args.serve, criu_args=list(args.criu_args),
        work_dir=args.work_dir, foreground=args.foreground, stop_timeout=args.stop_timeout,
        nat_peer_netns=list(args.nat_peer_netns), env=dict(os.environ),
        stdout_is_ours=args.json)
    p = plan(cfg)
    out = run(cfg, p, on_start=None if args.json else _print_summary)
    if args.json:
        sys.stdout.write(render_json(p, cfg, out))
    return out.exit_code


def render_json(p: Any, cfg: Any, out: Any) -> str:
    """`restore --json`: inspect's document (docs/json.md) plus what restore did."""
    import json
    import signal

    from .render import render_json as inspect_json

    doc = json.loads(inspect_json(p.image_real, p.amap, p.results, p.ports_taken))
    doc["netns"] = cfg.netns
    doc["map_defaulted"] = p.map_defaulted
    doc["restore"] = {
        "exit_code": out.exit_code,
        "criu_argv": out.argv,
        "tcp_established_added": out.tcp_established_added,
        "work_dir": out.work_dir,
        "log": out.log,
        "signal": signal.Signals(out.signal).name if out.signal else None,
        "nat_peer_netns": list(cfg.nat_peer_netns),
        "nat_kept": out.nat_kept,
    }
    return json.dumps(doc, indent=2) + "\n"
