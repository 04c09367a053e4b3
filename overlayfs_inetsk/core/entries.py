"""The inet socket entries of one socket image: decoding them, and splicing changed ones back.

Pure: bytes in, generated pycriu messages and bytes out. Entries of files.img that are not
inet sockets are never decoded; entries that do not change are copied byte for byte; a
changed entry is re-serialized from pycriu's generated message, which keeps unknown fields.
What changes in an entry is decided in decide.py; this module only reads and writes it.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Sequence

from google.protobuf.message import DecodeError, EncodeError
from pycriu.images import fdinfo_pb2, sk_inet_pb2

from ..errors import ImageError
from . import imagefile
from .sockaddr import AF_INET, AF_INET6, TCP_CLOSE, IPAddress, words_to_addr

FD_INETSK = fdinfo_pb2.INETSK  # file_entry.type of an inet socket (4)
SHUT_BOTH = 3  # SHUT_RDWR + 1: CRIU's sk_shutdown SK_SHUTDOWN__BOTH (sk-opts.proto)
_ZERO = (0, 0, 0, 0)

# (offset of the length prefix, payload start, payload end, message to re-serialize,
# its inet_sk_entry): for files.img the message is the file_entry holding the socket
InetEntry = tuple[int, int, int, object, object]


def inet_entries(data: bytes, path: str) -> Iterator[InetEntry]:
    """Each inet socket of a socket image (files.img or the legacy inetsk.img), decoded.
    Raises ImageError naming the file and the entry's offset for a malformed one."""
    magic = imagefile.read_header(data, path, imagefile.MAGIC_BY_NAME.get(posixpath.basename(path)))
    mv = memoryview(data)
    if magic == imagefile.FILES_MAGIC:
        from_string = fdinfo_pb2.file_entry.FromString
        for off, start, end in imagefile.frames(data, path):
            # protobuf-c writes field 1 (type) first, so b"\x08\x04" starts an INETSK entry;
            # any other one-byte type is skipped undecoded; anything else is decoded.
            if end - start >= 2 and data[start] == 0x08:
                kind = data[start + 1]
                if kind != FD_INETSK and kind < 0x80:
                    continue
            try:
                fe = from_string(mv[start:end])
            except DecodeError as exc:
                raise ImageError(path, f"not a valid file_entry: {exc}", off) from None
            if fe.type != FD_INETSK:
                continue
            if not fe.HasField("isk"):
                raise ImageError(path, f"INETSK file_entry id {fe.id} has no isk", off)
            isk = fe.isk
            if fe.id != isk.id:
                raise ImageError(path, f"file_entry.id {fe.id} != isk.id {isk.id}", off)
            yield off, start, end, fe, isk
    elif magic == imagefile.INETSK_MAGIC:
        from_string = sk_inet_pb2.inet_sk_entry.FromString
        for off, start, end in imagefile.frames(data, path):
            try:
                isk = from_string(mv[start:end])
            except DecodeError as exc:
                raise ImageError(path, f"not a valid inet_sk_entry: {exc}", off) from None
            yield off, start, end, isk, isk
    else:
        raise ImageError(path, f"image type 0x{magic:08x} holds no inet sockets")


class Interner:
    """One IPAddress object per distinct (family, words) of a checkpoint, validated once."""

    def __init__(self) -> None:
        self.addrs: dict[tuple[int, tuple[int, ...]], IPAddress] = {}

    def get(self, family: int, words: tuple[int, ...], path: str, off: int, isk: object,
            which: str) -> IPAddress:
        key = (family, words)
        got = self.addrs.get(key)
        if got is None:
            if family not in (AF_INET, AF_INET6):
                raise ImageError(path, f"inet socket id {isk.id} has family {family}, "  # type: ignore[attr-defined]
                                 "not AF_INET/AF_INET6", off)
            try:
                got = words_to_addr(words, family)
            except ValueError as exc:
                raise ImageError(path, f"inet socket id {isk.id}: {which}: {exc}", off) from None  # type: ignore[attr-defined]
            self.addrs[key] = got
        return got


def set_addresses(isk: object, src_words: Sequence[int] | None,
                  dst_words: Sequence[int] | None) -> None:
    """Write new address words into an entry (None: leave that side alone)."""
    if src_words is not None:
        _set_words(isk.src_addr, src_words)  # type: ignore[attr-defined]
    if dst_words is not None:
        _set_words(isk.dst_addr, dst_words)  # type: ignore[attr-defined]


def set_ports(isk: object, src_port: int | None, dst_port: int | None) -> None:
    """Write new ports into an entry (None: leave that side alone)."""
    if src_port is not None:
        isk.src_port = src_port  # type: ignore[attr-defined]
    if dst_port is not None:
        isk.dst_port = dst_port  # type: ignore[attr-defined]


def close_connection(isk: object) -> None:
    """Write decide.py's `closed` verdict into an entry: state CLOSE, no ports, addresses
    0.0.0.0 / ::, shutdown both ways. CRIU then restores an unbound socket and replays the
    shutdown (EOF on read, EPIPE on write; docs/tcp.md)."""
    isk.state = TCP_CLOSE  # type: ignore[attr-defined]
    isk.src_port = 0  # type: ignore[attr-defined]
    isk.dst_port = 0  # type: ignore[attr-defined]
    _set_words(isk.src_addr, _ZERO[: len(isk.src_addr)])  # type: ignore[attr-defined]
    _set_words(isk.dst_addr, _ZERO[: len(isk.dst_addr)])  # type: ignore[attr-defined]
    isk.shutdown = SHUT_BOTH  # type: ignore[attr-defined]


def _set_words(field_: object, words: Sequence[int]) -> None:
    for i, w in enumerate(words):  # IPv4 entries may carry extra words: keep them
        field_[i] = w  # type: ignore[index]


class Splicer:
    """The bytes of an image with some entries replaced: untouched stretches are copied as
    they are, a changed entry is re-serialized with a new length prefix. Entries must be
    replaced in file order."""

    __slots__ = ("data", "path", "out", "copied")

    def __init__(self, data: bytes, path: str) -> None:
        self.data = data
        self.path = path
        self.out: bytearray | None = None
        self.copied = 0

    def replace(self, off: int, end: int, msg: object, isk: object) -> None:
        try:
            payload = msg.SerializeToString()  # type: ignore[attr-defined]
        except EncodeError as exc:  # upb decodes entries that lack proto2 required fields
            sid = isk.id  # type: ignore[attr-defined]
            raise ImageError(self.path, f"inet socket id {sid}: {exc}", off) from None
        out = self.out
        if out is None:
            out = self.out = bytearray()
        out += self.data[self.copied:off]
        out += imagefile.pack_length(len(payload))
        out += payload
        self.copied = end

    def result(self) -> bytes | bytearray:
        """The original bytes object when nothing changed, else the spliced copy."""
        if self.out is None:
            return self.data
        self.out += self.data[self.copied:]
        return self.out
