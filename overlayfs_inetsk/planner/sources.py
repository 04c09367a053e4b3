"""Where the address map and the options come from.

load_map: `--map` rules, map files (read here, through host/files.py: one fd, no symlink
followed, a size cap), $INETSK_LOCAL_IPV4/6 and --port-offset, put together by
core/addrmap.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from ..core.addrmap import AddressMap
from ..errors import MapError
from ..host.files import read_regular_file


def _read_map_files(paths: Sequence[str]) -> Iterator[tuple[str, bytes]]:
    """(path, contents) of each map file, read when the map asks for it (so a later file's
    read error comes after an earlier file's parse error, as before)."""
    for path in paths:
        try:
            yield path, read_regular_file(path)
        except OSError as exc:
            raise MapError(f"{path}: cannot read map file: {exc.strerror}") from None


def load_map(specs: Sequence[str] = (), files: Sequence[str] = (),
             env: Mapping[str, str] | None = None,
             port_offset: int | None = None) -> AddressMap:
    """The map of these `--map` rules, `--map-file`s, environment and `--port-offset`."""
    return AddressMap.from_args(specs, _read_map_files(files), env, port_offset)
