"""The inet socket entries of one socket image: decoding them, and splicing changed ones back.

Pure: bytes in, generated pycriu messages and bytes out. Entries of files.img that are not
inet sockets are never decoded; entries that do not change are copied byte for byte; a
changed entry is re-serialized from pycriu's generated message, which keeps unknown fields.
What changes in an entry is decided in decide.py; this module only reads and writes it.

protobuf and pycriu's generated modules are imported on first use (generated(); the
module attributes fdinfo_pb2 and sk_inet_pb2 load them too), not with this module: the
byte pass (bytepass.py), the plugin's CLI route, needs neither (about 18 ms of its start).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, MutableSequence, Sequence

from ..errors import ImageError
from . import imagefile
from .sockaddr import AF_INET, AF_INET6, TCP_CLOSE, IPAddress, words_to_addr

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from typing import Any, Protocol
else:
    from ..record import Protocol


# once loaded (pb2.load()): fdinfo_pb2, sk_inet_pb2, file_entry's head class (type and id
# alone), protobuf's DecodeError and EncodeError
_PB2: list[Any] = []


def generated() -> tuple[Any, Any]:
    """pycriu's fdinfo_pb2 and sk_inet_pb2 (imported at the first call)."""
    if not _PB2:
        from .pb2 import load

        _PB2.extend(load())
    return _PB2[0], _PB2[1]


def __getattr__(name: str) -> Any:
    """entries.fdinfo_pb2 and entries.sk_inet_pb2, loaded when first asked for."""
    if name == "fdinfo_pb2":
        return generated()[0]
    if name == "sk_inet_pb2":
        return generated()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# file_entry.type of an inet socket (fdinfo.proto's INETSK: tests/test_isktail.py pins it)
FD_INETSK = 4
SHUT_BOTH = 3  # SHUT_RDWR + 1: CRIU's sk_shutdown SK_SHUTDOWN__BOTH (sk-opts.proto)


# pycriu's generated *_pb2 modules have no type hints (mypy sees them as Any): these
# Protocols say what this package reads and writes of their messages.
class InetSk(Protocol):
    """An inet_sk_entry (sk-inet.proto): the fields the core reads or writes."""

    id: int
    ino: int
    family: int
    type: int
    proto: int
    state: int
    src_port: int
    dst_port: int
    shutdown: int

    @property
    def src_addr(self) -> MutableSequence[int]: ...  # repeated uint32: set in place
    @property
    def dst_addr(self) -> MutableSequence[int]: ...


class _Descriptor(Protocol):
    @property
    def name(self) -> str: ...


class EntryMessage(Protocol):
    """The message re-serialized for a changed socket: the file_entry holding it
    (files.img), or the inet_sk_entry itself (inetsk.img)."""

    @property
    def DESCRIPTOR(self) -> _Descriptor: ...
    def SerializeToString(self) -> bytes: ...
    def IsInitialized(self) -> bool: ...
    def FindInitializationErrors(self) -> list[str]: ...


class _Head(Protocol):
    """A decoded _FileEntryHead."""

    type: int
    id: int

    def HasField(self, name: str) -> bool: ...


# (offset of the length prefix, payload start, payload end, message to re-serialize,
# its inet_sk_entry): for files.img the message is the file_entry holding the socket
InetEntry = tuple[int, int, int, EntryMessage, InetSk]


def not_inet(data: bytes, mv: memoryview, start: int, end: int, path: str, off: int) -> bool:
    """True when the entry is surely not an inet socket (skip it undecoded); False when it
    must be decoded whole. Raises ImageError for an entry CRIU would reject for want of
    its required fields type and id (what is inside a non-inet entry is CRIU's to check).

    The fast path reads the layout protobuf-c writes: `type` (one byte, not INETSK), `id`,
    then ONE length-delimited field that ends exactly where the entry ends. Then no later
    field can set `type` again. Anything else is decoded (type and id only, or whole)."""
    if end - start >= 5 and data[start] == 0x08:
        kind = data[start + 1]
        if kind == FD_INETSK:  # b"\x08\x04": an inet socket, decoded whole
            return False
        if kind < 0x80 and data[start + 2] == 0x10:
            p = start + 3
            while p < end and data[p] & 0x80:  # id
                p += 1
            p += 1
            if p < end:
                tag = data[p]
                if tag & 0x87 == 0x02 and tag > 0x12:  # one-byte tag, field >= 3, LEN
                    p += 1
                elif tag & 0x87 == 0x82 and p + 1 < end and data[p + 1] < 0x80:  # two-byte
                    p += 2
                else:
                    p = end
                if p < end:
                    n = data[p]
                    if n < 0x80:
                        p += 1
                    elif p + 1 < end and data[p + 1] < 0x80:
                        n = (n & 0x7F) | data[p + 1] << 7
                        p += 2
                    elif p + 2 < end and data[p + 2] < 0x80:
                        n = (n & 0x7F) | (data[p + 1] & 0x7F) << 7 | data[p + 2] << 14
                        p += 3
                    else:
                        n = -1
                    if p + n == end:
                        return True
    if end == start:
        raise ImageError(path, "empty entry: CRIU rejects a file_entry without its required "
                         "fields type and id", off)
    generated()
    try:
        head: _Head = _PB2[2].FromString(mv[start:end])
    except _PB2[3] as exc:
        raise ImageError(path, f"not a valid file_entry: {exc}", off) from None
    for name in ("type", "id"):
        if not head.HasField(name):
            raise ImageError(path, f"file_entry lacks required field {name}: CRIU would "
                             "reject it", off)
    # `type` given twice: the last one counts (CRIU's protobuf-c reads it so)
    return head.type != FD_INETSK


