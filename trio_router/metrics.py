"""Prometheus metrics on a router-owned registry (never the global one).

Counters and histograms that change per request live here; gauges that
describe current state (in-flight per worker, health) are read from the pool
at scrape time by a collector, so the hot path never updates them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .pool import WorkerPool, WorkerState

#: Paths reported by name; anything else is "other", so labels stay bounded.
KNOWN_PATHS = frozenset(
    {
        "/generate",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/embeddings",
        "/health_generate",
        "/get_model_info",
        "/get_server_info",
        "/model_info",
        "/server_info",
        "/flush_cache",
        "/abort_request",
    }
)

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
)  # fmt: skip


def path_label(path: str) -> str:
    return path if path in KNOWN_PATHS else "other"


class PoolCollector(Collector):
    """Per-worker gauges read from the pool when Prometheus scrapes."""

    def __init__(self, pool: WorkerPool, service_restarts: Callable[[], dict[str, int]]) -> None:
        self.pool = pool
        self.service_restarts = service_restarts

    def collect(self) -> Iterator[Metric]:
        inflight = GaugeMetricFamily(
            "trio_router_worker_inflight", "Requests in flight per worker", labels=["worker"]
        )
        healthy = GaugeMetricFamily(
            "trio_router_worker_healthy", "1 if the worker takes traffic", labels=["worker"]
        )
        state = GaugeMetricFamily(
            "trio_router_worker_state", "Health state of each worker", labels=["worker", "state"]
        )
        for worker in self.pool:
            inflight.add_metric([worker.url], worker.inflight)
            healthy.add_metric(
                [worker.url], float(worker.state is WorkerState.HEALTHY and not worker.draining)
            )
            for s in WorkerState:
                state.add_metric([worker.url, s.value], float(worker.state is s))
            state.add_metric([worker.url, "draining"], float(worker.draining))
        stats = self.pool.statistics()
        total = GaugeMetricFamily("trio_router_workers", "Registered workers", labels=["health"])
        total.add_metric(["healthy"], stats.healthy)
        total.add_metric(["all"], stats.total)
        restarts = GaugeMetricFamily(
            "trio_router_service_restarts",
            "Times a background service crashed and was restarted",
            labels=["service"],
        )
        for name, count in self.service_restarts().items():
            restarts.add_metric([name], count)
        yield from (inflight, healthy, state, total, restarts)


class Metrics:
    def __init__(
        self, pool: WorkerPool, service_restarts: Callable[[], dict[str, int]] = dict
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "trio_router_requests",
            "Proxied requests by path, worker and status",
            ["path", "worker", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "trio_router_request_duration_seconds",
            "Time from request to the last response byte",
            ["path", "worker", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "trio_router_retries", "Requests re-sent to another worker", ["path"], registry=r
        )
        self.decisions = Counter(
            "trio_router_policy_decisions",
            "Routing decisions by policy and branch",
            ["policy", "branch"],
            registry=r,
        )
        self.health_checks = Counter(
            "trio_router_health_checks", "Health probes by result", ["result"], registry=r
        )
        self.transitions = Counter(
            "trio_router_worker_transitions",
            "Worker health state changes",
            ["worker", "from_state", "to_state"],
            registry=r,
        )
        self.disconnects = Counter(
            "trio_router_client_disconnects",
            "Requests whose client went away before the response ended",
            registry=r,
        )
        r.register(PoolCollector(pool, service_restarts))

    def observe(self, path: str, worker: str, status: int, duration: float) -> None:
        label = path_label(path)
        code = str(status)
        self.requests.labels(label, worker, code).inc()
        self.latency.labels(label, worker, code).observe(duration)

    def render(self) -> bytes:
        return generate_latest(self.registry)
