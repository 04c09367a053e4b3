"""The error types every layer raises for bad input, with the CLI's exit code for each.

Each message is one line that names the file (and entry offset, where there is one) and what
is wrong, so the CLI can print it as is and the daemon can log it as is.
"""

from __future__ import annotations


class InetskError(Exception):
    """A problem with the user's input or environment (never a bug): exit code 1."""

    exit_code = 1


class MapError(InetskError):
    """An address-map rule or map file is invalid: exit code 3."""

    exit_code = 3


class ImageError(InetskError):
    """A CRIU image file is malformed or unreadable: exit code 4."""

    exit_code = 4

    def __init__(self, path: str, what: str, offset: int | None = None) -> None:
        self.path = path
        self.offset = offset
        self.what = what
        where = f"{path}" if offset is None else f"{path}: entry at offset {offset}"
        super().__init__(f"{where}: {what}")


class RewriteError(InetskError):
    """The rewrite cannot be done as asked (auto target unresolved, --strict violation, a
    socket refused by the `fail` fate): exit code 5."""

    exit_code = 5


class PortRangeError(RewriteError):
    """A port offset pushes a socket's port out of 1..65535: exit code 5. The planner turns
    it into a refused socket, named (`fields`: the port, the offset, the port it would
    get, where the offset came from)."""

    def __init__(self, port: int, offset: int, new: int, source: str) -> None:
        self.fields = (port, offset, new, source)
        super().__init__(f"port {port} {offset:+d} = {new} is out of range (1-65535) "
                         f"({source})")


class PortTakenError(RewriteError):
    """With --strict, a port the restore would bind is taken in the target network
    namespace: exit code 5 (without --strict it is a warning)."""


class MountError(InetskError):
    """The mount cannot be made or found (mountpoint, fuse, not our mount): exit code 6."""

    exit_code = 6


class BarrierError(InetskError):
    """The group barrier failed (timeout, an aborted group, a stale or bad directory):
    exit code 7. As an action script, a non-zero exit makes CRIU abort the restore."""

    exit_code = 7


class RestoreError(InetskError):
    """The restore cannot start (criu missing, no CRIU images, a reserved criu option):
    exit code 1."""


class NodeAddressError(InetskError):
    """The namespace or interface `auto` refers to is missing or unusable: exit code 1."""


class TreeError(InetskError):
    """IMAGE_DIR cannot be used as a tree (missing, not a directory, unreadable, a bad serve
    mode or link root): exit code 1."""


class NatError(InetskError):
    """The peers' NAT rules (fate nat) could not be applied or removed (nft missing or
    refusing, a peer network namespace missing): exit code 8. As an action script, a
    non-zero exit makes CRIU abort the restore."""

    exit_code = 8
