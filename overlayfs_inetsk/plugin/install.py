"""`overlayfs-inetsk plugin install|remove`: put the CRIU plugin where CRIU loads it.

CRIU loads every `*.so` of its plugin dir: `-L/--libdir`, else $CRIU_LIBS_DIR, else the
`lib` option of its config files, else its built-in default (/usr/lib/criu, which
`criu --help` names). Install copies the built .so there (mode 755, atomically: a copy
renamed into place) and writes, beside it, the plugin's config file
(overlayfs-inetsk-plugin.conf: the CLI it runs when no agent answers, or `none`, the agent's
socket, the timeout; CRIU ignores files not ending in .so). Both are idempotent. Under a
container runtime CRIU gets none of our environment, so the file is how the plugin is set
up there; the plugin reads it only when it is a regular root-owned file that neither group
nor others may write (it names a program run as root).
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import InetskError
from . import DEFAULT_LIBDIR
from .wire import AGENT_SOCKET, CONF_MAX, CONF_NAME, TIMEOUT_MAX_MS, TIMEOUT_MS

SO_NAME = "overlayfs_inetsk_plugin.so"
CLI_CONF = CONF_NAME
OLD_CLI_CONF = "overlayfs-inetsk-plugin.cli"  # before the config file: one line, the CLI
INSTALLED_SO = f"/usr/local/lib/overlayfs-inetsk/{SO_NAME}"  # where scripts/setup.sh puts it
ENV_SO = "OVERLAYFS_INETSK_PLUGIN_SO"
SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path), with its NUL
_REPO_SO = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "plugin", "build", SO_NAME)


@dataclass(frozen=True)
class PluginConf:
    """The plugin's config file. cli: an absolute path, "none" (no fallback), or None (the
    CLI beside this interpreter, at install)."""

    cli: str | None = None
    agent_socket: str = AGENT_SOCKET
    timeout_ms: int = TIMEOUT_MS

    def text(self) -> str:
        return ("# the overlayfs-inetsk CRIU plugin's configuration, written by "
                "`overlayfs-inetsk plugin install`\n"
                "# (docs/plugin.md); read only when root-owned and not writable by group or "
                "others\n"
                f"cli {self.cli}\nagent-socket {self.agent_socket}\n"
                f"timeout-ms {self.timeout_ms}\n")


def parse_conf(text: str, path: str) -> PluginConf:
    """The plugin's own reading of its config file (the C plugin applies the same rules):
    `cli PATH|none`, `agent-socket PATH`, `timeout-ms N`; `#` starts a comment."""
    seen: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, value = line.replace("\t", " ").partition(" ")
        value = value.strip(" \t")
        where = f"{path}:{n}"
        if key not in ("cli", "agent-socket", "timeout-ms"):
            raise InetskError(f"{where}: unknown setting {key!r} (cli, agent-socket, "
                              "timeout-ms)")
        if key in seen:
            raise InetskError(f"{where}: {key} is set twice")
        if not value:
            raise InetskError(f"{where}: {key} needs a value")
        if key == "cli" and value != "none" and not value.startswith("/"):
            raise InetskError(f"{where}: cli must be an absolute path or none, not {value!r}")
        if key == "agent-socket" and (not value.startswith("/")
                                      or len(value.encode()) >= SUN_PATH_MAX):
            raise InetskError(f"{where}: agent-socket must be an absolute path shorter than "
                              f"{SUN_PATH_MAX} bytes")
        if key == "timeout-ms" and not (value.isdigit() and 0 < int(value) <= TIMEOUT_MAX_MS):
            raise InetskError(f"{where}: timeout-ms must be 1 to {TIMEOUT_MAX_MS}, not "
                              f"{value!r}")
        seen[key] = value
    return PluginConf(cli=seen.get("cli"), agent_socket=seen.get("agent-socket", AGENT_SOCKET),
                      timeout_ms=int(seen.get("timeout-ms", TIMEOUT_MS)))


def read_conf(path: str) -> PluginConf | None:
    """The config file at path as the plugin reads it (None: absent); InetskError when the
    plugin would refuse it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InetskError(f"{path}: {e.strerror}"
                          + (" (a symlink is not followed)" if e.errno == 40 else "")) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InetskError(f"{path}: not a regular file")
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise InetskError(f"{path}: must be owned by root and not writable by group or "
                              f"others (uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})")
        data = f.read(CONF_MAX + 1)
    if len(data) > CONF_MAX:
        raise InetskError(f"{path}: larger than {CONF_MAX} bytes")
    try:
        return parse_conf(data.decode("utf-8"), path)
    except UnicodeDecodeError:
        raise InetskError(f"{path}: not UTF-8 text") from None


