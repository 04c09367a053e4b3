"""The workload's sockets other than its listeners (workload.py): UDP sockets, a TCP
connection to itself, client connections to other servers."""

from __future__ import annotations

import errno
import selectors
import socket
import time
from typing import TYPE_CHECKING


from .wlbase import LineConn, Request, Spec, make_socket, sock_names

if TYPE_CHECKING:
    from .workload import App


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
