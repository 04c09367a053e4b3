"""The agent's figures for operators (issue 20): every request logged once, with its outcome
and time; counters in Prometheus' text format (prometheus_client) over HTTP on
`--metrics ADDR:PORT` (here loopback), off by default; prometheus_client imported only then,
never by the CLI route (`plugin-view`)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from inetsk_testbed.agentproc import ROOT, AgentProc, ask, close_all, request, tree_env
from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk
from overlayfs_inetsk.plugin import metrics, wire
from overlayfs_inetsk.plugin.check import check

A4, B4 = "10.0.0.1", "10.0.0.2"
LINE = re.compile(r"^INFO (criu pid \d+|a client(?: \(uid \d+\))?): (.*) \((\d+) ms\)$")


@pytest.fixture
def fds(tmp_path: Path) -> Iterator[tuple[int, int]]:
    d = tmp_path / "images"
    d.mkdir()
    (d / "files.img").write_bytes(files_img(inet_file_entry(isk(2, A4, 7001))))
    img = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    ns = os.open("/proc/self/ns/net", os.O_RDONLY)
    yield img, ns
    os.close(img)
    os.close(ns)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """{'name{label="v"}': value} of one scrape, parsed by prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_real_requests_then_a_scrape_shows_the_counts(tmp_path: Path, fds) -> None:
    port = free_port()
    a = AgentProc(tmp_path / "agent.sock", tmp_path / "views", tmp_path / "agent.log",
                  extra=("--metrics", f"127.0.0.1:{port}")).wait_listening()
    try:
        def one(data: bytes, fdl: list[int]) -> str:
            text, got = ask(a.sock, data, fdl)
            close_all(got)
            return text

        views = [one(request({"INETSK_LOCAL_IPV4": B4}), list(fds)) for _ in range(3)]
        assert all(v.startswith("VIEW view-") for v in views), views
        assert one(request({"INETSK_LOCAL_IPV4": A4}), list(fds)).startswith("NONE ")
        assert one(request({"OVERLAYFS_INETSK_MAP": "nonsense"}), list(fds)).startswith("ERR ")
        assert one(request({}), [fds[0]]).startswith("ERR the agent needs 2 fds")
        assert one(request({}), [fds[1], fds[1]]).startswith("ERR the first fd is not a dir")
        assert one(b"hello", list(fds)).startswith("ERR not a plugin request")
        assert one(b"OVERLAYFS-INETSK-VIEW 1 pid=9\0", list(fds)).startswith(
            "ERR the plugin speaks protocol 1")
        assert one(request({}, ms=-1), list(fds)) == \
            "ERR the request's deadline passed before the planner read it"
        socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET).connect(str(a.sock))  # idle
        assert check(str(a.sock)).ok
        got = scrape(port)
        p = metrics.PREFIX
        want = {f'{p}requests_total{{outcome="view"}}': 3, f'{p}requests_total{{outcome="none"}}': 1,
                f'{p}requests_total{{outcome="refused"}}': 5,
                f'{p}requests_total{{outcome="timeout"}}': 1,
                f'{p}requests_total{{outcome="table"}}': 0,
                f'{p}requests_total{{outcome="failed"}}': 0, f"{p}views_total": 3,
                f'{p}refusals_total{{reason="plan"}}': 1,
                f'{p}refusals_total{{reason="fd_count"}}': 1,
                f'{p}refusals_total{{reason="fd_kind"}}': 1,
                f'{p}refusals_total{{reason="malformed"}}': 1,
                f'{p}refusals_total{{reason="protocol"}}': 1,
                f'{p}refusals_total{{reason="peer_uid"}}': 0,
                f'{p}timeouts_total{{stage="before_read"}}': 1,
                f'{p}timeouts_total{{stage="read"}}': 0, f"{p}checks_total": 1,
                f"{p}request_duration_seconds_count": 10, f"{p}in_flight": 0,
                f'{p}build_info{{protocol="{wire.PROTOCOL}",version="0.1.0"}}': 1,
                f'{p}request_duration_seconds_bucket{{le="+Inf"}}': 10}
        assert {k: got.get(k) for k in want} == want
        assert 0 < got[f"{p}request_duration_seconds_sum"] < 10
        assert got["process_open_fds"] > 0  # the process collector rides along
        # each request logged once, with its outcome and its time; the probe and the idle
        # client not at all (INFO); the lines are all written once the agent has stopped
        a.stop()
        lines = [ln for ln in a.text().splitlines() if LINE.match(ln)]
        outcomes = [LINE.match(ln).group(2) for ln in lines]  # type: ignore[union-attr]
        assert len(lines) == 10, a.text()
        assert sum(o.startswith("VIEW view-") for o in outcomes) == 3
        assert any(o.startswith("ERR the agent needs 2 fds") for o in outcomes)
        assert "the request's deadline had passed before it was read: dropped" in outcomes
        assert not [ln for ln in a.text().splitlines() if ln.startswith("INFO")
                    and not LINE.match(ln) and not re.search(
                        r"listening on |SIGTERM: stopping|^INFO stopped: ", ln)], a.text()
    finally:
        a.stop()


