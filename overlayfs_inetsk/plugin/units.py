"""The agent's systemd units, which `plugin install` writes and enables when systemd runs the
host (/run/systemd/system exists: sd_booted(3)), and `plugin remove` disables and removes.

overlayfs-inetsk-agent.socket listens on the agent's socket (SOCK_SEQPACKET, mode 0600) from
boot on; systemd starts overlayfs-inetsk-agent.service at the first connection and hands it
the socket (activation.py), so the first restore after boot goes through the agent. The
texts are made here (render()); systemd/ in the source tree holds them as rendered for
/usr/local/bin/overlayfs-inetsk (a test checks they are the same). A unit file at our path
that we did not write (no marker line) is never replaced or removed. Each step is one line
of what was done; nothing to do, no line.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping

from ..errors import InetskError
from .install import PluginConf, default_cli
from .wire import BACKLOG

UNIT_DIR = "/etc/systemd/system"
BOOTED = "/run/systemd/system"
SOCKET_UNIT = "overlayfs-inetsk-agent.socket"
SERVICE_UNIT = "overlayfs-inetsk-agent.service"
MARKER = "written by `overlayfs-inetsk plugin install`"
DOC = "file:///usr/share/doc/overlayfs-inetsk/plugin.md"
STOP_S = 40  # the agent drains for at most 35 s (drain.DRAIN_S)
_SAFE = re.compile(r"/[A-Za-z0-9/._+@-]+")  # no spaces, quotes, `%` or `$` for systemd to read

Runner = Callable[..., subprocess.CompletedProcess[str]]


def render(cli: str, sock: str) -> dict[str, str]:
    """{unit name: text} for the agent at cli listening on sock."""
    for what, path in (("the CLI", cli), ("the agent socket", sock)):
        if not _SAFE.fullmatch(path):
            raise InetskError(f"{what} {path!r}: a unit file cannot name it as it is (letters, "
                              "digits and /._+@- only): install with --no-agent")
    return {SOCKET_UNIT: f"""\
# {SOCKET_UNIT}: {MARKER} (docs/plugin.md).
# systemd listens on the agent's socket from boot on and starts {SERVICE_UNIT}
# at the first connection: the first restore after boot goes through the agent.
[Unit]
Description=overlayfs-inetsk agent socket (the CRIU plugin asks it for per-node views)
Documentation={DOC}

[Socket]
ListenSequentialPacket={sock}
SocketMode=0600
DirectoryMode=0755
Backlog={BACKLOG}
RemoveOnStop=yes

[Install]
WantedBy=sockets.target
""", SERVICE_UNIT: f"""\
# {SERVICE_UNIT}: {MARKER} (docs/plugin.md).
# Started by {SOCKET_UNIT} at the first connection; it takes that socket from
# systemd (LISTEN_FDS). SIGTERM drains: requests in flight finish by their own deadlines.
[Unit]
Description=overlayfs-inetsk agent (per-node views for CRIU restores)
Documentation={DOC}
Requires={SOCKET_UNIT}
After={SOCKET_UNIT}

[Service]
Type=notify
NotifyAccess=main
ExecStart={cli} agent --socket {sock}
Restart=on-failure
TimeoutStopSec={STOP_S}

[Install]
Also={SOCKET_UNIT}
"""}


def _run(systemctl: str, args: list[str], run: Runner, check: bool = True) -> str:
    try:
        cp = run([systemctl, *args], capture_output=True, text=True, timeout=60,
                 stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise InetskError(f"systemctl {' '.join(args)}: {e}") from None
    if check and cp.returncode != 0:
        why = (cp.stderr.strip().splitlines() or [""])[-1][:300]
        raise InetskError(f"systemctl {' '.join(args)} failed (exit {cp.returncode}): {why}")
    return cp.stdout.strip()


def _ours(path: str) -> bool | None:
    """None: absent; whether the file at path is one we wrote."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return MARKER in f.readline()
    except FileNotFoundError:
        return None


def _systemctl(env: Mapping[str, str] | None) -> str:
    env = os.environ if env is None else env
    found = shutil.which("systemctl", path=env.get("PATH", os.defpath))
    if found is None:
        raise InetskError("systemd runs this host but systemctl is not on PATH: cannot "
                          "install the agent's units (or install with --no-agent)")
    return found


def install_units(conf: PluginConf, unit_dir: str | None = None, booted: str | None = None,
                  env: Mapping[str, str] | None = None, run: Runner = subprocess.run
                  ) -> list[str]:
    """Write the units, reload, enable and start the socket, as far as needed."""
    unit_dir, booted = unit_dir or UNIT_DIR, booted or BOOTED
    if not os.path.isdir(booted):
        return []
    systemctl = _systemctl(env)
    texts = render(default_cli(), conf.agent_socket)
    done, changed = [], False
    for name, text in texts.items():
        path = os.path.join(unit_dir, name)
        if _ours(path) is False:
            raise InetskError(f"{path}: exists and was not written by plugin install: move "
                              "it away (or install with --no-agent)")
        try:
            with open(path, encoding="utf-8") as f:
                if f.read() == text:
                    continue
        except FileNotFoundError:
            pass
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.rename(tmp, path)
        except OSError as e:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise InetskError(f"{path}: cannot write: {e.strerror}") from None
        done.append(f"wrote {path}")
        changed = True
    if changed:
        _run(systemctl, ["daemon-reload"], run)
        done.append("systemctl daemon-reload")
        running = [u for u in (SERVICE_UNIT, SOCKET_UNIT)
                   if _run(systemctl, ["is-active", u], run, check=False) == "active"]
        if running:  # an agent of the old units, or a socket on an old path
            _run(systemctl, ["stop", *running], run)
            done.append(f"stopped {' '.join(running)} (its unit changed)")
    if _run(systemctl, ["is-enabled", SOCKET_UNIT], run, check=False) != "enabled":
        _run(systemctl, ["enable", SOCKET_UNIT], run)
        done.append(f"enabled {SOCKET_UNIT} (systemd listens for the agent from boot on)")
    if _run(systemctl, ["is-active", SOCKET_UNIT], run, check=False) != "active":
        _run(systemctl, ["start", SOCKET_UNIT], run)
        done.append(f"started {SOCKET_UNIT}: the next restore starts the agent")
    return done


def remove_units(unit_dir: str | None = None, booted: str | None = None,
                 env: Mapping[str, str] | None = None, run: Runner = subprocess.run
                 ) -> list[str]:
    """Stop and disable the units we wrote, and remove them."""
    unit_dir, booted = unit_dir or UNIT_DIR, booted or BOOTED
    if not os.path.isdir(booted):
        return []
    paths = {n: os.path.join(unit_dir, n) for n in (SOCKET_UNIT, SERVICE_UNIT)}
    state = {n: _ours(p) for n, p in paths.items()}
    done = [f"left {paths[n]}: not written by plugin install" for n, s in state.items()
            if s is False]
    ours = [n for n, s in state.items() if s]
    if not ours:
        return done
    systemctl = _systemctl(env)
    _run(systemctl, ["disable", "--now", *ours], run)
    done.append(f"stopped and disabled {' '.join(ours)}")
    for n in ours:
        try:
            os.unlink(paths[n])
        except FileNotFoundError:
            continue
        except OSError as e:
            raise InetskError(f"{paths[n]}: cannot remove: {e.strerror}") from None
        done.append(f"removed {paths[n]}")
    _run(systemctl, ["daemon-reload"], run)
    done.append("systemctl daemon-reload")
    return done
