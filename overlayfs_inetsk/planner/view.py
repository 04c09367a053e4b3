"""What a mount serves: the planner's one answer to a mount daemon (prepare_view), and the
plan a `restore` hands its daemon so that the checkpoint is planned once (handover).

prepare_view plans every checkpoint now where the outcome is known (no `auto` in the map,
or `auto` resolves now), so a refusal (--strict, --tcp-outside fail) stops the mount with
the socket named instead of an EIO inside CRIU later, and keeps the bytes: the first open
serves them if the originals and the addresses are still the ones planned. Where a socket
needs an `auto` address the node does not have yet, the images are only checked, and a
warning names the family and the namespace (the node may get its address before CRIU opens
files.img; the open fails with EIO until then).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Mapping
from typing import NamedTuple

from ..core.sockaddr import IPAddress
from ..core.tree import ImageTree, ServeMode
from ..errors import InetskError
from ..host.files import stamp
from ..host.nodeaddr import Snapshot, families_without, narrow
from .planner import CurrentFn, GenerateFn, Planner

log = logging.getLogger(__name__)

# socket images made ahead of their first open: (host.files.stamp of the originals, what
# the bytes depend on (None, or the `auto` addresses the plan asked for, as nodeaddr.narrow
# gives them), image name -> bytes)
Made = tuple[Hashable, Snapshot | None, dict[str, bytes]]
Generated = dict[int, Made]  # dir inode -> Made


class ViewPlan(NamedTuple):
    tree: ImageTree
    generate: GenerateFn  # the generator, without `auto` (else `current` gives one)
    current: CurrentFn | None  # with `auto`: Planner.current
    groups: int  # checkpoint dirs
    warnings: list[str]  # one line each, shown by `mount`
    generated: Generated  # what the first opens would generate from the same files


class _NoAutoYet(Exception):
    """An `auto` target with no address at mount (the plan falls back to checking only)."""


def prepare_view(planner: Planner, image_real: str, mountpoint: str, serve: ServeMode,
                 ro_bind: str | None, port_check: bool = True,
                 planned: Mapping[str, Made] | None = None) -> ViewPlan:
    """The view of IMAGE_DIR at mountpoint, everything that can fail for a user reason
    checked (InetskError, one line). `ro_bind`: where the view's links point (the
    read-only bind of IMAGE_DIR). `planned`: the plan a `restore` made (handover): used as
    it is, by checkpoint dir (it was checked there, ports too)."""
    # relative links: they resolve in a container's mount namespace too (runc restore)
    tree = planner.tree(image_real, "mount", serve=serve, link_root=ro_bind,
                        link_from=mountpoint)
    warnings: list[str] = []
    generated: Generated = {}
    current = planner.current if planner.amap.auto_families() else None
    if planned is not None:
        for dino, _group in tree.iter_socket_groups():
            got = planned.get(tree.display(dino))
            if got is not None:
                generated[dino] = got
        groups = len(tree.socket_groups)
        log.debug("%s: the plan of %d checkpoint dir(s) handed over", image_real, len(planned))
    else:
        groups = _plan(planner, tree, port_check, warnings, generated)
    if groups == 0:
        log.warning("%s holds no files.img or inetsk.img: the view is a plain mirror",
                    image_real)
    return ViewPlan(tree, planner.generator(None), current, groups, warnings, generated)


def _plan(planner: Planner, tree: ImageTree, port_check: bool, warnings: list[str],
          generated: Generated) -> int:
    snap, found, asked = planner.addresses()
    resolve = found
    lacking = families_without(snap or ())
    missing = {fam: v for fam, v in snap or () if fam in lacking}
    if missing:

        def resolve_or_wait(family: int) -> IPAddress | None:
            if family in missing:
                raise _NoAutoYet(family)
            assert found is not None
            return found(family)
        resolve = resolve_or_wait
    # taken before the files are read: a file changed since shows at the first open
    stamps = {d: stamp(g) for d, g in tree.iter_socket_groups()}
    try:
        # the port check needs every socket's report; a refusal known now stops the mount
        checkpoints = planner.checkpoints(tree, resolve, reports=port_check)
    except _NoAutoYet as e:
        fam = e.args[0]
        why = missing[fam]
        where = f"netns {planner.netns}" if planner.netns else "our network namespace"
        on = f" on {planner.iface}" if planner.iface else ""
        why = (f"no IPv{fam} address in {where}{on} yet" if why == "none"
               else f"IPv{fam}: {why[len('error: '):]}")
        warnings.append(f"auto: {why}; the view mounts, and files.img fails to open (EIO) "
                        "until there is one")
        return len(planner.checkpoints(tree, None, mode="check"))  # every image parses
    # what the bytes depend on: the addresses of the families the plan asked for
    depends = None if snap is None else narrow(snap, asked)
    for cp in checkpoints:
        # the bytes the first open would generate (same files, same addresses): kept
        generated[cp.dir_inode] = (stamps.get(cp.dir_inode), depends,
                                   {name: bytes(d) for name, d in cp.data().items()})
    if checkpoints and port_check:
        results = {p: r for cp in checkpoints for p, r in cp.results.items()}
        planner.port_check(results, "mount", warnings.append)
    return len(checkpoints)


# -- the handover: restore -> its mount daemon --------------------------------------------
# `restore` plans the checkpoint (to refuse before mounting and to print the summary) and
# hands the bytes to the daemon it starts (an fd: --plan-fd), which serves them as its own
# validation would have made them: one plan. A header line of JSON, then the bytes.

def encode_handover(plan_dirs: Mapping[str, Made]) -> bytes:
    """plan_dirs: the checkpoint dir (as the tree names it) -> (stamp, depends, bytes)."""
    head: dict[str, object] = {}
    blobs: list[bytes] = []
    pos = 0
    for path, (stamp_, depends, images) in plan_dirs.items():
        spans = {}
        for name, data in images.items():
            spans[name] = [pos, len(data)]
            blobs.append(data)
            pos += len(data)
        head[path] = {"stamp": stamp_, "depends": depends, "images": spans}
    return json.dumps(head).encode() + b"\n" + b"".join(blobs)


def _tuples(x: Hashable | list[object]) -> Hashable:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def _snapshot(x: object) -> Snapshot | None:
    """A handed-over `depends`: None, or (family, address text) pairs (nodeaddr.Snapshot)."""
    if x is None:
        return None
    if not isinstance(x, list) or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], int)
            and isinstance(p[1], str) for p in x):
        raise ValueError(f"depends: not a list of [family, address] pairs: {x!r}"[:200])
    return tuple((p[0], p[1]) for p in x)


def decode_handover(data: bytes, what: str) -> dict[str, Made]:
    """InetskError naming `what` for data that is not a handover."""
    line, sep, body = data.partition(b"\n")
    try:
        head = json.loads(line) if sep else None
        if not isinstance(head, dict):
            raise ValueError("no header")
        out = {}
        for path, d in head.items():
            images = {}
            for name, (pos, n) in d["images"].items():
                if pos < 0 or n < 0 or pos + n > len(body):
                    raise ValueError(f"{name}: outside the data")
                images[name] = body[pos:pos + n]
            out[path] = (_tuples(d["stamp"]), _snapshot(d["depends"]), images)
        return out
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise InetskError(f"{what}: not a plan handed over by restore ({e})") from None
