"""A planned socket as inspect, errors and log lines show it: the socket's facts and its
Decision (decide.py), side by side. A view of the decision, which it never changes; the
reasons are rendered here, with the socket's own addresses (reasons.py).

Pure. The table and the JSON are cli/render.py's.
"""

from __future__ import annotations

from .. import lazylog
from .decide import Decision
from .reasons import Reason, text
from .sockaddr import SOCK_STREAM, IPAddress, fmt_endpoint
from .sockets import Socket

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from typing import NamedTuple
else:
    from ..record import NamedTuple

log = lazylog.getLogger("overlayfs_inetsk.core.decide")  # the -v decision lines


class SocketReport(NamedTuple):
    """One socket and its decision."""

    sock: Socket
    decision: Decision

    # the socket (its facts and their names: Socket)
    @property
    def file(self) -> str:
        return self.sock.file

    @property
    def offset(self) -> int:
        return self.sock.offset

    @property
    def id(self) -> int:
        return self.sock.id

    @property
    def src(self) -> IPAddress:
        return self.sock.src

    @property
    def sport(self) -> int:
        return self.sock.sport

    @property
    def dst(self) -> IPAddress:
        return self.sock.dst

    @property
    def dport(self) -> int:
        return self.sock.dport

    @property
    def local(self) -> str:
        return self.sock.local

    @property
    def remote(self) -> str:
        return self.sock.remote

    # the decision
    @property
    def klass(self) -> str:
        return self.decision.klass

    @property
    def verdict(self) -> str:
        return self.decision.verdict

    @property
    def reasons(self) -> tuple[Reason, ...]:
        return self.decision.reasons

    @property
    def reason(self) -> str:
        """The reasons as one line."""
        return text(self.decision.reasons, self.sock)

    @property
    def new_src(self) -> IPAddress | None:
        return self.decision.new_src

    @property
    def new_dst(self) -> IPAddress | None:
        return self.decision.new_dst

    @property
    def new_sport(self) -> int | None:
        return self.decision.new_sport

    @property
    def new_dport(self) -> int | None:
        return self.decision.new_dport

    @property
    def peer_nat(self) -> bool:
        return self.decision.peer_nat

    @property
    def new_local(self) -> str | None:
        """The new local endpoint, or None when neither its address nor its port moves."""
        d, s = self.decision, self.sock
        if d.new_src is None and d.new_sport is None:
            return None
        return fmt_endpoint(s.src if d.new_src is None else d.new_src,
                            s.sport if d.new_sport is None else d.new_sport)

    @property
    def new_remote(self) -> str | None:
        d, s = self.decision, self.sock
        if d.new_dst is None and d.new_dport is None:
            return None
        return fmt_endpoint(s.dst if d.new_dst is None else d.new_dst,
                            s.dport if d.new_dport is None else d.new_dport)

    @property
    def binds(self) -> tuple[str, int, IPAddress, int] | None:
        """(table, family, address, port) the restore binds this socket's own port at (its
        new local endpoint), or None (decide.Decision.binds)."""
        d, s = self.decision, self.sock
        if d.binds is None:
            return None
        return (d.binds, s.family, s.src if d.new_src is None else d.new_src,
                s.sport if d.new_sport is None else d.new_sport)

    def line(self) -> str:
        """The socket and its verdict, as errors name it."""
        s = self.sock
        return (f"{s.file}: socket id {s.id} {s.kind} {s.local} -> {s.remote}: "
                f"{self.verdict}: {self.reason}")


def log_decision(r: SocketReport) -> None:
    """One DEBUG line per socket: where, what, the verdict, the new endpoints, why."""
    s = r.sock
    new = ""
    if r.new_local is not None or r.new_remote is not None:
        d = r.decision
        new_l = fmt_endpoint(d.new_src if d.new_src is not None else s.src,
                             s.sport if d.new_sport is None else d.new_sport)
        new_r = fmt_endpoint(d.new_dst if d.new_dst is not None else s.dst,
                             s.dport if d.new_dport is None else d.new_dport)
        new = f" => {new_l} -> {new_r}"
    log.debug("%s@%d: socket id %d %s %s %s -> %s: %s%s (%s)", s.file, s.offset, s.id,
              s.kind_label, s.state_name if s.type == SOCK_STREAM else "-", s.local,
              s.remote, r.verdict, new, r.reason)
