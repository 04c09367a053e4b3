"""The one place where the plugin calls the project's planning code (the layout refactor
renames these modules: only the imports below change)."""

from __future__ import annotations

from ..addrmap import AddressMap  # -> core.addrmap
from ..errors import ImageError, InetskError, MapError
from ..imagedir import read_group  # -> core.imagedir
from ..nodeaddr import make_resolver  # -> node.nodeaddr
from ..rewrite import RewriteOptions, RewriteResult, rewrite_group  # -> core.decide / plan
from ..view import View  # -> core.tree.ImageTree
from ..viewdir import VIEW_MARKER, write_view_dir  # -> offline

__all__ = ["AddressMap", "ImageError", "InetskError", "MapError", "RewriteOptions", "RewriteResult",
           "VIEW_MARKER", "View", "make_resolver", "plan", "write_view"]


def plan(root: str, amap: AddressMap, resolve, options: RewriteOptions
         ) -> tuple[View, dict[str, RewriteResult]]:
    """Every checkpoint under root rewritten in memory (RewriteError for a refused socket
    or a --strict violation, ImageError for a bad image)."""
    view = View.build(root)
    results: dict[str, RewriteResult] = {}
    for _dino, group in view.iter_socket_groups():
        results.update(rewrite_group(read_group(group.values()), amap, resolve, options))
    return view, results


def write_view(root: str, out: str, amap: AddressMap, resolve, options: RewriteOptions,
               view: View, results: dict[str, RewriteResult]) -> None:
    write_view_dir(root, out, amap, resolve, options, relative_links=True, view=view,
                   results=results)
