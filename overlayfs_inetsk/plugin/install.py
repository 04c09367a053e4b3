"""`overlayfs-inetsk plugin install|remove`: put the CRIU plugin where CRIU loads it.

CRIU loads every `*.so` of its plugin dir: `-L/--libdir`, else $CRIU_LIBS_DIR, else the
`lib` option of its config files, else its built-in default (/usr/lib/criu, which
`criu --help` names). Install copies the built .so there (mode 755, atomically: a copy
renamed into place) and writes, beside it, the one-line file naming the CLI the plugin
runs when no agent answers (CRIU ignores files not ending in .so). Both are idempotent.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping

from ..errors import InetskError
from . import DEFAULT_LIBDIR

SO_NAME = "overlayfs_inetsk_plugin.so"
CLI_CONF = "overlayfs-inetsk-plugin.cli"
INSTALLED_SO = f"/usr/local/lib/overlayfs-inetsk/{SO_NAME}"  # where scripts/setup.sh puts it
ENV_SO = "OVERLAYFS_INETSK_PLUGIN_SO"
_REPO_SO = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "plugin", "build", SO_NAME)


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
    raise InetskError("overlayfs-inetsk is not on PATH: pass --cli PATH")


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
            cli: str | None = None) -> list[str]:
    """Install; returns what changed (empty when all was in place already)."""
    so = so or built_so()
    cli = cli or default_cli()
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
        conf = os.path.join(libdir, CLI_CONF)
        want = (cli + "\n").encode()
        try:
            with open(conf, "rb") as f:
                have = f.read()
        except FileNotFoundError:
            have = None
        if have != want:
            _put(conf, want, None, 0o644)
            done.append(f"wrote {conf} ({cli})")
    except OSError as e:
        raise InetskError(f"{libdir}: cannot install the plugin: {e.strerror or e}") from None
    return done


def remove(libdir: str = DEFAULT_LIBDIR) -> list[str]:
    done = []
    for name in (SO_NAME, CLI_CONF):
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


def doctor_check(criu: str | None, env: Mapping[str, str], run: Runner = subprocess.run
                 ) -> tuple[str, str, str]:
    """(status, detail, fix) of the `plugin` check."""
    fix = "overlayfs-inetsk plugin install (runtime-driven restores: Podman, CRI-O, containerd)"
    if criu is None:
        return "skip", "no criu", ""
    libdir, why = criu_plugin_dir(criu, env, run)
    so = os.path.join(libdir, SO_NAME)
    if not os.path.isfile(so):
        return "warn", f"not installed: {so} missing ({libdir}: {why})", fix
    notes = []
    try:
        if not filecmp.cmp(built_so(env), so, shallow=False):
            notes.append("differs from the built plugin (re-run plugin install)")
    except InetskError:
        pass
    conf = os.path.join(libdir, CLI_CONF)
    try:
        with open(conf) as f:
            cli = f.read().strip()
        if not os.access(cli, os.X_OK):
            notes.append(f"{conf} names {cli}, which is not executable")
    except OSError:
        notes.append(f"no {conf}: the plugin runs overlayfs-inetsk from PATH")
    from . import DEFAULT_SOCKET

    if not os.path.exists(DEFAULT_SOCKET):
        notes.append("no agent running (restores start the CLI instead: slower)")
    detail = f"{so}, loaded by {criu} from {libdir} ({why})"
    if notes:
        return "warn", detail + "; " + "; ".join(notes), fix
    return "ok", detail, ""
