"""The FUSE view of a checkpoint: pyfuse3 handlers (ops), the foreground daemon and its
background start (spawn). The read-only bind of IMAGE_DIR and umount: host/mounts.py."""
