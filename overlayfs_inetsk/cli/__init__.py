"""Command-line entry point: `overlayfs-inetsk inspect|rewrite|mount|umount|restore|...`.

Thin adapter: parses arguments, calls the core, prints. One module per group of commands
(images, mount, restore, doctor, group); the options more than one command needs are
described once in options.py. User errors are one line on stderr
with the exit code of their InetskError class (docs/cli.md); no tracebacks.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from ..errors import InetskError

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:  # argparse is imported by make_parser: `plugin-view` never loads it
    import argparse

EXIT_INTERNAL = 70
EXIT_MISSING = 69  # EX_UNAVAILABLE: a module the install should have provided is missing
# third-party modules we need, and how to get each (docs/cli.md, README)
MISSING_FIX = {
    "pycriu": "CRIU's Python bindings, not on PyPI: run scripts/setup.sh, or pip install the "
              "lib/ dir of CRIU 4.2.1's source tree after `make lib` there",
    "google": "protobuf: run scripts/setup.sh, or pip install protobuf",
    "pyfuse3": "run scripts/setup.sh, or pip install pyfuse3 (needs libfuse3-dev, pkg-config)",
    "trio": "run scripts/setup.sh, or pip install trio",
}


def make_parser() -> argparse.ArgumentParser:
    import argparse

    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="overlayfs-inetsk",
        description="Serve a CRIU checkpoint with inet socket addresses rewritten for this node.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from .doctor import add_doctor_parser
    from .group import add_group_parsers
    from .images import add_image_parsers
    from .mount import add_mount_parsers
    from .nat import add_nat_parsers
    from .restore import add_restore_parsers

    add_image_parsers(sub)
    add_mount_parsers(sub)
    add_group_parsers(sub)
    add_restore_parsers(sub)
    add_nat_parsers(sub)
    add_doctor_parser(sub)
    from .plugin import add_plugin_parsers

    add_plugin_parsers(sub)
    from ..logsetup import add_log_options

    add_log_options(parser, sub)  # -v/-q before and after COMMAND (docs/logging.md)
    return parser


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace
                   ) -> argparse.ArgumentParser:
    """The parser of the (sub)command args names (`plugin install`: install's)."""
    import argparse

    for dest in ("command", "plugin_command"):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, dest, None)
        if not subs or name not in subs[0].choices:
            break
        parser = subs[0].choices[name]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # file names are bytes: one that is not UTF-8 (decoded with surrogateescape) goes out
    # as the same bytes in every locale, as in the C locale, instead of a UnicodeEncodeError
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plugin-view"]:  # the CRIU plugin's call: no parser of every command
        import gc

        gc.disable()  # while it imports (plugin_view_main turns it on again)
        from .plugin_view import plugin_view_main

        return plugin_view_main(argv[1:])
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the command's own usage, not the top level's (argparse's parse_args)
        command_parser(parser, args).error("unrecognized arguments: " + " ".join(extra))
    from ..logsetup import setup_from_args

    setup_from_args(args)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except InetskError as exc:
        from ..logsetup import error_prefix

        print(f"{error_prefix()}overlayfs-inetsk: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        top = (exc.name or "").partition(".")[0]
        if top not in MISSING_FIX:
            return _internal_error()
        from ..logsetup import error_prefix

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
