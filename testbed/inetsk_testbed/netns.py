"""Network namespaces for tests: the one command runner (_sh, TestNetError), a scratch
namespace for one test (scratch_netns, veth_with_route), and clearing the namespaces of
crashed testbed runs (cleanup_stale)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
from collections.abc import Iterable, Iterator, Sequence

from .procs import _proc_starttime, netns_pids

PREFIX = "oit"  # overlayfs-inetsk testbed
NETNS_DIR = "/run/netns"
REGISTRY_DIR = "/run/overlayfs-inetsk-testbed"


class TestNetError(RuntimeError):
    """A command building or tearing down the test network failed."""

    __test__ = False  # not a pytest test class


def _sh(argv: Sequence[str], *, check: bool = True, timeout: float = 20,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        cp = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                            input=input, stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise TestNetError(f"timeout after {timeout}s: {' '.join(argv)}") from e
    if check and cp.returncode != 0:
        raise TestNetError(f"{' '.join(argv)} -> exit {cp.returncode}: {cp.stderr.strip()}")
    return cp


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def cleanup_stale(names: Iterable[str] | None = None) -> list[str]:
    """Delete namespaces left by testbed runs whose owner process is gone (crashed).

    Namespaces of live runs (even in other processes) are left alone. Returns the names
    deleted.
    """
    removed: list[str] = []
    try:
        runs = os.listdir(REGISTRY_DIR)
    except FileNotFoundError:
        return removed
    all_ns = list_netns() if names is None else list(names)
    for run_id in runs:
        try:
            with open(f"{REGISTRY_DIR}/{run_id}") as f:
                pid_s, start = f.read().split()
        except (OSError, ValueError):
            continue
        if _proc_starttime(int(pid_s)) == start:
            continue  # owner alive
        for ns in all_ns:
            if ns.startswith(f"{PREFIX}{run_id}"):
                for pid in netns_pids(f"{NETNS_DIR}/{ns}"):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                if _sh(["ip", "netns", "del", ns], check=False).returncode == 0:
                    removed.append(ns)
        with contextlib.suppress(OSError):
            os.unlink(f"{REGISTRY_DIR}/{run_id}")
    return removed


@contextlib.contextmanager
def scratch_netns(*setup: Sequence[str], prefix: str = "oit") -> Iterator[str]:
    """A fresh, uniquely named network namespace for one test: each `setup` item is the
    arguments of one `ip -n NAME ...` command run in it (e.g. ("link", "set", "lo", "up"));
    yields its path (/run/netns/NAME) and always deletes it."""
    name = f"{prefix}{secrets.token_hex(3)}"
    _sh(["ip", "netns", "add", name])
    try:
        for args in setup:
            _sh(["ip", "-n", name, *args])
        yield f"/run/netns/{name}"
    finally:
        _sh(["ip", "netns", "del", name], check=False)


def veth_with_route(v4: str, gateway4: str, v6: str | None = None) -> list[Sequence[str]]:
    """scratch_netns set-up: a veth pair (v0, v1) up, `v4` (and `v6`, no DAD) on v0, the
    default route via `gateway4`: `auto` finds v4 (and v6) there."""
    cmds: list[Sequence[str]] = [("link", "add", "v0", "type", "veth", "peer", "name", "v1")]
    cmds += [("link", "set", dev, "up") for dev in ("lo", "v0", "v1")]
    cmds.append(("addr", "add", v4, "dev", "v0"))
    if v6 is not None:
        cmds.append(("-6", "addr", "add", v6, "dev", "v0", "nodad"))
    cmds.append(("route", "add", "default", "via", gateway4, "dev", "v0"))
    return cmds
