"""Test networks: network namespaces as "hosts" on a bridge in its own "switch" namespace.
(Scratch namespaces and the stale sweep: netns.py; their processes: procs.py.)

Nothing is created or changed in the root network namespace: the bridge and the switch end
of every veth pair live in the switch namespace, the other end (``eth0``) in the host
namespace. Names carry a random run id (``oit<6 hex>``), so several test runs can work side
by side and never collide with leftovers of a crashed run. Only addresses inside
10.77.0.0/16, fd77::/64 and loopback are used; the bridge has no uplink, so nothing is sent
anywhere else.

    with TestNet() as net:
        a = net.add_host("A")                       # 10.77.0.1/16, fd77::1/64
        b = net.add_host("B", ipv4="10.77.0.9/16")  # fd77::2/64
        a.run(["ss", "-ltn"])
    # every process in the namespaces killed, namespaces gone

Processes run inside a host with ``nsenter --net=/run/netns/<name>``: only the network
namespace changes (``ip netns exec`` also makes a new mount namespace, which breaks CRIU
dumps).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from .netns import NETNS_DIR, PREFIX, REGISTRY_DIR, TestNetError, _sh
from .procs import _proc_starttime, become_subreaper, netns_pids, try_reap

IpInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOWED_V4 = ipaddress.IPv4Network("10.77.0.0/16")
ALLOWED_V6 = ipaddress.IPv6Network("fd77::/64")
HOST_IF = "eth0"
BRIDGE = "br0"
_HOST_NAME_RE = re.compile(r"^[A-Za-z0-9]{1,6}$")
AUTO: Any = "auto"


def _check_allowed(iface: IpInterface) -> None:
    if isinstance(iface, ipaddress.IPv4Interface):
        ok = iface.network.prefixlen >= ALLOWED_V4.prefixlen and iface.network.subnet_of(ALLOWED_V4)
    else:
        ok = iface.network.prefixlen >= ALLOWED_V6.prefixlen and iface.network.subnet_of(ALLOWED_V6)
    if not ok:
        raise ValueError(f"{iface}: test addresses must lie inside {ALLOWED_V4} or {ALLOWED_V6}")


def _iface(addr: str | IpInterface, default_prefix: int | None = None) -> IpInterface:
    if isinstance(addr, (ipaddress.IPv4Interface, ipaddress.IPv6Interface)):
        iface = addr
    else:
        s = str(addr)
        if "/" not in s:
            ip = ipaddress.ip_address(s)
            s = f"{s}/{16 if ip.version == 4 else 64}" if default_prefix is None else f"{s}/{default_prefix}"
        iface = ipaddress.ip_interface(s)
    _check_allowed(iface)
    return iface


class Host:
    """One test host: a network namespace with ``lo`` and ``eth0`` (default route)."""

    def __init__(self, net: TestNet, name: str, netns: str, port: str):
        self.net = net
        self.name = name
        self.netns = netns
        self.netns_path = f"{NETNS_DIR}/{netns}"
        self.port = port  # the veth end in the switch namespace
        self.ifname = HOST_IF
        self.addrs: list[IpInterface] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._adopted: set[int] = set()
        self.alive = True

    def __repr__(self) -> str:
        return f"Host({self.name!r}, netns={self.netns!r}, addrs={[str(a) for a in self.addrs]})"

    # -- addresses ---------------------------------------------------------------------
    @property
    def ipv4(self) -> ipaddress.IPv4Address | None:
        """The first IPv4 address on eth0 (an ``ipaddress.IPv4Address``), or None."""
        for a in self.addrs:
            if a.version == 4:
                return a.ip
        return None

    @property
    def ipv6(self) -> ipaddress.IPv6Address | None:
        """The first IPv6 address on eth0 (an ``ipaddress.IPv6Address``), or None."""
        for a in self.addrs:
            if a.version == 6:
                return a.ip
        return None

    @property
    def ipv4_if(self) -> ipaddress.IPv4Interface | None:
        return next((a for a in self.addrs if a.version == 4), None)

    @property
    def ipv6_if(self) -> ipaddress.IPv6Interface | None:
        return next((a for a in self.addrs if a.version == 6), None)

    def add_addr(self, addr: str | IpInterface) -> IpInterface:
        """Add an address to eth0 (IPv6 with ``nodad``: usable at once). Returns it."""
        iface = _iface(addr)
        argv = ["ip", "-n", self.netns, "addr", "add", str(iface), "dev", self.ifname]
        if iface.version == 6:
            argv.append("nodad")
        _sh(argv)
        self.addrs.append(iface)
        return iface

    def del_addr(self, addr: str | IpInterface) -> None:
        """Remove an address from eth0 (routes via it go with it)."""
        iface = _iface(addr)
        _sh(["ip", "-n", self.netns, "addr", "del", str(iface), "dev", self.ifname])
        self.addrs = [a for a in self.addrs if a != iface]

    def set_connected(self, up: bool) -> None:
        """Plug (True) or unplug (False) the host's cable at the switch: its addresses and
        routes stay, but no packet goes in or out while unplugged."""
        _sh(["ip", "-n", self.net.switch, "link", "set", self.port, "up" if up else "down"])

    # -- processes ---------------------------------------------------------------------
    def cmd(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside this host's network namespace (only)."""
        return ["nsenter", f"--net={self.netns_path}", "--", *argv]

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 30,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the host; captures text output unless told otherwise.
        Raises ``subprocess.CalledProcessError`` (check=True) or ``TimeoutExpired``."""
        kw.setdefault("text", True)
        if "stdout" not in kw and "stderr" not in kw and "capture_output" not in kw:
            kw["capture_output"] = True
        if "input" not in kw:
            kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.cmd(argv), check=check, timeout=timeout, **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the host. The process is killed and reaped on cleanup."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(self.cmd(argv), **kw)
        self._procs.append(p)
        return p

    def adopt(self, pid: int) -> None:
        """Reap ``pid`` (our child, e.g. a restored root re-parented to us) on cleanup."""
        self._adopted.add(pid)

    def pids(self) -> list[int]:
        """Live processes in this host's network namespace (as ``ip netns pids``)."""
        return netns_pids(self.netns_path)

    def kill_all(self, timeout: float = 5) -> None:
        """SIGKILL every process in the namespace until none is left; reap our children
        (including orphans re-parented to us: TestNet makes this process a subreaper)."""
        deadline = time.monotonic() + timeout
        popen_pids = {p.pid for p in self._procs}
        while True:
            pids = self.pids()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if pid not in popen_pids:  # Popen objects reap their own
                    self._adopted.add(pid)
            self._reap()
            if not pids:
                break
            if time.monotonic() > deadline:
                raise TestNetError(f"{self.netns}: processes survive SIGKILL: {pids}")
            time.sleep(0.02)
        # our direct children may still be exiting: wait for them (bounded)
        for p in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        self._procs = [p for p in self._procs if p.returncode is None]
        end = time.monotonic() + 2
        while self._adopted and time.monotonic() < end:
            self._reap()
            if self._adopted:
                time.sleep(0.02)

    def _reap(self) -> None:
        for p in self._procs:
            p.poll()
        for pid in list(self._adopted):
            # done once reaped by us or gone; a zombie still owned by a dying parent is
            # re-parented to us (subreaper) a moment later
            if try_reap(pid) and not os.path.exists(f"/proc/{pid}"):
                self._adopted.discard(pid)


