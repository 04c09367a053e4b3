"""The one place where the plugin calls the project's planning code (the layout refactor
renames these modules: only the imports below change)."""

from __future__ import annotations

import os

from ..addrmap import AddressMap  # -> core.addrmap
from ..errors import ImageError, InetskError, MapError
from ..imagedir import read_group  # -> core.imagedir
from ..nodeaddr import make_resolver  # -> node.nodeaddr
from ..rewrite import RewriteOptions, RewriteResult, rewrite_group  # -> core.decide / plan
from ..view import ROOT_INODE, View  # -> core.tree.ImageTree
from ..viewdir import VIEW_MARKER, write_view_dir  # -> offline

__all__ = ["AddressMap", "ImageError", "InetskError", "MapError", "RewriteOptions", "RewriteResult",
           "VIEW_MARKER", "View", "make_resolver", "plan", "top_level", "write_view"]


def plan(root: str, amap: AddressMap, resolve, options: RewriteOptions, reports: bool = False
         ) -> tuple[View, dict[str, RewriteResult]]:
    """Every checkpoint under root rewritten in memory (RewriteError for a refused socket
    or a --strict violation, ImageError for a bad image). reports=True: every socket's
    SocketReport too (the hook table needs them)."""
    view = View.build(root)
    results: dict[str, RewriteResult] = {}
    for _dino, group in view.iter_socket_groups():
        results.update(rewrite_group(read_group(group.values()), amap, resolve, options,
                                     reports=reports))
    return view, results


def top_level(view: View, results: dict[str, RewriteResult]) -> dict[str, RewriteResult]:
    """The results of the images dir itself: the socket images CRIU reads."""
    names = {os.fsdecode(p) for p in view.socket_group(ROOT_INODE).values()}
    return {k: v for k, v in results.items() if k in names}


def write_view(root: str, out: str, amap: AddressMap, resolve, options: RewriteOptions,
               view: View, results: dict[str, RewriteResult]) -> None:
    write_view_dir(root, out, amap, resolve, options, relative_links=True, view=view,
                   results=results)
