"""Every command in README.md and docs/*.md is run, so the docs cannot rot.

Conventions for writing docs (the test enforces them):

* A fenced block tagged ``sh`` is RUN. All ``sh`` blocks of one page run in order in one
  ``bash`` (``set -euo pipefail``), in a fresh scratch directory, as root, with
  ``.venv/bin`` and ``/usr/local/sbin`` first on PATH, on a fresh test network:
  ``/run/netns/node-a``, ``node-b``, ``node-c`` are replaced by test hosts with 10.77.0.1,
  10.77.0.2, 10.77.0.3 (and fd77::1, ::2, ::3). The page's text may rely on that.
* A page that starts from an existing checkpoint says so with the comment
  ``<!-- docs-test: checkpoint -->``: before its blocks run, ``ckpt/web`` holds a dump of
  quickstart.md's hello.py (a TCP server on 10.77.0.1:8080) made on node-a (CHECKPOINT
  below: the commands of quickstart.md step 1, which a test keeps in step).
* Commands that cannot run here (podman, kubectl, docker, systemctl, journalctl, crictl,
  ctr) go in a ``console-noexec`` block: one command per line (``\\`` continues a line,
  ``#`` comments). Only those programs may appear there, and ``bash scripts/test.sh``,
  ``scripts/demo.sh``, ``scripts/setup.sh`` (CI runs them itself). Every
  ``overlayfs-inetsk`` command line must parse with our argparse parser: in ``sh`` and
  ``console-noexec`` blocks, and on ``$ `` lines of data blocks (transcripts).
* Any other tag (``text``, ``json``, ``ini``, ``toml``, ``dockerfile``, none) is data, not
  commands; ``bash``, ``shell``, ``console`` are refused (say ``sh`` or ``console-noexec``).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from overlayfs_inetsk.cli import make_parser
from overlayfs_inetsk.plugin import install

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
NOEXEC_PROGRAMS = {"podman", "kubectl", "docker", "systemctl", "journalctl", "crictl", "ctr"}
# the project's own entry points: CI runs them itself (test.sh IS the suite: no recursion)
NOEXEC_SCRIPTS = re.compile(r"^(bash |sudo )?(\./)?scripts/(test|demo|setup)\.sh\b")
DATA_TAGS = {"", "text", "json", "ini", "toml", "yaml", "dockerfile", "systemd"}
NODES = {"node-a": "A", "node-b": "B", "node-c": "C"}
CHECKPOINT_MARK = "<!-- docs-test: checkpoint -->"
CHECKPOINT = """\
cat > hello.py <<'EOF'
import socket
srv = socket.create_server(("10.77.0.1", 8080))
while True:
    conn, _ = srv.accept()
    conn.sendall(b"hello from %s\\n" % conn.getsockname()[0].encode())
    conn.close()
EOF
nsenter --net=/run/netns/node-a unshare --pid --fork setsid \\
    python3 hello.py </dev/null >/dev/null 2>&1 &
until nsenter --net=/run/netns/node-a ss -Hltn 'sport = :8080' | grep -q LISTEN; do sleep 0.1; done
PID=$(pgrep -P $!)  # unshare's child: python, pid 1 of its namespace
mkdir -p ckpt/web
nsenter --net=/run/netns/node-a criu dump -t "$PID" -D ckpt/web -o dump.log
"""


@dataclass
class Block:
    page: str
    line: int  # of the opening fence
    tag: str
    text: str


def pages() -> list[Path]:
    found = sorted((ROOT / "docs").glob("*.md"))
    if (ROOT / "README.md").exists():
        found.insert(0, ROOT / "README.md")
    return found


FENCE = re.compile(r"^```(\S*)\s*$")


def blocks(page: Path) -> list[Block]:
    out: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, tag, body = i, m.group(1), []
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{page.name}:{start + 1}: unclosed fence"
        out.append(Block(page.name, start + 1, tag, "\n".join(body) + "\n"))
        i += 1
    return out


def commands(text: str) -> list[str]:
    """Logical command lines: continuations joined, comments and blank lines dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    return out


