"""When CRIU's UPDATE_INETSK hook can apply a plan exactly, and the table it then applies.

Pure. CRIU (from the release after 4.2.1; docs/upstream-hook.md) calls the hook once per
inet socket entry with (family, state, src words, dst words) and lets it change the address
words only. It sees no ports, no protocol, no socket id. So the plan made by the one
decision logic (core/plan.py, core/decide.py) can go through the hook only when:
  - every decision is address-only (the Decision's `hook`, set by decide.py): new src
    and/or dst, or a socket left alone. A `closed` connection (--tcp-outside close)
    rewrites state, ports and shutdown, and a port rule or --port-offset rewrites ports:
    only the view can do that;
  - sockets the hook cannot tell apart (same family, state, src and dst words) all get the
    same change;
  - the table stays small (MAX_ENTRIES distinct keys; the answer is one message).
Otherwise the caller makes the view, as on CRIU 4.2.1. Refused sockets never get here:
the planner fails the restore at init, with one line, on both paths.

Wire form (one line per distinct key, all numbers hex; words are the image's u32 values,
the very values CRIU hands the hook):
    TABLE <n>
    <family> <state> <s0> <s1> <s2> <s3> <d0> <d1> <d2> <d3> M <ns0..ns3> <nd0..nd3>
    <family> <state> <s0> <s1> <s2> <s3> <d0> <d1> <d2> <d3> L
An AF_INET key uses word 0 (the others are 0). `M` = set these addresses, return 0;
`L` = leave the socket alone, return -ENOTSUP (another plugin may take it). A socket whose
key is not in the table was not in the plan (files.img changed after init): the hook fails
the restore with one line rather than guess.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .decide import HOOK_LEAVE, HOOK_NO_CLOSED, HOOK_NO_PORTS, HOOK_SET
from .plan import RewriteResult
from .report import SocketReport
from .sockaddr import AF_INET, IPAddress, addr_to_words

MAX_ENTRIES = 512

Words = tuple[int, int, int, int]


@dataclass(frozen=True)
class HookEntry:
    family: int
    state: int
    src: Words
    dst: Words
    new_src: Words | None = None  # None and None: leave alone (-ENOTSUP)
    new_dst: Words | None = None

    @property
    def moves(self) -> bool:
        return self.new_src is not None

    def line(self) -> str:
        head = " ".join(f"{x:x}" for x in (self.family, self.state, *self.src, *self.dst))
        if self.new_src is None or self.new_dst is None:
            return f"{head} L"
        return f"{head} M " + " ".join(f"{x:x}" for x in (*self.new_src, *self.new_dst))


@dataclass(frozen=True)
class HookPlan:
    entries: tuple[HookEntry, ...] | None  # None: the hook cannot apply this plan exactly
    why_not: str = ""

    @property
    def changed(self) -> int:
        return sum(e.moves for e in self.entries or ())

    def wire(self) -> str:
        assert self.entries is not None
        return "\n".join([f"TABLE {len(self.entries)}", *(e.line() for e in self.entries)])


def _words(addr: IPAddress, family: int) -> Words:
    w = addr_to_words(addr)
    if family == AF_INET:
        w = w[:1]
    w += [0, 0, 0, 0]
    return w[0], w[1], w[2], w[3]


def _entry(r: SocketReport) -> HookEntry | str:
    """The socket's entry, or why the hook cannot do what its decision says."""
    d, sk = r.decision, r.sock
    src, dst = _words(sk.src, sk.family), _words(sk.dst, sk.family)
    if d.hook == HOOK_SET:
        new_src = _words(sk.src if d.new_src is None else d.new_src, sk.family)
        new_dst = _words(sk.dst if d.new_dst is None else d.new_dst, sk.family)
        return HookEntry(sk.family, sk.state, src, dst, new_src, new_dst)
    if d.hook == HOOK_LEAVE:
        return HookEntry(sk.family, sk.state, src, dst)
    if d.hook == HOOK_NO_PORTS:
        return (f"socket id {sk.id} ({sk.local} -> {sk.remote}) moves to another port, which "
                "the hook cannot change")
    if d.hook == HOOK_NO_CLOSED:
        return (f"socket id {sk.id} ({sk.local} -> {sk.remote}) is restored closed "
                "(--tcp-outside close): that changes its state and ports, which the hook "
                "cannot")
    return f"socket id {sk.id} is {d.verdict}"


def hook_plan(results: Mapping[str, RewriteResult] | Iterable[SocketReport],
              max_entries: int = MAX_ENTRIES) -> HookPlan:
    """The table for a plan made with reports=True (every socket's report), or why not."""
    reports: Iterable[SocketReport]
    if isinstance(results, Mapping):
        reports = (r for res in results.values() for r in res.reports)
    else:
        reports = results
    table: dict[tuple[int, int, Words, Words], HookEntry] = {}
    for r in reports:
        e = _entry(r)
        if isinstance(e, str):
            return HookPlan(None, e)
        key = (e.family, e.state, e.src, e.dst)
        have = table.setdefault(key, e)
        if have != e:
            return HookPlan(None, f"socket id {r.id} ({r.local} -> {r.remote}) needs another "
                                  "change than a socket the hook cannot tell from it (same "
                                  "family, state and addresses; the hook sees no ports)")
        if len(table) > max_entries:
            return HookPlan(None, f"more than {max_entries} distinct sockets for the hook")
    return HookPlan(tuple(table.values()))
