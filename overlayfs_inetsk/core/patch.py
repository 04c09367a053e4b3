"""Inet socket entries of files.img read and changed in their bytes, without decoding them.

CRIU's protobuf-c writes a file_entry holding an inet socket in one layout: `type` INETSK,
`id`, then `isk`, whose fields come in field-number order: id, ino, family, type, proto,
state, src_port, dst_port, flags, backlog, the address words (one tag each: not packed),
then fown (13) and what follows it (the "tail"). read_head() reads that layout with one
regular expression (C speed), every varint canonical (the shortest form, what upb writes
back), and answers None for anything else: the caller then decodes the entry with upb, as
before. A changed entry is written back as upb would re-serialize the decoded message, so
the bytes are the decode/modify/encode route's:

  * the head's fields in their order, each canonical: the same bytes as upb's encoding of
    their values (proto2 keeps a field set to 0: none is dropped);
  * the tail as it is, after TailCheck found that upb gives these very bytes back for it
    (isktail.canonical, once per distinct tail: an unknown field, a field out of order, a
    repeated head field, an overlong varint, a missing required field in fown or opts all
    make it say no, and then the entry takes upb's route);
  * new lengths: isk's length (a varint) and the entry's u32 prefix follow the new sizes.

Pure: bytes in, bytes out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from . import imagefile, isktail
from .isktail import varint as varint  # (re-exported: patch.varint)

# A canonical varint of a uint32: up to 3 continuation bytes and a last byte that is not 0,
# or 0 alone, or 4 continuation bytes and a last byte up to 0x0f (the value fits 32 bits).
_V = rb"(?:[\x80-\xff]{0,3}+[\x01-\x7f]|\x00|[\x80-\xff]{4}[\x01-\x0f])"
_B = rb"[\x00-\x7f]"  # a one-byte varint (family, type, proto, state)

# groups: 1 file_entry.id (isk.id must be the same bytes), 2 isk's length, 3 family..state
# (the bytes: the family is its second), 4 src_port, 5 dst_port (each with its tag), then
# AF_INET: 6 src word, 7 dst word; AF_INET6: 8 four src words, 9 four dst words (each word
# with its tag).
# The match ends before fown's tag: the tail starts at m.end().
HEAD = re.compile(
    rb"\x08\x04\x10(" + _V + rb")\x22(" + _V + rb")\x08\1\x10" + _V +
    rb"(\x18[\x02\x0a]\x20" + _B + rb"\x28" + _B + rb"\x30" + _B + rb")"
    rb"(\x38" + _V + rb")(\x40" + _V + rb")\x48" + _V + rb"\x50" + _V +
    rb"(?:(\x58" + _V + rb")(\x60" + _V + rb")|(" + (rb"\x58" + _V) * 4 + rb")(" +
    (rb"\x60" + _V) * 4 + rb"))(?=\x6a)", re.S)  # (unrolled: a repeated group costs more)

SRC_TAG = 0x58  # src_addr (11), varint
DST_TAG = 0x60  # dst_addr (12), varint


def uvarint(raw: bytes | memoryview, pos: int = 0) -> tuple[int, int]:
    """(value, position after it) of the varint at raw[pos]."""
    n = shift = 0
    while True:
        b = raw[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, pos
        shift += 7


def words_field(tag: int, words: Sequence[int]) -> bytes:
    """Address words as CRIU writes them: a tag and a varint each."""
    return b"".join(bytes((tag,)) + varint(w) for w in words)


def field_words(raw: bytes) -> tuple[int, ...]:
    """The words of an address field as read_head() captured it (tags included)."""
    out = []
    pos = 0
    while pos < len(raw):
        w, pos = uvarint(raw, pos + 1)
        out.append(w)
    return tuple(out)


class TailCheck:
    """Whether upb gives an entry's tail (fown and what follows it) back byte for byte
    (asked once per distinct tail: a checkpoint's sockets share a handful), and a closed
    connection's tail: both in the bytes (core/isktail.py), no protobuf."""

    MAX = 1024

    def __init__(self) -> None:
        self._ok: dict[bytes, bool] = {}
        self._closed: dict[bytes, bytes] = {}

    def __call__(self, tail: bytes, data: bytes, start: int, end: int) -> bool:
        """Whether `tail` (the end of the entry data[start:end]) is one upb gives back."""
        ok = self._ok.get(tail)
        if ok is None:
            ok = isktail.canonical(tail)
            if len(self._ok) >= self.MAX:
                self._ok.clear()
            self._ok[tail] = ok
        return ok

    def closed(self, tail: bytes, shutdown: int) -> bytes:
        """A checked tail with `shutdown` set (entries.close_connection's one field there):
        what upb writes from field 13 on, since fields are written in number order."""
        got = self._closed.get(tail)
        if got is None:
            got = isktail.with_shutdown(tail, shutdown)
            if len(self._closed) >= self.MAX:
                self._closed.clear()
            self._closed[tail] = got
        return got


def patched(data: bytes, start: int, isk0: int, end: int, repl: list[tuple[int, int, bytes]],
            out: bytearray) -> None:
    """Append to `out` the entry data[start:end] (isk's length varint ends at isk0) with the
    spans `repl` (start, end, bytes; in entry order, inside isk) replaced: its new u32
    length, then the entry, isk's length rewritten."""
    body: list[bytes] = []
    pos = isk0
    for a, b, new in repl:
        body.append(data[pos:a])
        body.append(new)
        pos = b
    body.append(data[pos:end])
    isk = b"".join(body)
    n = len(isk)
    ilen0 = uvarint(data, start + 3)[1] + 1  # after 08 04 10, `id` and 0x22
    ilen = varint(n)
    out += imagefile.pack_length(ilen0 - start + len(ilen) + n)
    out += data[start:ilen0]
    out += ilen
    out += isk
