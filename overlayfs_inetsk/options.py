"""THE one description of the command-line options that more than one place needs.

The parsers are built from it (add_options), and so is the command line of the background
mount daemon (to_argv, used by fuse/spawn.py): a `mount` option added here reaches the
detached daemon without any change to the spawn code (tests/test_options.py checks that
every option survives the round trip), and so is the parser of the plugin's options files
and $OVERLAYFS_INETSK_OPTIONS (parse_words: the same options as on the command line).

A leaf module (no import of the rest of the package but errors): the CLI, the background
spawn (fuse/) and the planner's map sources (planner/sources.py) all read it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from typing import Any, Literal, NamedTuple
else:
    from .record import NamedTuple

if TYPE_CHECKING:  # not imported: the planner reads this module on the plugin's CLI route,
    import argparse  # which builds no parser (about 5 ms with what argparse loads)

# argparse.SUPPRESS (tests/test_startup.py checks that they are equal)
SUPPRESS = "==SUPPRESS=="

if TYPE_CHECKING:
    Kind = Literal["positional", "value", "append", "flag"]
else:
    Kind = str


class Option(NamedTuple):  # not a dataclass: its decorator costs every command ~1 ms
    flags: tuple[str, ...]  # ("--map",), ("--foreground", "-f"); for a positional: (dest,)
    dest: str
    kind: Kind
    help: str | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    default: Any = None
    type: Any = None
    field: str = ""  # the MountConfig attribute holding it ("" = dest)
    child: bool = True  # passed on to the background daemon (False: spawn sets it itself)

    @property
    def attr(self) -> str:
        return self.field or self.dest

    def add_to(self, p: Any) -> None:
        kw: dict[str, Any] = {}
        if self.help is not None:
            kw["help"] = self.help
        if self.metavar is not None:
            kw["metavar"] = self.metavar
        if self.kind == "positional":
            p.add_argument(self.dest, **kw)
            return
        kw["dest"] = self.dest
        if self.kind == "flag":
            p.add_argument(*self.flags, action="store_true", **kw)
            return
        if self.kind == "append":
            kw.update(action="append", default=[])
        else:
            kw["default"] = self.default
        if self.choices is not None:
            kw["choices"] = self.choices
        if self.type is not None:
            kw["type"] = self.type
        p.add_argument(*self.flags, **kw)

    def argv(self, value: Any) -> list[str]:
        """This option's part of a command line that parses back to `value`."""
        if self.kind == "positional":
            return [str(value)]
        if self.kind == "flag":
            return [self.flags[0]] if value else []
        if self.kind == "append":
            return [a for v in value for a in (self.flags[0], str(v))]
        return [] if value is None else [self.flags[0], str(value)]


TCP_FATES = ("close", "keep", "nat", "fail")  # = core.decide.TCP_FATES (tests/test_options.py)
SERVE_MODES = ("symlink", "read")  # = core.tree.SERVE_MODES
# = node.barrier's ACTIONS, DEFAULT_ACTION, DEFAULT_TIMEOUT (tests/test_options.py): the
# parser does not import node.barrier (subprocess, socket: every command's start-up)
BARRIER_ACTIONS = ("pre-restore", "post-setup-namespaces", "post-restore", "network-unlock",
                   "pre-resume", "post-resume")
BARRIER_DEFAULT_ACTION = "post-restore"
BARRIER_DEFAULT_TIMEOUT = 60.0
RESTORE_STOP_TIMEOUT = 10.0  # = node.criu.STOP_TIMEOUT (tests/test_options.py)

MAP_OPTIONS: tuple[Option, ...] = (
    Option(("--map",), "map", "append", metavar="OLD=NEW", field="maps",
           help="a rule: ADDR=ADDR, PREFIX=PREFIX, ADDR=auto, local=ADDR|auto, "
                "ADDR:PORT=ADDR:PORT, ADDR:PORT=:PORT, :PORT=:PORT "
                "(repeatable; see docs/map.md)"),
    Option(("--map-file",), "map_file", "append", metavar="FILE", field="map_files",
           help="TOML or JSON file of rules (repeatable)"),
    Option(("--port-offset",), "port_offset", "value", type=int, metavar="N",
           help="move every non-zero local port by N (port rules win; for clones of one "
                "checkpoint on one node; see docs/map.md)"),
    Option(("--strict",), "strict", "flag",
           help="fail when a socket keeps a specific address no rule covers, or when a "
                "port the restore binds is taken in --netns"),
    Option(("--tcp-outside",), "tcp_outside", "value", choices=TCP_FATES, default="close",
           help="fate of a TCP connection whose local end moves but whose peer is "
                "outside the map (default: close; see docs/tcp.md)"),
    Option(("--netns",), "netns", "value", metavar="PATH",
           help="network namespace whose address `auto` means and whose taken ports are "
                "checked (/run/netns/NAME or /proc/PID/ns/net; default: our own)"),
    Option(("--iface",), "iface", "value", metavar="NAME",
           help="interface whose address `auto` means (default: the default route's)"),
)

MOUNT_POSITIONALS: tuple[Option, ...] = (
    Option(("image_dir",), "image_dir", "positional", metavar="IMAGE_DIR"),
    Option(("mountpoint",), "mountpoint", "positional", metavar="MOUNTPOINT"),
)