def cli_invocations(cmd: str) -> list[list[str]]:
    """The argument lists given to overlayfs-inetsk in one command line (pipes and `;`
    split it; redirections and a leading `!` dropped)."""
    found = []
    try:
        words = shlex.split(cmd, comments=True)
    except ValueError as e:
        raise AssertionError(f"cannot split {cmd!r}: {e}") from None
    segment: list[str] = []
    for w in words + [";"]:
        if w in ("|", ";", "&&", "||", "&") and segment[:2] == ["docker", "run"]:
            # `docker run ... IMAGE ARGS`: the image's entrypoint is `overlayfs-inetsk mount
            # --foreground` (Dockerfile) unless --entrypoint overlayfs-inetsk replaces it
            image = max((k for k, x in enumerate(segment) if x == "overlayfs-inetsk"
                         and segment[k - 1] != "--entrypoint"), default=None)
            if image is not None:
                args = segment[image + 1:]
                found.append(args if "--entrypoint" in segment
                             else ["mount", "--foreground", *args])
            segment = []
        elif w in ("|", ";", "&&", "||", "&"):
            if segment[:1] == ["docker"]:
                segment = []
                continue
            for k, word in enumerate(segment):
                if os.path.basename(word) == "overlayfs-inetsk":
                    args = [a for a in segment[k + 1:] if not re.match(r"^\d?[<>]", a)]
                    found.append(args)
                    break
            segment = []
        else:
            segment.append(w)
    return found


ALL_BLOCKS = [b for p in pages() for b in blocks(p)]


def test_checkpoint_setup_is_the_quickstart_s():
    text = (ROOT / "docs" / "quickstart.md").read_text()
    for part in CHECKPOINT.split("nsenter --net=/run/netns/node-a unshare"):
        for line in part.splitlines():
            assert line in text, line


def test_docs_exist():
    names = {p.name for p in pages()}
    for want in ("quickstart.md", "node-systemd.md", "criu.md", "podman.md", "kubernetes.md",
                 "limits.md", "logging.md", "docker.md", "cli.md", "json.md"):
        assert want in names


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: f"{b.page}:{b.line}")
def test_block_kind_and_cli_syntax(block: Block):
    where = f"{block.page}:{block.line}"
    assert block.tag in DATA_TAGS | {"sh", "console-noexec"}, (
        f"{where}: fence tag {block.tag!r}: use sh (run), console-noexec (not run) or a data tag")
    if block.tag in DATA_TAGS:
        cmds = [ln[2:] for ln in block.text.splitlines() if ln.startswith("$ ")]
        _check_cli(where, cmds)
        return
    for cmd in commands(block.text):
        prog = os.path.basename(shlex.split(cmd, comments=True)[0].lstrip("!")) or "!"
        if block.tag == "console-noexec":
            if NOEXEC_SCRIPTS.match(cmd):
                continue
            if prog == "sudo":
                prog = shlex.split(cmd)[1]
            assert prog in NOEXEC_PROGRAMS, (
                f"{where}: {prog!r} can run here: move it to an sh block ({cmd!r})")
        else:
            assert prog not in NOEXEC_PROGRAMS, (
                f"{where}: {prog} does not run here: use a console-noexec block")
    _check_cli(where, commands(block.text))


def _check_cli(where: str, cmds: list[str]) -> None:
    for cmd in cmds:
        for args in cli_invocations(cmd):
            try:
                make_parser().parse_args(args)
            except SystemExit as e:
                if e.code != 0:  # --help exits 0
                    raise AssertionError(f"{where}: overlayfs-inetsk rejects {args}") from None


RUN_PAGES = [p for p in pages() if any(b.tag == "sh" for b in blocks(p))]


