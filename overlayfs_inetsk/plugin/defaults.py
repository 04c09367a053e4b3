"""Where the node agent listens and where views are made by default. Apart from agent.py
and viewmaker.py so that building the CLI's parser (which shows them) imports neither:
every command, `rewrite` and `inspect` too, would pay for the agent's imports."""

DEFAULT_SOCKET = "/run/overlayfs-inetsk/agent.sock"
VIEW_ROOT = "/run/overlayfs-inetsk/plugin"
