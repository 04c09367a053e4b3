"""overlayfs_inetsk.record.Record gives the value classes it replaced dataclasses in (for
start-up: docs/design.md, "The plugin's CLI route") a dataclass's ==, hash and repr."""

from __future__ import annotations

import dataclasses
import ipaddress
import os

import pytest

from overlayfs_inetsk.app.plugin_view import Reply
from overlayfs_inetsk.core.imagefile import ImageFile
from overlayfs_inetsk.core.ports import PortContext
from overlayfs_inetsk.core.rules import LocalRule
from overlayfs_inetsk.core.tree import Listing
from overlayfs_inetsk.host.mounts import Mount
from overlayfs_inetsk.plugin.metrics import Outcome
from overlayfs_inetsk.record import Record


class Pair(Record):
    __slots__ = ("a", "b")

    def __init__(self, a: object, b: object) -> None:
        self.a, self.b = a, b


@dataclasses.dataclass(frozen=True)
class DPair:
    a: object
    b: object


def test_eq_hash_and_repr_are_a_frozen_dataclasses():
    for a, b in ((1, "x"), (None, (1, 2)), (ipaddress.ip_address("10.77.0.1"), 7)):
        r, d = Pair(a, b), DPair(a, b)
        assert r == Pair(a, b) and hash(r) == hash(Pair(a, b)) == hash(d)
        assert repr(r) == repr(d).replace("DPair", "Pair")
        assert r != Pair(a, "other") and r != Pair("other", b)
    assert Pair(1, 2) != (1, 2) and Pair(1, 2).__eq__(DPair(1, 2)) is NotImplemented


def test_the_value_classes_compare_by_their_fields():
    v4 = ipaddress.ip_address("10.77.0.2")
    assert Mount(1, "/a", "tmpfs", "none") == Mount(1, "/a", "tmpfs", "none")
    assert Mount(1, "/a", "tmpfs", "none") != Mount(2, "/a", "tmpfs", "none")
    assert repr(Mount(1, "/a", "t", "s")) == "Mount(id=1, point='/a', fstype='t', source='s')"
    assert Outcome("view") == Outcome("view", "", 0.0) != Outcome("view", seconds=1.0)
    assert len({LocalRule(4, v4, "x"), LocalRule(4, v4, "x"), LocalRule(4, None, "x")}) == 2
    assert ImageFile("p", 1, []) == ImageFile("p", 1, []) != ImageFile("p", 2, [])
    assert Reply("NONE x") == Reply("NONE x", None, "") != Reply("NONE x", note="n")
    st = os.stat("/")
    assert Listing(b"/", st, {}) == Listing(b"/", st, {})
    assert PortContext() == PortContext() and PortContext().tcp_ends == set()
    c = PortContext()
    c.clashes[(4, v4, 7)] = "r"
    assert c != PortContext() and PortContext().clashes == {}  # a dict of its own each


def test_the_mutable_ones_are_unhashable_as_their_dataclasses_were():
    for obj in (Reply("x"), PortContext(), Listing(b"/", os.stat("/"), {})):
        try:
            hash(obj)
        except TypeError:
            continue
        raise AssertionError(f"{obj!r} is hashable")


