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

import collections

TYPE_CHECKING = False  # (typing is not loaded at run time: see NamedTuple below)
if TYPE_CHECKING:
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


# NamedTuple, Protocol and TypeVar for the modules on the plugin's CLI route, which import
# them from here at run time and from typing only for the type checker:
#     TYPE_CHECKING = False
#     if TYPE_CHECKING:
#         from typing import NamedTuple
#     else:
#         from ..record import NamedTuple
# `typing` (with the warnings and contextlib modules it loads) is about 5 ms of the route's
# start-up, one process per restore (docs/design.md), and typing.NamedTuple adds 0.1 ms to
# each of the route's ~20 classes over collections.namedtuple, which this one calls.

class _NamedTupleMeta(type):
    def __new__(mcs, name: str, bases: tuple[type, ...], ns: dict[str, Any]) -> Any:
        if ns.get("_root"):
            return super().__new__(mcs, name, bases, ns)
        fields = list(ns.get("__annotations__", {}))
        defaults = [ns[f] for f in fields if f in ns]
        if any(f not in ns for f in fields[len(fields) - len(defaults):]):
            raise TypeError(f"{name}: a field without a default follows one with a default")
        make: Any = collections.namedtuple  # (mypy checks namedtuple() calls as literals)
        cls = make(name, fields, defaults=defaults, module=ns["__module__"])
        cls.__annotations__ = ns.get("__annotations__", {})
        for key, value in ns.items():
            if key in ("_make", "_fields", "_field_defaults", "_replace", "_asdict",
                       "_source", "__new__", "__init__", "__slots__", "__getnewargs__"):
                raise AttributeError(f"{name}: cannot set {key} of a NamedTuple")
            if key not in ("__module__", "__qualname__", "__annotations__", "_root") \
                    and key not in fields:
                setattr(cls, key, value)
        return cls


class NamedTuple(metaclass=_NamedTupleMeta):
    """`class Point(NamedTuple): x: int; y: int = 0`, as with typing.NamedTuple: a
    collections.namedtuple of the annotated fields (defaults from their values) with the
    class's methods, properties and docstring."""

    _root = True


class Protocol:
    """A stand-in base at run time: the type checker sees typing.Protocol."""


def TypeVar(name: str, *constraints: object, **kw: object) -> str:  # noqa: N802 (typing's)
    """A stand-in at run time (type variables appear in annotations only): its name."""
    return name
