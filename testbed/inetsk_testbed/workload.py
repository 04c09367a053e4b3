"""Sample service program to checkpoint: holds the sockets its command line asks for (one
program: it runs as init of its own pid namespace; its parts: wlbase.py, wlsockets.py).

    python -m inetsk_testbed.workload [--ready-fd N] SOCKET-FLAGS...

Socket flags (each repeatable). ENDPOINT is ``ADDR:PORT``, IPv6 as ``[ADDR]:PORT``.
An IPv6 ENDPOINT makes an AF_INET6 socket with IPV6_V6ONLY off (dual stack) unless
``,v6only=1``; ``[::ffff:10.77.0.1]:PORT`` is a dual-stack socket bound to a v4-mapped
address. Every spec may start with ``LABEL@``; by default the label is derived from the
flag and the spec (``tcp/10.77.0.1:8000``, ``udp/...``, ``udpc/...``, ``self/...``,
``client/...``). Options follow as ``,key=value``.

--tcp-listen [LABEL@]ENDPOINT[,v6only=1][,backlog=N]
    Listener. Each accepted connection first gets ``<label> <local-addr> <local-port>\\n``,
    then lines are echoed, except these commands (answers end with a line ``END``):
      SELF [LABEL]         ping over each (or the named) self-connection:
                           ``SELF <label> OK`` or ``SELF <label> FAIL <reason>``
      CLIENT LABEL TEXT    send TEXT over a --tcp-connect connection, wait for it to be
                           echoed back: ``CLIENT <label> OK <local> <peer>`` or FAIL
      ASK LABEL COMMAND    send COMMAND over a --tcp-connect connection to another
                           workload listener and relay its answer (the lines up to its
                           END, joined by `` | ``): ``ASK <label> OK <answer>`` or FAIL
      SEQ                  ``SEQ <label> conn=<k> seq=<n> pid=<pid>``: this is the k-th
                           connection the listener accepted, and the n-th SEQ asked over
                           it (through ASK, a number only that very connection carries)
      UDPSEND LABEL TEXT   send TEXT on a --udp-connect socket: ``UDPSEND <label> OK <n>``
      STATUS               one line per socket: ``<kind> <label> <local> <peer> <state>``
      PID                  ``PID <pid in own ns> <pid in the host's /proc>``
      BYE                  the server closes the connection (no answer)
--udp-bind [LABEL@]ENDPOINT[,v6only=1]
    Bound UDP socket: answers each datagram to its sender with ``<label> <datagram>``.
--udp-connect [LABEL@]LOCAL=PEER[,v6only=1]
    UDP socket bound to LOCAL and connected to PEER: answers datagrams from PEER likewise.
--tcp-self [LABEL@]ENDPOINT[,keep_listener=1]
    A TCP connection to itself over ENDPOINT (listen, connect, accept; both ends kept; the
    listener is closed afterwards unless keep_listener=1). Checked with ``SELF``.
--tcp-connect [LABEL@]PEER[,bind=ADDR][,reconnect=1][,retry=SECONDS]
    Client connection to another server (blocking connect at start, 5 s timeout). With
    reconnect=1 a lost connection (EOF, reset, EPIPE) is re-established every 0.5 s. With
    retry=S a refused connect at start is tried again every 50 ms for up to S seconds (a
    peer process started at the same time may not listen yet).

Once every socket is set up it writes ``READY <host-pid>\\n`` to --ready-fd (then closes
it) or to stdout; a set-up failure writes ``ERROR <message>`` there and exits 2. After
READY, fds 0-2 point at /dev/null. One process, a poll() loop, no threads, no files
opened for writing: safe to checkpoint with CRIU.
"""

from __future__ import annotations

import argparse
import errno
import os
import selectors
import socket
import sys
import time
from collections.abc import Callable
from typing import Any


from .wlbase import (  # noqa: F401 (Endpoint, parse_endpoint, sock_names: the API)
    Endpoint,
    LineConn,
    Request,
    Spec,
    make_socket,
    parse_endpoint,
    parse_spec,
    sock_names,
)
from .wlsockets import Client, SelfPair, Udp


