"""inspect's report: the plans of a tree rendered as a table or as JSON (schema in
docs/json.md). Display only: the planning is plan.py's."""

from __future__ import annotations

import functools
import os
from typing import Mapping, Protocol, Sequence

from .addrmap import AddressMap
from .decide import VERDICTS, SocketReport
from .natrules import nat_connections, table_name
from .plan import RewriteResult
from .sockaddr import SOCK_STREAM, IPAddress, fmt_addr

JSON_SCHEMA_VERSION = 1


class WantedPort(Protocol):
    """What the JSON shows of an endpoint a restore binds (node.portcheck.Want)."""

    @property
    def file(self) -> str: ...
    @property
    def id(self) -> int: ...
    @property
    def proto(self) -> str: ...
    @property
    def addr(self) -> IPAddress: ...
    @property
    def port(self) -> int: ...


class TakenPort(Protocol):
    """A port a restore would find taken (node.portcheck.Clash: the core does not import
    node/)."""

    @property
    def want(self) -> WantedPort: ...
    @property
    def holder(self) -> object: ...
    @property
    def where(self) -> str: ...


@functools.lru_cache(maxsize=8)
def _real(root: str) -> str:
    return os.path.realpath(root)


def _rel(root: str, path: str) -> str:
    return os.path.relpath(path, _real(root))


def socket_dict(root: str, r: SocketReport) -> dict[str, object]:
    return {
        "file": _rel(root, r.file),
        "offset": r.offset,
        "id": r.id,
        "ino": r.ino,
        "family": r.family_name,
        "type": r.type_name,
        "proto": r.proto_name,
        "state": r.state_name,
        "class": r.klass,
        "src": fmt_addr(r.src),
        "src_port": r.sport,
        "dst": fmt_addr(r.dst),
        "dst_port": r.dport,
        "new_src": None if r.new_src is None else fmt_addr(r.new_src),
        "new_dst": None if r.new_dst is None else fmt_addr(r.new_dst),
        "new_src_port": r.new_sport,
        "new_dst_port": r.new_dport,
        "verdict": r.verdict,
        "reason": r.reason,
        "peer_nat": r.peer_nat,
    }


def nat_dict(results: Mapping[str, RewriteResult]) -> dict[str, object]:
    """The connections of fate nat (the peers' side must rewrite them) and the table that
    `nat-rules` makes for them."""
    conns = nat_connections(r for res in results.values() for r in res.reports)
    return {
        "table": table_name(conns) if conns else None,
        "connections": [
            {"family": f"ipv{c.version}", "peer": fmt_addr(c.peer), "peer_port": c.peer_port,
             "old": fmt_addr(c.old), "old_port": c.old_port, "new": fmt_addr(c.new),
             "new_port": c.new_port} for c in conns],
    }


def summary(results: Mapping[str, RewriteResult]) -> dict[str, int]:
    counts = dict.fromkeys(VERDICTS, 0)
    for res in results.values():
        for verdict, n in res.counts.items():
            counts[verdict] += n
    return {"sockets": sum(counts.values()), **counts}


def map_sources(amap: AddressMap) -> list[str]:
    """The rules in force, by their source (address rules, local rules, port rules, the
    port offset)."""
    out = [r.source for r in amap.rules] + [lr.source for lr in amap.local.values()]
    out += [pr.source for pr in amap.port_rules]
    if amap.port_offset:
        out.append(amap.port_offset_source)
    return list(dict.fromkeys(out))


def render_json(image_dir: str, amap: AddressMap, results: Mapping[str, RewriteResult],
                ports_taken: Sequence[TakenPort] | None = None) -> str:
    """`ports_taken`: node.portcheck's Clash list when the check ran (inspect --netns);
    the key is left out when it did not."""
    import json  # here: `rewrite` and the table need no json (start-up time)

    doc: dict[str, object] = {
        "schema": JSON_SCHEMA_VERSION,
        "image_dir": os.path.realpath(image_dir),
        "map": map_sources(amap),
        "files": [_rel(image_dir, p) for p in results],
        "sockets": [socket_dict(image_dir, r) for res in results.values() for r in res.reports],
        "summary": summary(results),
        "nat": nat_dict(results),
    }
    if ports_taken is not None:
        doc["ports_taken"] = [
            {"file": _rel(image_dir, c.want.file), "id": c.want.id,
             "proto": c.want.proto, "addr": fmt_addr(c.want.addr),
             "port": c.want.port, "holder": str(c.holder), "where": c.where}
            for c in ports_taken]
    return json.dumps(doc, indent=2) + "\n"


def render_table(
    image_dir: str,
    results: Mapping[str, RewriteResult],
    with_map: bool,
    only_changes: bool = False,
    only_problems: bool = False,
) -> str:
    """The table, one row per socket, and a summary line (counts per verdict).
    only_changes: no rows for kept sockets; only_problems: rows only for the sockets that
    need attention (RewriteResult.problems: needs-address, refused), which the plan has
    even without per-socket reports."""
    head = ["FILE", "ID", "TYPE", "PROTO", "STATE", "LOCAL", "REMOTE", "CLASS"]
    if with_map:
        head += ["NEW LOCAL", "NEW REMOTE", "VERDICT", "REASON"]
    rows = [head]
    # 10,000 sockets make 10,000 rows: what repeats (files, protocols, addresses) is
    # formatted once; endpoints as fmt_endpoint() writes them
    texts: dict[object, str] = {}

    def endpoint(addr: IPAddress, port: int) -> str:
        text = texts.get(addr)
        if text is None:
            text = texts[addr] = f"[{fmt_addr(addr)}]" if addr.version == 6 else fmt_addr(addr)
        return f"{text}:{port}"

    labels: dict[tuple[int, int, int], tuple[str, str]] = {}
    for res in results.values():
        shown = res.problems if only_problems else res.reports
        file = _rel(image_dir, res.path) if shown else ""
        for r in shown:
            if only_changes and r.verdict == "kept":
                continue
            lkey = (r.type, r.proto, r.family)
            label = labels.get(lkey)
            if label is None:
                label = labels[lkey] = (r.type_name, r.proto_label)
            row = [file if r.file == res.path else _rel(image_dir, r.file), str(r.id), *label,
                   r.state_name if r.type == SOCK_STREAM else "-", endpoint(r.src, r.sport),
                   endpoint(r.dst, r.dport), r.klass]
            if with_map:  # = r.new_local, r.new_remote
                new, port = r.new_src, r.new_sport
                new_l = "-" if new is None and port is None else endpoint(
                    r.src if new is None else new, r.sport if port is None else port)
                new, port = r.new_dst, r.new_dport
                new_r = "-" if new is None and port is None else endpoint(
                    r.dst if new is None else new, r.dport if port is None else port)
                row += [new_l, new_r, r.verdict, r.reason]
            rows.append(row)
    widths = [max(map(len, col)) for col in list(zip(*rows))[:-1]]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"  # = c.ljust(w) for each column
    lines = [fmt.format(*row) for row in rows]
    s = summary(results)
    tail = f"{s['sockets']} inet socket(s)"
    if with_map:
        tail += ": " + ", ".join(f"{s[v]} {v}" for v in VERDICTS if s[v])
    if len(rows) == 1:
        lines = []
    return "\n".join(line.rstrip() for line in lines) + ("\n" if lines else "") + tail + "\n"
