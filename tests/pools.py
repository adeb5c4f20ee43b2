"""Small worker pools for the pure pool and policy tests."""

from __future__ import annotations

from trio_router.pool import HealthRules, Worker, WorkerPool


def url(i: int) -> str:
    return f"http://10.0.0.{i}:8000"


def make_pool(n: int, now: float = 0.0, rules: HealthRules | None = None) -> WorkerPool:
    """A pool of ``n`` workers ``http://10.0.0.{i}:8000``, all HEALTHY."""
    pool = WorkerPool(rules=rules or HealthRules())
    for i in range(n):
        pool.add(url(i), now)
        pool.probe_succeeded(url(i), now)
    return pool


def worker(pool: WorkerPool, i: int) -> Worker:
    w = pool.get(url(i))
    assert w is not None
    return w
