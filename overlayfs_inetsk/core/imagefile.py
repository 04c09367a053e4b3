"""Codec for CRIU image files: the magic pair, then length-prefixed protobuf entries.

Pure: bytes in, bytes out. Entries are kept as slices of the original buffer so unchanged
entries are written back byte for byte; only the caller decides which entries to re-encode.
"""

from __future__ import annotations

import struct
import sys

from ..errors import ImageError
from ..record import Record

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from typing import Iterable, Iterator, NamedTuple
else:
    from ..record import NamedTuple

IMG_COMMON = 0x54564319
FILES_MAGIC = 0x56303138  # files.img: file_entry messages
INETSK_MAGIC = 0x56443851  # legacy inetsk.img (CRIU <= 3.3): bare inet_sk_entry messages
# (= pycriu.images.magic.by_name; kept literal: importing it loads all of pycriu.images)

MAGIC_BY_NAME = {"files.img": FILES_MAGIC, "inetsk.img": INETSK_MAGIC}

# CRIU writes the length prefix in host byte order.
_U32 = struct.Struct("<I" if sys.byteorder == "little" else ">I")
_HEADER = struct.Struct(_U32.format[0] + "II")
LENGTH = _U32  # an entry's length prefix (core/bytepass.py calls its methods directly)


class Entry(NamedTuple):
    offset: int  # of the entry's length prefix within the file
    payload: bytes  # the packed protobuf message


class ImageFile(Record):  # a Record, not a dataclass: ..record
    __slots__ = ("path", "magic", "entries")
    path: str
    magic: int
    entries: list[Entry]

    def __init__(self, path: str, magic: int, entries: list[Entry]) -> None:
        self.path, self.magic, self.entries = path, magic, entries


def read_header(data: bytes, path: str, magic: int | None = None) -> int:
    """Check the magic pair; return the type magic. `magic` is the one expected (None: any)."""
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
    return int(kind)


HEADER_SIZE = _HEADER.size


def frames(data: bytes, path: str) -> Iterator[tuple[int, int, int]]:
    """(offset, start, end) of each entry after the header: the length prefix is at
    `offset`, the packed message is data[start:end]. Nothing is copied."""
    size = len(data)
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
        end = start + length
        yield pos, start, end
        pos = end


def parse(data: bytes, path: str, magic: int | None = None) -> ImageFile:
    """Split an image file into entries (copies each payload)."""
    kind = read_header(data, path, magic)
    return ImageFile(path, kind, [Entry(o, data[s:e]) for o, s, e in frames(data, path)])


def pack_length(n: int) -> bytes:
    return _U32.pack(n)



def encode(magic: int, payloads: Iterable[bytes]) -> bytes:
    """Build an image file from packed entries."""
    parts = [_HEADER.pack(IMG_COMMON, magic)]
    pack = _U32.pack
    for p in payloads:
        parts.append(pack(len(p)))
        parts.append(p)
    return b"".join(parts)
