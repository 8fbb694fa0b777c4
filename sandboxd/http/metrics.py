"""Prometheus metrics of the bridge (python3-prometheus-client), in a registry of its own.

    sandboxd_http_requests_total{route,status}       requests answered, by route template and HTTP status
    sandboxd_http_request_duration_seconds{route}    time to answer (histogram)
    sandboxd_http_runs_total{language,verdict}       runs the daemon answered, by its verdict
    sandboxd_http_in_flight                          /v1/sandbox/run requests running or waiting
    sandboxd_http_connections{state}                 open connections: pending (first head not in), admitted
    sandboxd_http_connections_shed_total{reason}     connections closed and heads refused to make room (gate.REASONS)
    sandboxd_daemon_up                               1 when the daemon answered status at the last scrape
    sandboxd_daemon_capacity / _running / _queued / _queue_max, sandboxd_daemon_pool_ready{profile},
    sandboxd_daemon_pool_hits_total / _misses_total  from the daemon's status, read at scrape time

Routes are the templates (``/v1/sandbox/run``), never raw paths: a scanner cannot grow
the label set.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .gate import Gate

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class DaemonCollector(Collector):
    """The daemon's capacity and pool, from the status answer the scrape just fetched."""

    def __init__(self) -> None:
        self.status: dict[str, Any] | None = None

    def collect(self) -> Iterator[Metric]:
        st = self.status
        yield GaugeMetricFamily("sandboxd_daemon_up", "1 when sandboxd answered status", value=int(st is not None))
        if st is None:
            return
        cap = st.get("capacity") or {}
        for key, doc in (("capacity", "runs the daemon executes at once"), ("running", "runs executing"),
                         ("queued", "runs waiting for capacity"), ("queue_max", "runs that may wait")):
            if isinstance(cap.get(key), (int, float)):
                yield GaugeMetricFamily(f"sandboxd_daemon_{key}", f"sandboxd: {doc}", value=cap[key])
        pool = st.get("pool") or {}
        ready = GaugeMetricFamily("sandboxd_daemon_pool_ready", "sandboxd: warm workers ready", labels=["profile"])
        for profile, info in sorted((pool.get("profiles") or {}).items()):
            if isinstance(info, dict) and isinstance(info.get("ready"), int):
                ready.add_metric([str(profile)], info["ready"])
        yield ready
        for key in ("hits", "misses"):
            if isinstance(pool.get(key), int):
                yield CounterMetricFamily(f"sandboxd_daemon_pool_{key}", f"sandboxd: runs that found a warm "
                                          f"worker ({key})", value=pool[key])


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sandboxd_http_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.duration = Histogram("sandboxd_http_request_duration_seconds", "time to answer a request", ["route"],
                                  buckets=BUCKETS, registry=r)
        self.runs = Counter("sandboxd_http_runs", "runs answered by sandboxd, by verdict", ["language", "verdict"],
                            registry=r)
        self.in_flight = Gauge("sandboxd_http_in_flight", "run requests running or waiting", registry=r)
        self.connections = Gauge("sandboxd_http_connections", "open connections", ["state"], registry=r)
        self.shed_total = Counter("sandboxd_http_connections_shed", "connections closed and request heads refused "
                                  "to make room, by reason", ["reason"], registry=r)
        self._children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self.daemon = DaemonCollector()
        r.register(self.daemon)
        ProcessCollector(registry=r)

    def watch(self, gate: Gate) -> None:
        """The gate's counts, read at scrape time."""
        self.connections.labels("pending").set_function(lambda: len(gate.pending))
        self.connections.labels("admitted").set_function(lambda: len(gate.admitted))

    def shed(self, reason: str) -> None:
        self.shed_total.labels(reason).inc()

    def answered(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        children = self._children.get(key)
        if children is None:  # label lookups cost more than the counting: once per route and status
            children = self._children[key] = (self.requests.labels(route, str(status)), self.duration.labels(route))
        children[0].inc()
        children[1].observe(seconds)

    def render(self, daemon_status: dict[str, Any] | None) -> bytes:
        self.daemon.status = daemon_status
        return generate_latest(self.registry)
