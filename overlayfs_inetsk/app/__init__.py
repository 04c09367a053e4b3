"""The applications: what a command does from start to end, over the planner and the
adapters (fuse, node, plugin, host): the mount daemon (mount), `restore` (restore), the
plugin's view and its node agent (plugin_view, agent), the group barrier (barrier) and
`doctor` (doctor). Nothing below imports them; cli/ calls them."""
