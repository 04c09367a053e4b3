"""The workload's parts every socket kind uses (workload.py): endpoints and socket specs
from the command line, sockets made as they ask, and a line-based connection with its
requests."""

from __future__ import annotations

import errno
import ipaddress
import selectors
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from .workload import App, ControlConn

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
