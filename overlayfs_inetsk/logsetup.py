"""Logging for the command line: levels, -v/-q, and output that suits a terminal or journald.

    overlayfs-inetsk [-v|-q] COMMAND ...      (also accepted after COMMAND)

Levels: default INFO, `-q/--quiet` WARNING, `-v/--verbose` DEBUG (one line per rewrite
decision, see docs/logging.md). Lines go to stderr:

  * on a terminal or a file: `LEVEL message` (`DEBUG files.img: socket id 5 ...`);
  * when stderr is the journal (systemd sets $JOURNAL_STREAM to the `dev:ino` of the stream
    it gave us, checked against fstat(2)): `<N>message`, N the syslog priority, which
    journald turns into the entry's PRIORITY (`journalctl -p warning` works); journald
    adds the time and pid itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from typing import IO, Any

# syslog priorities (sd-daemon.h SD_ERR ...)
PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
            logging.DEBUG: 7}


def syslog_priority(levelno: int) -> int:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return PRIORITY[level]
    return PRIORITY[logging.DEBUG]


class JournalFormatter(logging.Formatter):
    """`<N>message`, one prefix per line (journald reads each line as an entry)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def stream_is_journal(stream: IO[Any] | None, env: Mapping[str, str] | None = None) -> bool:
    """True when `stream` is the journal stream systemd connected ($JOURNAL_STREAM)."""
    if stream is None:  # a FileHandler's stream before it is opened
        return False
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev_s, sep, ino_s = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev_s), int(ino_s))
    except (OSError, ValueError, AttributeError):
        return False


def formatter_for(stream: IO[Any] | None, fmt: str,
                  env: Mapping[str, str] | None = None) -> logging.Formatter:
    """Formatter(fmt) for lines on `stream`; JournalFormatter(fmt) when it is the journal."""
    return (JournalFormatter if stream_is_journal(stream, env) else logging.Formatter)(fmt)


def error_prefix(stream: IO[Any] | None = None) -> str:
    """`<3>` (LOG_ERR) for a line printed outside logging, e.g. the CLI's one-line error,
    when `stream` (stderr) is the journal; else nothing."""
    return "<3>" if stream_is_journal(sys.stderr if stream is None else stream) else ""


def level_for(verbosity: int = 0, quiet: bool = False) -> int:
    if quiet:
        return logging.WARNING
    return logging.DEBUG if verbosity > 0 else logging.INFO


def setup(verbosity: int = 0, quiet: bool = False, stream: IO[Any] | None = None,
          env: Mapping[str, str] | None = None) -> logging.Handler:
    """Configure the root logger for a CLI run; returns the handler installed. Replaces
    handlers an earlier call installed (idempotent)."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    journal = stream_is_journal(stream, env)
    handler.setFormatter(formatter_for(stream, "%(message)s" if journal else
                                       "%(levelname)s %(message)s", env))
    handler.set_name("overlayfs-inetsk-cli")
    root = logging.getLogger()
    for h in list(root.handlers):
        if h.get_name() == "overlayfs-inetsk-cli":
            root.removeHandler(h)
    root.addHandler(handler)
    level = level_for(verbosity, quiet)
    root.setLevel(level)
    # third-party chatter stays at INFO or above unless asked twice (-vv)
    for name in ("pyfuse3", "trio"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity > 1 else
                                         max(level, logging.INFO))
    return handler


def add_log_options(parser: argparse.ArgumentParser, subparsers: Any = None) -> None:
    """-v/--verbose (repeatable) and -q/--quiet on the main parser, and on every subcommand
    parser that does not define them already (a subcommand's own `-v` keeps its meaning).
    On subcommands the default is SUPPRESS, so `overlayfs-inetsk -v inspect ...` keeps the
    global value."""
    def add(p: argparse.ArgumentParser, default_v: Any, default_q: Any) -> None:
        have = p._option_string_actions  # noqa: SLF001 - argparse offers no public way
        g = p.add_argument_group("logging")
        if "-v" not in have and "--verbose" not in have:
            g.add_argument("-v", "--verbose", dest="verbosity", action="count",
                           default=default_v, help="debug logging (-vv: libraries too)")
        if "-q" not in have and "--quiet" not in have:
            g.add_argument("-q", "--quiet", dest="quiet", action="store_true",
                           default=default_q, help="warnings and errors only")

    add(parser, 0, False)
    if subparsers is not None:
        for sp in subparsers.choices.values():
            add(sp, argparse.SUPPRESS, argparse.SUPPRESS)


def setup_from_args(args: argparse.Namespace) -> logging.Handler:
    """setup() from parsed options (a subcommand's own boolean `verbose` counts as -v)."""
    verbosity = int(getattr(args, "verbosity", 0) or 0)
    if getattr(args, "verbose", None) is True:
        verbosity = max(verbosity, 1)
    elif getattr(args, "verbose", None) is False and verbosity > 0:
        args.verbose = True  # `overlayfs-inetsk -v mount ...` makes the daemon verbose too
    return setup(verbosity, bool(getattr(args, "quiet", False)))