class TestNet:
    """A private test network; use as a context manager (cleanup always runs).

    ``add_host(name, ipv4=AUTO, ipv6=AUTO)`` makes a host; the n-th host gets
    10.77.0.n/16 and fd77::n/64 unless told otherwise (``None`` = no address of that family).
    """

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self.run_id = secrets.token_hex(3)
        self.prefix = f"{PREFIX}{self.run_id}"
        self.switch = f"{self.prefix}-sw"
        self.hosts: dict[str, Host] = {}
        self._count = 0
        self._made: list[str] = []  # netns names created, in order
        self._registry = f"{REGISTRY_DIR}/{self.run_id}"
        self._open = False

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> TestNet:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        for tool in ("ip", "nsenter"):
            if shutil.which(tool) is None:
                raise TestNetError(f"{tool} not found")
        become_subreaper()
        os.makedirs(REGISTRY_DIR, exist_ok=True)
        with open(self._registry, "w") as f:
            f.write(f"{os.getpid()} {_proc_starttime(os.getpid())}\n")
        self._open = True
        try:
            self._add_netns(self.switch)
            _sh(["nsenter", f"--net={NETNS_DIR}/{self.switch}", "--", "sysctl", "-q", "-w",
                 "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])
            _sh(["ip", "-n", self.switch, "-batch", "-"], input=(
                "link set lo up\n"
                f"link add {BRIDGE} type bridge forward_delay 0 stp_state 0 mcast_snooping 0\n"
                f"link set {BRIDGE} up\n"))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kill every process in every namespace of this net, then delete the namespaces.
        Idempotent; errors are collected and raised at the end."""
        if not self._open:
            return
        errors: list[str] = []
        for host in list(self.hosts.values()):
            try:
                host.kill_all()
            except Exception as e:  # keep going: delete what we can
                errors.append(str(e))
        for name in reversed(self._made):
            path = f"{NETNS_DIR}/{name}"
            for pid in netns_pids(path):  # e.g. the switch namespace: should be none
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            cp = _sh(["ip", "netns", "del", name], check=False)
            if cp.returncode != 0 and os.path.exists(path):
                errors.append(f"ip netns del {name}: {cp.stderr.strip()}")
        self._made.clear()
        for host in self.hosts.values():
            host.alive = False
        with contextlib.suppress(OSError):
            os.unlink(self._registry)
        self._open = False
        if errors:
            raise TestNetError("; ".join(errors))

    def _add_netns(self, name: str) -> None:
        _sh(["ip", "netns", "add", name])
        self._made.append(name)

    # -- hosts -------------------------------------------------------------------------
    def add_host(self, name: str, ipv4: str | IpInterface | None = AUTO,
                 ipv6: str | IpInterface | None = AUTO) -> Host:
        """Make a host: namespace ``oit<run><name>`` with lo up, eth0 on the bridge,
        the given addresses (IPv6 ``nodad``) and a default route (v4 and v6) via eth0."""
        if not self._open:
            raise TestNetError("TestNet is not open (use it as a context manager)")
        if not _HOST_NAME_RE.match(name):
            raise ValueError(f"host name {name!r}: 1-6 letters/digits")
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists")
        n = self._count + 1
        v4 = _iface(f"10.77.0.{n}/16") if ipv4 is AUTO else (None if ipv4 is None else _iface(ipv4))
        v6 = _iface(f"fd77::{n:x}/64") if ipv6 is AUTO else (None if ipv6 is None else _iface(ipv6))
        self._count = n
        netns = f"{self.prefix}{name}"
        port = f"p-{name}"
        self._add_netns(netns)
        host = Host(self, name, netns, port)
        self.hosts[name] = host
        # No DAD at all in the host (link-local included): addresses usable at once.
        _sh(["nsenter", f"--net={host.netns_path}", "--", "sysctl", "-q", "-w",
             "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
             "net.ipv6.conf.default.dad_transmits=0"])
        _sh(["ip", "-n", self.switch, "link", "add", port, "type", "veth",
             "peer", "name", HOST_IF, "netns", netns])
        _sh(["ip", "-n", self.switch, "link", "set", port, "master", BRIDGE, "up"])
        batch = ["link set lo up", f"link set {HOST_IF} up"]
        if v4 is not None:
            batch.append(f"addr add {v4} dev {HOST_IF}")
        if v6 is not None:
            batch.append(f"addr add {v6} dev {HOST_IF} nodad")
        batch.append(f"route add 0.0.0.0/0 dev {HOST_IF}")
        batch.append(f"route add ::/0 dev {HOST_IF}")
        _sh(["ip", "-n", netns, "-batch", "-"], input="\n".join(batch) + "\n")
        host.addrs = [a for a in (v4, v6) if a is not None]
        return host

    def remove_host(self, host: Host | str) -> None:
        """Kill the host's processes and delete its namespace (the node is gone)."""
        h = self.hosts.pop(host if isinstance(host, str) else host.name)
        h.kill_all()
        _sh(["ip", "netns", "del", h.netns])
        self._made.remove(h.netns)
        h.alive = False

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def namespaces(self) -> list[str]:
        return list(self._made)