def inet_entries(data: bytes, path: str) -> Iterator[InetEntry]:
    """Each inet socket of a socket image (files.img or the legacy inetsk.img), decoded.
    Raises ImageError naming the file and the entry's offset for a malformed one."""
    magic = imagefile.read_header(data, path, imagefile.MAGIC_BY_NAME.get(posixpath.basename(path)))
    mv = memoryview(data)
    fdinfo_pb2, sk_inet_pb2 = generated()
    DecodeError = _PB2[3]  # noqa: N806
    if magic == imagefile.FILES_MAGIC:
        from_string = fdinfo_pb2.file_entry.FromString
        is_not_inet = not_inet
        for off, start, end in imagefile.frames(data, path):
            # Entries that are not inet sockets are read for their type and id only (the
            # type's last value counts, as for CRIU); inet ones are decoded whole. An entry
            # starting with `type` INETSK is decoded whole at once (not_inet's first test).
            if not (end - start >= 5 and data[start] == 0x08 and data[start + 1] == FD_INETSK
                    ) and is_not_inet(data, mv, start, end, path, off):
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
    """One IPAddress object per distinct (family, words) of a checkpoint, validated once
    (up to MAX of them at a time)."""

    MAX = 1024

    def __init__(self) -> None:
        self.addrs: dict[tuple[int, tuple[int, ...]], IPAddress] = {}

    def valid(self, family: int, words: tuple[int, ...]) -> IPAddress:
        """get() of words whose family and count are known good (core/patch.py read them)."""
        got = self.addrs.get((family, words))
        if got is None:
            got = words_to_addr(words, family)
            if len(self.addrs) >= self.MAX:
                self.addrs.clear()
            self.addrs[(family, words)] = got
        return got

    def get(self, family: int, words: tuple[int, ...], path: str, off: int, isk: InetSk,
            which: str) -> IPAddress:
        key = (family, words)
        got = self.addrs.get(key)
        if got is None:
            if family not in (AF_INET, AF_INET6):
                raise ImageError(path, f"inet socket id {isk.id} has family {family}, "
                                 "not AF_INET/AF_INET6", off)
            try:
                got = words_to_addr(words, family)
            except ValueError as exc:
                raise ImageError(path, f"inet socket id {isk.id}: {which}: {exc}", off) from None
            if len(self.addrs) >= self.MAX:  # 10,000 distinct peers: keep memory flat
                self.addrs.clear()
            self.addrs[key] = got
        return got


def check_required(path: str, off: int, msg: EntryMessage, isk: InetSk) -> None:
    """ImageError when a decoded inet entry lacks proto2 required fields (CRIU rejects it)."""
    if not msg.IsInitialized():
        missing = ",".join(msg.FindInitializationErrors())
        name = msg.DESCRIPTOR.name
        raise ImageError(path, f"inet socket id {isk.id}: Message {name} is missing "
                         f"required fields: {missing}", off)


def set_endpoints(isk: InetSk, src_words: Sequence[int] | None,
                  dst_words: Sequence[int] | None, src_port: int | None,
                  dst_port: int | None) -> None:
    """Write new address words and ports into an entry (None: leave that one alone)."""
    if src_words is not None:
        isk.src_addr[:len(src_words)] = src_words  # IPv4 entries may carry extra words
    if dst_words is not None:
        isk.dst_addr[:len(dst_words)] = dst_words
    if src_port is not None:
        isk.src_port = src_port
    if dst_port is not None:
        isk.dst_port = dst_port


def close_connection(isk: InetSk) -> None:
    """Write decide.py's `closed` verdict into an entry: state CLOSE, no ports, addresses
    0.0.0.0 / ::, shutdown both ways. CRIU then restores an unbound socket and replays the
    shutdown (EOF on read, EPIPE on write; docs/tcp.md)."""
    isk.state = TCP_CLOSE
    isk.src_port = 0
    isk.dst_port = 0
    isk.src_addr[:] = [0] * len(isk.src_addr)
    isk.dst_addr[:] = [0] * len(isk.dst_addr)
    isk.shutdown = SHUT_BOTH


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

    def keep(self, off: int, msg: EntryMessage, isk: InetSk) -> None:
        """An entry that stays as it is: CRIU must be able to read it. upb decodes entries
        that lack proto2 required fields, CRIU's protobuf-c rejects them (a changed entry
        is checked by replace(), when it is re-encoded: no cost here)."""
        check_required(self.path, off, msg, isk)

    def replace(self, off: int, end: int, msg: EntryMessage, isk: InetSk) -> None:
        try:
            payload = msg.SerializeToString()
        except _PB2[4] as exc:  # (msg was decoded here: generated() ran)  # upb decodes entries that lack proto2 required fields
            sid = isk.id
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
