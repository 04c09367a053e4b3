"""`restore --tcp-outside nat --nat-peer-netns PATH`: the peers' NAT table applied at the one
moment that keeps the connections (docs/tcp.md, "Fate nat: the order").

Two resets can kill a connection of fate nat. A client packet rewritten to the new address
before the restored socket exists is answered with a reset by the new host; a packet the
restored socket sends before the client's side rewrites it reaches the client from an
address its socket does not know, and the client's TCP resets it. So the restore runs this
module as a CRIU action script (`nat-action DIR`):

    pre-restore    CRIU has read files.img, no socket exists yet: LOCK the connections'
                   new 4-tuples here, with the very iptables rules CRIU's own lock uses
                   (node/tcplock.py). Nothing of them enters or leaves this namespace.
    post-restore   every socket exists, in repair mode, sending nothing: APPLY the table
                   in every peer namespace. A failure removes what was applied and the
                   lock, and exits 8: CRIU aborts the restore (repair-mode sockets close
                   silently), no rule is left.
    (CRIU)         network unlock deletes the lock rules; repair mode ends; the window
                   probe and the app's data go out, through the peers' table already.
    post-resume    the tasks run: marked, so that a sweep keeps the table.

The state lives in DIR (the restore's own temporary dir): `state.json` (the table, the
peers, the connections), `locked.json`, `applied`, `resumed`. The restore removes the table
and the lock when criu fails or is killed (clean), and after a --foreground service exits;
app/restore.clear_restores (the one sweeper, host/stale.py) does the same for a restore killed
with SIGKILL whose criu did not resume.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping, Sequence

from ..core.natrules import NatConn, table_name
from ..errors import BarrierError, InetskError, NatError
from ..host.netns import in_netns
from . import barrier, nat, tcplock

log = logging.getLogger(__name__)

ENV_ACTION = "CRTOOLS_SCRIPT_ACTION"
STATE, LOCKED, APPLIED, RESUMED = "state.json", "locked.json", "applied", "resumed"

SCRIPT = """#!/bin/sh
# CRIU action script made by `overlayfs-inetsk restore --nat-peer-netns`: locks the
# connections of fate nat at pre-restore, applies the peers' NAT table at post-restore.
exec {python} -m overlayfs_inetsk.cli nat-action {dir}
"""


def _conn_row(c: NatConn) -> list[object]:
    return [c.version, str(c.peer), c.peer_port, str(c.old), c.old_port, str(c.new),
            c.new_port]


def _conn(row: Sequence[object]) -> NatConn:
    v, peer, pport, old, oport, new, nport = row
    a = ipaddress.ip_address
    return NatConn(int(str(v)), a(str(peer)), int(str(pport)), a(str(old)), int(str(oport)),
                   a(str(new)), int(str(nport)))


def _lock_conn(c: NatConn) -> tcplock.Conn:
    """The restored socket's 4-tuple as node/tcplock.py (CRIU's lock) names it."""
    return (c.version, str(c.new), c.new_port, str(c.peer), c.peer_port)


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def prepare(directory: str, conns: Sequence[NatConn], peers: Sequence[str],
            source: str, netns: str | None, python: str | None = None) -> str:
    """Write DIR/state.json and the action script; returns the script's path. `netns`:
    where criu restores (the lock rules are there)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    state = {"table": table_name(conns), "peers": list(peers), "source": source,
             "netns": netns, "conns": [_conn_row(c) for c in conns]}
    _write(os.path.join(directory, STATE), json.dumps(state, indent=1) + "\n")
    path = os.path.join(directory, "nat-action.sh")
    _write(path, SCRIPT.format(python=barrier._sh_quote(python or sys.executable),
                               dir=barrier._sh_quote(os.path.abspath(directory))))
    os.chmod(path, 0o755)
    return path


def _state(directory: str) -> tuple[str, list[str], list[NatConn], str, str | None]:
    path = os.path.join(directory, STATE)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        conns = [_conn(row) for row in doc["conns"]]
        netns = None if doc["netns"] is None else str(doc["netns"])
        return (str(doc["table"]), [str(p) for p in doc["peers"]], conns, str(doc["source"]),
                netns)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NatError(f"{path}: not a nat-action state ({exc})") from None


