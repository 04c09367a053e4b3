"""`overlayfs-inetsk doctor`: argument parsing and output (the checks are app/doctor.py)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_doctor_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "doctor", help="check that this node can restore with overlayfs-inetsk",
        description="Check what a node needs: criu (found, its version, `criu check`, kernel "
                    "features it reports missing), /dev/fuse, fusermount3, nsenter, "
                    "iptables-restore, root, the Python modules. Prints each problem with "
                    "how to fix it. Exit status 0: ready; 1: not ready.")
    p.add_argument("--json", action="store_true", help="machine-readable output (docs/json.md)")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from ..app.doctor import render_json, render_text, run_checks

    checks = run_checks()
    sys.stdout.write(render_json(checks) if args.json else render_text(checks))
    return 0 if all(c.status != "fail" for c in checks) else 1
