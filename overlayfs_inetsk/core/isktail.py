"""An inet_sk_entry's tail (fown, field 13, and what follows it) checked and changed in its
bytes, with no protobuf: what core/patch.TailCheck asks on the plugin's CLI route.

    canonical(tail) -> bool     whether upb, decoding the entry and encoding it back, gives
                                these very bytes (True only when sure of it)
    with_shutdown(tail, n)      a canonical tail with `shutdown` (19) set to n: the bytes upb
                                writes for it

upb writes a message's known fields in field-number order, a singular field once, a
repeated one as its declaration says (packed in one record, or a tag per element), every
varint in its shortest form and every value in its type's range (a uint32 below 2**32, a
bool 0 or 1, an int32 sign-extended to 64 bits, a proto2 enum one of its declared values:
an undeclared one goes to the unknown fields, written last). canonical() accepts a tail
only in that form, with every field known, the required ones present (in sub-messages
too), every length exact and strings valid UTF-8; anything else is "no" and the entry
takes upb's route. SCHEMA is what it walks: the messages of sk-inet.proto from field 13
on, pinned to pycriu's generated descriptors by tests/test_isktail.py (schema_of()
derives this table from them).

Pure: bytes in, bytes out.
"""

from __future__ import annotations

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from typing import Any

# kinds of field: how its value is written and which values upb writes back
U32, U64, I32, I64, S32, S64, BOOL, ENUM, F32, F64, STR, BYTES, MSG = range(13)
_WIRE = {U32: 0, U64: 0, I32: 0, I64: 0, S32: 0, S64: 0, BOOL: 0, ENUM: 0, F32: 5, F64: 1,
         STR: 2, BYTES: 2, MSG: 2}
# protobuf's FieldDescriptor.type -> kind (double, float, int64, uint64, int32, fixed64,
# fixed32, bool, string, group, message, bytes, uint32, enum, sfixed32, sfixed64, sint32,
# sint64: 1..18; no group)
_KIND_OF_TYPE = {1: F64, 2: F32, 3: I64, 4: U64, 5: I32, 6: F64, 7: F32, 8: BOOL, 9: STR,
                 11: MSG, 12: BYTES, 13: U32, 14: ENUM, 15: F32, 16: F64, 17: S32, 18: S64}

# A field: (number, name, kind, repeated, packed, required, what: the message's name (MSG),
# the enum's values (ENUM), else None). A message: its fields by number.
if TYPE_CHECKING:
    Field = tuple[int, str, int, bool, bool, bool, Any]
else:
    Field = tuple
Schema = dict[str, dict[int, Field]]

TOP = "inet_sk_entry"
FIRST = 13  # the tail's first field: fown (the head, 1..12, is patch.HEAD's)
SHUTDOWN = 19

