"""Large address maps for the map-loading test and bench (tests/test_addrmap.py,
bench/bench_map.py): n rules that never overlap, of one kind or mixed."""

from __future__ import annotations

import json
from collections.abc import Callable

KINDS = ("addr4", "prefix4", "addr6", "prefix6", "port", "mixed")


def _addr4(i: int) -> str:  # 10.0.0.0/10: 4,194,304 addresses
    low = f"{i >> 8 & 0xFF}.{i & 0xFF}"
    return f"10.{i >> 16 & 0x3F}.{low}=172.{16 + (i >> 16 & 0xF)}.{low}"


def _prefix4(i: int) -> str:  # /24s of 10.64.0.0/10 (16,384), then /28s of 10.128.0.0/9
    if i < 1 << 14:
        return f"10.{64 + (i >> 8)}.{i & 0xFF}.0/24=11.{i >> 8}.{i & 0xFF}.0/24"
    j = i - (1 << 14)
    return (f"10.{128 + (j >> 12 & 0x7F)}.{j >> 4 & 0xFF}.{(j & 0xF) << 4}/28="
            f"12.{j >> 12 & 0x7F}.{j >> 4 & 0xFF}.{(j & 0xF) << 4}")


def _addr6(i: int) -> str:
    return f"fd00::{i >> 16:x}:{i & 0xFFFF:x}=fd09::{i >> 16:x}:{i & 0xFFFF:x}"


def _prefix6(i: int) -> str:
    return f"fd01:{i >> 16:x}:{i & 0xFFFF:x}::/64=fd02:{i >> 16:x}:{i & 0xFFFF:x}::/64"


def _port(i: int) -> str:  # distinct addresses of 10.192.0.0/10, alternating forms
    a = f"10.{192 + (i >> 16 & 0x3F)}.{i >> 8 & 0xFF}.{i & 0xFF}"
    new = f"10.{248 + (i >> 16 & 7)}.{i >> 8 & 0xFF}.{i & 0xFF}"
    return f"{a}:80=:8080" if i % 2 else f"{a}:443={new}:8443"


_MAKERS: dict[str, Callable[[int], str]] = {
    "addr4": _addr4, "prefix4": _prefix4, "addr6": _addr6, "prefix6": _prefix6, "port": _port}


def rules(n: int, kind: str = "mixed") -> list[str]:
    """n rule specs (`OLD=NEW`) that never overlap; "mixed": the five kinds in turn."""
    if kind == "mixed":
        makers = list(_MAKERS.values())
        return [makers[i % 5](i // 5) for i in range(n)]
    return [_MAKERS[kind](i) for i in range(n)]


def map_file_text(specs: list[str], fmt: str) -> str:
    """A map file holding specs: "toml" (a `rules` list), "toml-table" (a [map] table, one
    line per rule) or "json" (a `map` object)."""
    if fmt == "json":
        return json.dumps({"map": dict(s.split("=") for s in specs)})
    if fmt == "toml-table":
        return "[map]\n" + "".join('"{}" = "{}"\n'.format(*s.split("=")) for s in specs)
    return "rules = [\n" + "".join(f'  "{s}",\n' for s in specs) + "]\n"
