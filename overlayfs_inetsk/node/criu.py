"""Finding CRIU on this node (restore runs it, doctor checks it)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

from ..errors import RestoreError

CRIU_DEFAULT = "/usr/local/sbin/criu"


def find_criu(env: Mapping[str, str]) -> str:
    """$CRIU, else `criu` on $PATH, else /usr/local/sbin/criu."""
    if env.get("CRIU"):
        path = env["CRIU"]
        if shutil.which(path) is None:
            raise RestoreError(f"$CRIU={path}: not an executable")
        return path
    found = shutil.which("criu", path=env.get("PATH", os.defpath))
    if found:
        return found
    if os.access(CRIU_DEFAULT, os.X_OK):
        return CRIU_DEFAULT
    raise RestoreError("criu not found ($CRIU, $PATH, /usr/local/sbin/criu): run "
                       "scripts/setup.sh, which builds CRIU 4.2.1, or set $CRIU")
