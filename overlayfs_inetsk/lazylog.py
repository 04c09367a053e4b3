"""Loggers for the modules on the plugin's CLI route, which load `logging` only when a
record can go somewhere.

`logging` and what it loads (traceback, linecache, tokenize, textwrap, string, threading,
weakref) were about 13 % of the start-up of `plugin-view`, the process the CRIU plugin runs
for every restore when no agent answers (docs/design.md, "The plugin's CLI route"); and
there it logs nothing: its lines are below WARNING. While `logging` is not loaded, nobody
has configured it, so its root logger is at WARNING with no handler: a DEBUG or INFO record
would be dropped. A Logger here drops it the same way without loading logging; from
WARNING up, or once anything has loaded logging (the agent and every other command set it
up: logsetup.py), it hands each call to logging.getLogger(name), the same logger a
module's `logging.getLogger(__name__)` gives, so handlers, levels and pytest's caplog see
these records as they see any other.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging as logging_

# logging's levels (the same numbers), for callers that must not load it to name one
DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40


class Logger:
    """The subset of logging.Logger the route's modules call."""

    __slots__ = ("name", "_real")

    def __init__(self, name: str) -> None:
        self.name = name
        self._real: logging_.Logger | None = None

    def _logger(self, level: int) -> logging_.Logger | None:
        """logging's logger, or None for a record unconfigured logging would drop."""
        real = self._real
        if real is None:
            if level < WARNING and "logging" not in sys.modules:
                return None
            import logging

            real = self._real = logging.getLogger(self.name)
        return real

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 (logging's name)
        real = self._logger(level)
        return real is not None and real.isEnabledFor(level)

    def _emit(self, level: int, msg: object, args: tuple[object, ...],
              exc_info: bool = False) -> None:
        real = self._logger(level)
        if real is not None:  # stacklevel: the record names our caller, not this module
            real.log(level, msg, *args, exc_info=exc_info, stacklevel=3)

    def log(self, level: int, msg: object, *args: object, exc_info: bool = False) -> None:
        self._emit(level, msg, args, exc_info)

    def debug(self, msg: object, *args: object) -> None:
        self._emit(DEBUG, msg, args)

    def info(self, msg: object, *args: object) -> None:
        self._emit(INFO, msg, args)

    def warning(self, msg: object, *args: object) -> None:
        self._emit(WARNING, msg, args)

    def error(self, msg: object, *args: object) -> None:
        self._emit(ERROR, msg, args)

    def exception(self, msg: object, *args: object) -> None:
        self._emit(ERROR, msg, args, exc_info=True)


def getLogger(name: str) -> Logger:  # noqa: N802 (logging's name)
    return Logger(name)