def _script(page: Path, hosts: dict[str, object]) -> str:
    parts = ["set -euo pipefail"]
    text = page.read_text()
    if CHECKPOINT_MARK in text:
        parts += ["echo '### docs-test: checkpoint' >&2", CHECKPOINT]
    for b in blocks(page):
        if b.tag == "sh":
            parts += [f"echo '### {b.page}:{b.line}' >&2", b.text]
    script = "\n".join(parts)
    for node, name in NODES.items():
        script = script.replace(f"/run/netns/{node}", hosts[name].netns_path)  # type: ignore[attr-defined]
    return script


def _our_mounts(under: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f if ln.split()[4].startswith(str(under))]


def _reap_orphans() -> None:
    """Reap zombie children left by the page's background jobs (we are a subreaper)."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            try:
                os.waitpid(int(d), os.WNOHANG)
            except ChildProcessError:
                pass


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.criu
@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: p.name)
def test_run_page(page: Path, tmp_path: Path):
    from inetsk_testbed import TestNet

    scratch = tmp_path / "scratch"
    (tmp_path / "tmp").mkdir()
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CRIU", "JOURNAL_STREAM")}
    env["PATH"] = f"{VENV_BIN}:/usr/local/sbin:{env.get('PATH', '/usr/sbin:/usr/bin:/bin')}"
    env["TMPDIR"] = str(tmp_path / "tmp")
    with TestNet() as net:
        hosts = {name: net.add_host(name) for name in ("A", "B", "C")}
        script = tmp_path / "page.sh"
        script.write_text(_script(page, hosts))
        try:
            cp = subprocess.run(["bash", str(script)], cwd=scratch, env=env, text=True,
                                capture_output=True, timeout=240, stdin=subprocess.DEVNULL)
        finally:
            left = _our_mounts(tmp_path)
            for mp in reversed(left):
                subprocess.run(["umount", "-l", mp], capture_output=True)
            net.close()
            _reap_orphans()
        where = cp.stderr.rsplit("### ", 1)[-1].splitlines()[0] if "### " in cp.stderr else "?"
        assert cp.returncode == 0, (
            f"{page.name}: the block at {where} failed (exit {cp.returncode})\n"
            f"--- stdout\n{cp.stdout[-3000:]}\n--- stderr\n{cp.stderr[-3000:]}")
        assert left == [], f"{page.name} leaves mounts behind: {left}"


def test_dockerfile_by_reading():
    """No Docker engine runs here: check what can be checked by reading (docs/docker.md)."""
    text = (ROOT / "Dockerfile").read_text()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    sha = re.search(r"CRIU_SHA256=([0-9a-f]{64})", setup).group(1)  # type: ignore[union-attr]
    assert sha in text, "the CRIU tarball checksum must match scripts/setup.sh"
    assert "CRIU_DEB_VERSION=4.2.1-1" in text and "criu=${CRIU_DEB_VERSION}" in text
    assert "--tar-only" in text and "sha256sum -c" in text
    assert "criu_src_entry\" > /etc/apt/sources.list.d/" in text  # tests/test_apt_mirror.py
    assert re.search(r'ENTRYPOINT \[.*overlayfs-inetsk", "mount", "--foreground"', text)
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore
    # the plugin .so: built in the build stage against the CRIU source tree built there, and
    # copied to where `plugin install` (the DaemonSet's init container) takes it from
    assert "plugin/build" in ignore  # never the host's build
    build, final = text.split("\nFROM ${DEBIAN}\n")
    src = re.search(r"mkdir -p (\S+) && cd \1 .*?tar -xJf \S+ -C (\S+) ", build, re.S)
    assert src, "the build stage extracts CRIU's source tree"
    criu_src = f"{src.group(1)}/{src.group(2)}"
    assert f"make -C {src.group(2)} -j" in build
    made = re.search(r"^RUN make -C /app/plugin CRIU_SRC=(\S+) OUT=(\S+)$", build, re.M)
    assert made, "the build stage builds the plugin"
    assert made.group(1) == criu_src, (made.group(1), criu_src)
    assert build.index("COPY . /app") < made.start()
    so, dest = install.SO_NAME, os.path.dirname(install.INSTALLED_SO)
    assert f"COPY --from=build {made.group(2)}/{so} {dest}/\n" in final
