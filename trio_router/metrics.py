"""Prometheus metrics on a router-owned registry (never the global one).

Counters and histograms that change per request live here; gauges that
describe current state (in-flight per worker, health) are read from the pool
at scrape time by a collector, so the hot path never updates them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import ClassVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
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
            "trio_router_worker_healthy", "1 if the worker is healthy", labels=["worker"]
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


class CacheCollector(Collector):
    """The token cache's figures (its /metrics ``cache`` section), read at scrape time."""

    GAUGES: ClassVar[dict[str, tuple[str, str]]] = {
        "cur_cache_size": ("trio_router_cache_tokens", "Tokens stored in the token cache"),
        "max_cache_size": ("trio_router_cache_max_tokens", "Token budget of the token cache"),
        "total_entries": ("trio_router_cache_nodes", "Radix tree nodes"),
        "cache_size_mb": ("trio_router_cache_size_mb", "Memory the cache's objects take, MiB"),
        "hit_rate": ("trio_router_cache_hit_rate", "Lookups that found a cached prefix"),
    }
    COUNTERS: ClassVar[dict[str, tuple[str, str]]] = {
        "cache_hits": ("trio_router_cache_hits", "Lookups that found a cached prefix"),
        "cache_misses": ("trio_router_cache_misses", "Lookups that found nothing"),
        "evictions": ("trio_router_cache_evicted_tokens", "Tokens evicted for the budget"),
        "gc_removed_tokens": ("trio_router_cache_gc_tokens", "Tokens dropped with old versions"),
        "recorded": ("trio_router_cache_recorded", "Trajectories recorded"),
        "alignment_failures": (
            "trio_router_cache_alignment_failures",
            "Answers whose tokens do not spell their text (kept only in part)",
        ),
        "cached_prompt_tokens": (
            "trio_router_cache_prompt_tokens_cached",
            "Prompt tokens taken from the cache instead of tokenizing",
        ),
        "fresh_prompt_tokens": (
            "trio_router_cache_prompt_tokens_fresh",
            "Prompt tokens the router tokenized",
        ),
        "continued_aborts": (
            "trio_router_cache_continued_aborts",
            "Aborted generations continued on a worker",
        ),
    }

    def __init__(self, report: Callable[[], dict[str, object]]) -> None:
        self.report = report

    def collect(self) -> Iterator[Metric]:
        report = self.report()
        for key, (name, text) in self.GAUGES.items():
            value = report.get(key)
            if isinstance(value, int | float):
                yield GaugeMetricFamily(name, text, value=float(value))
        for key, (name, text) in self.COUNTERS.items():
            value = report.get(key)
            if isinstance(value, int | float):
                yield CounterMetricFamily(name, text, value=float(value))


class Metrics:
    def __init__(
        self, pool: WorkerPool, service_restarts: Callable[[], dict[str, int]] = dict
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.recent: deque[float] = deque(maxlen=2048)  # latencies for the dashboard
        self._series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._decided: dict[tuple[str, str], Counter] = {}  # policies' branches: a few
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
        self.cut = Counter(
            "trio_router_responses_cut",
            "Responses that ended before their last byte (client gone, worker failed, deadline)",
            ["cause"],
            registry=r,
        )
        r.register(PoolCollector(pool, service_restarts))

    def decided(self, policy: str, branch: str) -> None:
        """Count one routing decision."""
        key = (policy, branch)
        counter = self._decided.get(key)
        if counter is None:
            counter = self._decided[key] = self.decisions.labels(policy, branch)
        counter.inc()

    def observe(self, path: str, worker: str, status: int, duration: float) -> None:
        key = (path, worker, status)
        series = self._series.get(key)
        if series is None:  # label sets are few (paths are bucketed) and never removed
            labels = (path_label(path), worker, str(status))
            series = (self.requests.labels(*labels), self.latency.labels(*labels))
            if len(self._series) < 10_000:
                self._series[key] = series
        series[0].inc()
        series[1].observe(duration)
        self.recent.append(duration)

    def latency_summary(self) -> dict[str, float | int]:
        """Quantiles of the most recent request latencies, in milliseconds."""
        values = sorted(self.recent)
        if not values:
            return {"count": 0}

        def at(q: float) -> float:
            return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 2)

        return {"count": len(values), "p50_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99)}

    def decision_counts(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for family in self.decisions.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    policy = counts.setdefault(sample.labels["policy"], {})
                    policy[sample.labels["branch"]] = int(sample.value)
        return counts

    def render(self) -> bytes:
        return generate_latest(self.registry)
