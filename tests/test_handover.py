"""The plan `restore` hands its mount daemon (planner/view.py encode_handover /
decode_handover): what comes back is what went in, and what is not a handover is one
InetskError naming where it came from, before anything is served."""

from __future__ import annotations

import json

import pytest

from overlayfs_inetsk.errors import InetskError
from overlayfs_inetsk.planner.view import decode_handover, encode_handover

WHAT = "--plan-fd 5"


def test_a_handover_comes_back_as_it_went() -> None:
    plan = {
        "ck1": ((("files.img", 1, 2),), ((2, "10.77.0.2"), (10, "none")),
                {"files.img": b"\x01\x02", "tcp-stream-1.img": b""}),
        "ck2": ((("files.img", 3, 4),), None, {"files.img": b"abc"}),
        "ck3": ((), (), {}),
    }
    assert decode_handover(encode_handover(plan), WHAT) == plan


def _handover(depends: object) -> bytes:
    head = {"ck": {"stamp": [], "depends": depends, "images": {"files.img": [0, 2]}}}
    return json.dumps(head).encode() + b"\n" + b"ab"


@pytest.mark.parametrize("depends", [
    "IPv4 10.77.0.2",  # a text, as mounts before narrow() described the addresses
    [[2]], [[2, "10.77.0.2", 1]], [["2", "10.77.0.2"]], [[2, 7]], [2, "10.77.0.2"], {"2": "x"},
])
def test_depends_that_is_not_address_pairs_is_refused(depends: object) -> None:
    with pytest.raises(InetskError, match=r"--plan-fd 5: not a plan handed over by "
                                          r"restore \(depends: "):
        decode_handover(_handover(depends), WHAT)


def test_well_formed_depends_is_accepted() -> None:
    got = decode_handover(_handover([[2, "10.77.0.2"], [10, "none"]]), WHAT)
    assert got == {"ck": ((), ((2, "10.77.0.2"), (10, "none")), {"files.img": b"ab"})}


@pytest.mark.parametrize("data", [
    b"", b"not json\n", b"[]\n",
    b'{"ck": {"stamp": [], "depends": null, "images": {"files.img": [0, 9]}}}\nab',
    b'{"ck": {"stamp": [], "depends": null}}\n',
])
def test_what_is_not_a_handover_is_refused(data: bytes) -> None:
    with pytest.raises(InetskError, match=r"^--plan-fd 5: not a plan handed over by restore"):
        decode_handover(data, WHAT)
