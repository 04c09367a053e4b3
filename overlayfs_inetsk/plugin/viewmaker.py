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

The view is written by the offline writer (relative symlinks to every other image, the
rewritten socket images), built in a temporary dir and renamed, so it is whole or absent.
`auto` is resolved in the restore's network namespace (netns_fd).

Where the map comes from (the first that has one wins, as a whole; docs/plugin.md):
  1. CRIU's environment: OVERLAYFS_INETSK_MAP (rules as for --map, separated by commas or
     blanks) and/or INETSK_LOCAL_IPV4 / INETSK_LOCAL_IPV6;
  2. the checkpoint: a map file `overlayfs-inetsk.map` in the images dir (--map-file syntax);
  3. the node: /etc/overlayfs-inetsk/plugin.map (--map-file syntax);
  4. the default: local=auto.
Options (--strict, --tcp-outside, --iface) likewise: OVERLAYFS_INETSK_OPTIONS, then
`overlayfs-inetsk.options` in the images dir, then /etc/overlayfs-inetsk/plugin.options.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass

from ..core.addrmap import open_regular_file, read_regular_file
from ..core.hooktable import hook_plan
from ..fuse.robind import FSTYPE as FUSE_FSTYPE
from ..fuse.robind import mounts
from . import viewroot
from .planning import (
    VIEW_MARKER,
    AddressMap,
    ImageError,
    InetskError,
    MapError,
    TCP_FATES,
    RewriteOptions,
    make_resolver,
    plan,
    top_level,
    write_view,
)
from .wire import TABLE_MAX, VIEW_ROOT, view_reply

log = logging.getLogger(__name__)

ENV_MAP = "OVERLAYFS_INETSK_MAP"
ENV_OPTIONS = "OVERLAYFS_INETSK_OPTIONS"
ENV_CONF_DIR = "OVERLAYFS_INETSK_CONF_DIR"
ENV_LOCAL = ("INETSK_LOCAL_IPV4", "INETSK_LOCAL_IPV6")
NODE_CONF_DIR = "/etc/overlayfs-inetsk"
CHECKPOINT_MAP = "overlayfs-inetsk.map"
CHECKPOINT_OPTIONS = "overlayfs-inetsk.options"
NODE_MAP = "plugin.map"
NODE_OPTIONS = "plugin.options"
DEFAULT_MAP = "local=auto"


@dataclass
class Reply:
    """What the planner answers: the line, and for VIEW the view (its fd goes with it);
    note: what the agent's one log line for the request adds (not sent)."""

    text: str
    view: viewroot.View | None = None
    note: str = ""

    def close(self) -> None:
        if self.view is not None:
            self.view.close()


@dataclass
class Config:
    amap: AddressMap
    map_source: str
    options: RewriteOptions
    iface: str | None
    options_source: str


# -- where the images are -----------------------------------------------------------------
def images_root(images_fd: int) -> str:
    """The path of the images dir fd, checked to be that very directory from here."""
    link = f"/proc/self/fd/{images_fd}"
    try:
        path = os.readlink(link)
        fst = os.fstat(images_fd)
    except OSError as e:
        raise InetskError(f"images dir fd {images_fd}: {e.strerror}") from None
    if not stat.S_ISDIR(fst.st_mode):
        raise InetskError(f"images dir fd {images_fd} ({path}) is not a directory")
    try:
        pst = os.stat(path)
    except OSError:
        pst = None
    if pst is None or (pst.st_dev, pst.st_ino) != (fst.st_dev, fst.st_ino):
        raise InetskError(f"images dir {path} is not reachable by that path from the planner "
                          "(another mount namespace?)")
    return path


def _fstype(images_fd: int, root: str) -> str:
    """The file system type of the mount holding the images dir, as this planner's mount
    namespace has it: from an fd of our own of `root` (the fd criu sent may be on a mount of
    another namespace, whose id means nothing here). InetskError when it cannot be told:
    guessing "not a FUSE view" could rewrite a view twice."""
    why = "cannot tell which file system it is on"
    try:
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if (os.fstat(fd).st_ino, os.fstat(fd).st_dev) != (os.fstat(images_fd).st_ino,
                                                              os.fstat(images_fd).st_dev):
                raise InetskError(f"images dir {root}: changed while being looked at")
            with open(f"/proc/self/fdinfo/{fd}") as f:
                mnt_id = next((ln.split()[1] for ln in f if ln.startswith("mnt_id:")), None)
        finally:
            os.close(fd)
        if mnt_id is None:
            raise InetskError(f"images dir {root}: {why}: no mnt_id in /proc/self/fdinfo")
        found = next((m.fstype for m in mounts() if m.id == int(mnt_id)), None)
    except (OSError, ValueError, IndexError) as e:
        raise InetskError(f"images dir {root}: {why}: {e}") from None
    if found is None:
        raise InetskError(f"images dir {root}: {why}: mount {mnt_id} is not in "
                          "/proc/self/mountinfo")
    return found


def already_a_view(images_fd: int, root: str, view_root: str = VIEW_ROOT) -> str | None:
    """Why the images dir must not be rewritten again, or None."""
    for vr in {VIEW_ROOT, os.path.normpath(view_root)}:
        if root == vr or root.startswith(vr + "/"):
            return "the images dir is a view the plugin made"
    if os.path.lexists(os.path.join(root, VIEW_MARKER)):
        return f"the images dir is a per-node view already ({VIEW_MARKER})"
    if _fstype(images_fd, root) == FUSE_FSTYPE:
        return "the images dir is an overlayfs-inetsk mount (a per-node view already)"
    return None


