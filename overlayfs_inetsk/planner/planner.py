"""THE planner: the one pipeline from (the map, the options, the node's addresses) to what
an adapter serves, writes or checks. Every adapter calls it: `inspect` and `rewrite`
(cli/images.py), the mount's validation and its FUSE opens (app/mount.py, fuse/ops.py),
`restore` (app/restore.py), the barrier (app/barrier.py) and the plugin's view
(app/plugin_view.py). No adapter strings the steps together:

    tree      the listing of IMAGE_DIR (host/listing.py) as the view shows it (core/tree.py)
    parents   a `parent` link out of IMAGE_DIR: refused, or a warning (check_parents)
    addresses `auto`, looked up once in --netns (host/nodeaddr.py): a resolver, and what
              the bytes depend on (fuse/ops.py generates again when that changes)
    plan      each checkpoint's socket images read (host/files.py) and planned together
              (core/plan.py: every socket's Decision, the bytes)
    problems  a refused socket, a --strict violation: RewriteError naming the first
    ports     the ports the restore binds that are taken in --netns (planner/ports.py)

Which of them a use runs is the STEPS table, by purpose, so no adapter can forget one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from functools import partial

from .. import lazylog
from ..core.addrmap import AddressMap
from ..core.boundmap import Resolver
from ..core.decide import RewriteOptions
from ..core.plan import CheckpointPlan, Mode, RewriteResult, plan_checkpoint, raise_problems
from ..core.plan import rewrite_checkpoint
from ..core.tree import ImageTree, ServeMode
from ..errors import TreeError
from ..host.files import read_group, stamp
from ..host.listing import build_tree
from ..host.nodeaddr import Snapshot, asking, narrow, snapshot
from .sources import CliMap, cli_map

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from typing import NamedTuple
else:
    from ..record import NamedTuple

if TYPE_CHECKING:  # the port check's modules load when it runs: not for `plugin`, `rewrite`
    from ..core.portcheck import Clash

log = lazylog.getLogger(__name__)

# images of one directory (path -> original bytes) -> path -> result; raises InetskError
GenerateFn = Callable[[Mapping[str, bytes]], Mapping[str, RewriteResult]]
# () -> (the node's `auto` addresses now, the generator for them, the families it asked for
# (filled as it runs)): Planner.current
CurrentFn = Callable[[], tuple[Snapshot, GenerateFn, set[int]]]
Warn = Callable[[str], None]


class Steps(NamedTuple):
    parents: str  # "refuse" (a view cannot show it), "warn" (nothing is served), "view"
    refuse: bool  # a refused socket or a --strict violation fails the plan
    ports: str  # the port check: "yes", "netns" (when a namespace is named), "no"
    sockets_only: bool = False  # only socket images are read (a left-out file is no news)


STEPS: dict[str, Steps] = {
    "inspect": Steps("warn", False, "netns", True),  # shows every socket, refused or not
    "rewrite": Steps("refuse", True, "no"),  # offline: no target namespace
    "mount": Steps("refuse", True, "yes"),
    "restore": Steps("refuse", True, "yes"),
    # the runtime's netns: its own restore fails on a taken port; `parent` links matter only
    # to a view (app/plugin_view.py checks them before writing one; the hook needs none)
    "plugin": Steps("view", True, "no"),
    "barrier": Steps("warn", False, "no", True),  # the view CRIU restores from: its sockets
    "nat-rules": Steps("warn", True, "no", True),  # the peers' side of a restore's plan
}


class Plan(NamedTuple):
    tree: ImageTree
    checkpoints: list[CheckpointPlan]  # one per checkpoint dir, in the tree's order
    results: dict[str, RewriteResult]  # every socket image of every checkpoint, by path
    ports_taken: list[Clash] | None  # None: the port check did not run
    # what the bytes depend on: the `auto` addresses the plan asked for (nodeaddr.narrow;
    # None: no auto)
    depends: Snapshot | None
    stamps: dict[int, Hashable]  # dir inode -> host.files.stamp of its originals, taken
    # before they were read


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


def served_bytes(paths: Mapping[str, bytes | str], generate: GenerateFn) -> dict[str, bytes]:
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


class Planner:
    """The map, the options and where the node's addresses are looked up (and the ports
    checked), and the steps every use runs."""

    def __init__(self, amap: AddressMap, options: RewriteOptions = RewriteOptions(),
                 netns: str | None = None, iface: str | None = None) -> None:
        self.amap = amap
        self.options = options
        self.netns = netns
        self.iface = iface

    @classmethod
    def from_cli(cls, specs: Sequence[str], files: Sequence[str], env: Mapping[str, str],
                 port_offset: int | None, strict: bool, tcp_outside: str,
                 netns: str | None, iface: str | None, default: str | None = None
                 ) -> tuple[Planner, CliMap]:
        """The planner of a command's options (the map: sources.cli_map, `default` when
        none is given); ValueError for a fate that is none."""
        m = cli_map(specs, files, env, port_offset, default)
        return cls(m.amap, RewriteOptions(strict=strict, tcp_outside=tcp_outside), netns,
                   iface), m

    def addresses(self) -> tuple[Snapshot | None, Resolver | None, set[int]]:
        """The node's `auto` addresses now (one lookup of every family the map needs, in
        --netns), the resolver that answers from them, and the set it fills with every
        family it is asked for; (None, None, set()) when the map has no `auto`. Bytes
        planned with that resolver depend on narrow(snapshot, asked) (host/nodeaddr.py)."""
        asked: set[int] = set()
        families = self.amap.auto_families()
        if not families:
            return None, None, asked
        snap, resolve = snapshot(families, self.netns, self.iface)
        return snap, asking(resolve, asked), asked

    def generator(self, resolve: Resolver | None) -> GenerateFn:
        """What the FUSE view calls on first open of a checkpoint's socket images:
        rewrite_checkpoint (RewriteError for a refused socket or a --strict violation)."""
        return partial(rewrite_checkpoint, amap=self.amap, resolve=resolve,
                       options=self.options)

    def current(self) -> tuple[Snapshot, GenerateFn, set[int]]:
        """(the node's `auto` addresses now, the generator for them, the set it fills with
        the families it asks for: narrow() of the first by it is what its bytes depend on):
        fuse/images.py asks it at every open of a socket image when the map has `auto`,
        and when the node's addresses change."""
        snap, resolve, asked = self.addresses()
        return snap or (), self.generator(resolve), asked

    def tree(self, image_dir: str, purpose: str, *, serve: ServeMode = "symlink",
             link_root: str | None = None, link_from: str | None = None) -> ImageTree:
        """IMAGE_DIR as a view of it shows it, its `parent` links checked."""
        steps = STEPS[purpose]
        # only a mount serves attributes: for the rest a plain file is not stat'ed
        tree = build_tree(image_dir, serve, link_root, link_from, steps.sockets_only,
                          attrs=purpose == "mount")
        if purpose != "plugin" and not tree.holds_images():  # the plugin's is CRIU's own
            raise TreeError(f"{image_dir}: not a CRIU image dir (no inventory.img, files.img "
                            "or inetsk.img in it or below it)")
        if steps.parents != "view":
            check_parents(tree, warn_only=steps.parents == "warn")
        return tree

    def checkpoints(self, tree: ImageTree, resolve: Resolver | None, *, reports: bool = True,
                    mode: Mode = "rewrite", refuse: bool = True
                    ) -> list[CheckpointPlan]:
        """Each checkpoint dir of the tree planned (mode "check": its images only checked);
        with `refuse`, RewriteError for the first refused socket or --strict violation."""
        out = []
        for dino, group in tree.iter_socket_groups():
            paths = {name: os.fsdecode(real) for name, real in group.items()}
            results = plan_checkpoint(read_group(paths.values()), self.amap, resolve,
                                      self.options, reports, mode)
            if refuse and mode == "rewrite":
                raise_problems(results, self.options)
            out.append(CheckpointPlan(dino, tree.display(dino), paths, results))
        return out

    def port_check(self, results: Mapping[str, RewriteResult], purpose: str,
                   warn: Warn) -> list[Clash] | None:
        """The port check as `purpose` runs it (None: it does not): each taken port is
        passed to `warn`; with --strict, PortTakenError names the first."""
        when = STEPS[purpose].ports
        if when == "no" or (when == "netns" and not self.netns):
            return None
        from .ports import check_plan

        # inspect shows: only a use that refuses fails on a taken port (--strict)
        return check_plan(results, self.netns, self.options.strict and STEPS[purpose].refuse,
                          warn)

    def plan(self, image_dir: str | ImageTree, purpose: str, *, reports: bool = True,
             link_from: str | None = None, port_check: bool = True,
             warn: Warn = log.warning) -> Plan:
        """Every step `purpose` runs, over IMAGE_DIR (or a tree already made). reports=False:
        a SocketReport only for the sockets that need attention (faster; the port check and
        the hook table need every one). port_check=False: the caller checked the ports."""
        steps = STEPS[purpose]
        tree = image_dir if isinstance(image_dir, ImageTree) else self.tree(
            image_dir, purpose, link_from=link_from)
        snap, resolve, asked = self.addresses()
        # taken before the files are read: a file changed since shows at the first open
        stamps: dict[int, Hashable] = {d: stamp(g) for d, g in tree.iter_socket_groups()}
        checkpoints = self.checkpoints(tree, resolve, reports=reports, refuse=steps.refuse)
        results = {p: r for cp in checkpoints for p, r in cp.results.items()}
        taken = self.port_check(results, purpose, warn) if port_check else None
        return Plan(tree, checkpoints, results, taken,
                    None if snap is None else narrow(snap, asked), stamps)
