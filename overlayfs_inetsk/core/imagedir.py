"""What an image dir holds for the planner: which files are socket images, and how big one
may be. (Reading them is host/files.py's; which dirs are checkpoints, core/tree.py's.)

Every directory holding a socket image is one checkpoint, rewritten as a group (its
files.img and legacy inetsk.img together).
"""

from __future__ import annotations

SOCKET_IMAGE_NAMES = ("files.img", "inetsk.img")

# The largest socket image read (bytes): a bigger one is refused, not read into memory. The
# plugin's C fast path has the same limit (plugin/inetsk_scan.h INETSK_SOCKET_IMAGE_MAX;
# tests/test_scan.py checks that they agree). 256 MiB is about 2.4 million inet sockets.
SOCKET_IMAGE_MAX = 256 << 20