SCHEMA: Schema = {
    "inet_sk_entry": {
        13: (13, "fown", MSG, False, False, True, "fown_entry"),
        14: (14, "opts", MSG, False, False, True, "sk_opts_entry"),
        15: (15, "v6only", BOOL, False, False, False, None),
        16: (16, "ip_opts", MSG, False, False, False, "ip_opts_entry"),
        17: (17, "ifname", STR, False, False, False, None),
        18: (18, "ns_id", U32, False, False, False, None),
        19: (19, "shutdown", ENUM, False, False, False, (0, 1, 2, 3)),
        20: (20, "tcp_opts", MSG, False, False, False, "tcp_opts_entry"),
    },
    "fown_entry": {
        1: (1, "uid", U32, False, False, True, None),
        2: (2, "euid", U32, False, False, True, None),
        3: (3, "signum", U32, False, False, True, None),
        4: (4, "pid_type", U32, False, False, True, None),
        5: (5, "pid", U32, False, False, True, None),
    },
    "sk_opts_entry": {
        1: (1, "so_sndbuf", U32, False, False, True, None),
        2: (2, "so_rcvbuf", U32, False, False, True, None),
        3: (3, "so_snd_tmo_sec", U64, False, False, True, None),
        4: (4, "so_snd_tmo_usec", U64, False, False, True, None),
        5: (5, "so_rcv_tmo_sec", U64, False, False, True, None),
        6: (6, "so_rcv_tmo_usec", U64, False, False, True, None),
        7: (7, "reuseaddr", BOOL, False, False, False, None),
        8: (8, "so_priority", U32, False, False, False, None),
        9: (9, "so_rcvlowat", U32, False, False, False, None),
        10: (10, "so_mark", U32, False, False, False, None),
        11: (11, "so_passcred", BOOL, False, False, False, None),
        12: (12, "so_passsec", BOOL, False, False, False, None),
        13: (13, "so_dontroute", BOOL, False, False, False, None),
        14: (14, "so_no_check", BOOL, False, False, False, None),
        15: (15, "so_bound_dev", STR, False, False, False, None),
        16: (16, "so_filter", F64, True, False, False, None),
        17: (17, "so_reuseport", BOOL, False, False, False, None),
        18: (18, "so_broadcast", BOOL, False, False, False, None),
        19: (19, "so_keepalive", BOOL, False, False, False, None),
        20: (20, "tcp_keepcnt", U32, False, False, False, None),
        21: (21, "tcp_keepidle", U32, False, False, False, None),
        22: (22, "tcp_keepintvl", U32, False, False, False, None),
        23: (23, "so_oobinline", U32, False, False, False, None),
        24: (24, "so_linger", U32, False, False, False, None),
        25: (25, "so_buf_lock", U32, False, False, False, None),
    },
    "ip_opts_entry": {
        1: (1, "freebind", BOOL, False, False, False, None),
        4: (4, "raw", MSG, False, False, False, "ip_opts_raw_entry"),
        5: (5, "pktinfo", BOOL, False, False, False, None),
        6: (6, "tos", U32, False, False, False, None),
        7: (7, "ttl", U32, False, False, False, None),
    },
    "ip_opts_raw_entry": {
        1: (1, "hdrincl", BOOL, False, False, False, None),
        2: (2, "nodefrag", BOOL, False, False, False, None),
        3: (3, "checksum", BOOL, False, False, False, None),
        4: (4, "icmpv_filter", U32, True, False, False, None),
    },
    "tcp_opts_entry": {
        1: (1, "cork", BOOL, False, False, False, None),
        2: (2, "nodelay", BOOL, False, False, False, None),
        3: (3, "keepcnt", U32, False, False, False, None),
        4: (4, "keepidle", U32, False, False, False, None),
        5: (5, "keepintvl", U32, False, False, False, None),
    },
}


def schema_of(descriptor: Any, first: int = FIRST) -> Schema:
    """SCHEMA as pycriu's generated descriptor of inet_sk_entry says it (fields from
    `first` on at the top, every field of the messages below): what the test pins SCHEMA
    to. Raises ValueError for what canonical() does not know (a group, an extension
    range's field, a map, proto3's open enums)."""
    out: Schema = {}

    def add(d: Any, lowest: int) -> None:
        if d.name in out:
            return
        fields: dict[int, Field] = {}
        out[d.name] = fields
        for f in sorted(d.fields, key=lambda f: f.number):
            if f.number < lowest:
                continue
            kind = _KIND_OF_TYPE.get(f.type)
            if kind is None:
                raise ValueError(f"{d.full_name}.{f.name}: field type {f.type} not known")
            what: Any = None
            if kind == MSG:
                add(f.message_type, 1)
                what = f.message_type.name
            elif kind == ENUM:
                if not f.enum_type.is_closed:
                    raise ValueError(f"{d.full_name}.{f.name}: an open enum")
                what = tuple(sorted({v.number for v in f.enum_type.values}))
            fields[f.number] = (f.number, f.name, kind, bool(f.is_repeated),
                                bool(f.is_packed), bool(f.is_required), what)

    add(descriptor, first)
    return out


