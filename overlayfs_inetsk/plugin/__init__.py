"""The runtime plugin's Python side (docs/plugin.md): what the planner's answer to the CRIU
plugin is made of.

The CRIU plugin (plugin/overlayfs_inetsk_plugin.c) asks, at restore init, for a per-node view
of the images dir: the node agent (`overlayfs-inetsk agent`, app/agent.py) or, when none
runs and one is configured, the hidden command `overlayfs-inetsk plugin-view --socket-fd 3`
(cli/plugin_view.py), which serves the one request with the agent's own handler; the answer is
app/plugin_view.py's. Here: the protocol and its limits (wire.py), the view dirs and their
lifetime (flock: viewroot.py), the images dir CRIU hands over (imagesdir.py) and `plugin
install` (install.py).
"""

from .wire import AGENT_SOCKET, VIEW_ROOT

# where the agent listens and where views are made (the C plugin accepts views there only)
DEFAULT_SOCKET = AGENT_SOCKET
# CRIU's plugin dir, where `plugin install` puts the .so (here, not in install.py: the
# parser needs it, and install.py's imports would slow every command's start)
DEFAULT_LIBDIR = "/usr/lib/criu"

__all__ = ["DEFAULT_LIBDIR", "DEFAULT_SOCKET", "VIEW_ROOT"]
