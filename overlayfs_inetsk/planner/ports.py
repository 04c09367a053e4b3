"""The port check, a step of the planner: which of the ports a planned restore binds are
taken in its target network namespace (core/portcheck.py says what holds a port; the tables
come from host/proctables.py), and which of its addresses the namespace does not have
(core/addrcheck.py; the addresses come from host/nodeaddr.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from ..core.addrcheck import absent
from ..core.plan import RewriteResult
from ..core.portcheck import Clash, Want, clashes, wants_of
from ..errors import PortTakenError, RewriteError
from ..host.nodeaddr import local_addresses
from ..host.proctables import read_tables


def taken(wants: Iterable[Want], netns: str | None = None) -> list[Clash]:
    """The wanted endpoints already taken in the namespace at path `netns` (None: ours).
    Raises NodeAddressError when the namespace cannot be entered."""
    where = f"netns {netns}" if netns else "this network namespace"
    return clashes(list(wants), read_tables(netns), where)




def check_plan(results: Mapping[str, RewriteResult], netns: str | None, strict: bool,
               warn: Callable[[str], None]) -> list[Clash]:
    """The port check of a planned restore (core.plan results by path): each taken port,
    then each bound address the namespace does not have, is passed to `warn` as one line;
    with `strict`, PortTakenError (RewriteError) names the first instead."""
    reports = [r for res in results.values() for r in res.reports]
    wants = wants_of(reports)
    found = taken(wants, netns)
    if found and strict:  # one line: the error alone
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise PortTakenError(f"{found[0]}{more} (--strict)")
    where = f"netns {netns}" if netns else "this network namespace"
    missing = absent(wants, local_addresses(netns), where)
    if missing and strict:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise RewriteError(f"{missing[0]}{more} (--strict)")
    for c in found:
        warn(f"{c}: the restore would fail there (EADDRINUSE)")
    for m in missing:
        warn(str(m))
    return found
