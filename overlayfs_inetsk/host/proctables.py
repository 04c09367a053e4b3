"""The socket tables of a network namespace (/proc/net/{tcp,udp,udplite}{,6}), read from
a thread in that namespace (host/netns.py): what the port check (core/portcheck.py) compares
a restore's wanted ports with."""

from __future__ import annotations

from ..core.portcheck import TABLES, Holder, parse_table
from .netns import in_netns


def read_tables(netns: str | None = None) -> list[Holder]:
    """Every TCP and UDP socket of the namespace at path `netns` (None: ours)."""

    def read() -> list[Holder]:
        out: list[Holder] = []
        for name, family in TABLES:
            try:
                with open(f"/proc/thread-self/net/{name}") as f:
                    text = f.read()
            except FileNotFoundError:  # IPv6 (or UDP-Lite) not there: no such table
                continue
            out.extend(parse_table(text, name.removesuffix("6"), family))
        return out

    return in_netns(netns, read)