def test_the_planners_values_keep_what_their_dataclasses_gave():
    """RewriteOptions (frozen), RewriteResult, CheckpointPlan and AddressMap, on the CLI
    route, are Records now: the same ==, hash, repr and frozen-ness."""
    from overlayfs_inetsk.core.addrmap import AddressMap
    from overlayfs_inetsk.core.decide import RewriteOptions
    from overlayfs_inetsk.core.plan import CheckpointPlan, RewriteResult

    o = RewriteOptions()
    assert o == RewriteOptions(False, "close") and hash(o) == hash(RewriteOptions())
    assert o != RewriteOptions(strict=True) and len({o, RewriteOptions()}) == 1
    assert repr(RewriteOptions(True, "keep")) == "RewriteOptions(strict=True, tcp_outside='keep')"
    for name in ("strict", "tcp_outside", "other"):
        try:
            setattr(o, name, 1)
        except AttributeError:
            continue
        raise AssertionError(f"RewriteOptions.{name} could be set")
    try:
        RewriteOptions(tcp_outside="bogus")
    except ValueError as e:
        assert "tcp_outside must be one of" in str(e)
    else:
        raise AssertionError("a bogus fate was taken")
    r = RewriteResult("p", b"x")
    assert r == RewriteResult("p", b"x", [], {}, [], 0) != RewriteResult("p", b"x", changed=1)
    r.counts["kept"] = 1
    assert RewriteResult("p", b"x").counts == {}  # a dict of its own each
    assert repr(RewriteResult("p", b"")) == ("RewriteResult(path='p', data=b'', reports=[], "
                                             "counts={}, problems=[], changed=0)")
    plan = CheckpointPlan(1, ".", {"files.img": "p"}, {"p": r})
    assert plan == CheckpointPlan(1, ".", {"files.img": "p"}, {"p": r}) and plan.data() == {
        "files.img": b"x"}
    a = AddressMap.from_args(["10.77.0.1=10.77.0.2", "local=10.77.0.9"])
    b = AddressMap.from_args(["10.77.0.1=10.77.0.2", "local=10.77.0.9"])
    assert a == b != AddressMap.from_args(["10.77.0.1=10.77.0.3"]) and AddressMap() == AddressMap()
    assert repr(AddressMap()) == ("AddressMap(rules=[], local={}, port_rules=[], port_offset=0,"
                                  " port_offset_source='')")
    for obj in (r, plan, a):
        try:
            hash(obj)
        except TypeError:
            continue
        raise AssertionError(f"{obj!r} is hashable")


# --- record.NamedTuple: typing.NamedTuple's behaviour without loading typing ----------------

def _make(base: type, body: str) -> type:
    ns: dict[str, object] = {"NT": base, "__name__": "tests.test_record"}
    exec(f"class Point(NT):\n{body}", ns)  # a test's own source
    return ns["Point"]  # type: ignore[return-value]


def _both(body: str) -> tuple[type, type]:
    """The same class body made with record.NamedTuple and with typing.NamedTuple."""
    import typing

    from overlayfs_inetsk import record

    return _make(record.NamedTuple, body), _make(typing.NamedTuple, body)


POINT = '''
    """A point."""
    x: int
    y: int = 0
    tag: str = "p"
    LIMIT = 9

    def norm(self) -> int:
        return abs(self.x) + abs(self.y)

    @property
    def far(self) -> bool:
        return self.norm() > self.LIMIT
'''


def test_the_named_tuple_stand_in_makes_what_typing_makes():
    ours, theirs = _both(POINT)
    assert ours._fields == theirs._fields == ("x", "y", "tag")
    assert ours._field_defaults == theirs._field_defaults == {"y": 0, "tag": "p"}
    assert ours.__doc__ == theirs.__doc__ == "A point."
    assert ours.__module__ == theirs.__module__ == "tests.test_record"
    assert list(ours.__annotations__) == list(theirs.__annotations__)
    for cls in (ours, theirs):
        p = cls(3, y=-4)
        assert isinstance(p, tuple) and tuple(p) == (3, -4, "p")
        assert (p.norm(), p.far, cls(5, 5).far, p.LIMIT) == (7, False, True, 9)
        assert p._replace(tag="q") == (3, -4, "q") and p._asdict()["y"] == -4
        assert repr(p) == "Point(x=3, y=-4, tag='p')" and cls._make((1, 2, "z")).tag == "z"
        assert tuple.__new__(cls, (1, 2, "t")).y == 2  # decide.py builds them so
        assert hash(p) == hash((3, -4, "p")) and p == (3, -4, "p")


@pytest.mark.parametrize("body", ["    x: int = 0\n    y: int\n",
                                  "    x: int\n    def _replace(self): pass\n"])
def test_the_named_tuple_stand_in_refuses_what_typing_refuses(body):
    import typing

    from overlayfs_inetsk import record

    for base in (typing.NamedTuple, record.NamedTuple):
        with pytest.raises((TypeError, AttributeError)):
            _make(base, body)


def test_the_route_s_classes_are_named_tuples_as_before():
    from overlayfs_inetsk.core.decide import Decision
    from overlayfs_inetsk.core.treenode import Entry

    assert issubclass(Entry, tuple) and Entry._fields[:3] == ("name", "path", "lst")
    assert Entry(b"n", b"/p", None).error is None
    assert issubclass(Decision, tuple) and "Decision(" in repr(Decision._make(
        [None] * len(Decision._fields)))
