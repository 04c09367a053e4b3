"""The runtime plugin's Python side (docs/plugin.md).

The CRIU plugin (plugin/overlayfs_inetsk_plugin.c) asks, at restore init, for a per-node view
of the images dir: the node agent (`overlayfs-inetsk agent`, agent.py) or, when none runs,
the hidden command `overlayfs-inetsk plugin-view` (cli.py). Both answer with
viewmaker.make_view(): one line, NONE | VIEW <dir> | ERR <message>.
"""

# where the agent listens and where views are made (the C plugin accepts views there only)
DEFAULT_SOCKET = "/run/overlayfs-inetsk/agent.sock"
VIEW_ROOT = "/run/overlayfs-inetsk/plugin"
# CRIU's plugin dir, where `plugin install` puts the .so (here, not in install.py: the
# parser needs it, and install.py's imports would slow every command's start)
DEFAULT_LIBDIR = "/usr/lib/criu"
