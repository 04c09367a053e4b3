"""Soak: no leaks across mounts, opens and restores (needs root and /dev/fuse).

    .venv/bin/python bench/soak.py                      # 200 cycles, 10,000 opens
    .venv/bin/python bench/soak.py --cycles 20 --opens 1000
    .venv/bin/python bench/soak.py --restores 30        # + restore speed (needs CRIU)

A thin runner: the soak itself is inetsk_testbed.soak (the tests run it from there).
"""

import sys

from inetsk_testbed.soak import main

if __name__ == "__main__":
    sys.exit(main())
