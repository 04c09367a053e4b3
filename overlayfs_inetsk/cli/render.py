"""inspect's report: the plans of a tree rendered as a table or as JSON (schema in
docs/json.md). Display only: what is shown of each socket is its decision
(core/report.py's SocketReport: the socket and its core/decide.py Decision)."""

from __future__ import annotations

import functools
import os
from typing import Mapping, Sequence

from ..core.addrmap import AddressMap
from ..core.decide import VERDICTS
from ..core.natrules import nat_connections, table_name
from ..core.plan import RewriteResult
from ..core.portcheck import Clash
from ..core.report import SocketReport
from ..core.sockaddr import SOCK_STREAM, IPAddress, fmt_addr

JSON_SCHEMA_VERSION = 1


@functools.lru_cache(maxsize=8)
def _real(root: str) -> str:
    return os.path.realpath(root)


def _rel(root: str, path: str) -> str:
    return os.path.relpath(path, _real(root))


def socket_dict(root: str, r: SocketReport) -> dict[str, object]:
    s, d = r.sock, r.decision
    return {
        "file": _rel(root, s.file),
        "offset": s.offset,
        "id": s.id,
        "ino": s.ino,
        "family": s.family_name,
        "type": s.type_name,
        "proto": s.proto_name,
        "state": s.state_name,
        "class": d.klass,
        "src": fmt_addr(s.src),
        "src_port": s.sport,
        "dst": fmt_addr(s.dst),
        "dst_port": s.dport,
        "new_src": None if d.new_src is None else fmt_addr(d.new_src),
        "new_dst": None if d.new_dst is None else fmt_addr(d.new_dst),
        "new_src_port": d.new_sport,
        "new_dst_port": d.new_dport,
        "verdict": d.verdict,
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
                ports_taken: Sequence[Clash] | None = None) -> str:
    """`ports_taken`: the port check's Clash list when it ran (inspect --netns);
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
            s, d = r.sock, r.decision
            if only_changes and d.verdict == "kept":
                continue
            lkey = (s.type, s.proto, s.family)
            label = labels.get(lkey)
            if label is None:
                label = labels[lkey] = (s.type_name, s.proto_label)
            row = [file if s.file == res.path else _rel(image_dir, s.file), str(s.id), *label,
                   s.state_name if s.type == SOCK_STREAM else "-", endpoint(s.src, s.sport),
                   endpoint(s.dst, s.dport), d.klass]
            if with_map:  # = r.new_local, r.new_remote
                new, port = d.new_src, d.new_sport
                new_l = "-" if new is None and port is None else endpoint(
                    s.src if new is None else new, s.sport if port is None else port)
                new, port = d.new_dst, d.new_dport
                new_r = "-" if new is None and port is None else endpoint(
                    s.dst if new is None else new, s.dport if port is None else port)
                row += [new_l, new_r, d.verdict, r.reason]
            rows.append(row)
    widths = [max(map(len, col)) for col in list(zip(*rows))[:-1]]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"  # = c.ljust(w) for each column
    lines = [fmt.format(*row) for row in rows]
    n = summary(results)
    tail = f"{n['sockets']} inet socket(s)"
    if with_map and n["sockets"]:
        tail += ": " + ", ".join(f"{n[v]} {v}" for v in VERDICTS if n[v])
    if len(rows) == 1:
        lines = []
    return "\n".join(line.rstrip() for line in lines) + ("\n" if lines else "") + tail + "\n"
