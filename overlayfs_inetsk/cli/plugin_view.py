"""`overlayfs-inetsk plugin-view --socket-fd 3`: the hidden command the CRIU plugin runs when
no agent answers, one process per restore (docs/plugin.md).

Its start-up is paid by every such restore, so it is lean: cli/__init__.py hands it argv
before any parser is built, and the command line the plugin passes (`--socket-fd N`, and
`--view-root DIR` in tests, each `--name value` or `--name=value`) is read without argparse
(which loads re, gettext, locale and shutil: about 5 ms), with the cyclic GC paused while
it imports. Anything else (an abbreviation,
a repeated option, -h, a bad value) goes to the argparse parser, which gives the same
result, usage and exit code 2 as before. tests/test_startup.py pins what this route
imports.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..plugin.wire import CLI_FD, VIEW_ROOT

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from typing import NoReturn
    import argparse

PROG = "overlayfs-inetsk plugin-view"
_NAMES = {"--socket-fd": "socket_fd", "--view-root": "view_root"}


def parser() -> argparse.ArgumentParser:
    import argparse

    p = argparse.ArgumentParser(prog=PROG)
    p.add_argument("--socket-fd", type=int, required=True,
                   help=f"the socket the request comes on (the plugin passes {CLI_FD})")
    p.add_argument("--view-root", default=VIEW_ROOT, help=argparse.SUPPRESS)
    return p


def quick_args(argv: Sequence[str]) -> tuple[int, str] | None:
    """(socket fd, view root) of the plain forms, or None for argparse to read argv."""
    got: dict[str, str] = {}
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name not in _NAMES or name in got:
            return None
        if not eq:
            i += 1
            if i == len(argv):
                return None
            value = argv[i]
        if not value or value.startswith("-"):
            return None
        got[name] = value
        i += 1
    fd = got.get("--socket-fd")
    if fd is None or not (fd.isascii() and fd.isdigit()):
        return None
    return int(fd), got.get("--view-root", VIEW_ROOT)


def _error(message: str) -> NoReturn:
    parser().error(message)


def plugin_view_main(argv: Sequence[str]) -> int:
    """Serve the one request the plugin sends on --socket-fd (its end of a socketpair)
    with the agent's handler, then exit at once (the plugin waits for this process, and
    kills its process group at its deadline)."""
    import gc

    # the cyclic GC was paused by cli.main for the imports (their objects hold no garbage,
    # and its collections walked them again and again: 1.5 % of the route's instructions);
    # it runs again for the request (and for a caller in process, whatever happens)
    try:
        quick = quick_args(argv)
        if quick is None:
            args = parser().parse_args(argv)
            quick = args.socket_fd, args.view_root
        fd, view_root = quick
        import _socket

        from ..app import plugin_view  # noqa: F401  (handle() would import it: GC paused)
        from ..app.agent import handle

        gc.freeze()  # what was imported, out of the collector's reach (before it runs again)
    finally:
        gc.enable()

    try:
        conn = _socket.socket(fileno=fd)
    except OSError as e:
        _error(f"--socket-fd {fd}: {e.strerror}")
    if conn.type != _socket.SOCK_SEQPACKET or conn.family != _socket.AF_UNIX:
        _error(f"--socket-fd {fd}: not a unix SOCK_SEQPACKET socket")
    handle(conn, view_root)
    os._exit(0)  # no interpreter teardown: the restore waits for this exit
