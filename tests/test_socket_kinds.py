"""Each socket's own class, verdict and reason (core/decide.py): the decision shared by
sockets with one key must not carry a reason that depends on a field left out of the key
(issue 14)."""

from __future__ import annotations

import pytest

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk
from overlayfs_inetsk.core.addrmap import AddressMap
from overlayfs_inetsk.core.decide import RewriteOptions
from overlayfs_inetsk.core.plan import plan_checkpoint

MAP = ["10.0.1.0/24=10.77.1.0/24", "fd00::/64=fd77::/64"]


def plan(*entries, specs=MAP):
    data = files_img(*(inet_file_entry(e) for e in entries))
    res = plan_checkpoint({"files.img": data}, AddressMap.from_args(specs), None,
                          RewriteOptions())
    return res["files.img"].reports


@pytest.mark.parametrize("order", ["unbound-first", "bound-first"])
@pytest.mark.parametrize("proto, state, src", [
    ("udp", 7, "0.0.0.0"), ("udp", 7, "::"),
    ("tcp", 7, "0.0.0.0"), ("tcp", 7, "::"),  # zdtm socket-tcp-unconn / socket-tcp6-unconn
])
def test_reason_follows_each_sockets_own_port(order, proto, state, src):
    unbound = isk(1, src, 0, proto=proto, state=state)
    bound = isk(2, src, 5353, proto=proto, state=state)
    sks = [unbound, bound] if order == "unbound-first" else [bound, unbound]
    reasons = {r.id: r.reason for r in plan(*sks)}
    assert reasons == {1: "not bound", 2: "bound to any address"}
