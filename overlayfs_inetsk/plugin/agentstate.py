"""doctor's view of the plugin: installed and set up (`plugin`), the agent's state
(`agent`), and the route a restore will take (`route`).

The agent's states: answering (it answered the check request: version, pid), socket-activated
(systemd, or systemd-socket-activate, listens on its socket and has not started it yet:
nothing is sent, since a connection would start it), not-running (no socket, or nobody
listens), not-answering (it takes connections but does not answer: frozen, overloaded),
not-accepting (its backlog is full), refused (not root). The route follows from it and from
the config file: agent; cli (no agent, the CLI fallback runs per restore: slower); wait (no
agent and no CLI: a restore waits for one until timeout-ms, then fails); fail (an agent is
there and does not answer: restores fail after timeout-ms); no-plugin.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import InetskError
from . import check as chk
from .install import (
    CLI_CONF,
    OLD_CLI_CONF,
    SO_NAME,
    PluginConf,
    Runner,
    built_so,
    criu_plugin_dir,
    read_conf,
)
from .wire import CHECK_MS, ENV_AGENT_SOCKET, ENV_CLI, ENV_TIMEOUT

ACCEPTCON = 0x10000  # /proc/net/unix Flags of a listening socket
SEQPACKET = 5
MANAGERS = ("systemd", "systemd-socket-")  # comm (15 chars) of who listens for an agent


@dataclass(frozen=True)
class Found:
    """One check's outcome, as node/doctor.Check takes it."""

    name: str
    status: str
    detail: str
    fix: str = ""
    state: str | None = None


def _listening_inode(path: str) -> int | None:
    """The inode of a listening SOCK_SEQPACKET socket bound to path in this network
    namespace (systemd binds the path itself; an agent binds a temporary name)."""
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                w = line.split()
                if (len(w) >= 8 and w[7] == path and int(w[3], 16) & ACCEPTCON
                        and int(w[4], 16) == SEQPACKET):
                    return int(w[6])
    except (OSError, ValueError, StopIteration):
        return None
    return None


def waiting_for_first_connection(path: str) -> bool:
    """Whether only a socket manager (systemd, systemd-socket-activate) holds the listening
    socket at path: socket-activated, the agent not started yet."""
    ino = _listening_inode(path)
    if ino is None:
        return False
    want, holders = f"socket:[{ino}]", []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if not any(os.readlink(f"/proc/{pid}/fd/{fd}") == want for fd in fds):
                continue
            with open(f"/proc/{pid}/comm") as f:
                holders.append(f.read().strip())
        except OSError:
            continue
    return bool(holders) and all(h in MANAGERS for h in holders)


def agent_found(sock: str, timeout_ms: int = CHECK_MS) -> Found:
    if waiting_for_first_connection(sock):
        return Found("agent", "ok", f"socket-activated at {sock}: started at the first "
                     "restore (not asked now: that would start it)", state="socket-activated")
    r = chk.check(sock, timeout_ms)
    fix = {chk.NOT_RUNNING: "start the agent: systemctl start overlayfs-inetsk-agent.socket "
                            "(plugin install enables it), or its DaemonSet",
           chk.NOT_ANSWERING: "the agent is stopped or stuck: restart it",
           chk.NOT_ACCEPTING: "the agent is stopped or stuck: restart it"}.get(r.state, "")
    return Found("agent", "ok" if r.ok else "warn", r.detail, fix, r.state)


def _fallback(cli: str, env: Mapping[str, str]) -> tuple[bool, str]:
    if cli == "none":
        return False, "no CLI fallback (cli none)"
    found = cli if "/" in cli else shutil.which(cli, path=env.get("PATH", os.defpath))
    if found is not None and os.access(found, os.X_OK):
        return True, f"CLI fallback: {found}"
    return False, f"no CLI fallback: {cli} is not executable here"


def route_found(agent: Found, cli_ok: bool, fallback: str, timeout_ms: int) -> Found:
    if agent.state in (chk.ANSWERING, "socket-activated"):
        return Found("route", "ok", "restores ask the agent" + (
            " (systemd starts it for the first)" if agent.state == "socket-activated" else ""),
            state="agent")
    if agent.state in (chk.NOT_ANSWERING, chk.NOT_ACCEPTING, chk.REFUSED, chk.BROKEN):
        return Found("route", "warn", f"restores that need a change fail (the agent does not "
                     f"serve them; within timeout-ms {timeout_ms})", agent.fix, "fail")
    if cli_ok:
        return Found("route", "warn", f"restores run the CLI, one per restore ({fallback}): "
                     "slower than the agent", "start the agent (docs/plugin.md)", "cli")
    return Found("route", "warn", f"restores wait for an agent up to timeout-ms {timeout_ms}, "
                 f"then fail ({fallback})", "start the agent, or install with --cli PATH",
                 "wait")


def doctor_checks(criu: str | None, env: Mapping[str, str], run: Runner = subprocess.run
                  ) -> list[Found]:
    """plugin, agent, route."""
    fix = "overlayfs-inetsk plugin install (runtime-driven restores: Podman, CRI-O, containerd)"
    if criu is None:
        return [Found(n, "skip", "no criu") for n in ("plugin", "agent", "route")]
    libdir, why = criu_plugin_dir(criu, env, run)
    so = os.path.join(libdir, SO_NAME)
    no_plugin = Found("route", "skip", "no plugin: runtime restores keep their addresses",
                      state="no-plugin")
    if not os.path.isfile(so):
        return [Found("plugin", "warn", f"not installed: {so} missing ({libdir}: {why})", fix),
                Found("agent", "skip", "no plugin"), no_plugin]
    notes = []
    try:
        if not filecmp.cmp(built_so(env), so, shallow=False):
            notes.append("differs from the built plugin (re-run plugin install)")
    except InetskError:
        pass
    path = os.path.join(libdir, CLI_CONF)
    try:
        conf = read_conf(path)
    except InetskError as e:
        return [Found("plugin", "warn", f"{so}: {e}: the plugin refuses it, and every restore "
                      "with it fails", fix), Found("agent", "skip", "no usable config"),
                Found("route", "warn", "restores with the plugin fail (its config file)", fix,
                      "fail")]
    if conf is None:
        conf = PluginConf(cli="overlayfs-inetsk")
        notes.append(f"no {path}: the plugin runs overlayfs-inetsk from PATH")
    if os.path.lexists(os.path.join(libdir, OLD_CLI_CONF)):
        notes.append(f"{OLD_CLI_CONF} is left from an older install (re-run plugin install)")
    sock = env.get(ENV_AGENT_SOCKET) or conf.agent_socket
    raw = env.get(ENV_TIMEOUT, "")
    timeout_ms = int(raw) if raw.isdigit() and int(raw) > 0 else conf.timeout_ms
    cli_ok, fallback = _fallback(env.get(ENV_CLI) or conf.cli or "none", env)
    detail = f"{so}, loaded by {criu} from {libdir} ({why}); {fallback}"
    plugin = Found("plugin", "warn" if notes else "ok",
                   detail + "".join(f"; {n}" for n in notes), fix if notes else "")
    agent = agent_found(sock)
    return [plugin, agent, route_found(agent, cli_ok, fallback, timeout_ms)]
