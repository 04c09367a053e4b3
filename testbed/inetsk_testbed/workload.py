"""Sample service program to checkpoint: holds the sockets its command line asks for.
Long: one self-contained program (it runs as init of its own pid namespace) for every
socket kind the tests dump.

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
import ipaddress
import os
import selectors
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

LINE_MAX = 4096


# --------------------------------------------------------------------------- parsing
@dataclass
class Endpoint:
    family: int
    host: str
    port: int
    v4mapped: bool = False

    @property
    def sockaddr(self) -> tuple[Any, ...]:
        if self.family == socket.AF_INET6:
            return (self.host, self.port, 0, 0)
        return (self.host, self.port)

    def __str__(self) -> str:
        return fmt_addr(self.host, self.port)


def fmt_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoint(s: str) -> Endpoint:
    if s.startswith("["):
        host, sep, port = s[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad IPv6 endpoint {s!r} (want [ADDR]:PORT)")
        ip = ipaddress.IPv6Address(host)
        return Endpoint(socket.AF_INET6, str(ip), int(port), ip.ipv4_mapped is not None)
    host, sep, port = s.rpartition(":")
    if not sep:
        raise ValueError(f"bad endpoint {s!r} (want ADDR:PORT)")
    ip4 = ipaddress.IPv4Address(host)
    return Endpoint(socket.AF_INET, str(ip4), int(port))


@dataclass
class Spec:
    kind: str
    label: str
    endpoint: Endpoint
    peer: Endpoint | None = None
    opts: dict[str, str] = field(default_factory=dict)


def parse_spec(kind: str, text: str) -> Spec:
    label = None
    if "@" in text:
        label, text = text.split("@", 1)
        if not label or any(c.isspace() for c in label):
            raise ValueError(f"bad label {label!r}")
    main, *optparts = text.split(",")
    opts = {}
    for o in optparts:
        k, sep, v = o.partition("=")
        if not sep:
            raise ValueError(f"bad option {o!r} (want key=value)")
        opts[k] = v
    peer = None
    if kind == "udpc":
        local_s, sep, peer_s = main.partition("=")
        if not sep:
            raise ValueError(f"--udp-connect {main!r}: want LOCAL=PEER")
        ep = parse_endpoint(local_s)
        peer = parse_endpoint(peer_s)
    else:
        ep = parse_endpoint(main)
    return Spec(kind, label or f"{kind}/{main}", ep, peer, opts)


# --------------------------------------------------------------------------- sockets
def make_socket(ep: Endpoint, type_: int, opts: dict[str, str]) -> socket.socket:
    s = socket.socket(ep.family, type_)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if ep.family == socket.AF_INET6:
        v6only = opts.get("v6only", "0") not in ("0", "")
        if v6only and ep.v4mapped:
            raise ValueError(f"{ep}: a v4-mapped address needs v6only=0")
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
    return s


def sock_names(s: socket.socket) -> tuple[str, str]:
    def f(fn: Any) -> str:
        try:
            a = fn()
        except OSError:
            return "-"
        return fmt_addr(a[0], a[1])
    return f(s.getsockname), f(s.getpeername)


class LineConn:
    """A non-blocking stream socket with line buffering on both sides."""

    def __init__(self, app: App, sock: socket.socket):
        self.app = app
        self.sock = sock
        self.inbuf = b""
        self.outbuf = b""
        self.closed: str | None = None
        sock.setblocking(False)
        app.sel.register(sock, selectors.EVENT_READ, self)

    def send_line(self, line: str) -> None:
        if self.closed:
            return
        self.outbuf += line.encode() + b"\n"
        self.flush()

    def flush(self) -> None:
        while self.outbuf and not self.closed:
            try:
                n = self.sock.send(self.outbuf)
            except BlockingIOError:
                break
            except OSError as e:
                self.close(f"send:{errno.errorcode.get(e.errno or 0, e)}")
                return
            self.outbuf = self.outbuf[n:]
        if not self.closed:
            ev = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbuf else 0)
            self.app.sel.modify(self.sock, ev, self)

    def on_event(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self.flush()
        if mask & selectors.EVENT_READ and not self.closed:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as e:
                self.close(f"recv:{errno.errorcode.get(e.errno or 0, e)}")
                return
            if not data:
                self.close("eof")
                return
            self.inbuf += data
            while b"\n" in self.inbuf and not self.closed:
                line, self.inbuf = self.inbuf.split(b"\n", 1)
                self.on_line(line.decode(errors="replace").rstrip("\r"))
            if len(self.inbuf) > LINE_MAX:
                self.close("line too long")

    def on_line(self, line: str) -> None:
        raise NotImplementedError

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = reason
        try:
            self.app.sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        self.on_closed()

    def on_closed(self) -> None:
        pass


class Request:
    """A command waiting for asynchronous results (SELF, CLIENT)."""

    def __init__(self, conn: ControlConn, keys: list[str], deadline: float):
        self.conn = conn
        self.waiting = set(keys)
        self.results: dict[str, str] = {}
        self.order = keys
        self.deadline = deadline

    def resolve(self, key: str, line: str) -> None:
        if key in self.waiting:
            self.waiting.discard(key)
            self.results[key] = line
            if not self.waiting:
                self.finish()

    def expire(self, now: float) -> None:
        if self.waiting and now >= self.deadline:
            for k in list(self.waiting):
                self.resolve(k, f"{k} FAIL timeout")

    def finish(self) -> None:
        for k in self.order:
            self.conn.send_line(self.results[k])
        self.conn.send_line("END")
        self.conn.app.requests.discard(self)


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


class Udp:
    def __init__(self, app: App, spec: Spec):
        self.app, self.spec, self.label = app, spec, spec.label
        self.sock = make_socket(spec.endpoint, socket.SOCK_DGRAM, spec.opts)
        self.sock.bind(spec.endpoint.sockaddr)
        if spec.peer is not None:
            if spec.peer.family != spec.endpoint.family:
                raise ValueError(f"{spec.label}: local and peer families differ")
            self.sock.connect(spec.peer.sockaddr)
        self.sock.setblocking(False)
        self.last_error = "-"
        app.sel.register(self.sock, selectors.EVENT_READ, self)

    def on_event(self, mask: int) -> None:
        try:
            data, src = self.sock.recvfrom(65536)
        except BlockingIOError:
            return
        except OSError as e:  # e.g. ECONNREFUSED from an ICMP error on a connected socket
            self.last_error = errno.errorcode.get(e.errno or 0, str(e))
            return
        reply = self.label.encode() + b" " + data
        try:
            if self.spec.peer is not None:
                self.sock.send(reply)
            else:
                self.sock.sendto(reply, src)
        except OSError as e:
            self.last_error = errno.errorcode.get(e.errno or 0, str(e))

    def status(self) -> str:
        local, peer = sock_names(self.sock)
        kind = "udp-connect" if self.spec.peer is not None else "udp-bind"
        return f"{kind} {self.label} {local} {peer} {self.last_error}"


class SelfEnd(LineConn):
    def __init__(self, app: App, sock: socket.socket, pair: SelfPair, role: str):
        self.pair, self.role = pair, role
        super().__init__(app, sock)

    def on_line(self, line: str) -> None:
        word, _, token = line.partition(" ")
        if self.role == "server" and word == "PING":
            self.send_line(f"PONG {token}")
        elif self.role == "client" and word == "PONG":
            self.pair.pong(token)

    def on_closed(self) -> None:
        self.pair.broken(f"{self.role}-{self.closed}")


class SelfPair:
    """--tcp-self: a TCP connection from this process to itself."""

    def __init__(self, app: App, spec: Spec):
        self.app, self.spec, self.label = app, spec, spec.label
        ep = spec.endpoint
        lsock = make_socket(ep, socket.SOCK_STREAM, spec.opts)
        lsock.bind(ep.sockaddr)
        lsock.listen(1)
        csock = socket.socket(ep.family, socket.SOCK_STREAM)
        if ep.family == socket.AF_INET6:
            csock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        csock.settimeout(5)
        csock.connect(ep.sockaddr)
        lsock.settimeout(5)
        ssock, _ = lsock.accept()
        self.listener: socket.socket | None = lsock
        if spec.opts.get("keep_listener", "0") in ("0", ""):
            lsock.close()
            self.listener = None
        else:
            lsock.setblocking(False)  # kept, never accepts again
        self.client = SelfEnd(app, csock, self, "client")
        self.server = SelfEnd(app, ssock, self, "server")
        self.seq = 0
        self.pending: dict[str, Request] = {}
        self.failed: str | None = None

    def ping(self, req: Request) -> None:
        key = f"SELF {self.label}"
        if self.failed:
            req.resolve(key, f"{key} FAIL {self.failed}")
            return
        self.seq += 1
        token = str(self.seq)
        self.pending[token] = req
        self.client.send_line(f"PING {token}")

    def pong(self, token: str) -> None:
        req = self.pending.pop(token, None)
        if req is not None:
            req.resolve(f"SELF {self.label}", f"SELF {self.label} OK")

    def broken(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason
        for req in self.pending.values():
            req.resolve(f"SELF {self.label}", f"SELF {self.label} FAIL {self.failed}")
        self.pending.clear()

    def status(self) -> str:
        c_local, c_peer = sock_names(self.client.sock) if not self.client.closed else ("-", "-")
        state = f"BROKEN:{self.failed}" if self.failed else "ESTABLISHED"
        return f"tcp-self {self.label} {c_local} {c_peer} {state}"


class ClientConn(LineConn):
    def __init__(self, app: App, sock: socket.socket, owner: Client):
        self.owner = owner
        super().__init__(app, sock)

    def on_line(self, line: str) -> None:
        self.owner.on_line(line)

    def on_closed(self) -> None:
        self.owner.lost(self.closed or "closed")


class Client:
    """--tcp-connect: a client connection to another server."""

    def __init__(self, app: App, spec: Spec):
        self.app, self.spec, self.label = app, spec, spec.label
        self.conn: ClientConn | None = None
        self.connecting: socket.socket | None = None
        self.hello = "-"
        self.lost_reason = "-"
        self.reconnects = 0
        self.retry_at: float | None = None
        self.waiting: tuple[Request, str] | None = None
        self.asking: tuple[Request, list[str]] | None = None
        retry_end = time.monotonic() + float(spec.opts.get("retry", "0") or "0")
        while True:
            s = self._new_socket()
            s.settimeout(5)
            try:
                s.connect(spec.endpoint.sockaddr)
                break
            except ConnectionRefusedError:
                s.close()
                if time.monotonic() >= retry_end:
                    raise
                time.sleep(0.05)
        self.conn = ClientConn(app, s, self)

    def _new_socket(self) -> socket.socket:
        ep = self.spec.endpoint
        s = socket.socket(ep.family, socket.SOCK_STREAM)
        bind = self.spec.opts.get("bind")
        if bind:
            if ep.family == socket.AF_INET6:
                s.bind((bind.strip("[]"), 0, 0, 0))
            else:
                s.bind((bind, 0))
        return s

    def on_line(self, line: str) -> None:
        if self.asking is not None and self.hello != "-":
            req, got = self.asking
            if line != "END":
                got.append(line)
                return
            self.asking = None
            req.resolve(f"ASK {self.label}", f"ASK {self.label} OK {' | '.join(got)}")
        elif self.waiting and line == self.waiting[1]:
            req, _ = self.waiting
            self.waiting = None
            local, peer = sock_names(self.conn.sock) if self.conn else ("-", "-")
            req.resolve(f"CLIENT {self.label}", f"CLIENT {self.label} OK {local} {peer}")
        elif self.hello == "-" or not self.waiting:
            self.hello = line

    def request(self, req: Request, text: str) -> None:
        key = f"CLIENT {self.label}"
        if self.conn is None or self.conn.closed:
            req.resolve(key, f"{key} FAIL not-connected:{self.lost_reason}")
            return
        self.waiting = (req, text)
        self.conn.send_line(text)  # a failed send closes the conn -> lost() -> FAIL

    def ask(self, req: Request, text: str) -> None:
        key = f"ASK {self.label}"
        if self.asking is not None and not self.asking[0].waiting:
            self.asking = None  # that ASK timed out: its answer, if it comes, is lost
        if self.conn is None or self.conn.closed or self.waiting or self.asking:
            why = f"not-connected:{self.lost_reason}" if not self.conn else "busy"
            req.resolve(key, f"{key} FAIL {why}")
            return
        self.asking = (req, [])
        self.conn.send_line(text)  # a failed send closes the conn -> lost() -> FAIL

    def lost(self, reason: str) -> None:
        self.lost_reason = reason
        self.conn = None
        if self.asking:
            req, _ = self.asking
            self.asking = None
            req.resolve(f"ASK {self.label}", f"ASK {self.label} FAIL {reason}")
        if self.waiting:
            req, _ = self.waiting
            self.waiting = None
            req.resolve(f"CLIENT {self.label}", f"CLIENT {self.label} FAIL {reason}")
        if self.spec.opts.get("reconnect", "0") not in ("0", ""):
            self.retry_at = time.monotonic()

    def tick(self, now: float) -> None:
        if self.retry_at is not None and now >= self.retry_at and self.connecting is None:
            self.retry_at = None
            s = self._new_socket()
            s.setblocking(False)
            err = s.connect_ex(self.spec.endpoint.sockaddr)
            if err not in (0, errno.EINPROGRESS):
                s.close()
                self.retry_at = now + 0.5
                return
            self.connecting = s
            self.app.sel.register(s, selectors.EVENT_WRITE, self)

    def on_event(self, mask: int) -> None:  # the pending non-blocking connect finished
        s = self.connecting
        assert s is not None
        self.app.sel.unregister(s)
        self.connecting = None
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            s.close()
            self.retry_at = time.monotonic() + 0.5
            return
        self.reconnects += 1
        self.hello = "-"
        self.conn = ClientConn(self.app, s, self)

    def status(self) -> str:
        if self.conn is not None and not self.conn.closed:
            local, peer = sock_names(self.conn.sock)
            state = "ESTABLISHED"
        else:
            local, peer, state = "-", "-", f"LOST:{self.lost_reason}"
        return (f"tcp-connect {self.label} {local} {peer} {state} "
                f"reconnects={self.reconnects} hello={self.hello.replace(' ', '_')}")


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
