"""`python -m overlayfs_inetsk.plugin.wire_h > plugin/inetsk_wire.h`: the C plugin's copy of
wire.py's limits and names (a module of its own: `-m` on wire itself, which the package
imports, would run it twice)."""

import sys

from .wire import header

if __name__ == "__main__":
    sys.stdout.write(header())
