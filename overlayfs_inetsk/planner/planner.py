"""The pipeline every adapter calls (for now: the functions that read a tree's socket images
and plan them; the Planner object comes with the next steps)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from functools import partial

from ..core.addrmap import AddressMap
from ..core.boundmap import Resolver
from ..core.decide import RewriteOptions
from ..core.plan import CheckpointPlan, Mode, RewriteResult, plan_checkpoint, rewrite_checkpoint
from ..core.tree import ImageTree
from ..errors import TreeError
from ..host.files import read_group

log = logging.getLogger(__name__)


def check_parents(tree: ImageTree, warn_only: bool = False) -> None:
    """TreeError naming the first `parent` link (CRIU's link to the previous dump of an
    incremental chain, --prev-images-dir) that points outside image_dir. A view (mount,
    rewrite) cannot show it, and CRIU cannot restore such a dump without it: its
    restorer fails late ("No parent for snapshot pagemap"). Refused at once instead,
    naming the dir to use. warn_only (inspect, which serves nothing): one WARNING line
    per such link instead."""
    for link_b, target_b in tree.outside_parents:
        link, target = os.fsdecode(link_b), os.fsdecode(target_b)
        chain = os.path.commonpath([os.path.dirname(link), target])
        msg = (f"{link}: the link to the previous dump (--prev-images-dir) points outside "
               f"IMAGE_DIR ({target}): a view of this dir cannot show it and CRIU cannot "
               "restore the dump without it; use the directory holding the whole chain "
               f"({chain}) and restore from its subdirectory")
        if not warn_only:
            raise TreeError(msg)
        log.warning("%s", msg)


def generator(amap: AddressMap, resolve: Resolver | None, options: RewriteOptions
              ) -> Callable[[Mapping[str, bytes]], dict[str, RewriteResult]]:
    """What the FUSE view calls on first open of a checkpoint's socket image."""
    return partial(rewrite_checkpoint, amap=amap, resolve=resolve, options=options)


def served_bytes(paths: Mapping[str, bytes | str],
                 generate: Callable[[Mapping[str, bytes]], Mapping[str, RewriteResult]]
                 ) -> dict[str, bytes]:
    """Read one checkpoint's originals (image name -> real path) and run `generate` over
    them: image name -> the bytes to serve (the original where the generator left one
    out). The generator sees each image under its real path, so messages name the file."""
    by_path = {os.fsdecode(real): name for name, real in paths.items()}
    images = read_group(by_path)
    results = generate(images)
    out: dict[str, bytes] = {}
    for path, name in by_path.items():
        r = results.get(path)
        out[name] = images[path] if r is None else bytes(r.data)
    return out


def plan_tree(
    tree: ImageTree,
    amap: AddressMap,
    resolve: Resolver | None = None,
    options: RewriteOptions = RewriteOptions(),
    *,
    mode: Mode = "rewrite",
    reports: bool = True,
) -> Iterator[CheckpointPlan]:
    """One CheckpointPlan per checkpoint dir of `tree` (every dir holding a socket image),
    in the tree's order. Raises ImageError for a malformed image; never for a refused
    socket (see problems())."""
    for dino, group in tree.iter_socket_groups():
        paths = {name: os.fsdecode(real) for name, real in group.items()}
        results = plan_checkpoint(read_group(paths.values()), amap, resolve, options, reports,
                                  mode)
        yield CheckpointPlan(dino, tree.display(dino), paths, results)


def merged(plans: Iterator[CheckpointPlan]) -> dict[str, RewriteResult]:
    """Every image's result of every checkpoint, by real path (inspect's, rewrite's and
    restore's view of a whole tree)."""
    out: dict[str, RewriteResult] = {}
    for cp in plans:
        out.update(cp.results)
    return out
