"""The baseline our benchmarks compare against: rewriting files.img the way people do it
today, through crit's JSON (decode --pretty, edit, encode), as whole crit processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CRIT = os.path.join(os.path.dirname(sys.executable), "crit")


def crit_rewrite(src: str, dst: str, old: str, new: str) -> None:
    """Write dst: src's files.img with every `old` address in an inet socket set to `new`."""
    js = dst + ".json"
    subprocess.run([CRIT, "decode", "-i", src, "-o", js, "--pretty"], check=True)
    with open(js) as f:
        doc = json.load(f)
    for e in doc["entries"]:
        isk = e.get("isk")
        if isk:
            for k in ("src_addr", "dst_addr"):
                isk[k] = [new if a == old else a for a in isk.get(k, [])]
    with open(js, "w") as f:
        json.dump(doc, f)
    if os.path.lexists(dst):
        os.unlink(dst)
    subprocess.run([CRIT, "encode", "-i", js, "-o", dst], check=True)
    os.unlink(js)
