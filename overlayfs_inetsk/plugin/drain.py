"""The agent's accept loop and its stop: SIGTERM (or SIGINT) drains, it does not drop.

The loop polls the listening socket and a pipe the signal handler writes to, so a signal
ends the wait at once and never lands in the middle of a request's start. On stop:
  1. the path is unlinked if it is still the socket we bound (not the one a new agent took
     it over with, not systemd's): from then on a restore finds no agent here and waits for
     the next one (or runs the CLI), as the plugin does for any agent that is away;
  2. what is already in the backlog is accepted and served (a restore that connected before
     step 1 is answered; closing the socket would reset it). systemd's socket is not
     drained: its backlog stays with systemd for the next agent;
  3. requests in flight finish, each by its own deadline, for at most DRAIN_S in all.
While it runs, the loop notices (once) when another agent has taken its path over.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .listener import Listener
from .wire import TIMEOUT_MS

log = logging.getLogger(__name__)

DRAIN_S = TIMEOUT_MS / 1000 + 5  # a request's default deadline, and some
CONNECT_GRACE_S = 0.05  # after the unlink: a connect() that found the path completes


class Stopper:
    """SIGTERM/SIGINT set `stopping` and wake the loop (a pipe it polls)."""

    def __init__(self) -> None:
        self.stopping = False
        self.signal = ""
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.signal = self.signal or signal.Signals(signum).name  # logged by finish()
        self.stopping = True
        try:
            os.write(self.w, b"x")
        except OSError:
            pass

    def wait(self, seconds: float) -> None:
        """Sleep, unless a stop comes first."""
        select.select([self.r], [], [], seconds)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        os.close(self.r)
        os.close(self.w)


def accept_loop(lst: Listener, stop: Stopper, slots: threading.BoundedSemaphore,
                start: Callable[[socket.socket], bool], short_of_fds: tuple[int, ...]) -> None:
    """Accept and start requests (at most the slots at once) until stop."""
    s = lst.sock
    s.setblocking(False)
    poller = select.poll()
    poller.register(s, select.POLLIN)
    poller.register(stop.r, select.POLLIN)
    pause, short, told, next_look = 0.05, False, False, time.monotonic() + 1
    while not stop.stopping:
        if time.monotonic() >= next_look:
            next_look = time.monotonic() + 1
            if not told and not lst.still_ours():
                log.info("%s is another agent's socket now: serving what came before it, "
                         "until SIGTERM", lst.path)
                told = True
        if not slots.acquire(timeout=0.2):
            continue
        ready = poller.poll(1000)
        if stop.stopping or not any(fd == s.fileno() for fd, _ in ready):
            slots.release()
            continue
        try:
            conn, _ = s.accept()
        except BlockingIOError:
            slots.release()
            continue
        except OSError as e:
            slots.release()
            if e.errno in short_of_fds:
                if not short:
                    log.warning("accept on %s: %s: pausing (raise the agent's fd limit?)",
                                lst.path, e.strerror)
                    short = True
                stop.wait(pause)
                pause = min(pause * 2, 1.0)
                continue
            if e.errno in (errno.ECONNABORTED, errno.EINTR, errno.EPROTO):
                continue
            raise
        if short:
            log.info("accepting again on %s", lst.path)
            short, pause = False, 0.05
        if not start(conn):
            stop.wait(pause)


def finish(lst: Listener, stop: Stopper, slots: threading.BoundedSemaphore,
           start: Callable[[socket.socket], bool], threads: set[threading.Thread]) -> None:
    """Steps 1 to 3 of the module's docstring."""
    log.info("%s: stopping (draining what came before it)", stop.signal or "stop")
    end = time.monotonic() + DRAIN_S
    drained, in_flight = 0, len(threads)
    if lst.activated:
        where = "systemd keeps the socket (what waits there is the next agent's)"
    else:
        unlinked = lst.unlink_if_ours()
        where = (f"removed {lst.path}" if unlinked else
                 f"left {lst.path} (another agent's socket now)")
        time.sleep(CONNECT_GRACE_S)
        while time.monotonic() < end:
            try:
                conn, _ = lst.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if not slots.acquire(timeout=max(0.0, end - time.monotonic())):
                conn.close()
                break
            if start(conn):
                drained += 1
    lst.sock.close()
    running = list(threads)  # a snapshot: the threads remove themselves as they end
    for t in running:
        t.join(max(0.0, end - time.monotonic()))
    left = sum(t.is_alive() for t in running)
    if left:
        log.warning("stopped with %d request(s) still running after %.0f s: they are lost",
                    left, DRAIN_S)
    log.info("stopped: %s; served %d request(s) from the backlog, %d were in flight",
             where, drained, in_flight)