DAEMON_OPTIONS: tuple[Option, ...] = (
    Option(("--foreground", "-f"), "foreground", "flag", child=False,
           help="serve in this process until unmounted or SIGTERM/SIGINT"),
    Option(("--systemd",), "systemd", "flag",
           help="send READY=1 to $NOTIFY_SOCKET once serving (Type=notify units)"),
    Option(("--allow-other",), "allow_other", "flag",
           help="let other users than the mounting one see the view"),
    Option(("--serve",), "serve", "value", choices=SERVE_MODES, default="symlink",
           help="how files other than socket images appear: symlinks to the "
                "originals through a read-only bind of IMAGE_DIR (default; CRIU "
                "follows them; see docs/security.md) or served through read()"),
    Option(("--log-file",), "log_file", "value", metavar="PATH", child=False,
           help="daemon log (default in the background: "
                "/run/overlayfs-inetsk/<mountpoint>.log; in the foreground: stderr)"),
    Option(("--verbose", "-v"), "verbose", "flag", help="debug logging"),
    Option(("--ready-fd",), "ready_fd", "value", type=int, help=SUPPRESS,
           child=False),
    # set by `restore` and the background `mount`, which made the port check themselves
    Option(("--no-port-check",), "no_port_check", "flag", help=SUPPRESS),
    # set by `restore`: its plan, handed over (planner/view.py), so the daemon plans nothing
    Option(("--plan-fd",), "plan_fd", "value", type=int, help=SUPPRESS),
)

# every option of `mount`, in command-line order
MOUNT_OPTIONS: tuple[Option, ...] = MOUNT_POSITIONALS + MAP_OPTIONS + DAEMON_OPTIONS

# `rewrite`'s own options (its output: docs/cli.md)
REWRITE_OPTIONS: tuple[Option, ...] = (
    Option(("--table",), "table", "flag",
           help="print a row for every socket that changes (inspect's table), not only "
                "for those that need attention (needs-address)"),
)


def add_options(p: argparse.ArgumentParser, options: Iterable[Option],
                group: str | None = None) -> None:
    target: Any = p.add_argument_group(group) if group else p
    for o in options:
        o.add_to(p if o.kind == "positional" else target)


def add_map_options(p: argparse.ArgumentParser) -> None:
    """The address-map options shared by every command that rewrites."""
    add_options(p, MAP_OPTIONS, "address map")


def to_argv(options: Sequence[Option], values: Mapping[str, Any] | Any) -> list[str]:
    """The command-line words of `options` that parse back to `values` (a mapping by
    attribute name, or an object with those attributes, such as a MountConfig). Options
    with child=False are left out (their caller sets them)."""
    get = values.get if isinstance(values, Mapping) else (lambda a: getattr(values, a))
    positional = [w for o in options if o.kind == "positional" for w in o.argv(get(o.attr))]
    named = [w for o in options if o.kind != "positional" and o.child
             for w in o.argv(get(o.attr))]
    return positional + named


def from_args(options: Iterable[Option], args: argparse.Namespace) -> dict[str, Any]:
    """Parsed values by attribute name (MountConfig's keyword arguments)."""
    return {o.attr: (list(getattr(args, o.dest)) if o.kind == "append"
                     else getattr(args, o.dest)) for o in options}


# the options the CRIU plugin takes from its options files and $OVERLAYFS_INETSK_OPTIONS
PLUGIN_OPTIONS: tuple[Option, ...] = tuple(
    o for o in MAP_OPTIONS if o.dest in ("strict", "tcp_outside", "iface"))


def _usage(o: Option) -> str:
    if o.kind == "flag":
        return o.flags[0]
    return f"{o.flags[0]} {'|'.join(o.choices) if o.choices else o.metavar}"


def parse_words(options: Sequence[Option], words: Sequence[str], source: str
                ) -> dict[str, Any]:
    """The values (by dest; the defaults for those not given) of `words` read as these
    flag and value options on a command line (`--name value` or `--name=value`). MapError
    naming `source` for an unknown option, a missing value or a value not among the
    choices."""
    from .errors import MapError

    by_flag = {f: o for o in options for f in o.flags}
    values: dict[str, Any] = {o.dest: (False if o.kind == "flag" else o.default)
                              for o in options}
    i = 0
    while i < len(words):
        w = words[i]
        name, eq, val = w.partition("=")
        o = by_flag.get(w if w in by_flag else name)
        if o is None or (o.kind == "flag" and w not in by_flag):
            allowed = ", ".join(_usage(o) for o in options)
            raise MapError(f"{source}: unknown option {w!r} (allowed: {allowed})")
        if o.kind == "flag":
            values[o.dest] = True
        else:
            if not eq:
                i += 1
                if i == len(words):
                    raise MapError(f"{source}: {name} needs a value")
                val = words[i]
            if o.choices is not None and val not in o.choices:
                raise MapError(f"{source}: {name} must be {', '.join(o.choices[:-1])} or "
                               f"{o.choices[-1]}, not {val!r}")
            values[o.dest] = val
        i += 1
    return values
