"""plan.py's pass over files.img in the entries' bytes (core/patch.py), with no upb decode.

    plan_bytes(path, data, interner, bmap, options, seen) -> (data, counts, problems,
                                                               changed) or None

The same pass as plan._plan_image (the same keys, one decide() per kind of socket, the
same `local` protocol), for what a mount's first open and `rewrite` need: no report per
socket, no port moves. Every inet entry must be in protobuf-c's layout (patch.HEAD, its
tail checked by patch.TailCheck, in its bytes too): at the first that is not, it answers None and plan.py
makes its upb pass over the image, so every entry is exactly what that pass gives
(tests/test_bytepass.py compares the two).
"""

from __future__ import annotations

import posixpath

from ..errors import RewriteError
from .boundmap import BoundMap, Sources
from .decide import (
    CLOSE,
    KEEP,
    NEEDS_ADDRESS,
    REFUSED,
    SET,
    VERDICTS,
    RewriteOptions,
    decide,
)
from .entries import FD_INETSK, SHUT_BOTH, Interner, not_inet
from .imagefile import FILES_MAGIC, HEADER_SIZE, LENGTH, MAGIC_BY_NAME, read_header
from .patch import (
    DST_TAG,
    HEAD,
    SRC_TAG,
    TailCheck,
    field_words,
    patched,
    uvarint,
    varint,
    words_field,
)
from .report import SocketReport
from .sockaddr import AF_INET, TCP_CLOSE, IPAddress
from .sockets import Socket

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from typing import Any

_MAX = 1024  # classes, sources and tails kept (as plan._SAME_MAX)
_TAILS = TailCheck()
_ZERO_SPORT, _ZERO_DPORT = b"\x38\x00", b"\x40\x00"
# isk's length as a varint (entries are a few hundred bytes), made without varint(): that
# took ~1 ms of every start-up
_VARINTS = [bytes((n,)) for n in range(0x80)] + [bytes((n & 0x7F | 0x80, n >> 7))
                                                 for n in range(0x80, 2048)]
_STATE_CLOSE = bytes((TCP_CLOSE,))
# both address fields of a closed connection: every word 0 (as many as the entry has)
_ZERO_WORDS = {n: words_field(SRC_TAG, (0,) * n) + words_field(DST_TAG, (0,) * n)
               for n in (1, 4)}

# what a class does to its entries: nothing, new addresses, closed
_KEEP, _ADDRS, _CLOSE = 0, 1, 2

Result = tuple[bytes | bytearray, dict[str, int], list[SocketReport], int]
# a class: what it does, its verdict, whether it is a problem (refused, needs-address), its
# src field after (new or as it is), new dst field (None: as it is), the first socket's
# report, how many bytes longer the src field gets
_Class = tuple[int, str, bool, bytes, bytes | None, SocketReport, int]


def _socket(path: str, off: int, data: bytes, start: int, end: int, interner: Interner,
            src: IPAddress, fam: int, dst_raw: bytes) -> Socket:
    """The facts of the entry data[start:end], read from the bytes HEAD matched (once per
    class): 08 04 10 id 22 len | 08 id 10 ino | 18 family 20 type 28 proto 30 state | 38
    src_port | 40 dst_port ..."""
    m = HEAD.match(data, start, end)
    assert m is not None  # plan_bytes matched it
    sid, p = uvarint(data, m.end(2) + 1)  # isk.id (the same bytes as file_entry.id)
    ino = uvarint(data, p + 1)[0]
    kind = m.group(3)
    return Socket(path, off, sid, ino, fam, kind[3], kind[5], kind[7], src,
                  uvarint(m.group(4), 1)[0], interner.valid(fam, field_words(dst_raw)),
                  uvarint(m.group(5), 1)[0])


