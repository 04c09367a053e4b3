"""Client checks run inside a test host's network namespace, always with timeouts.

Host side (each runs ``nsenter --net=<host ns> python -m inetsk_testbed.probe``):

    tcp_hello(host, addr, port, timeout=5) -> str          # first line from the server
    tcp_command(host, addr, port, command, timeout=5) -> list[str]   # a workload command
    tcp_echo(host, addr, port, text, timeout=5) -> str
    self_check(host, addr, port, label=None, timeout=5) -> dict[str, str]  # label -> "OK"/"FAIL .."
    status(host, addr, port, timeout=5) -> list[str]
    udp_echo(host, addr, port, payload, bind=None, timeout=2) -> str   # the answer datagram

A failed check raises :class:`ProbeError` with ``kind`` one of ``refused``, ``timeout``,
``unreachable``, ``reset``, ``eof``, ``error``.

Command line (prints one JSON object, exit 0 on success, 1 on a failed check):

    python -m inetsk_testbed.probe tcp ADDR PORT [--cmd LINE]... [--echo LINE] [--timeout T]
    python -m inetsk_testbed.probe udp ADDR PORT PAYLOAD [--bind ADDR:PORT] [--timeout T]
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where inetsk_testbed is


class ProbeError(Exception):
    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


# --------------------------------------------------------------------------- in-namespace side
def _kind(e: BaseException) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, OSError) and e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH,
                                              errno.EADDRNOTAVAIL):
        return "unreachable"
    return "error"


def _sockaddr(addr: str, port: int) -> tuple[int, tuple[Any, ...]]:
    ip = ipaddress.ip_address(addr.strip("[]"))
    if ip.version == 6:
        return socket.AF_INET6, (str(ip), port, 0, 0)
    return socket.AF_INET, (str(ip), port)


class _Lines:
    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline, self.buf = sock, deadline, b""

    def readline(self) -> str:
        while b"\n" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out waiting for a line")
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                raise ProbeError("eof", f"connection closed; partial={self.buf!r}")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace")


def run_tcp(addr: str, port: int, cmds: list[str], echo: str | None,
            timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    fam, sa = _sockaddr(addr, port)
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(sa)
        local = s.getsockname()
        rd = _Lines(s, deadline)
        hello = rd.readline()
        out: dict[str, Any] = {"ok": True, "hello": hello, "local": [local[0], local[1]]}
        replies = []
        for c in cmds:
            s.sendall(c.encode() + b"\n")
            lines = []
            while (line := rd.readline()) != "END":
                lines.append(line)
            replies.append(lines)
        out["replies"] = replies
        if echo is not None:
            s.sendall(echo.encode() + b"\n")
            out["echo"] = rd.readline()
        # polite close: the server closes first, so that it never holds a half-closed
        # connection (a CLOSE_WAIT socket would need --tcp-established to dump)
        s.sendall(b"BYE\n")
        s.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass
        return out
    finally:
        s.close()


def run_udp(addr: str, port: int, payload: str, bind: str | None,
            timeout: float) -> dict[str, Any]:
    fam, sa = _sockaddr(addr, port)
    s = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        if bind:
            bhost, _, bport = bind.rpartition(":")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            bfam, bsa = _sockaddr(bhost, int(bport))
            s.bind(bsa)
        s.settimeout(timeout)
        s.connect(sa)  # only the answer from addr:port counts; ICMP errors are reported
        s.send(payload.encode())
        data = s.recv(65536)
        return {"ok": True, "reply": data.decode(errors="replace")}
    finally:
        s.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m inetsk_testbed.probe")
    sub = ap.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("tcp")
    t.add_argument("addr")
    t.add_argument("port", type=int)
    t.add_argument("--cmd", action="append", default=[])
    t.add_argument("--echo")
    t.add_argument("--timeout", type=float, default=5)
    u = sub.add_parser("udp")
    u.add_argument("addr")
    u.add_argument("port", type=int)
    u.add_argument("payload")
    u.add_argument("--bind")
    u.add_argument("--timeout", type=float, default=2)
    a = ap.parse_args(argv)
    try:
        if a.mode == "tcp":
            res = run_tcp(a.addr, a.port, a.cmd, a.echo, a.timeout)
        else:
            res = run_udp(a.addr, a.port, a.payload, a.bind, a.timeout)
    except ProbeError as e:
        res = {"ok": False, "kind": e.kind, "detail": e.detail}
    except (OSError, ValueError) as e:
        res = {"ok": False, "kind": _kind(e), "detail": f"{type(e).__name__}: {e}"}
    print(json.dumps(res))
    return 0 if res["ok"] else 1


# --------------------------------------------------------------------------- host side
def _run(host: Any, args: list[str], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = PKG_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    argv = [sys.executable, "-m", "inetsk_testbed.probe", *args,
            "--timeout", str(timeout)]
    try:
        cp = host.run(argv, check=False, timeout=timeout + 10, env=env)
    except subprocess.TimeoutExpired as e:
        raise ProbeError("timeout", f"probe process hung: {argv}") from e
    try:
        res: dict[str, Any] = json.loads(cp.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as e:
        raise ProbeError("error", f"probe exit {cp.returncode}: {cp.stdout!r} {cp.stderr!r}") from e
    if not res["ok"]:
        raise ProbeError(res["kind"], res.get("detail", ""))
    return res


def tcp_hello(host: Any, addr: Any, port: int, timeout: float = 5) -> str:
    """Connect from ``host`` to addr:port; return the server's first line."""
    return str(_run(host, ["tcp", str(addr), str(port)], timeout)["hello"])


def tcp_command(host: Any, addr: Any, port: int, command: str,
                timeout: float = 5) -> list[str]:
    """Send one workload command (SELF, STATUS, CLIENT .., UDPSEND .., PID) to a workload
    listener; return the answer lines (without the hello line and END)."""
    res = _run(host, ["tcp", str(addr), str(port), "--cmd", command], timeout)
    return list(res["replies"][0])


def tcp_echo(host: Any, addr: Any, port: int, text: str, timeout: float = 5) -> str:
    return str(_run(host, ["tcp", str(addr), str(port), "--echo", text], timeout)["echo"])


def self_check(host: Any, addr: Any, port: int, label: str | None = None,
               timeout: float = 5) -> dict[str, str]:
    """Ask the workload (via its listener at addr:port) to ping over its self-connections.
    Returns {label: "OK" | "FAIL <reason>"}."""
    lines = tcp_command(host, addr, port, "SELF" + (f" {label}" if label else ""), timeout)
    out = {}
    for line in lines:
        _, lab, verdict = line.split(" ", 2)
        out[lab] = verdict
    return out


def status(host: Any, addr: Any, port: int, timeout: float = 5) -> list[str]:
    return tcp_command(host, addr, port, "STATUS", timeout)


def udp_echo(host: Any, addr: Any, port: int, payload: str, bind: str | None = None,
             timeout: float = 2) -> str:
    """Send ``payload`` from ``host`` (optionally from ``bind`` = "ADDR:PORT", IPv6 as
    "[ADDR]:PORT") to addr:port; return the answer datagram as text."""
    args = ["udp", str(addr), str(port), payload]
    if bind:
        args += ["--bind", bind]
    return str(_run(host, args, timeout)["reply"])


if __name__ == "__main__":
    sys.exit(main())


def wait_for(pred: Any, timeout: float = 5, what: str = "condition") -> Any:
    """Poll pred() every 50 ms until it returns something true; return that, or raise
    AssertionError after timeout seconds."""
    end = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
