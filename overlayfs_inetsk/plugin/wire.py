"""The plugin <-> planner protocol: every limit and name both sides use, defined once.

The C plugin includes plugin/inetsk_wire.h, which is generated from this module
(`python -m overlayfs_inetsk.plugin.wire_h > plugin/inetsk_wire.h`, or `make -C plugin
wire-header`; a test fails when the checked-in header is not what header() prints). docs/plugin.md, "The protocol", says the rest.

One request, one reply, each one SOCK_SEQPACKET message (the agent's socket, or the
socketpair the plugin hands the CLI as fd 3):
  request  `OVERLAYFS-INETSK-VIEW 2 pid=N deadline=MS [hook=1]`, then NUL-separated
           KEY=VALUE (CRIU's OVERLAYFS_INETSK_* and INETSK_* variables); SCM_RIGHTS
           [images dir, network namespace]. MS: CLOCK_MONOTONIC milliseconds by which the
           plugin stops waiting. pid: criu's pid as criu sees it, for log lines only.
  reply    `NONE <why>` | `ERR <message>` | `TABLE <n>` + n lines (hooktable.py), no fd;
           `VIEW view-<32 hex>`: one entry of VIEW_ROOT, with exactly one fd, that
           directory, on which the planner holds flock(LOCK_SH): the view lives while any
           copy of that open file is open (viewroot.py).
  check    `OVERLAYFS-INETSK-CHECK 2`, no fds (`agent --check`, doctor: not the C plugin)
  reply    `OK overlayfs-inetsk <version> protocol 2 pid <the agent's pid, as it sees it>`
Pure: no I/O; cheap to import (the CLI's parser reads
AGENT_SOCKET and VIEW_ROOT from here).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping

PROTOCOL = 2
MAGIC = "OVERLAYFS-INETSK-VIEW"
CHECK_MAGIC = "OVERLAYFS-INETSK-CHECK"  # the liveness request: the agent answers OK ...
CHECK_MS = 2000  # `agent --check`'s default deadline (connect + send + reply)
DEADLINE_PASSED = "the request's deadline passed"  # how every late ERR begins
REQUEST_MAX = 65536  # bytes of one request (header + environment)
REPLY_MAX = 131072  # bytes of one reply (a full hook table fits: checked below)
TABLE_MAX = 512  # rows of a hook table (app/plugin_view passes it to core.hooktable.hook_plan)
TABLE_LINE_MAX = 256  # bytes of one table row with its NUL (inetsk_hook.c's line buffer)
REQUEST_FDS = 2  # images dir, network namespace
TIMEOUT_MS = 30000  # default: connect + send + reply (or the CLI) of one restore
TIMEOUT_MAX_MS = 600000  # the largest timeout-ms a config or the environment may set
READ_MS = 2000  # the planner waits this long for a connected client's request
MAX_IN_FLIGHT = 32  # requests the agent serves at once (more wait in its backlog)
BACKLOG = 64
AGENT_SOCKET = "/run/overlayfs-inetsk/agent.sock"
VIEW_ROOT = "/run/overlayfs-inetsk/plugin"
VIEW_PREFIX = "view-"
VIEW_HEX = 32  # hex digits after VIEW_PREFIX (16 random bytes)
CONF_NAME = "overlayfs-inetsk-plugin.conf"  # beside the .so (CRIU loads only *.so)
CONF_MAX = 4096  # bytes of that file
CLI_FD = 3  # the CLI's end of the socketpair
ENV_AGENT_SOCKET = "OVERLAYFS_INETSK_AGENT_SOCK"
ENV_CLI = "OVERLAYFS_INETSK_CLI"
ENV_TIMEOUT = "OVERLAYFS_INETSK_TIMEOUT_MS"
ENV_PREFIXES = ("OVERLAYFS_INETSK_", "INETSK_")  # what the plugin forwards of its environment
PID_MAX_DIGITS = 10  # a pid longer than this is logged as "?"

VIEW_NAME = re.compile(rf"{VIEW_PREFIX}[0-9a-f]{{{VIEW_HEX}}}")
# offline.write_view_dir's temporary dir for a view: `.` + the view's name + `.` + mkdtemp's
TEMP_NAME = re.compile(rf"\.{VIEW_PREFIX}[0-9a-f]{{{VIEW_HEX}}}\.[a-z0-9_]+")
# the longest table row: 10 head words, `M`, 8 new words, each word up to 8 hex digits
_TABLE_ROW = 18 * 8 + 17 + 1
assert _TABLE_ROW < TABLE_LINE_MAX
assert len(f"TABLE {TABLE_MAX}") + TABLE_MAX * (_TABLE_ROW + 1) < REPLY_MAX


class RequestError(Exception):
    """A request that cannot be served; the message is the ERR line's text, reason a word
    for the agent's counters: "malformed" or "protocol" (another version)."""

    def __init__(self, message: str, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason


class Request:
    """pid: criu's pid as it says (untrusted: log lines only); deadline: time.monotonic()
    seconds; hook: CRIU calls UPDATE_INETSK; env: the forwarded variables."""

    __slots__ = ("pid", "deadline", "hook", "env")

    def __init__(self, pid: int | None, deadline: float, hook: bool, env: dict[str, str]):
        self.pid, self.deadline, self.hook, self.env = pid, deadline, hook, env

    @property
    def who(self) -> str:
        return f"criu pid {self.pid if self.pid is not None else '?'}"


def monotonic_ms() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1_000_000


def encode_request(pid: int, deadline_ms: int, env: Mapping[str, str], hook: bool = False
                   ) -> bytes:
    """A request as the C plugin builds it (tests, and a Python client)."""
    head = f"{MAGIC} {PROTOCOL} pid={pid} deadline={deadline_ms}" + (" hook=1" if hook else "")
    items = [f"{k}={v}" for k, v in env.items() if k.startswith(ENV_PREFIXES)]
    return "\0".join([head, *items]).encode() + b"\0"


def _pid(value: bytes) -> int | None:
    if not value.isdigit() or len(value) > PID_MAX_DIGITS:
        return None
    pid = int(value)
    return pid if 0 < pid < 2**31 else None


def parse_request(data: bytes, now_ms: int | None = None) -> Request:
    """The request in data (RequestError says what is wrong). The deadline is read as
    CLOCK_MONOTONIC ms (criu and the planner share that clock) and never trusted beyond
    TIMEOUT_MAX_MS from now."""
    parts = data.split(b"\0")
    head = parts[0].split(b" ")
    if not head or head[0] != MAGIC.encode():
        raise RequestError(f"not a plugin request: {parts[0][:80]!r}")
    if len(head) < 2 or head[1] != str(PROTOCOL).encode():
        version = head[1][:16].decode("ascii", "replace") if len(head) > 1 else "?"
        raise RequestError(f"the plugin speaks protocol {version}, this planner {PROTOCOL}: "
                           "install the plugin and the agent of one release "
                           "(overlayfs-inetsk plugin install; restart the agent)", "protocol")
    fields: dict[bytes, bytes] = {}
    for word in head[2:]:
        name, sep, val = word.partition(b"=")
        fields[name] = val if sep else b"1"
    now = monotonic_ms() if now_ms is None else now_ms
    raw = fields.get(b"deadline", b"")
    if not raw.isdigit() or len(raw) > 20:
        raise RequestError(f"bad deadline in {parts[0][:120]!r}")
    deadline_ms = min(int(raw), now + TIMEOUT_MAX_MS)
    env: dict[str, str] = {}
    for item in parts[1:]:
        if not item:
            continue
        key, eq, value = item.decode("utf-8", "replace").partition("=")
        if eq and key.startswith(ENV_PREFIXES):
            env[key] = value
    return Request(pid=_pid(fields.get(b"pid", b"")),
                   deadline=time.monotonic() + (deadline_ms - now) / 1000,
                   hook=fields.get(b"hook") == b"1", env=env)


def is_check(data: bytes) -> bool:
    return data.split(b"\0", 1)[0].split(b" ")[0] == CHECK_MAGIC.encode()


def encode_check() -> bytes:
    return f"{CHECK_MAGIC} {PROTOCOL}".encode()


def check_reply(version: str, pid: int) -> str:
    return f"OK overlayfs-inetsk {version} protocol {PROTOCOL} pid {pid}"


CHECK_REPLY = re.compile(r"OK overlayfs-inetsk (\S+) protocol (\d+) pid (\d+)")


def view_reply(name: str) -> str:
    assert VIEW_NAME.fullmatch(name), name
    return f"VIEW {name}"


# -- the C header ---------------------------------------------------------------------------
def _c_string(s: str) -> str:
    assert all(32 <= ord(c) < 127 and c not in '"\\' for c in s), s
    return f'"{s}"'


def header() -> str:
    # the socket image cap is the planner's own (core may import nothing of plugin/, and the
    # CLI's parser, which imports this module, must not load core: hence here, not above)
    from ..core.imagedir import SOCKET_IMAGE_MAX

    ints = [("SOCKET_IMAGE_MAX", SOCKET_IMAGE_MAX), ("PROTOCOL", PROTOCOL), ("REQUEST_MAX", REQUEST_MAX), ("REPLY_MAX", REPLY_MAX),
            ("TABLE_MAX", TABLE_MAX), ("TABLE_LINE_MAX", TABLE_LINE_MAX),
            ("REQUEST_FDS", REQUEST_FDS), ("TIMEOUT_MS", TIMEOUT_MS),
            ("TIMEOUT_MAX_MS", TIMEOUT_MAX_MS), ("VIEW_HEX", VIEW_HEX),
            ("CONF_MAX", CONF_MAX), ("CLI_FD", CLI_FD)]
    strs = [("MAGIC", MAGIC), ("AGENT_SOCKET", AGENT_SOCKET), ("VIEW_ROOT", VIEW_ROOT),
            ("VIEW_PREFIX", VIEW_PREFIX), ("CONF_NAME", CONF_NAME),
            ("ENV_AGENT_SOCKET", ENV_AGENT_SOCKET), ("ENV_CLI", ENV_CLI),
            ("ENV_TIMEOUT", ENV_TIMEOUT), ("ENV_PREFIX_0", ENV_PREFIXES[0]),
            ("ENV_PREFIX_1", ENV_PREFIXES[1])]
    lines = ["/* Generated by `python -m overlayfs_inetsk.plugin.wire_h` from",
             " * overlayfs_inetsk/plugin/wire.py: do not edit (tests/test_plugin_viewmaker.py",
             " * checks it is what the generator prints). */",
             "#ifndef INETSK_WIRE_H", "#define INETSK_WIRE_H", ""]
    lines += [f"#define INETSK_WIRE_{k} {v}" for k, v in ints]
    lines += [f"#define INETSK_WIRE_{k} {_c_string(v)}" for k, v in strs]
    lines += ["", "#endif", ""]
    return "\n".join(lines)

