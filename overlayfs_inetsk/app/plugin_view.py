"""Make the per-node view the CRIU plugin puts in place of its images dir.

make_view(images_fd, netns_fd, env, pid, view_root, hook, deadline) answers the plugin with
a Reply: one line, and for VIEW the view's locked fd (viewroot.py; the protocol: wire.py):
  NONE <why>     nothing to change (or the images dir is a per-node view already);
  VIEW <name>    a private view dir made for this restore, an entry of the view root (the
                 plugin removes it at fini; the sweeper once no restore holds it);
  ERR <message>  the map cannot be applied: the restore must fail, with this line;
  TABLE <n>      only when the plugin says CRIU calls UPDATE_INETSK (hook=True) and the
                 hook can apply the plan exactly: n more lines, the table the hook applies
                 socket by socket, and no view (hooktable.py, docs/upstream-hook.md).

The map and options come from CRIU's environment, the checkpoint or the node
(planner/sources.plugin_config: the precedence); the planner plans (planner/planner.py,
purpose "plugin"), with `auto` resolved in the restore's network namespace (netns_fd); the
view is written by the offline writer (relative symlinks to every other image, the
rewritten socket images), built in a temporary dir and renamed, so it is whole or absent,
into the view root (plugin/viewroot.py: views live while a restore holds them).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from .. import lazylog
from ..record import Record
from ..core.tree import ROOT_INODE, ImageTree
from ..errors import ImageError, InetskError
from ..offline import write_view_dir
from ..planner.planner import Planner, check_parents
from ..planner.sources import plugin_config
from ..plugin import viewroot
from ..plugin.imagesdir import already_a_view, images_root
from ..plugin.wire import TABLE_MAX, VIEW_ROOT, view_reply

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from ..core.plan import RewriteResult

log = lazylog.getLogger(__name__)


class Reply(Record):
    """What the planner answers: the line, and for VIEW the view (its fd goes with it);
    note: what the agent's one log line for the request adds (not sent). (A Record, not a
    dataclass: record.py.)"""

    __slots__ = ("text", "view", "note")
    __hash__ = None  # type: ignore[assignment]  # mutable, as a dataclass with eq is
    text: str
    view: viewroot.View | None
    note: str

    def __init__(self, text: str, view: viewroot.View | None = None, note: str = "") -> None:
        self.text, self.view, self.note = text, view, note

    def close(self) -> None:
        if self.view is not None:
            self.view.close()


# -- the view -----------------------------------------------------------------------------
def _one_line(text: str) -> str:
    return " ".join(text.split())[:1000]


def _who(pid: int | None) -> str:
    return f"criu pid {pid if pid is not None else '?'}"


def make_view(images_fd: int, netns_fd: int, env: Mapping[str, str], pid: int | None,
              view_root: str = VIEW_ROOT, hook: bool = False,
              deadline: float | None = None) -> Reply:
    """pid: what criu said its pid is, for the log only. deadline: time.monotonic() by
    which the plugin stops waiting (no view is written after it). The caller logs the
    request's one line (agent.handle)."""
    try:
        reply = _make_view(images_fd, netns_fd, env, pid, view_root, hook, deadline)
    except InetskError as e:
        reply = Reply("ERR " + _one_line(str(e)))
    except Exception as e:  # a bug: the restore fails with its name, the log has the rest
        log.exception("plugin-view for %s failed", _who(pid))
        reply = Reply("ERR internal error (a bug; please report it): " + _one_line(
            f"{type(e).__name__}: {e}"))
    return reply


def _check_deadline(deadline: float | None, what: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise InetskError(f"the request's deadline passed {what}")


def top_level(tree: ImageTree, results: Mapping[str, RewriteResult]
              ) -> dict[str, RewriteResult]:
    """The results of the images dir itself: the socket images CRIU reads."""
    names = {os.fsdecode(p) for p in tree.socket_group(ROOT_INODE).values()}
    return {k: v for k, v in results.items() if k in names}


def _make_view(images_fd: int, netns_fd: int, env: Mapping[str, str], pid: int | None,
               view_root: str, hook: bool, deadline: float | None) -> Reply:
    t0 = time.perf_counter()
    notes: list[str] = []
    root = images_root(images_fd)
    why = already_a_view(images_fd, root, view_root)
    if why:
        return Reply(f"NONE {why}")
    cfg = plugin_config(root, env)
    # `auto` is this node's address in the restore's network namespace
    planner = Planner(cfg.amap, cfg.options, f"/proc/self/fd/{netns_fd}", cfg.iface)
    # the view's path comes first: its links are relative to it
    name = viewroot.new_name()
    out = os.path.join(os.path.normpath(view_root), name)
    try:
        # every socket's report when the hook table may be the answer
        plan = planner.plan(root, "plugin", reports=hook, link_from=out)
    except ImageError:
        raise
    except InetskError as e:  # name the map it came from
        raise InetskError(f"{e} (map: {cfg.map_source}; options: {cfg.options_source})") \
            from None
    t1 = time.perf_counter()
    changed = sum(r.changed for r in plan.results.values())
    if not changed:
        return Reply(f"NONE no socket to change (map: {cfg.map_source})")
    if hook:  # only a CRIU with the UPDATE_INETSK hook asks: hooktable is loaded then only
        from ..core.hooktable import hook_plan

        hp = hook_plan(top_level(plan.tree, plan.results), max_entries=TABLE_MAX)
        if hp.entries is not None and hp.changed:
            return Reply(hp.wire())
        notes.append(f"a view, not the hook: {hp.why_not or 'only sockets in sub-dirs change'}")
    check_parents(plan.tree)  # a view cannot show a `parent` link out of the images dir
    _check_deadline(deadline, "while planning: no view written")
    swept = viewroot.sweep(view_root)
    if swept:
        notes.append(f"removed {len(swept)} view(s) no restore holds: {' '.join(swept)}")
    made = viewroot.create_view(
        view_root, lambda path: write_view_dir(root, path, plan.tree, plan.results),
        name=name, deadline=deadline)
    log.debug("%s: planned in %.1f ms (map: %s), view written in %.1f ms", root,
              (t1 - t0) * 1000, cfg.map_source, (time.perf_counter() - t1) * 1000)
    return Reply(view_reply(made.name), made, "; ".join(notes))
