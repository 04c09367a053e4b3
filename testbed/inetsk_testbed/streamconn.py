"""One end of stream.py's numbered stream: what it sends and receives, the checks of the
numbering, and what happened to it (the events STATUS reports)."""

from __future__ import annotations

import errno
import selectors
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .stream import App


def _err(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e))


class Stream:
    def __init__(self, app: App, sock: socket.socket):
        self.app, self.sock = app, sock
        self.inbuf = b""
        self.outbuf = b""
        self.sent = self.recv = self.bad = 0
        self.rd = self.wr = "open"
        self.closed = False
        sock.setblocking(False)
        app.sel.register(sock, selectors.EVENT_READ, self)
        self.registered = True
        app.events.append("connected")

    def tick(self) -> None:
        if self.app.sending and self.wr == "open":
            self.sent += 1
            self.outbuf += f"{self.sent}\n".encode()
            self.flush()

    def flush(self) -> None:
        while self.outbuf and self.wr in ("open", "draining"):
            try:
                n = self.sock.send(self.outbuf)
            except BlockingIOError:
                break
            except OSError as e:
                self.fail("wr", e)
                return
            self.outbuf = self.outbuf[n:]
        if self.closed:
            return
        if not self.outbuf and self.wr == "draining":
            self.sock.shutdown(socket.SHUT_WR)
            self.wr = "shut"
            self.app.events.append("shutwr")
        ev = (selectors.EVENT_READ if self.rd == "open" else 0) | (
            selectors.EVENT_WRITE if self.outbuf and self.wr in ("open", "draining") else 0)
        if ev and self.registered:
            self.app.sel.modify(self.sock, ev, self)
        elif ev:
            self.app.sel.register(self.sock, ev, self)
        elif self.registered:
            self.app.sel.unregister(self.sock)
        self.registered = bool(ev)

    def shut_wr(self) -> None:
        if self.wr == "open":
            self.wr = "draining"
            self.flush()

    def on_event(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self.flush()
        if self.closed or not mask & selectors.EVENT_READ or self.rd != "open":
            return
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            self.fail("rd", e)
            return
        if not data:
            self.rd = "eof"
            self.app.events.append("eof")
            if self.wr == "shut":
                self.close()
            else:
                self.flush()  # stop polling for reading; keep writing (half-closed)
            return
        self.inbuf += data
        *lines, self.inbuf = self.inbuf.split(b"\n")
        for line in lines:
            self.recv += 1
            if line != str(self.recv).encode():
                self.bad += 1
                self.app.events.append(f"bad:{line[:20].decode(errors='replace')}@{self.recv}")
                try:
                    self.recv = int(line)
                except ValueError:
                    pass

    def fail(self, side: str, e: OSError) -> None:
        setattr(self, side, _err(e))
        self.app.events.append(f"{side}:{_err(e)}")
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.registered:
            self.app.sel.unregister(self.sock)
            self.registered = False
        self.sock.close()
        self.app.lost(self)
