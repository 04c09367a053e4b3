"""options.py is the one description of the shared options: every `mount` option
survives the round trip to the background daemon's command line (fuse/spawn.py derives it),
so an option added to the description reaches the daemon without a change to the spawn."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from overlayfs_inetsk.cli import make_parser
from overlayfs_inetsk.cli.mount import config_from_args
from overlayfs_inetsk import options
from overlayfs_inetsk.options import MOUNT_OPTIONS, SERVE_MODES, TCP_FATES, Option
from overlayfs_inetsk.core.decide import TCP_FATES as CORE_TCP_FATES
from overlayfs_inetsk.core.tree import SERVE_MODES as CORE_SERVE_MODES
from overlayfs_inetsk.fuse.daemon import MountConfig
from overlayfs_inetsk.fuse.spawn import CHILD_MODULE, child_argv

SPAWN_SETS = {"foreground": True, "ready_fd": 9, "log_file": "/run/x/daemon.log"}


def non_default(o: Option) -> tuple[list[str], object]:
    """Command-line words setting `o` to a value that is not its default, and that value."""
    if o.kind == "positional":
        return [f"/srv/{o.dest}"], f"/srv/{o.dest}"
    if o.kind == "flag":
        return [o.flags[0]], True
    if o.kind == "append":
        return [o.flags[0], "10.0.0.1=10.0.0.2", o.flags[0], "10.0.1.0/24=auto"], [
            "10.0.0.1=10.0.0.2", "10.0.1.0/24=auto"]
    if o.choices:
        v = next(c for c in o.choices if c != o.default)
        return [o.flags[0], v], v
    if o.type is int:
        return [o.flags[0], "7"], 7
    return [o.flags[0], f"value-of-{o.dest}"], f"value-of-{o.dest}"


def parse_mount(argv: list[str]) -> argparse.Namespace:
    return make_parser().parse_args(["mount", *argv])


def test_every_mount_option_reaches_the_daemon() -> None:
    argv: list[str] = []
    expected: dict[str, object] = {}
    for o in MOUNT_OPTIONS:
        words, value = non_default(o)
        argv += words
        expected[o.dest] = value
    args = parse_mount(argv)
    for dest, value in expected.items():  # the parser is built from the description
        assert getattr(args, dest) == value, dest
    cfg = config_from_args(args)
    child = child_argv(cfg, SPAWN_SETS["ready_fd"], str(SPAWN_SETS["log_file"]))
    assert child[:4] == [sys.executable, "-m", CHILD_MODULE, "mount"]
    back = parse_mount(child[4:])
    for o in MOUNT_OPTIONS:
        want = SPAWN_SETS[o.dest] if not o.child else expected[o.dest]
        assert getattr(back, o.dest) == want, f"{o.flags[0]} lost on the way to the daemon"


def test_defaults_round_trip_too() -> None:
    args = parse_mount(["/srv/img", "/srv/mnt"])
    back = parse_mount(child_argv(config_from_args(args), 5, "/l")[4:])
    for o in MOUNT_OPTIONS:
        if o.child:
            assert getattr(back, o.dest) == getattr(args, o.dest), o.dest


def test_every_mount_option_has_a_config_field() -> None:
    fields = {f.name for f in dataclasses.fields(MountConfig)}
    assert {o.attr for o in MOUNT_OPTIONS} <= fields


def test_choices_agree_with_the_core() -> None:
    assert TCP_FATES == CORE_TCP_FATES
    assert SERVE_MODES == CORE_SERVE_MODES


def test_barrier_defaults_agree_with_the_barrier() -> None:
    from overlayfs_inetsk.node import barrier, criu

    assert options.BARRIER_ACTIONS == barrier.ACTIONS
    assert options.RESTORE_STOP_TIMEOUT == criu.STOP_TIMEOUT
    assert options.BARRIER_DEFAULT_ACTION == barrier.DEFAULT_ACTION
    assert options.BARRIER_DEFAULT_TIMEOUT == barrier.DEFAULT_TIMEOUT
