"""The system calls and /proc readers the adapters share: reading image dirs and map files
safely (files, listing), mountinfo and the read-only bind (mounts), network namespaces
(netns), rtnetlink and the node's `auto` address (rtnl, nodeaddr), the /proc/net socket
tables (proctables). A leaf: it imports nothing of the project but errors and the pure
core (tests/test_layout.py)."""
