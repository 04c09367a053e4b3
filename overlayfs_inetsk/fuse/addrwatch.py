"""The mount daemon's address watch: with `auto` in the map, the socket images are made
when the node's addresses or routes change (host/rtnl.AddressWatch in --netns, or the
daemon's own namespace), not when CRIU first opens files.img (fuse/images.py's warm())."""

from __future__ import annotations

import logging

import trio

from ..errors import InetskError
from ..host.netns import in_netns
from ..host.rtnl import AddressWatch
from .images import SocketImages

log = logging.getLogger("overlayfs_inetsk.fuse.daemon")


async def watch_addresses(images: SocketImages, netns: str | None) -> None:
    """Warm `images` whenever the node's addresses or routes change (in `netns`, or our
    own namespace), and once at the start: what changed between the mount's look and the
    watch's. Without a watch (it cannot be made) the images are made at their first open."""
    where = f"netns {netns}" if netns else "our network namespace"
    try:
        watch = await trio.to_thread.run_sync(in_netns, netns, AddressWatch)
    except (InetskError, OSError) as e:  # NodeAddressError: the netns is gone
        log.warning("cannot watch %s for address changes: %s; the socket images are made at "
                    "their first open", where, e)
        return
    with watch:
        log.info("watching %s for address changes", where)
        await images.warm()
        while True:
            await trio.lowlevel.wait_readable(watch.fileno())
            try:
                changed = watch.changed()
            except OSError as e:
                log.warning("stopped watching %s for address changes: %s; the socket "
                            "images are made at their first open", where, e)
                return
            if changed:
                await images.warm()
