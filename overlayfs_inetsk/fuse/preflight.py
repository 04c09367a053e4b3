"""What `mount` checks before it mounts, beyond parsing: the map applied now (where `auto`
resolves), so that a refusal known in advance stops the mount, and the ports the restore
will bind that are taken in --netns are named (docs/map.md, "Ports")."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..core.addrmap import AddressMap, Resolver
from ..core.decide import RewriteOptions
from ..core.tree import ImageTree
from ..errors import MountError, NodeAddressError, RewriteError

if TYPE_CHECKING:
    from .daemon import MountConfig

log = logging.getLogger(__name__)


def check_ports(cfg: MountConfig, warn: Callable[[str], None]) -> None:
    """The port check alone (the background `mount` makes it before it spawns the daemon,
    so that its warnings reach the terminal)."""
    from ..core.imagedir import check_image_dir
    from ..node.nodeaddr import check_netns, make_resolver

    amap = AddressMap.from_args(cfg.maps, cfg.map_files, env=cfg.env,
                                port_offset=cfg.port_offset)
    if cfg.netns:
        check_netns(cfg.netns)
    try:
        options = RewriteOptions(strict=cfg.strict, tcp_outside=cfg.tcp_outside)
    except ValueError as e:
        raise MountError(str(e)) from None
    tree = ImageTree.build(check_image_dir(cfg.image_dir))
    resolver = make_resolver(cfg.netns, cfg.iface) if amap.auto_families() else None
    plan_ports(tree, amap, resolver, options, cfg.netns, cfg.strict, warn)


def plan_ports(tree: ImageTree, amap: AddressMap, resolver: Resolver | None,
               options: RewriteOptions, netns: str | None, strict: bool,
               warn: Callable[[str], None]) -> None:
    """Warn (with --strict: refuse) when a port the view's restore would bind is taken in
    `netns`. The map is applied for it now; when an `auto` address is not there yet, the
    check is left out (the view resolves it on first open)."""
    from ..core.plan import merged, plan_tree, raise_problems
    from ..node.portcheck import check_plan

    try:
        results = merged(plan_tree(tree, amap, resolver, options))
    except (RewriteError, NodeAddressError) as e:  # `auto` not there yet: told on first open
        log.debug("port check left out: %s", e)
        return
    if amap.moves_ports():
        # a port map refused for a socket (two onto one port, a split connection, an
        # offset past 65535) stops the mount now rather than at the first open
        raise_problems(results, options)
    check_plan(results, netns, strict, warn)
