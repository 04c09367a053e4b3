"""overlayfs-inetsk: a per-node view of a shared CRIU checkpoint with inet socket addresses
rewritten for this node."""

__version__ = "0.1.0"
