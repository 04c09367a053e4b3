"""A numbered TCP stream in both directions, for moving established connections (one end
of the stream: streamconn.py).

    python -m inetsk_testbed.stream --ctl ENDPOINT (--listen EP | --connect EP)
                                              [--interval S] [--reconnect] [--ready-fd N]

ENDPOINT is ``ADDR:PORT`` (IPv6 ``[ADDR]:PORT``). The process holds ONE stream connection:
``--listen`` accepts it (the listener stays open; a new connection replaces the current one), ``--connect``
makes it at start (and, with ``--reconnect``, again every 0.2 s after a loss). Each side
sends ``<n>\\n`` with n = 1, 2, 3, ... every ``--interval`` seconds (default 0.02) and checks
that what it receives is 1, 2, 3, ... with nothing missing and nothing repeated. A new
connection starts both counters again at 1.

The control listener (``--ctl``) speaks the workload's protocol (``probe.tcp_command``): a
hello line ``ctl <addr> <port>``, then commands answered by lines and ``END``:

  STATUS   ``conn=<open|none> rd=<open|eof|ERRNO> wr=<open|shut|ERRNO> sent=N recv=N bad=N
           local=EP peer=EP connects=N events=<e1,e2,...>``: bad counts received numbers
           that were not the next one; events lists what happened to the stream
           (``connected``, ``eof``, ``rd:ECONNRESET``, ``wr:EPIPE``, ...), oldest first
  STOP     stop sending (numbers already queued still go out); answers STATUS's line
  GO       send again
  SHUTWR   stop sending and shutdown(SHUT_WR): the peer reads EOF, we still receive
  BYE      close the control connection

Reading EOF does not close the stream: the peer may have half-closed it, and we keep
sending (CLOSE_WAIT). The stream socket is closed only on an error, or on EOF after our
own SHUTWR (both directions done). One process, poll(), no threads, nothing written to
files: safe to checkpoint with CRIU. ``start_stream(host, args)`` runs it as init of its
own pid namespace, like ``criu.start_workload``.
"""

from __future__ import annotations

import argparse
import errno
import selectors
import socket
import sys
import time
from typing import Any

from .streamconn import Stream
from .wlbase import Endpoint, parse_endpoint, sock_names
from .workload import serve


class Ctl:
    def __init__(self, app: App, sock: socket.socket):
        self.app, self.sock, self.buf = app, sock, b""
        sock.setblocking(True)
        sock.settimeout(2)
        local = sock.getsockname()
        self.send(f"ctl {local[0]} {local[1]}")
        sock.setblocking(False)
        app.sel.register(sock, selectors.EVENT_READ, self)

    def send(self, line: str) -> None:
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(2)
            self.sock.sendall(line.encode() + b"\n")
            self.sock.setblocking(False)
        except OSError:
            self.close()

    def close(self) -> None:
        try:
            self.app.sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()

    def on_event(self, mask: int) -> None:
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            word = line.decode(errors="replace").strip()
            if word == "BYE":
                self.close()
                return
            if word == "STOP":
                self.app.sending = False
            elif word == "GO":
                self.app.sending = True
            elif word == "SHUTWR":
                self.app.sending = False
                if self.app.stream is not None:
                    self.app.stream.shut_wr()
            elif word != "STATUS":
                self.send(f"ERROR unknown command {word!r}")
                self.send("END")
                continue
            self.send(self.app.status())
            self.send("END")


class Acceptor:
    def __init__(self, app: App, sock: socket.socket, ctl: bool):
        self.app, self.sock, self.ctl = app, sock, ctl
        sock.setblocking(False)
        app.sel.register(sock, selectors.EVENT_READ, self)

    def on_event(self, mask: int) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        if self.ctl:
            Ctl(self.app, conn)
        else:
            old = self.app.stream
            if old is not None:  # one stream at a time: the newest one wins
                self.app.events.append("replaced")
                self.app.stream = None
                old.close()
            self.app.stream = Stream(self.app, conn)
            self.app.connects += 1


