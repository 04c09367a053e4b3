"""Applying and removing the peers' NAT table (core/natrules.py) in a network namespace,
through `nft -f -` (run inside the namespace with nsenter). Thin: every rule comes from
core/natrules.py; this module only runs nft and reports what it said, in one line.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Sequence

from ..core.natrules import FAMILY, NatConn, apply_script, remove_script, table_name
from ..errors import NatError

log = logging.getLogger(__name__)

NFT_TIMEOUT = 30.0  # seconds for one nft run (a transaction of a few rules takes ms)


def _argv(netns: str | None, *args: str) -> list[str]:
    nft = shutil.which("nft")
    if nft is None:
        raise NatError("nft not found: the NAT rules need nftables (apt-get install nftables)")
    pre = [] if netns is None else ["nsenter", f"--net={netns}", "--"]
    return [*pre, nft, *args]


def _where(netns: str | None) -> str:
    return "this network namespace" if netns is None else netns


def nft(netns: str | None, args: Sequence[str], text: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    """Run nft (in `netns`, None: ours) with `text` on stdin; NatError when it cannot run."""
    argv = _argv(netns, *args)
    try:
        return subprocess.run(argv, input=text, capture_output=True, text=True,
                              timeout=NFT_TIMEOUT,
                              stdin=subprocess.DEVNULL if text is None else None)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NatError(f"{' '.join(argv)}: {exc}") from None


def _fail(what: str, netns: str | None, cp: subprocess.CompletedProcess[str]) -> NatError:
    said = " ".join(cp.stderr.split()) or f"exit {cp.returncode}"
    return NatError(f"{what} in {_where(netns)}: nft: {said}")


def has_table(netns: str | None, name: str) -> bool:
    cp = nft(netns, ["list", "table", FAMILY, name])
    if cp.returncode == 0:
        return True
    if "No such file or directory" in cp.stderr:
        return False
    raise _fail(f"cannot list table {FAMILY} {name}", netns, cp)


def ruleset_text(netns: str | None) -> str:
    """`nft list ruleset` of the namespace (for checks and tests)."""
    cp = nft(netns, ["list", "ruleset"])
    if cp.returncode != 0:
        raise _fail("cannot list the ruleset", netns, cp)
    return cp.stdout


def apply(peers: Sequence[str | None], conns: Sequence[NatConn], source: str = "") -> str:
    """Apply the table of `conns` in every peer namespace (one atomic transaction each; a
    table already there is replaced). On a failure the table is removed again from the
    peers done so far, then NatError. Returns the table's name."""
    name = table_name(conns)
    text = apply_script(conns, source)
    if not text:
        return name
    done: list[str | None] = []
    for peer in peers:
        cp = nft(peer, ["-f", "-"], text)
        if cp.returncode != 0:
            exc = _fail(f"cannot add table {FAMILY} {name}", peer, cp)
            try:
                remove(done, name)
            except NatError as more:
                exc.args = (f"{exc}; and {more}",)
            raise exc
        done.append(peer)
        log.info("table %s %s (%d connection(s)) added in %s", FAMILY, name, len(conns),
                 _where(peer))
    return name


def remove(peers: Sequence[str | None], name: str) -> list[str | None]:
    """Remove table `name` from every peer namespace that has it; returns those it was
    removed from. Every failure is named (NatError, one line) after the others are done."""
    problems: list[str] = []
    removed: list[str | None] = []
    text = remove_script(name)
    for peer in peers:
        try:
            there = has_table(peer, name)
            if not there:
                continue
            cp = nft(peer, ["-f", "-"], text)
            if cp.returncode != 0:
                problems.append(str(_fail(f"cannot delete table {FAMILY} {name}", peer, cp)))
                continue
        except NatError as exc:
            problems.append(str(exc))
            continue
        removed.append(peer)
        log.info("table %s %s removed from %s", FAMILY, name, _where(peer))
    if problems:
        raise NatError("; ".join(problems))
    return removed
