"""The FUSE view of a checkpoint: pyfuse3 handlers (ops), the foreground daemon, its
background start (spawn) and the read-only bind of IMAGE_DIR with umount (robind)."""
