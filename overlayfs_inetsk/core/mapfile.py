"""Map files: the contents of a TOML or JSON map file (`--map-file`, the plugin's map
files) to the rules' texts and the port offset it holds (docs/map.md).

Pure: the bytes come from an adapter (host/files.py reads them through one fd, no symlink
followed); rules.py parses each rule, addrmap.py puts them together.
"""

from __future__ import annotations

from ..errors import MapError
from .rules import check_port_offset

PORT_OFFSET_KEY = "port-offset"


def parse_map_file(path: str, raw: bytes) -> tuple[list[tuple[str, str]], int | None]:
    """(spec, source) pairs from the bytes of the TOML or JSON map file at `path` (named in
    messages, and its `.json` suffix chooses JSON), and its port offset if it has one.

    Either form holds a table `map` of OLD -> NEW and/or a list `rules` of "OLD=NEW", and
    optionally `port-offset`, an integer.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MapError(f"{path}: map file is not UTF-8 text") from None
    doc: object
    if path.endswith(".json") or text.lstrip().startswith("{"):
        import json  # here, not at the top: only map files need it (start-up time)

        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MapError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    else:
        import tomllib

        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise MapError(f"{path}: invalid TOML: {exc}") from None
    if not isinstance(doc, dict):
        raise MapError(f"{path}: top level must be a table/object")
    unknown = set(doc) - {"map", "rules", PORT_OFFSET_KEY}
    if unknown:
        raise MapError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} "
                       f"(expected map, rules, {PORT_OFFSET_KEY})")
    offset: int | None = None
    if PORT_OFFSET_KEY in doc:
        raw_off = doc[PORT_OFFSET_KEY]
        if not isinstance(raw_off, int) or isinstance(raw_off, bool):
            raise MapError(f"{path}: {PORT_OFFSET_KEY} must be an integer")
        offset = check_port_offset(raw_off, f"{path}: {PORT_OFFSET_KEY}")
    out: list[tuple[str, str]] = []
    table = doc.get("map", {})
    if not isinstance(table, dict):
        raise MapError(f"{path}: `map` must be a table of OLD = NEW")
    for old, new in table.items():
        if not isinstance(new, str):
            raise MapError(f"{path}: map[{old!r}] must be a string")
        out.append((f"{old}={new}", f"{path}: map[{old!r}]"))
    rules = doc.get("rules", [])
    if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
        raise MapError(f"{path}: `rules` must be a list of \"OLD=NEW\" strings")
    for i, r in enumerate(rules):
        out.append((r, f"{path}: rules[{i}]"))
    return out, offset