# -- the map and options ------------------------------------------------------------------
def _file(path: str) -> str | None:
    """path if it exists; MapError if it is there but not a regular file (a symlink is
    not followed). AddressMap, which then reads a map file, checks again on the fd it
    reads (addrmap.read_regular_file), so a file swapped meanwhile is refused there."""
    try:
        os.close(open_regular_file(path))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise MapError(f"{path}: {e.strerror}") from None
    return path


def _read(path: str) -> bytes | None:
    """The bytes of the options file at path (None if there is none), read from the fd
    it was checked on; MapError as _file's."""
    try:
        return read_regular_file(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise MapError(f"{path}: {e.strerror}") from None


def parse_options(text: str, source: str) -> tuple[RewriteOptions, str | None]:
    """--strict, --tcp-outside FATE, --iface NAME, as on the command line."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError as e:
        raise MapError(f"{source}: {e}") from None
    strict, fate, iface = False, "close", None
    i = 0
    while i < len(words):
        w = words[i]
        name, eq, val = w.partition("=")
        if w == "--strict":
            strict = True
        elif name in ("--tcp-outside", "--iface"):
            if not eq:
                i += 1
                if i == len(words):
                    raise MapError(f"{source}: {name} needs a value")
                val = words[i]
            if name == "--iface":
                iface = val
            elif val not in TCP_FATES:
                raise MapError(f"{source}: --tcp-outside must be close, keep, nat or fail, "
                               f"not {val!r}")
            else:
                fate = val
        else:
            raise MapError(f"{source}: unknown option {w!r} (allowed: --strict, "
                           "--tcp-outside close|keep|nat|fail, --iface NAME)")
        i += 1
    return RewriteOptions(strict=strict, tcp_outside=fate), iface


def load_config(root: str, env: Mapping[str, str]) -> Config:
    conf_dir = env.get(ENV_CONF_DIR) or NODE_CONF_DIR
    specs = [s for s in re.split(r"[,\s]+", env.get(ENV_MAP, "")) if s]
    env_local = [n for n in ENV_LOCAL if env.get(n, "").strip()]
    if specs or env_local:
        amap = AddressMap.from_args(specs, env=env)
        what = [f"{ENV_MAP}={env[ENV_MAP]}"] if specs else []
        map_source = "CRIU's environment (" + ", ".join(what + env_local) + ")"
    elif (path := _file(os.path.join(root, CHECKPOINT_MAP))) is not None:
        amap, map_source = AddressMap.from_args(files=[path]), path
    elif (path := _file(os.path.join(conf_dir, NODE_MAP))) is not None:
        amap, map_source = AddressMap.from_args(files=[path]), path
    else:
        amap, map_source = AddressMap.from_args([DEFAULT_MAP]), f"the default {DEFAULT_MAP}"
    if env.get(ENV_OPTIONS, "").strip():
        text, options_source = env[ENV_OPTIONS], f"${ENV_OPTIONS}"
    else:
        text, options_source = "", "defaults"
        for path in (os.path.join(root, CHECKPOINT_OPTIONS), os.path.join(conf_dir, NODE_OPTIONS)):
            if (raw := _read(path)) is not None:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise MapError(f"{path}: cannot read: {e}") from None
                options_source = path
                break
    options, iface = parse_options(text, options_source)
    return Config(amap, map_source, options, iface, options_source)


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


def _make_view(images_fd: int, netns_fd: int, env: Mapping[str, str], pid: int | None,
               view_root: str, hook: bool, deadline: float | None) -> Reply:
    t0 = time.perf_counter()
    notes: list[str] = []
    root = images_root(images_fd)
    why = already_a_view(images_fd, root, view_root)
    if why:
        return Reply(f"NONE {why}")
    cfg = load_config(root, env)
    resolve = None
    if cfg.amap.auto_families():
        resolve = make_resolver(netns=f"/proc/self/fd/{netns_fd}", iface=cfg.iface)
    # the view's path comes first: its links are relative to it
    name = viewroot.new_name()
    out = os.path.join(os.path.normpath(view_root), name)
    try:
        view, results = plan(root, cfg.amap, resolve, cfg.options, reports=hook, link_from=out)
    except ImageError:
        raise
    except InetskError as e:  # name the map it came from
        raise InetskError(f"{e} (map: {cfg.map_source}; options: {cfg.options_source})") \
            from None
    t1 = time.perf_counter()
    changed = sum(r.changed for r in results.values())
    if not changed:
        return Reply(f"NONE no socket to change (map: {cfg.map_source})")
    if hook:
        hp = hook_plan(top_level(view, results), max_entries=TABLE_MAX)
        if hp.entries is not None and hp.changed:
            return Reply(hp.wire())
        notes.append(f"a view, not the hook: {hp.why_not or 'only sockets in sub-dirs change'}")
    _check_deadline(deadline, "while planning: no view written")
    swept = viewroot.sweep(view_root)
    if swept:
        notes.append(f"removed {len(swept)} view(s) no restore holds: {' '.join(swept)}")
    made = viewroot.create_view(
        view_root, lambda path: write_view(root, path, cfg.amap, resolve, cfg.options, view,
                                           results), name=name, deadline=deadline)
    log.debug("%s: planned in %.1f ms (map: %s), view written in %.1f ms", root,
              (t1 - t0) * 1000, cfg.map_source, (time.perf_counter() - t1) * 1000)
    return Reply(view_reply(made.name), made, "; ".join(notes))