class ControlConn(LineConn):
    """A connection accepted by a --tcp-listen socket."""

    def __init__(self, app: App, sock: socket.socket, label: str, number: int = 0):
        super().__init__(app, sock)
        self.label, self.number, self.seq = label, number, 0
        local = sock.getsockname()
        self.send_line(f"{label} {local[0]} {local[1]}")

    def on_line(self, line: str) -> None:
        word, _, rest = line.partition(" ")
        app = self.app
        if word == "BYE":
            self.close("bye")
        elif word == "PID":
            self.send_line(f"PID {os.getpid()} {os.readlink('/proc/self')}")
            self.send_line("END")
        elif word == "STATUS":
            for obj in app.objects:
                self.send_line(obj.status())
            self.send_line("END")
        elif word == "SELF":
            pairs = [p for p in app.selfs if not rest or p.label == rest]
            if not pairs:
                self.send_line(f"SELF {rest or '-'} FAIL no-such-self-connection")
                self.send_line("END")
                return
            req = Request(self, [f"SELF {p.label}" for p in pairs], time.monotonic() + 2)
            app.requests.add(req)
            for p in pairs:
                p.ping(req)
        elif word == "CLIENT":
            label, _, text = rest.partition(" ")
            cl = app.clients.get(label)
            key = f"CLIENT {label}"
            if cl is None:
                self.send_line(f"{key} FAIL no-such-client")
                self.send_line("END")
                return
            req = Request(self, [key], time.monotonic() + 3)
            app.requests.add(req)
            cl.request(req, text or "hello")
        elif word == "SEQ":
            self.seq += 1
            self.send_line(f"SEQ {self.label} conn={self.number} seq={self.seq} "
                           f"pid={os.getpid()}")
            self.send_line("END")
        elif word == "ASK":
            label, _, text = rest.partition(" ")
            cl = app.clients.get(label)
            key = f"ASK {label}"
            if cl is None or not text:
                self.send_line(f"{key} FAIL {'no-such-client' if cl is None else 'no-command'}")
                self.send_line("END")
                return
            req = Request(self, [key], time.monotonic() + 3)
            app.requests.add(req)
            cl.ask(req, text)
        elif word == "UDPSEND":
            label, _, text = rest.partition(" ")
            u = app.udps.get(label)
            if u is None or u.spec.kind != "udpc":
                self.send_line(f"UDPSEND {label} FAIL no-such-connected-udp")
            else:
                try:
                    n = u.sock.send(text.encode())
                    self.send_line(f"UDPSEND {label} OK {n}")
                except OSError as e:
                    self.send_line(f"UDPSEND {label} FAIL {errno.errorcode.get(e.errno or 0, e)}")
            self.send_line("END")
        else:
            self.send_line(line)


class Listener:
    def __init__(self, app: App, spec: Spec):
        self.app, self.spec, self.label = app, spec, spec.label
        self.sock = make_socket(spec.endpoint, socket.SOCK_STREAM, spec.opts)
        self.sock.bind(spec.endpoint.sockaddr)
        self.sock.listen(int(spec.opts.get("backlog", "64")))
        self.sock.setblocking(False)
        self.accepted = 0
        app.sel.register(self.sock, selectors.EVENT_READ, self)

    def on_event(self, mask: int) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        self.accepted += 1
        ControlConn(self.app, conn, self.label, self.accepted)

    def status(self) -> str:
        local, _ = sock_names(self.sock)
        return f"tcp-listen {self.label} {local} - LISTEN"


class App:
    def __init__(self) -> None:
        self.sel = selectors.PollSelector()  # poll(): no epoll fd to checkpoint
        self.objects: list[Any] = []
        self.selfs: list[SelfPair] = []
        self.clients: dict[str, Client] = {}
        self.udps: dict[str, Udp] = {}
        self.requests: set[Request] = set()
        self.ballast: bytearray | None = None  # --hold-mib: memory for the dump to carry

    def setup(self, specs: list[Spec]) -> None:
        labels = set()
        for spec in specs:
            if spec.label in labels:
                raise ValueError(f"duplicate label {spec.label!r}")
            labels.add(spec.label)
            try:
                if spec.kind == "tcp":
                    obj: Any = Listener(self, spec)
                elif spec.kind in ("udp", "udpc"):
                    obj = self.udps[spec.label] = Udp(self, spec)
                elif spec.kind == "self":
                    obj = SelfPair(self, spec)
                    self.selfs.append(obj)
                elif spec.kind == "client":
                    obj = self.clients[spec.label] = Client(self, spec)
                else:
                    raise ValueError(spec.kind)
            except OSError as e:
                raise OSError(e.errno, f"{spec.label}: {e.strerror}") from None
            self.objects.append(obj)

    def loop(self) -> None:
        while True:
            now = time.monotonic()
            timeout = 0.2
            for req in list(self.requests):
                req.expire(now)
            for c in self.clients.values():
                c.tick(now)
            for key, mask in self.sel.select(timeout):
                key.data.on_event(mask)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m inetsk_testbed.workload",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--ready-fd", type=int, default=None)
    ap.add_argument("--hold-mib", type=int, default=0,
                    help="also hold this many MiB of touched memory (for restore benchmarks)")
    for flag, kind in (("--tcp-listen", "tcp"), ("--udp-bind", "udp"),
                       ("--udp-connect", "udpc"), ("--tcp-self", "self"),
                       ("--tcp-connect", "client")):
        ap.add_argument(flag, dest=kind, action="append", default=[], metavar="SPEC")
    args = ap.parse_args(argv)

    def setup() -> App:
        app = App()
        # every page written, so CRIU dumps (and restores) all of it
        app.ballast = bytearray(b"\x5a") * (args.hold_mib << 20) if args.hold_mib else None
        # keep command-line order within each kind; listeners first so that --tcp-connect
        # to our own listener works
        specs = [parse_spec(kind, s) for kind in ("tcp", "udp", "udpc", "self", "client")
                 for s in getattr(args, kind)]
        app.setup(specs)
        return app

    return serve(args.ready_fd, setup)


def serve(ready_fd: int | None, setup: Callable[[], Any]) -> int:
    """The start-up protocol of the test programs: run setup(); write `ERROR <message>`
    (exit 2) or `READY <pid here>` to ready_fd (or stdout); point fds 0-2 at /dev/null so
    nothing changes size under CRIU; run the app's loop."""
    ready = os.fdopen(ready_fd, "w") if ready_fd is not None else sys.stdout
    try:
        app = setup()
    except (OSError, ValueError) as e:
        ready.write(f"ERROR {e}\n")
        ready.flush()
        return 2
    ready.write(f"READY {os.readlink('/proc/self')}\n")
    ready.flush()
    if ready_fd is not None:
        ready.close()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    app.loop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
