"""The one place where the plugin calls the project's planning code (core/plan.py) and the
offline writer (offline.py): the plugin decides nothing of its own."""

from __future__ import annotations

import os

from ..core.addrmap import AddressMap, Resolver
from ..core.decide import TCP_FATES, RewriteOptions
from ..core.plan import RewriteResult, plan_tree, raise_problems
from ..core.tree import ROOT_INODE, ImageTree
from ..errors import ImageError, InetskError, MapError
from ..node.nodeaddr import make_resolver
from ..offline import VIEW_MARKER, write_view_dir

__all__ = ["AddressMap", "ImageError", "InetskError", "MapError", "RewriteOptions", "RewriteResult",
           "TCP_FATES", "VIEW_MARKER", "ImageTree", "make_resolver", "plan", "top_level", "write_view"]


def plan(root: str, amap: AddressMap, resolve: Resolver | None, options: RewriteOptions,
         reports: bool = False, link_from: str | None = None
         ) -> tuple[ImageTree, dict[str, RewriteResult]]:
    """Every checkpoint under root rewritten in memory (RewriteError for a refused socket
    or a --strict violation, ImageError for a bad image). reports=True: every socket's
    SocketReport too (the hook table needs them). link_from: where the view will be; its
    links are then relative (they must resolve in a container's mount namespace too)."""
    tree = ImageTree.build(root, link_from=link_from)
    results: dict[str, RewriteResult] = {}
    for cp in plan_tree(tree, amap, resolve, options, reports=reports):
        raise_problems(cp.results, options)
        results.update(cp.results)
    return tree, results


def top_level(tree: ImageTree, results: dict[str, RewriteResult]) -> dict[str, RewriteResult]:
    """The results of the images dir itself: the socket images CRIU reads."""
    names = {os.fsdecode(p) for p in tree.socket_group(ROOT_INODE).values()}
    return {k: v for k, v in results.items() if k in names}


def write_view(root: str, out: str, amap: AddressMap, resolve: Resolver | None,
               options: RewriteOptions, tree: ImageTree,
               results: dict[str, RewriteResult]) -> None:
    write_view_dir(root, out, amap, resolve, options, tree=tree, results=results)
