"""The agent's systemd units (issue 20): what `plugin install` writes and enables when systemd
runs the host, and `plugin remove` takes away, against a fake `systemctl` on PATH that
records its calls and keeps the state it was told (these machines have no systemd as pid
1); the units' syntax with `systemd-analyze verify`; systemd/ holds what render() makes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from overlayfs_inetsk.cli import main
from overlayfs_inetsk.errors import InetskError
from overlayfs_inetsk.plugin import DEFAULT_SOCKET, units
from overlayfs_inetsk.plugin.install import PluginConf, default_cli

ROOT = Path(__file__).resolve().parents[1]
SOCK, SERV = units.SOCKET_UNIT, units.SERVICE_UNIT

FAKE = r"""#!PYTHON
# a stand-in for systemctl: records argv, keeps "enabled" and "active" in a JSON file
import json, os, sys
d = os.environ.get("FAKE_SYSTEMCTL_DIR") or os.path.dirname(os.path.abspath(__file__))
st_path = os.path.join(d, "state.json")
st = json.load(open(st_path)) if os.path.exists(st_path) else {"enabled": [], "active": []}
with open(os.path.join(d, "calls"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
cmd, args = sys.argv[1], [a for a in sys.argv[2:] if not a.startswith("-")]
if cmd in st.get("fail", []):
    print(f"Failed to {cmd} unit: Unit file {args[0]} does not exist.", file=sys.stderr)
    sys.exit(1)
code = 0
if cmd == "is-enabled":
    on = args[0] in st["enabled"]
    print("enabled" if on else "disabled"); code = 0 if on else 1
elif cmd == "is-active":
    on = args[0] in st["active"]
    print("active" if on else "inactive"); code = 0 if on else 3
elif cmd == "enable":
    st["enabled"] += [a for a in args if a not in st["enabled"]]
elif cmd == "start":
    st["active"] += [a for a in args if a not in st["active"]]
elif cmd == "stop":
    st["active"] = [a for a in st["active"] if a not in args]
elif cmd == "disable":
    st["enabled"] = [a for a in st["enabled"] if a not in args]
    if "--now" in sys.argv:
        st["active"] = [a for a in st["active"] if a not in args]
json.dump(st, open(st_path, "w"))
sys.exit(code)
"""


class Host:
    """A systemd host: a unit dir, /run/systemd/system, and the fake systemctl on PATH."""

    def __init__(self, tmp: Path, booted: bool = True):
        self.units = tmp / "etc-systemd-system"
        self.units.mkdir()
        self.booted = tmp / "run-systemd-system"
        if booted:
            self.booted.mkdir()
        self.bin = tmp / "bin"
        self.bin.mkdir()
        fake = self.bin / "systemctl"
        fake.write_text(FAKE.replace("PYTHON", sys.executable, 1))
        fake.chmod(0o755)
        self.env = {"PATH": str(self.bin)}  # never the real systemctl

    def calls(self) -> list[list[str]]:
        p = self.bin / "calls"
        out = [json.loads(ln) for ln in p.read_text().splitlines()] if p.exists() else []
        p.unlink(missing_ok=True)
        return out

    def state(self) -> dict[str, list[str]]:
        p = self.bin / "state.json"
        return json.loads(p.read_text()) if p.exists() else {"enabled": [], "active": []}

    def set_state(self, **kw: list[str]) -> None:
        (self.bin / "state.json").write_text(json.dumps({**self.state(), **kw}))

    def install(self, sock: str = DEFAULT_SOCKET) -> list[str]:
        return units.install_units(PluginConf(agent_socket=sock), str(self.units),
                                   str(self.booted), self.env)

    def remove(self) -> list[str]:
        return units.remove_units(str(self.units), str(self.booted), self.env)


def test_the_source_trees_units_are_what_install_writes() -> None:
    for name, text in units.render("/usr/local/bin/overlayfs-inetsk", DEFAULT_SOCKET).items():
        assert (ROOT / "systemd" / name).read_text() == text, name


def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    sa = shutil.which("systemd-analyze")
    assert sa, "systemd-analyze missing (scripts/setup.sh installs the systemd package)"
    for name, text in units.render(default_cli(), str(tmp_path / "agent.sock")).items():
        (tmp_path / name).write_text(text)
    cp = subprocess.run([sa, "verify", str(tmp_path / SOCK), str(tmp_path / SERV)],
                        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert (cp.returncode, cp.stdout + cp.stderr) == (0, "")
    # and it does catch a bad one
    (tmp_path / SERV).write_text((tmp_path / SERV).read_text().replace(
        "ExecStart=/", "ExecStart=/nonexistent/"))
    cp = subprocess.run([sa, "verify", str(tmp_path / SERV)], capture_output=True, text=True,
                        timeout=120, cwd=tmp_path)
    assert cp.returncode != 0 and "is not executable" in cp.stderr


def test_install_writes_reloads_enables_and_starts_once(tmp_path: Path) -> None:
    h = Host(tmp_path)
    assert h.install() == [f"wrote {h.units / SOCK}", f"wrote {h.units / SERV}",
                           "systemctl daemon-reload",
                           f"enabled {SOCK} (systemd listens for the agent from boot on)",
                           f"started {SOCK}: the next restore starts the agent"]
    assert h.calls() == [["daemon-reload"], ["is-active", SERV], ["is-active", SOCK],
                         ["is-enabled", SOCK], ["enable", SOCK], ["is-active", SOCK],
                         ["start", SOCK]]
    want = units.render(default_cli(), DEFAULT_SOCKET)
    for name in (SOCK, SERV):
        assert (h.units / name).read_text() == want[name]
        assert (h.units / name).stat().st_mode & 0o777 == 0o644
    assert "ListenSequentialPacket=/run/overlayfs-inetsk/agent.sock\nSocketMode=0600\n" in \
        want[SOCK]
    assert f"ExecStart={default_cli()} agent --socket {DEFAULT_SOCKET}\n" in want[SERV]
    assert h.install() == []  # idempotent: asked, nothing done
    assert h.calls() == [["is-enabled", SOCK], ["is-active", SOCK]]


def test_a_changed_unit_stops_the_running_agent_and_restarts_the_socket(tmp_path: Path
                                                                        ) -> None:
    h = Host(tmp_path)
    h.install()
    h.set_state(active=[SOCK, SERV])  # the agent was started by a restore
    h.calls()
    assert h.install("/run/other/agent.sock") == [
        f"wrote {h.units / SOCK}", f"wrote {h.units / SERV}", "systemctl daemon-reload",
        f"stopped {SERV} {SOCK} (its unit changed)",
        f"started {SOCK}: the next restore starts the agent"]
    assert ["stop", SERV, SOCK] in h.calls()
    assert h.state()["active"] == [SOCK]


def test_remove_stops_disables_and_removes_only_what_install_wrote(tmp_path: Path) -> None:
    h = Host(tmp_path)
    h.install()
    h.calls()
    assert h.remove() == [f"stopped and disabled {SOCK} {SERV}", f"removed {h.units / SOCK}",
                          f"removed {h.units / SERV}", "systemctl daemon-reload"]
    assert h.calls() == [["disable", "--now", SOCK, SERV], ["daemon-reload"]]
    assert h.state() == {"enabled": [], "active": []}
    assert h.remove() == [] and h.calls() == []
    mine = h.units / SERV
    mine.write_text("[Service]\nExecStart=/bin/true\n")  # an admin's own unit of that name
    assert h.remove() == [f"left {mine}: not written by plugin install"]
    with pytest.raises(InetskError, match=rf"^{mine}: exists and was not written by plugin "
                                          r"install: move it away \(or install with "
                                          r"--no-agent\)$"):
        h.install()
    assert mine.read_text() == "[Service]\nExecStart=/bin/true\n"


def test_no_systemd_no_units_and_a_failing_systemctl_is_one_line(tmp_path: Path) -> None:
    h = Host(tmp_path, booted=False)
    assert h.install() == [] and h.remove() == [] and h.calls() == []
    assert list(h.units.iterdir()) == []
    h.booted.mkdir()
    (h.bin / "systemctl").unlink()
    with pytest.raises(InetskError, match="systemd runs this host but systemctl is not on"):
        h.install()
    (tmp_path / "2").mkdir()
    h2 = Host(tmp_path / "2")
    h2.set_state(fail=["enable"])
    with pytest.raises(InetskError, match=rf"^systemctl enable {SOCK} failed \(exit 1\): "
                                          r"Failed to enable unit: Unit file"):
        h2.install()


def test_plugin_install_and_remove_print_the_units_lines_unless_no_agent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
        ) -> None:
    h = Host(tmp_path)
    monkeypatch.setattr(units, "UNIT_DIR", str(h.units))
    monkeypatch.setattr(units, "BOOTED", str(h.booted))
    monkeypatch.setenv("PATH", h.env["PATH"])
    so = tmp_path / "plugin.so"
    so.write_bytes(b"\x7fELF stand-in")
    lib = tmp_path / "lib"
    base = ["plugin", "install", "--libdir", str(lib), "--so", str(so), "--no-cli",
            "--agent-socket", str(tmp_path / "agent.sock")]
    assert main([*base, "--no-agent"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert not any("systemctl" in ln or SOCK in ln for ln in out) and h.calls() == []
    assert main(base) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"wrote {h.units / SOCK}", f"wrote {h.units / SERV}",
                   "systemctl daemon-reload",
                   f"enabled {SOCK} (systemd listens for the agent from boot on)",
                   f"started {SOCK}: the next restore starts the agent"]
    assert f"ListenSequentialPacket={tmp_path / 'agent.sock'}\n" in (h.units / SOCK).read_text()
    assert main(base) == 0 and capsys.readouterr().out == f"already installed in {lib}\n"
    assert main(["plugin", "remove", "--libdir", str(lib), "--no-agent"]) == 0
    assert (h.units / SOCK).exists()
    capsys.readouterr()
    assert main(["plugin", "remove", "--libdir", str(lib)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"stopped and disabled {SOCK} {SERV}", f"removed {h.units / SOCK}",
        f"removed {h.units / SERV}", "systemctl daemon-reload"]