def _varint(b: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, position after) of a canonical varint of at most 10 bytes at b[pos], or
    (-1, pos) if there is none (cut short, overlong, over 64 bits)."""
    n = shift = 0
    p = pos
    while p < end and p - pos < 10:
        c = b[p]
        p += 1
        n |= (c & 0x7F) << shift
        if c < 0x80:
            if c == 0 and p - pos > 1:  # a trailing zero byte: not the shortest form
                return -1, pos
            if n >> 64:
                return -1, pos
            return n, p
        shift += 7
    return -1, pos


def _value_ok(kind: int, n: int, what: Any) -> bool:
    """Whether upb writes varint value n back as it is, for a field of this kind."""
    if kind == U32 or kind == S32:
        return n < 1 << 32
    if kind == BOOL:
        return n < 2
    if kind == I32 or kind == ENUM:  # int32: sign-extended to 64 bits when negative
        v = n - (1 << 64) if n >> 63 else n
        if not -(1 << 31) <= v < 1 << 31:
            return False
        return kind == I32 or v in what
    return True  # U64, I64, S64: any 64-bit value


def _message(b: bytes, pos: int, end: int, fields: dict[int, Field], lowest: int) -> bool:
    """Whether b[pos:end] is a message of these fields (numbers from `lowest` on) in the
    form upb writes."""
    last = lowest - 1
    seen: set[int] = set()
    while pos < end:
        tag, pos = _varint(b, pos, end)
        if tag < 0:
            return False
        num, wire = tag >> 3, tag & 7
        f = fields.get(num)
        if f is None or num < last or (num == last and not (f[3] and not f[4])):
            return False  # unknown, out of order, or a field again that is not a tag-per-
            # element repeated one (those are written one after the other)
        last = num
        seen.add(num)
        _n, _name, kind, repeated, packed, _req, what = f
        if repeated and packed:
            if wire != 2:
                return False
            n, pos = _varint(b, pos, end)
            if n <= 0 or n > end - pos:  # an empty packed record: upb writes none
                return False
            stop = pos + n
            want = _WIRE[kind]
            while pos < stop:
                if want == 0:
                    v, pos = _varint(b, pos, stop)
                    if v < 0 or not _value_ok(kind, v, what):
                        return False
                else:
                    pos += 8 if want == 1 else 4
            if pos != stop:
                return False
            continue
        if wire != _WIRE[kind]:
            return False
        if wire == 0:
            v, pos = _varint(b, pos, end)
            if v < 0 or not _value_ok(kind, v, what):
                return False
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
            if pos > end:
                return False
        else:
            n, pos = _varint(b, pos, end)
            if n < 0 or n > end - pos:
                return False
            stop = pos + n
            if kind == MSG:
                if not _message(b, pos, stop, SCHEMA[what], 1):
                    return False
            elif kind == STR:
                try:
                    b[pos:stop].decode("utf-8")
                except UnicodeDecodeError:
                    return False
            pos = stop
    return all(num in seen for num, f in fields.items() if f[5])


def canonical(tail: bytes) -> bool:
    """Whether upb gives this tail back byte for byte (see the module's docstring)."""
    return _message(tail, 0, len(tail), SCHEMA[TOP], FIRST)


def varint(n: int) -> bytes:
    """The canonical varint of n >= 0 (patch.py's too)."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tag(num: int, wire: int) -> bytes:
    return varint(num << 3 | wire)


def with_shutdown(tail: bytes, value: int) -> bytes:
    """A canonical() tail with shutdown (19, an enum of 0..3) set to `value`: the field
    replaced where it is, or put in its place by number."""
    assert value in SCHEMA[TOP][SHUTDOWN][6]
    field = _tag(SHUTDOWN, 0) + bytes((value,))
    pos, end = 0, len(tail)
    while pos < end:
        start = pos
        tag, pos = _varint(tail, pos, end)
        num, wire = tag >> 3, tag & 7
        if num >= SHUTDOWN:
            rest = tail[start:]
            if num == SHUTDOWN:
                rest = tail[_varint(tail, pos, end)[1]:]
            return tail[:start] + field + rest
        if wire == 0:
            pos = _varint(tail, pos, end)[1]
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
        else:
            n, pos = _varint(tail, pos, end)
            pos += n
    return tail + field
