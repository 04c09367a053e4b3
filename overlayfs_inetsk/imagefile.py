"""Codec for CRIU image files: the magic pair, then length-prefixed protobuf entries.

Pure: bytes in, bytes out. Entries are kept as slices of the original buffer so unchanged
entries are written back byte for byte; only the caller decides which entries to re-encode.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from .errors import ImageError

IMG_COMMON = 0x54564319
FILES_MAGIC = 0x56303138  # files.img: file_entry messages
INETSK_MAGIC = 0x56443851  # legacy inetsk.img (CRIU <= 3.3): bare inet_sk_entry messages

MAGIC_BY_NAME = {"files.img": FILES_MAGIC, "inetsk.img": INETSK_MAGIC}

# CRIU writes the length prefix in host byte order.
_U32 = struct.Struct("<I" if sys.byteorder == "little" else ">I")
_HEADER = struct.Struct(_U32.format[0] + "II")


class Entry(NamedTuple):
    offset: int  # of the entry's length prefix within the file
    payload: bytes  # the packed protobuf message


@dataclass(frozen=True, slots=True)
class ImageFile:
    path: str
    magic: int
    entries: list[Entry]


def parse(data: bytes, path: str, magic: int | None = None) -> ImageFile:
    """Split an image file into entries. `magic` is the type magic expected (None: any)."""
    size = len(data)
    if size == 0:
        raise ImageError(path, "empty file (no image magic)")
    if size < _HEADER.size:
        raise ImageError(path, f"file is {size} bytes, shorter than the 8-byte image magic")
    common, kind = _HEADER.unpack_from(data, 0)
    if common != IMG_COMMON:
        raise ImageError(
            path, f"not a CRIU image: magic 0x{common:08x}, expected 0x{IMG_COMMON:08x}"
        )
    if magic is not None and kind != magic:
        raise ImageError(path, f"wrong image type: magic 0x{kind:08x}, expected 0x{magic:08x}")
    mv = memoryview(data)
    entries: list[Entry] = []
    append = entries.append
    unpack = _U32.unpack_from
    pos = _HEADER.size
    while pos < size:
        if size - pos < 4:
            raise ImageError(path, f"{size - pos} trailing bytes, too short for a length", pos)
        (length,) = unpack(data, pos)
        start = pos + 4
        if length > size - start:
            raise ImageError(
                path,
                f"entry length {length} runs past the end of the file "
                f"({size - start} bytes left): truncated or corrupt",
                pos,
            )
        append(Entry(pos, bytes(mv[start : start + length])))
        pos = start + length
    return ImageFile(path, kind, entries)


def encode(magic: int, payloads: Iterable[bytes]) -> bytes:
    """Build an image file from packed entries."""
    parts = [_HEADER.pack(IMG_COMMON, magic)]
    pack = _U32.pack
    for p in payloads:
        parts.append(pack(len(p)))
        parts.append(p)
    return b"".join(parts)


def leading_varint_field(payload: bytes, field: int) -> int | None:
    """The value of varint `field` if it is the message's first field, else None.

    protobuf-c (CRIU) writes fields in number order, so `file_entry.type` (field 1) is the
    first tag; reading it lets callers skip decoding entries that are not sockets.
    """
    n = len(payload)
    if n == 0:
        return None
    tag = payload[0]
    if tag != (field << 3):  # wire type 0, single-byte tag for fields 1..15
        return None
    value = 0
    shift = 0
    i = 1
    while i < n and shift < 64:
        b = payload[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value
        shift += 7
    return None
