"""The baseline our benchmarks compare against: rewriting files.img the way people do it
today, through crit's JSON (decode --pretty, edit, encode), as whole crit processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping

CRIT = os.path.join(os.path.dirname(sys.executable), "crit")


def crit_rewrite(src: str, dst: str, old: str | Mapping[str, str], new: str | None = None
                 ) -> None:
    """Write dst: src's files.img with every `old` address in an inet socket set to `new`
    (or, with `old` a mapping, every address it names set to its value). Addresses are
    written as `crit decode --pretty` shows them (inet_ntop: 10.0.0.1, fd77::1)."""
    mapping = {old: new} if isinstance(old, str) else dict(old)
    js = dst + ".json"
    subprocess.run([CRIT, "decode", "-i", src, "-o", js, "--pretty"], check=True)
    with open(js) as f:
        doc = json.load(f)
    for e in doc["entries"]:
        isk = e.get("isk")
        if isk:
            for k in ("src_addr", "dst_addr"):
                isk[k] = [mapping.get(a, a) for a in isk.get(k, [])]
    with open(js, "w") as f:
        json.dump(doc, f)
    if os.path.lexists(dst):
        os.unlink(dst)
    subprocess.run([CRIT, "encode", "-i", js, "-o", dst], check=True)
    os.unlink(js)
