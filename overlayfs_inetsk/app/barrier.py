"""The group barrier as a CRIU action script: lock the image's TCP connections at
`pre-restore` (node/tcplock.py), wait at the chosen action (node/barrier.py), and on a
failure remove the lock before CRIU aborts the restore (docs/tcp.md). The connections are
the view's, as the planner reads them (purpose "barrier": the map is empty, an outside
`parent` link is a warning).
"""

from __future__ import annotations

import os

from ..errors import BarrierError
from ..node.barrier import ACTIONS, DEFAULT_ACTION, DEFAULT_TIMEOUT, ENV_ACTION, Passed, wait
from ..node.tcplock import Conn, _load_locked, _save_locked, _unlock_after, lock

LOCK_ACTION = "pre-restore"
ENV_IMAGE_DIR = "CRTOOLS_IMAGE_DIR"


def image_connections(image_dir: str) -> list[Conn]:
    """The 4-tuples of every TCP socket with a peer in the checkpoint(s) under image_dir, as
    the images say (for a view: after the rewrite). Sockets the rewrite closed are in state
    CLOSE and not listed."""
    from ..core.addrmap import AddressMap
    from ..core.sockaddr import SOCK_STREAM, TCP_CONNECTED_STATES, TCP_TIME_WAIT
    from ..host.files import check_image_dir
    from ..planner.planner import Planner

    out: list[Conn] = []
    results = Planner(AddressMap()).plan(check_image_dir(image_dir), "barrier").results
    for res in results.values():
        for r in res.reports:
            s = r.sock
            if (s.type != SOCK_STREAM or s.state not in TCP_CONNECTED_STATES
                    or s.state == TCP_TIME_WAIT):
                continue
            src, dst = s.src, s.dst
            v4src, v4dst = getattr(src, "ipv4_mapped", None), getattr(dst, "ipv4_mapped", None)
            if v4src is not None and v4dst is not None:  # CRIU locks these with iptables
                src, dst = v4src, v4dst
            conn = (src.version, str(src), r.sport, str(dst), r.dport)
            if conn not in out:
                out.append(conn)
    return out



def run_action(directory: str, name: str, members: int, timeout: float = DEFAULT_TIMEOUT,
               action: str = DEFAULT_ACTION, env: dict[str, str] | None = None,
               lock_connections: bool = True) -> Passed | list[Conn] | None:
    """The action-script entry. At `pre-restore` (with lock_connections) lock the image's
    connections (returns them); at `action` wait at the barrier (returns Passed; on failure
    remove our lock rules, then raise); do nothing (None) for every other action. With
    CRTOOLS_SCRIPT_ACTION unset (run by hand) just wait."""
    if action not in ACTIONS:
        raise BarrierError(f"--action {action!r}: one of {', '.join(ACTIONS)}")
    environ = os.environ if env is None else env
    current = environ.get(ENV_ACTION)
    if lock_connections and current == LOCK_ACTION and action != LOCK_ACTION:
        image_dir = environ.get(ENV_IMAGE_DIR)
        if not image_dir:
            raise BarrierError(f"{ENV_ACTION}={current} but {ENV_IMAGE_DIR} is not set")
        if not os.path.isdir(directory):
            raise BarrierError(f"barrier dir {directory} does not exist")
        added = lock(image_connections(image_dir))
        _save_locked(directory, name, added)
        return added
    if current is not None and current != action:
        return None
    try:
        return wait(directory, name, members, timeout)
    except BarrierError as exc:
        if current is not None:
            _unlock_after(_load_locked(directory, name), exc)
        raise