def test_metrics_are_off_by_default_and_prometheus_client_is_not_loaded(tmp_path: Path,
                                                                       fds) -> None:
    a = AgentProc(tmp_path / "agent.sock", tmp_path / "views", tmp_path / "agent.log",
                  env={"PYTHONPROFILEIMPORTTIME": "1"}).wait_listening()
    try:
        text, got = ask(a.sock, request({"INETSK_LOCAL_IPV4": B4}), list(fds))
        close_all(got)
        assert text.startswith("VIEW ")
    finally:
        a.stop()
    log = a.text()
    assert "| overlayfs_inetsk.app.plugin_view" in log  # the import trace is there
    assert "prometheus_client" not in log and "metrics on" not in log


def test_plugin_view_never_imports_prometheus_client(tmp_path: Path, fds) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    p = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "overlayfs_inetsk.cli",
                          "plugin-view", "--socket-fd", str(b.fileno()), "--view-root",
                          str(tmp_path / "views")], pass_fds=(b.fileno(),), env=tree_env(),
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    b.close()
    socket.send_fds(a, [request({"INETSK_LOCAL_IPV4": B4})], list(fds))
    msg, got, _f, _a = socket.recv_fds(a, 4096, 4)
    close_all(got)
    a.close()
    _out, err = p.communicate(timeout=60)
    assert msg.startswith(b"VIEW view-")
    assert "| overlayfs_inetsk.app.plugin_view" in err
    assert "prometheus_client" not in err


def test_a_metrics_address_that_cannot_be_served_stops_the_start(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        for arg, code, want in (
                (f"127.0.0.1:{port}", 1, f"overlayfs-inetsk: error: --metrics 127.0.0.1:{port}: "
                                         "cannot serve there: Address already in use"),
                ("127.0.0.1", 2, "not ADDR:PORT (a port 1 to 65535): '127.0.0.1'"),
                ("localhost:9", 2, "not an IP address: 'localhost' (in 'localhost:9')")):
            cp = subprocess.run([sys.executable, "-m", "overlayfs_inetsk.cli", "agent",
                                 "--socket", str(tmp_path / "agent.sock"), "--view-root",
                                 str(tmp_path / "views"), "--metrics", arg],
                                capture_output=True, text=True, timeout=60, env=tree_env(),
                                cwd=ROOT)
            assert cp.returncode == code, cp.stderr
            assert cp.stderr.splitlines()[-1].endswith(want), cp.stderr
            assert not (tmp_path / "agent.sock").exists()
    finally:
        taken.close()


def test_stats_count_and_bucket_as_prometheus_does() -> None:
    s = metrics.Stats()
    for o in (metrics.Outcome("view", seconds=0.005), metrics.Outcome("view", seconds=0.3),
              metrics.Outcome("refused", "plan", 0.002), metrics.Outcome("timeout", "reply", 40),
              metrics.Outcome("check"), metrics.Outcome("idle")):
        s.started()
        s.record(o)
    snap = s.snapshot()
    assert snap["requests"]["view"] == 2 and snap["views"] == 2 and snap["checks"] == 1
    assert snap["refusals"]["plan"] == 1 and snap["timeouts"]["reply"] == 1
    assert snap["in_flight"] == 0
    b = dict(zip([*metrics.BUCKETS, "inf"], snap["buckets"]))
    assert b[0.005] == 2 and b[0.5] == 1 and b["inf"] == 1  # le: 0.005 counts in 0.005
    assert sum(snap["buckets"]) == 4


def test_metrics_addresses() -> None:
    assert metrics.parse_addr("0.0.0.0:9478") == ("0.0.0.0", 9478)
    assert metrics.parse_addr("[::1]:9478") == ("::1", 9478)
    for bad in ("9478", ":9478", "127.0.0.1:0", "127.0.0.1:65536", "[::1]", "::1:x"):
        with pytest.raises(ValueError):
            metrics.parse_addr(bad)