def _locked(directory: str) -> list[tcplock.Conn]:
    try:
        with open(os.path.join(directory, LOCKED), encoding="utf-8") as f:
            rows = json.load(f)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise NatError(f"{directory}/{LOCKED}: {exc}") from None
    return [(int(r[0]), str(r[1]), int(r[2]), str(r[3]), int(r[4])) for r in rows]


def _unlock(locked: list[tcplock.Conn]) -> None:
    """Delete the lock rules we added that are still there (CRIU's network unlock may have
    deleted them already)."""
    try:
        tcplock.unlock(locked, missing_ok=True)
    except BarrierError as exc:
        raise NatError(str(exc)) from None


def run_action(directory: str, env: Mapping[str, str] | None = None) -> str:
    """The action-script entry (see the module's doc); returns what it did, for the log."""
    environ = os.environ if env is None else env
    action = environ.get(ENV_ACTION, "")
    name, peers, conns, source, _netns = _state(directory)  # we run in criu's netns
    if action == "pre-restore":
        try:
            added = tcplock.lock([_lock_conn(c) for c in conns])
        except BarrierError as exc:
            raise NatError(str(exc)) from None
        _write(os.path.join(directory, LOCKED), json.dumps([list(c) for c in added]) + "\n")
        return f"locked {len(added)} connection(s) of fate nat until the network unlock"
    if action == "post-restore":
        try:
            nat.apply(peers, conns, source)
        except NatError as exc:
            try:
                _unlock(_locked(directory))
            except NatError as more:
                exc.args = (f"{exc}; and {more}",)
            raise
        _write(os.path.join(directory, APPLIED), "\n".join(peers) + "\n")
        return f"table {name} applied in {', '.join(peers)}"
    if action == "post-resume":
        _write(os.path.join(directory, RESUMED), "")
        return "resumed"
    return ""


def clean(directory: str) -> list[str]:
    """After a failed or killed restore (or a --foreground service's exit): remove the
    table from every peer and our lock rules. Returns the peers it was removed from; a
    failure is NatError naming each."""
    if not os.path.exists(os.path.join(directory, STATE)):
        return []
    name, peers, _conns, _src, netns = _state(directory)
    problems: list[str] = []
    removed: list[str] = []
    try:
        removed = [p for p in nat.remove(peers, name) if p is not None]
    except NatError as exc:
        problems.append(str(exc))
    try:
        locked = _locked(directory)
        if locked:
            in_netns(netns, lambda: _unlock(locked))
    except InetskError as exc:
        problems.append(str(exc))
    if problems:
        raise NatError("; ".join(problems))
    return removed


def finish(directory: str, keep: bool) -> bool:
    """The restore's end: keep the table (criu resumed a detached service) or clean up;
    the state dir goes either way. Returns whether the table stays; a failure to clean is
    logged (the restore failed already)."""
    kept = keep and resumed(directory)
    if not kept:
        try:
            gone = clean(directory)
        except NatError as exc:
            log.error("%s (remove it with `overlayfs-inetsk nat-rules --remove`)", exc)
            return False
        if gone:
            log.info("NAT table removed from %s (the restore did not go on)", ", ".join(gone))
    shutil.rmtree(directory, ignore_errors=True)
    return kept


def resumed(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, RESUMED))


def sweep(directory: str) -> None:
    """For app/restore.clear_restores: a restore killed with SIGKILL. Its table stays only if criu
    resumed the tasks (the connections live on); otherwise clean(). Never raises."""
    if not os.path.exists(os.path.join(directory, STATE)) or resumed(directory):
        return
    try:
        gone = clean(directory)
    except NatError as exc:
        log.error("cannot clear the NAT table of a killed restore: %s", exc)
        return
    if gone:
        log.warning("removed the NAT table of a killed restore from %s", ", ".join(gone))
