"""Where the address map and the options come from: THE one place that decides which map
applies (docs/map.md, docs/cli.md, docs/plugin.md).

On the command line (cli_map): the `--map` rules, the `--map-file`s (read here, through
host/files.py: one fd, no symlink followed, a size cap) and `--port-offset`; then the
environment form of CRIU's sample plugin, $INETSK_LOCAL_IPV4=<ipv4> (and _IPV6), which means
`local4=<ipv4>` unless a `local` rule of that family is given; and when none of these says
anything, the command's default (`restore`: local=auto; the others: none).

For the CRIU plugin (plugin_config), the first that has one wins, as a whole:
  1. CRIU's environment: OVERLAYFS_INETSK_MAP (rules as for --map, separated by commas or
     blanks) and/or INETSK_LOCAL_IPV4 / INETSK_LOCAL_IPV6;
  2. the checkpoint: a map file `overlayfs-inetsk.map` in the images dir (--map-file syntax);
  3. the node: /etc/overlayfs-inetsk/plugin.map (or $OVERLAYFS_INETSK_CONF_DIR's);
  4. the default: local=auto.
Its options (--strict, --tcp-outside, --iface, parsed as on the command line: options.py)
likewise: OVERLAYFS_INETSK_OPTIONS, then `overlayfs-inetsk.options` in the images dir, then
the node's plugin.options.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence

from ..core.addrmap import AddressMap
from ..core.decide import RewriteOptions
from ..errors import MapError
from ..host.files import open_regular_file, read_regular_file
from ..options import PLUGIN_OPTIONS, parse_words

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from typing import NamedTuple
else:
    from ..record import NamedTuple

ENV_LOCAL = {4: "INETSK_LOCAL_IPV4", 6: "INETSK_LOCAL_IPV6"}
DEFAULT_MAP = "local=auto"  # restore's and the plugin's default
ENV_MAP = "OVERLAYFS_INETSK_MAP"
ENV_OPTIONS = "OVERLAYFS_INETSK_OPTIONS"
ENV_CONF_DIR = "OVERLAYFS_INETSK_CONF_DIR"
NODE_CONF_DIR = "/etc/overlayfs-inetsk"
CHECKPOINT_MAP = "overlayfs-inetsk.map"
CHECKPOINT_OPTIONS = "overlayfs-inetsk.options"
NODE_MAP = "plugin.map"
NODE_OPTIONS = "plugin.options"


def _read_map_files(paths: Sequence[str]) -> Iterator[tuple[str, bytes]]:
    """(path, contents) of each map file, read when the map asks for it (so a later file's
    read error comes after an earlier file's parse error)."""
    for path in paths:
        try:
            yield path, read_regular_file(path)
        except OSError as exc:
            raise MapError(f"{path}: cannot read map file: {exc.strerror}") from None


def _env_local(env: Mapping[str, str] | None) -> list[tuple[str, str]]:
    """The environment form's local rules (each applies unless a local rule of its family
    is given)."""
    out = []
    for version, name in ENV_LOCAL.items():
        value = (env or {}).get(name, "").strip()
        if value:
            out.append((f"local{version}={value}", f"${name}"))
    return out


def load_map(specs: Sequence[str] = (), files: Sequence[str] = (),
             env: Mapping[str, str] | None = None,
             port_offset: int | None = None) -> AddressMap:
    """The map of these `--map` rules, `--map-file`s, environment and `--port-offset`."""
    return AddressMap.from_args(specs, _read_map_files(files), port_offset, _env_local(env))


class CliMap(NamedTuple):
    amap: AddressMap
    specs: list[str]  # the --map rules in force (with the default, when it applies)
    defaulted: bool  # no rule was given: `default` applies


def cli_map(specs: Sequence[str], files: Sequence[str], env: Mapping[str, str],
            port_offset: int | None, default: str | None = None) -> CliMap:
    """The map a command's options and environment give; `default`: the rule that applies
    when neither gives one (restore: local=auto)."""
    if default is not None and not (specs or files or any(env.get(n) for n in ENV_LOCAL.values())):
        return CliMap(load_map([default], (), env, port_offset), [default], True)
    return CliMap(load_map(specs, files, env, port_offset), list(specs), False)


class PluginConfig(NamedTuple):
    amap: AddressMap
    map_source: str
    options: RewriteOptions
    iface: str | None
    options_source: str


def _file(path: str) -> str | None:
    """path if it exists; MapError if it is there but not a regular file (a symlink is
    not followed). load_map, which then reads a map file, checks again on the fd it reads
    (host/files.read_regular_file), so a file swapped meanwhile is refused there."""
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
    """--strict, --tcp-outside FATE, --iface NAME, as on the command line (options.py)."""
    words: list[str] = []
    if text.strip():  # shlex (about 1 ms to import) only for a file or variable with words
        import shlex

        try:
            words = shlex.split(text, comments=True)
        except ValueError as e:
            raise MapError(f"{source}: {e}") from None
    got = parse_words(PLUGIN_OPTIONS, words, source)
    return RewriteOptions(strict=got["strict"], tcp_outside=got["tcp_outside"]), got["iface"]


def plugin_config(root: str, env: Mapping[str, str]) -> PluginConfig:
    """The plugin's map and options for the images dir `root`, in CRIU's environment."""
    conf_dir = env.get(ENV_CONF_DIR) or NODE_CONF_DIR
    specs = [s for s in re.split(r"[,\s]+", env.get(ENV_MAP, "")) if s]
    env_local = [n for n in ENV_LOCAL.values() if env.get(n, "").strip()]
    if specs or env_local:
        try:
            amap = load_map(specs, env=env)
        except MapError as e:  # a rule of $OVERLAYFS_INETSK_MAP: nobody gave a --map
            msg = str(e)
            if msg.startswith("--map "):
                raise MapError(f"${ENV_MAP}: {msg.removeprefix('--map ')}") from None
            raise
        what = [f"{ENV_MAP}={env[ENV_MAP]}"] if specs else []
        map_source = "CRIU's environment (" + ", ".join(what + env_local) + ")"
    elif (path := _file(os.path.join(root, CHECKPOINT_MAP))) is not None:
        amap, map_source = load_map(files=[path]), path
    elif (path := _file(os.path.join(conf_dir, NODE_MAP))) is not None:
        amap, map_source = load_map(files=[path]), path
    else:
        amap, map_source = load_map([DEFAULT_MAP]), f"the default {DEFAULT_MAP}"
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
    return PluginConfig(amap, map_source, options, iface, options_source)
