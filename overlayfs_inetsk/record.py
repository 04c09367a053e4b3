"""Record: what @dataclass gives a small value class (==, hash, repr from its fields), with
no code generated at import.

@dataclass compiles an __init__, __repr__, __eq__ (and for frozen ones __setattr__,
__delattr__, __hash__) for every class it decorates, when its module is imported: about
0.3 ms a class here, with 0.4 ms more for importing dataclasses (and inspect) at all, paid
at every start. The plugin's CLI route, one process per restore, imports a dozen such
classes (docs/design.md, "The plugin's CLI route"). A Record subclass writes its __init__
and lists its fields in __slots__; equality, hashing and repr are these shared methods,
which compare and show the fields in that order, as a dataclass does.
"""

from __future__ import annotations

from typing import Any


class Record:
    """Fields: __slots__, or _compared when a class keeps more than it compares and shows
    (a dataclass's field(compare=False, repr=False))."""

    __slots__: tuple[str, ...] = ()
    _compared: tuple[str, ...] | None = None

    def _names(self) -> tuple[str, ...]:
        return self.__slots__ if self._compared is None else self._compared

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._names())

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Record)
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._names())
        return f"{type(self).__qualname__}({inner})"
