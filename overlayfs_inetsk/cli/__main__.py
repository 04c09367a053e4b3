"""`python -m overlayfs_inetsk.cli`: the same as the `overlayfs-inetsk` command."""

import sys

from . import main

sys.exit(main())
