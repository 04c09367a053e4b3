"""What each request came to (Outcome), the agent's counters (Stats), and their Prometheus
exposition (`agent --metrics ADDR:PORT`).

Counting is a few integer additions under a lock, always on; prometheus_client (about
0.1 s to import here) is imported only by serve_http(), i.e. only when --metrics is given,
and never by the CLI route (`plugin-view`), which records nothing. The exposition reads the
counters at each scrape (a custom collector), so no request ever touches the library.

Metrics (all prefixed overlayfs_inetsk_agent_):
  requests_total{outcome}      view, table, none, refused, timeout, failed
  views_total                  views made and handed to a restore
  refusals_total{reason}       peer_uid, too_large, fd_count, fd_kind, malformed, protocol,
                               plan (the planner's ERR: the map cannot be applied)
  timeouts_total{stage}        read (no request within READ_MS), before_read (its deadline
                               had passed), planning, reply
  request_duration_seconds     histogram, from accept to the reply sent
  in_flight                    requests being served now
  checks_total                 `agent --check` requests answered (probes)
  build_info{version,protocol} 1
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from ..record import Record

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from typing import Any

OUTCOMES = ("view", "table", "none", "refused", "timeout", "failed")
REASONS = ("peer_uid", "too_large", "fd_count", "fd_kind", "malformed", "protocol", "plan")
STAGES = ("read", "before_read", "planning", "reply")
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PREFIX = "overlayfs_inetsk_agent_"


class Outcome(Record):
    """kind: one of OUTCOMES, or "check" / "idle" (a probe, a client that sent nothing:
    not requests); detail: reason (refused) or stage (timeout); seconds: accept to reply.
    (A Record, not a dataclass: record.py.)"""

    __slots__ = ("kind", "detail", "seconds")
    kind: str
    detail: str
    seconds: float

    def __init__(self, kind: str, detail: str = "", seconds: float = 0.0) -> None:
        self.kind, self.detail, self.seconds = kind, detail, seconds


class Stats:
    def __init__(self) -> None:
        import threading  # (the agent's: handle() on the plugin's CLI route has no Stats)

        self._lock = threading.Lock()
        self.requests = dict.fromkeys(OUTCOMES, 0)
        self.refusals = dict.fromkeys(REASONS, 0)
        self.timeouts = dict.fromkeys(STAGES, 0)
        self.views = self.checks = self.in_flight = 0
        self.buckets = [0] * (len(BUCKETS) + 1)  # the last: over the largest bound
        self.seconds_sum = 0.0

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def record(self, o: Outcome) -> None:
        with self._lock:
            self.in_flight -= 1
            if o.kind == "check":
                self.checks += 1
                return
            if o.kind not in self.requests:
                return  # idle: connected and sent nothing
            self.requests[o.kind] += 1
            if o.kind == "view":
                self.views += 1
            elif o.kind == "refused" and o.detail in self.refusals:
                self.refusals[o.detail] += 1
            elif o.kind == "timeout" and o.detail in self.timeouts:
                self.timeouts[o.detail] += 1
            self.buckets[bisect.bisect_left(BUCKETS, o.seconds)] += 1
            self.seconds_sum += o.seconds

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": dict(self.requests), "refusals": dict(self.refusals),
                    "timeouts": dict(self.timeouts), "views": self.views,
                    "checks": self.checks, "in_flight": self.in_flight,
                    "buckets": list(self.buckets), "sum": self.seconds_sum}


def _collector(stats: Stats, version: str, protocol: int) -> Any:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        InfoMetricFamily,
    )

    class Collector:
        def collect(self) -> Iterator[Any]:
            s = stats.snapshot()
            c = CounterMetricFamily(PREFIX + "requests", "Requests served, by outcome",
                                    labels=["outcome"])
            for k, v in s["requests"].items():
                c.add_metric([k], v)
            yield c
            yield CounterMetricFamily(PREFIX + "views", "Views made and handed to a restore",
                                      value=s["views"])
            c = CounterMetricFamily(PREFIX + "refusals", "Requests answered ERR, by reason",
                                    labels=["reason"])
            for k, v in s["refusals"].items():
                c.add_metric([k], v)
            yield c
            c = CounterMetricFamily(PREFIX + "timeouts", "Requests whose deadline passed, "
                                    "by stage", labels=["stage"])
            for k, v in s["timeouts"].items():
                c.add_metric([k], v)
            yield c
            cum, running = [], 0
            for bound, n in zip([*map(str, BUCKETS), "+Inf"], s["buckets"]):
                running += n
                cum.append((bound, running))
            yield HistogramMetricFamily(PREFIX + "request_duration_seconds",
                                        "From accept to the reply sent", buckets=cum,
                                        sum_value=s["sum"])
            yield GaugeMetricFamily(PREFIX + "in_flight", "Requests being served",
                                    value=s["in_flight"])
            yield CounterMetricFamily(PREFIX + "checks", "agent --check requests answered",
                                      value=s["checks"])
            yield InfoMetricFamily(PREFIX + "build", "The agent's version and protocol",
                                   value={"version": version, "protocol": str(protocol)})

    return Collector()


def parse_addr(text: str) -> tuple[str, int]:
    """ADDR:PORT, [IPV6]:PORT -> (addr, port); ValueError with what is wrong."""
    import ipaddress

    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not ADDR:PORT (a port 1 to 65535): {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"not an IP address: {host!r} (in {text!r})") from None
    return host, int(port)


def serve_http(stats: Stats, addr: str, port: int, version: str, protocol: int
               ) -> tuple[Any, Any]:
    """Serve the counters at http://ADDR:PORT/metrics (a thread of prometheus_client's);
    (server, thread). OSError when it cannot bind."""
    from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

    registry = CollectorRegistry(auto_describe=True)
    registry.register(_collector(stats, version, protocol))
    ProcessCollector(registry=registry)  # fds, memory, CPU, start time of the agent
    server, thread = start_http_server(port, addr=addr, registry=registry)
    return server, thread
