"""Instructions of one in-process plan, counted by callgrind (repeatable on a shared machine,
where wall and CPU times of a 20 ms pass vary by half from one run to the next).

    .venv/bin/python bench/count_plan.py IMAGES_DIR [udp|tcp ...]

IMAGES_DIR is bench_rewrite.py's --images dir. For each image and route, two child
processes under `valgrind --tool=callgrind` run the route 1 and 3 times: one run is half
the difference (imports and reading the file cancel out). Routes:
  floor  every inet entry decoded with upb and encoded back, nothing else
         (bench_rewrite.upb_floor);
  same   ours, to new addresses whose words are as long as the old ones (the common case:
         no length in the entry changes);
  ours   plan_checkpoint without reports, bench_rewrite's map (the pass on the bytes);
  upb    the same with the pass on the bytes turned off (plan.py's upb pass alone);
  least  the least any pass in Python does, to same's addresses: walk the frames, match
         each inet entry's head (patch.HEAD, one C call) and splice the new source field
         in, nothing decided or checked. Its bytes must be same's (checked outside the
         count); it is the bound a faster Python pass would meet.
Prints millions of instructions and ours / floor. Needs valgrind (apt-get install valgrind).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import sys
sys.path.insert(0, sys.argv[4])
from bench_rewrite import upb_floor
from overlayfs_inetsk.core.addrmap import AddressMap
from overlayfs_inetsk.core.decide import RewriteOptions
import overlayfs_inetsk.core.plan as plan
route, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = open(path, "rb").read()
amap = AddressMap.from_args(["local=10.77.0.99", "local=fd77::99"])
if route in ("same", "least"):  # new words as long as the old ones (10.77.0.1 -> .7, fd77::1 -> ::7)
    amap = AddressMap.from_args(["local=10.77.0.7", "local=fd77::7"])
opts = RewriteOptions(tcp_outside="keep")
if route == "upb":
    plan.plan_bytes = lambda *a: None
if route == "least":
    from overlayfs_inetsk.core.imagefile import HEADER_SIZE, LENGTH
    from overlayfs_inetsk.core.patch import HEAD, SRC_TAG, words_field

    def least(data, subst):  # (what is not a new word is copied in runs, as ours does)
        unpack, match, mv = LENGTH.unpack_from, HEAD.match, memoryview(data)
        out = bytearray()
        copied, pos, size = 0, HEADER_SIZE, len(data)
        while pos < size:
            start = pos + 4
            pos = start + unpack(data, pos)[0]
            m = match(data, start, pos)
            if m is not None:
                g = m.groups()
                src, dst = (g[5], g[6]) if g[5] is not None else (g[7], g[8])
                s0 = m.end() - len(dst) - len(src)
                out += mv[copied:s0]
                out += subst[src]
                copied = s0 + len(src)
        out += mv[copied:]
        return out

    import ipaddress
    import struct

    def field(addr):  # the address as CRIU's words (network order read as u32 each)
        packed = ipaddress.ip_address(addr).packed
        return words_field(SRC_TAG, struct.unpack(f"<{len(packed) // 4}I", packed))

    # every source field of the image -> the same route's (its `local` of the family)
    subst = {}
    for m in HEAD.finditer(data):
        v4 = m.group(6) is not None
        subst[m.group(6) if v4 else m.group(8)] = field("10.77.0.7" if v4 else "fd77::7")
    same = plan.plan_checkpoint({"files.img": data}, amap, None, opts, False)
    if bytes(least(data, subst)) != bytes(same["files.img"].data):
        raise SystemExit("least: not the same route's bytes")
for _ in range(n):
    if route == "floor":
        upb_floor(data)
    elif route == "least":
        least(data, subst)
    else:
        plan.plan_checkpoint({"files.img": data}, amap, None, opts, False)
"""


def counted(route: str, path: str, n: int) -> int:
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         "-c", CHILD, route, path, str(n), HERE],
        check=True, capture_output=True, text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"}).stderr  # (the same dicts in both runs)
    m = re.search(r"Collected : (\d+)", out)
    if m is None:
        raise SystemExit(f"no count from callgrind: {out[-500:]}")
    return int(m.group(1))


def main() -> int:
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed")
    images = sys.argv[1]
    names = sys.argv[2:] or ["udp", "tcp"]
    for name in names:
        path = os.path.join(images, name, "files.img")
        got = {}
        for route in ("floor", "ours", "same", "upb", "least"):
            got[route] = (counted(route, path, 3) - counted(route, path, 1)) / 2 / 1e6
            print(f"[{name}] {route:<6} {got[route]:8.0f} M instructions", flush=True)
        print(f"[{name}] ours / floor {got['ours'] / got['floor']:.2f}x (same length: "
              f"{got['same'] / got['floor']:.2f}x), upb / floor "
              f"{got['upb'] / got['floor']:.2f}x, ours / upb {got['ours'] / got['upb']:.2f}x, "
              f"least / floor {got['least'] / got['floor']:.2f}x (same / least "
              f"{got['same'] / got['least']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