def _socket(ep: Endpoint) -> socket.socket:
    s = socket.socket(ep.family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return s


def _listen(ep: Endpoint) -> socket.socket:
    s = _socket(ep)
    s.bind(ep.sockaddr)
    s.listen(8)
    return s


class App:
    def __init__(self, interval: float, connect: Endpoint | None, reconnect: bool):
        self.sel = selectors.PollSelector()  # poll(): no epoll fd to checkpoint
        self.interval = interval
        self.connect_to = connect
        self.reconnect = reconnect
        self.stream: Stream | None = None
        self.sending = True
        self.connects = 0
        self.events: list[str] = []
        self.last: Stream | None = None
        self.retry_at: float | None = None
        self.connecting: socket.socket | None = None

    def status(self) -> str:
        s = self.stream or self.last
        if s is None:
            return f"conn=none connects=0 events={','.join(self.events) or '-'}"
        local, peer = sock_names(s.sock) if not s.closed else ("-", "-")
        return (f"conn={'none' if s.closed else 'open'} rd={s.rd} wr={s.wr} sent={s.sent} "
                f"recv={s.recv} bad={s.bad} local={local} peer={peer} "
                f"connects={self.connects} events={','.join(self.events) or '-'}")

    def lost(self, s: Stream) -> None:
        if self.stream is s:
            self.stream = None
            self.last = s
            if self.reconnect and self.connect_to is not None:
                self.retry_at = time.monotonic()

    def first_connect(self) -> None:
        assert self.connect_to is not None
        s = _socket(self.connect_to)
        s.settimeout(5)
        s.connect(self.connect_to.sockaddr)
        self.stream = Stream(self, s)
        self.connects += 1

    def try_connect(self, now: float) -> None:
        if self.retry_at is None or now < self.retry_at or self.connecting is not None:
            return
        assert self.connect_to is not None
        self.retry_at = None
        s = _socket(self.connect_to)
        s.setblocking(False)
        if s.connect_ex(self.connect_to.sockaddr) not in (0, errno.EINPROGRESS):
            s.close()
            self.retry_at = now + 0.2
            return
        self.connecting = s
        self.sel.register(s, selectors.EVENT_WRITE, self)

    def on_event(self, mask: int) -> None:  # the pending non-blocking connect finished
        s = self.connecting
        assert s is not None
        self.sel.unregister(s)
        self.connecting = None
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            s.close()
            self.events.append(f"connect:{errno.errorcode.get(err, err)}")
            self.retry_at = time.monotonic() + 0.2
            return
        self.stream = Stream(self, s)
        self.connects += 1

    def loop(self) -> None:
        next_send = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_send:
                if self.stream is not None:
                    self.stream.tick()
                next_send = now + self.interval
            self.try_connect(now)
            for key, mask in self.sel.select(max(0.0, next_send - time.monotonic())):
                key.data.on_event(mask)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m inetsk_testbed.stream")
    ap.add_argument("--ready-fd", type=int)
    ap.add_argument("--ctl", required=True)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--listen")
    g.add_argument("--connect")
    ap.add_argument("--interval", type=float, default=0.02)
    ap.add_argument("--reconnect", action="store_true")
    args = ap.parse_args(argv)
    def setup() -> App:
        connect = parse_endpoint(args.connect) if args.connect else None
        app = App(args.interval, connect, args.reconnect)
        Acceptor(app, _listen(parse_endpoint(args.ctl)), ctl=True)
        if args.listen:
            Acceptor(app, _listen(parse_endpoint(args.listen)), ctl=False)
        else:
            app.first_connect()
        return app

    return serve(args.ready_fd, setup)


# --------------------------------------------------------------------------- host side
def start_stream(host: Any, args: list[str], timeout: float = 10) -> int:
    """Start the stream in ``host`` as init of a new pid namespace (as
    ``criu.start_workload`` does the workload); wait for READY; return its pid here."""
    from .criu import start_workload

    return start_workload(host, args, timeout, module="inetsk_testbed.stream")


def parse_status(line: str) -> dict[str, str]:
    """STATUS's line as a dict (numbers stay strings)."""
    return dict(part.split("=", 1) for part in line.split())


def status(host: Any, addr: Any, port: int, command: str = "STATUS",
           timeout: float = 5) -> dict[str, str]:
    """Send a control command from ``host``; the stream's STATUS line as a dict."""
    from .probe import tcp_command

    lines = tcp_command(host, addr, port, command, timeout)
    return parse_status(lines[-1])


if __name__ == "__main__":
    sys.exit(main())