def plan_bytes(path: str, data: bytes, interner: Interner, bmap: BoundMap,
               options: RewriteOptions, seen: Sources | None) -> Result | None:
    """The plan of one files.img (see the module's docstring), or None: plan it with upb."""
    if read_header(data, path, MAGIC_BY_NAME.get(posixpath.basename(path))) != FILES_MAGIC:
        return None  # (read_header raises what inet_entries would)
    counts = dict.fromkeys(VERDICTS, 0)
    problems: list[SocketReport] = []
    # the key is plan._plan_image's (decide.peer_class), the bytes standing for the words
    # (canonical varints): family..state, whether each port is 0, src, dst is src, where
    # the map moves dst
    classes: dict[tuple[object, ...], _Class] = {}
    srcs: dict[bytes, tuple[IPAddress, bytes]] = {}  # src field -> (address, as a dst field)
    out = bytearray()  # the new image, from the first changed entry on (copied: done)
    copied = 0
    changed = 0
    mv = memoryview(data)
    match, tails, varints = HEAD.match, _TAILS, _VARINTS
    unpack, pack, join = LENGTH.unpack_from, LENGTH.pack, b"".join
    # the image's own addresses, asked for when a first peer is judged, as might_move()
    # asks (boundmap.one_pass: the sources met before are not late)
    local: tuple[set[bytes] | None, set[bytes] | None, bytes] | None = None
    asked = False
    l4 = l6 = None
    mapped = b""
    bits, mask = bytearray(), 0
    might_move, lookup = bmap.might_move, bmap.lookup
    good_tails: set[bytes] = set()
    inet, z7, z8, v4, addrs = FD_INETSK, _ZERO_SPORT, _ZERO_DPORT, AF_INET, _ADDRS
    last_dst = b""
    # per family (AF_INET6, AF_INET): the last tail, src field, (src, src as a dst field),
    # class key and class
    lasts: list[list[Any]] = [[b"", b"", None, None, None], [b"", b"", None, None, None]]
    moved: tuple[IPAddress, str] | None = None
    pos, size = HEADER_SIZE, len(data)
    while pos < size:
        if size - pos < 4:
            return None  # upb's route names what is wrong
        start = pos + 4
        end = start + unpack(data, pos)[0]
        if end > size:
            return None
        off, pos = pos, end
        m = match(data, start, end)  # (it starts with `type` INETSK)
        if m is None:
            if end - start < 5 or data[start + 1] != inet or data[start] != 0x08:
                if not_inet(data, mv, start, end, path, off):
                    continue
            return None  # an inet socket in another layout
        fid, ilen, kind, sportf, dportf, src_raw, dst_raw, src6, dst6 = m.groups()
        fam = kind[1]
        if src_raw is None:
            if fam != 10:
                return None
            src_raw, dst_raw = src6, dst6
        elif fam != v4:
            return None
        isk0 = m.end(2)  # 08 04 10 id 22 len: isk's first field
        n = end - isk0
        if (varints[n] if n < 2048 else varint(n)) != ilen:  # (canonical: the same bytes)
            return None  # isk must be the entry's last field
        tail0 = m.end()
        tail = data[tail0:end]
        last = lasts[fam == v4]  # what the family's last entry had (the families alternate)
        if tail != last[0]:
            if tail not in good_tails:
                if not tails(tail, data, start, end):
                    return None
                if len(good_tails) >= _MAX:
                    good_tails.clear()
                good_tails.add(tail)
            last[0] = tail
        if src_raw != last[1]:
            got_src = srcs.get(src_raw)
            if got_src is None:
                words = field_words(src_raw)
                got_src = (interner.valid(fam, words), words_field(DST_TAG, words))
                if len(srcs) >= _MAX:
                    srcs.clear()
                srcs[src_raw] = got_src
                if seen is not None:
                    seen.src((fam, words), got_src[0])
            last[1] = src_raw
            last[2] = got_src
        src, src_as_dst = last[2]
        if dst_raw != last_dst:  # decide.peer_class's dst_moved, as plan._plan_image finds it
            last_dst = dst_raw
            if not asked:
                asked = True
                local = bmap.raw_locals()  # None: the map has address rules: the words
                if local is not None:
                    l4, l6, mapped = local
                    bits, mask = bmap.not_local_bits()
            if local is None:
                may = might_move(fam, field_words(dst_raw))
            else:  # BoundMap.might_move, inline and on the bytes: 10,000 distinct peers
                key = dst_raw
                if fam == v4:
                    lset = l4
                elif dst_raw[1] or dst_raw[3] or not dst_raw.startswith(mapped):
                    lset = l6
                else:  # ::ffff:a.b.c.d: as the IPv4 address
                    lset, key = l4, b"\x60" + dst_raw[len(mapped):]
                if lset is None:
                    may = False
                else:
                    may = key in lset
                    if not may:  # BoundMap.note_not_local, inline
                        b = hash(key) & mask
                        bits[b >> 3] |= 1 << (b & 7)
            if may:
                try:
                    moved = lookup(interner.valid(fam, field_words(dst_raw)))
                except RewriteError:  # an `auto` target that cannot be resolved: upb's
                    return None  # route names it
            else:
                moved = None
        key = (kind, sportf == z7, dportf == z8, src_raw, dst_raw == src_as_dst, moved)
        got = last[4] if key == last[3] else classes.get(key)  # the family's last class?
        if got is None:
            assert src is not None
            first = _socket(path, off, data, start, end, interner, src, fam, dst_raw)
            d = decide(first, bmap, options, None)
            n_words = 1 if fam == AF_INET else 4
            new_src = new_dst = None
            if d.action == SET:
                if d.src_words is not None:
                    if len(d.src_words) != n_words:
                        return None  # not a word for a word: upb's route
                    new_src = words_field(SRC_TAG, d.src_words)
                if d.dst_words is not None:
                    if len(d.dst_words) != n_words:
                        return None
                    new_dst = words_field(DST_TAG, d.dst_words)
            elif d.action != KEEP and d.action != CLOSE:
                return None  # an action this pass does not know: upb's route
            if d.new_sport is not None or d.new_dport is not None:
                return None  # ports move only with a PortContext (upb's route): not here
            act = _KEEP if d.action == KEEP else _CLOSE if d.action == CLOSE else _ADDRS
            a_src = new_src or src_raw  # (src_raw is the class's: in its key)
            got = (act, d.verdict, d.verdict == REFUSED or d.verdict == NEEDS_ADDRESS,
                   a_src, new_dst, SocketReport(first, d), len(a_src) - len(src_raw))
            if len(classes) >= _MAX:
                classes.clear()
            classes[key] = got
        last[3] = key
        last[4] = got
        act, verdict, problem, a_src, new_dst, report, grow = got
        counts[verdict] += 1
        if problem:
            if report.sock.offset != off:
                assert src is not None
                report = SocketReport(_socket(path, off, data, start, end, interner, src, fam,
                                              dst_raw), report.decision)
            problems.append(report)
        if not act:
            continue
        changed += 1
        src0 = tail0 - len(dst_raw) - len(src_raw)
        if act == addrs and not grow and (new_dst is None or len(new_dst) == len(dst_raw)):
            # no length changes (the common case): only the words are new; the rest of
            # the entry is copied with what follows it
            out += mv[copied:src0]
            out += a_src
            if new_dst is None:
                copied = src0 + len(a_src)
            else:
                out += new_dst
                copied = tail0
            continue
        if copied != off:
            out += mv[copied:off]
        copied = end
        if act == addrs:  # new addresses, a length changed: the entry made again
            if new_dst is None:
                a_dst = dst_raw
                n = end - isk0 + grow
            else:
                a_dst = new_dst
                n = end - isk0 + grow + len(new_dst) - len(dst_raw)
            nlen = varints[n] if n < 2048 else varint(n)
            # 08 04 10 id 22 len isk: the head rebuilt from `id`, not sliced
            out += join((pack(4 + len(fid) + len(nlen) + n), b"\x08\x04\x10", fid, b"\x22",
                         nlen, data[isk0:src0], a_src, a_dst, tail))
            continue
        # closed (entries.close_connection, on the bytes): state, both ports, every word,
        # and the tail with shutdown set
        p3, p7 = m.start(3), m.start(4)
        p8 = p7 + len(sportf)
        patched(data, start, isk0, end, [
            (p3 + 7, p3 + 8, _STATE_CLOSE), (p7 + 1, p8, b"\x00"),
            (p8 + 1, p8 + len(dportf), b"\x00"),
            (src0, end, _ZERO_WORDS[1 if fam == v4 else 4] + tails.closed(
                tail, SHUT_BOTH))], out)
    if not changed:
        return data, counts, problems, changed
    out += mv[copied:]
    return out, counts, problems, changed
