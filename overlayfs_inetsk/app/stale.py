"""What restores killed with SIGKILL left, cleared by the one sweeper (host/stale.py), their
peers' NAT tables too: the next `restore` and every `umount` call it. Light on purpose:
`umount` imports it (nothing of the planner)."""

from __future__ import annotations

import os

from ..host.stale import RESTORE_DIR
from ..host.stale import clear_restores as _clear_restores


def _nat(base: str) -> None:
    from ..node import natrestore  # only for a dir left behind: its table, unless criu resumed

    natrestore.sweep(os.path.join(base, "nat"))


def clear_restores() -> list[str]:
    """The views cleared (host/stale.clear_restores)."""
    return _clear_restores(RESTORE_DIR, _nat)