def built_so(env: Mapping[str, str] | None = None) -> str:
    """The built plugin: $OVERLAYFS_INETSK_PLUGIN_SO, the source tree's own build (when this
    package runs from a checkout), or setup.sh's copy."""
    env = os.environ if env is None else env
    for path in (env.get(ENV_SO), _REPO_SO, INSTALLED_SO):
        if path and os.path.isfile(path):
            return path
    raise InetskError(f"no built plugin ({INSTALLED_SO} missing): run scripts/setup.sh "
                      f"(or make -C plugin), or set ${ENV_SO}")


def default_cli() -> str:
    """The CLI the plugin should run: the console script beside this interpreter, else the
    one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "overlayfs-inetsk")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("overlayfs-inetsk")
    if found:
        return os.path.abspath(found)
    raise InetskError("overlayfs-inetsk is not on PATH: pass --cli PATH (or --no-cli)")


def _put(path: str, data: bytes | None, src: str | None, mode: int) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        if src is not None:
            shutil.copyfile(src, tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data or b"")
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def install(libdir: str = DEFAULT_LIBDIR, so: str | None = None,
            conf: PluginConf | None = None) -> list[str]:
    """Install; returns what changed (empty when all was in place already)."""
    so = so or built_so()
    conf = conf or PluginConf()
    if conf.cli is None:
        conf = PluginConf(default_cli(), conf.agent_socket, conf.timeout_ms)
    parse_conf(conf.text(), "the config to write")  # what the plugin will accept
    done = []
    try:
        if not os.path.isdir(libdir):
            os.makedirs(libdir, mode=0o755)
            done.append(f"made {libdir}")
        dest = os.path.join(libdir, SO_NAME)
        if not (os.path.isfile(dest) and filecmp.cmp(so, dest, shallow=False)):
            _put(dest, None, so, 0o755)
            done.append(f"installed {dest}")
        elif os.stat(dest).st_mode & 0o777 != 0o755:
            os.chmod(dest, 0o755)
            done.append(f"chmod 755 {dest}")
        path = os.path.join(libdir, CLI_CONF)
        want = conf.text().encode()
        try:
            with open(path, "rb") as f:
                have = f.read()
            st = os.lstat(path)
            fine = stat.S_ISREG(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022
        except FileNotFoundError:
            have, fine = None, False
        if have != want or not fine:
            _put(path, want, None, 0o644)
            done.append(f"wrote {path} (cli {conf.cli}, agent-socket {conf.agent_socket}, "
                        f"timeout-ms {conf.timeout_ms})")
        old = os.path.join(libdir, OLD_CLI_CONF)
        if os.path.lexists(old):
            os.unlink(old)
            done.append(f"removed {old} (replaced by {CLI_CONF})")
    except OSError as e:
        raise InetskError(f"{libdir}: cannot install the plugin: {e.strerror or e}") from None
    return done


def remove(libdir: str = DEFAULT_LIBDIR) -> list[str]:
    done = []
    for name in (SO_NAME, CLI_CONF, OLD_CLI_CONF):
        path = os.path.join(libdir, name)
        try:
            os.unlink(path)
            done.append(f"removed {path}")
        except FileNotFoundError:
            pass
        except OSError as e:
            raise InetskError(f"{path}: cannot remove: {e.strerror}") from None
    return done


# -- which CRIU loads it (doctor) ---------------------------------------------------------
Runner = Callable[..., subprocess.CompletedProcess[str]]


def _config_libdir(paths: tuple[str, ...]) -> tuple[str, str] | None:
    """(dir, file) from the last `lib`/`libdir` option of CRIU's config files."""
    found = None
    for path in paths:
        try:
            with open(path) as f:
                for line in f:
                    words = line.split("#", 1)[0].split()
                    if len(words) == 2 and words[0].lstrip("-") in ("lib", "libdir", "L"):
                        found = (words[1], path)
        except OSError:
            continue
    return found


def criu_plugin_dir(criu: str, env: Mapping[str, str], run: Runner = subprocess.run
                    ) -> tuple[str, str]:
    """(plugin dir, why) for plain `criu restore` by this criu."""
    if env.get("CRIU_LIBS_DIR"):
        return env["CRIU_LIBS_DIR"], "$CRIU_LIBS_DIR"
    conf = _config_libdir(("/etc/criu/default.conf",))
    if conf is not None:
        return conf[0], f"`lib` in {conf[1]}"
    try:
        cp = run([criu, "--help"], capture_output=True, text=True, timeout=20,
                 env=dict(env), stdin=subprocess.DEVNULL)
        m = re.search(r"--libdir\s.*?by default (\S+?)/?\)", cp.stdout + cp.stderr)
    except (OSError, subprocess.TimeoutExpired):
        m = None
    if m:
        return m.group(1), f"{criu}'s built-in default"
    return DEFAULT_LIBDIR, "CRIU's usual default"
