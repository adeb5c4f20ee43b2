"""Routing policies: pure functions of the pool's view, a routing key and ``now``.

Every policy returns a ``Decision`` naming the worker and the *branch* that
chose it (counted in metrics). Ties between equally loaded workers are broken
at random with the injected ``random.Random``, never by registration order.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .errors import ConfigError, NoHealthyWorker
from .pool import Worker, WorkerPool

POLICY_NAMES = (
    "least_inflight",
    "cache_aware",
    "round_robin",
    "power_of_two",
    "random",
    "consistent_hash",
    "sticky",
    "manual",
)


@dataclass(frozen=True, slots=True)
class Decision:
    worker: Worker
    branch: str


class Policy(Protocol):
    name: str

    def choose(
        self,
        pool: WorkerPool,
        key: str | None,
        now: float,
        exclude: frozenset[str] = ...,
        hint: str | None = ...,
    ) -> Decision: ...


def eligible(pool: WorkerPool, exclude: frozenset[str]) -> list[Worker]:
    """The pool's candidates minus workers this request already tried."""
    workers = pool.candidates()
    if exclude:
        workers = [w for w in workers if w.url not in exclude]
    if not workers:
        if len(pool) == 0:
            raise NoHealthyWorker("no workers registered")
        raise NoHealthyWorker(f"no healthy worker among {len(pool)} registered")
    return workers


def least_loaded(workers: Sequence[Worker], rng: random.Random) -> Worker:
    """The worker with the fewest requests in flight; ties broken uniformly at random."""
    best = workers[0]
    lowest = best.inflight
    ties = 1
    for worker in workers[1:]:
        load = worker.inflight
        if load < lowest:
            best, lowest, ties = worker, load, 1
        elif load == lowest:
            ties += 1
            if rng.randrange(ties) == 0:  # reservoir sampling over the tied set
                best = worker
    return best


@dataclass(slots=True)
class LeastInflight:
    rng: random.Random
    name: str = "least_inflight"

    def choose(
        self,
        pool: WorkerPool,
        key: str | None,
        now: float,
        exclude: frozenset[str] = frozenset(),
        hint: str | None = None,
    ) -> Decision:
        return Decision(least_loaded(eligible(pool, exclude), self.rng), "least_load")


@dataclass(slots=True)
class RoundRobin:
    name: str = "round_robin"
    counter: int = 0

    def choose(
        self,
        pool: WorkerPool,
        key: str | None,
        now: float,
        exclude: frozenset[str] = frozenset(),
        hint: str | None = None,
    ) -> Decision:
        workers = eligible(pool, exclude)
        worker = workers[self.counter % len(workers)]
        self.counter += 1
        return Decision(worker, "next")


@dataclass(slots=True)
class RandomChoice:
    rng: random.Random
    name: str = "random"

    def choose(
        self,
        pool: WorkerPool,
        key: str | None,
        now: float,
        exclude: frozenset[str] = frozenset(),
        hint: str | None = None,
    ) -> Decision:
        return Decision(self.rng.choice(eligible(pool, exclude)), "random")


@dataclass(slots=True)
class PowerOfTwo:
    """Sample two workers, take the one with fewer requests in flight."""

    rng: random.Random
    name: str = "power_of_two"

    def choose(
        self,
        pool: WorkerPool,
        key: str | None,
        now: float,
        exclude: frozenset[str] = frozenset(),
        hint: str | None = None,
    ) -> Decision:
        workers = eligible(pool, exclude)
        if len(workers) == 1:
            return Decision(workers[0], "single")
        a, b = self.rng.sample(workers, 2)
        return Decision(a if a.inflight <= b.inflight else b, "two_choices")


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@dataclass(slots=True)
class ConsistentHash:
    """A hash ring (virtual nodes per worker) with bounded load.

    A key goes to the first worker clockwise from its hash that may take
    traffic and is not above ``load_factor`` × the mean load (+1). When a worker
    leaves, only the keys on its arcs move.
    """

    rng: random.Random
    vnodes: int = 150
    load_factor: float = 1.25
    name: str = "consistent_hash"
    _ring_version: int = -1
    _hashes: list[int] = field(default_factory=list)
    _owners: list[str] = field(default_factory=list)

    def _rebuild(self, pool: WorkerPool) -> None:
        points = sorted(
            (_hash64(f"{url}#{i}"), url) for url in pool.urls() for i in range(self.vnodes)
        )
        self._hashes = [h for h, _ in points]
        self._owners = [u for _, u in points]
        self._ring_version = pool.version

    def choose(
        self,
        pool: WorkerPool,
        key: str | None,
        now: float,
        exclude: frozenset[str] = frozenset(),
        hint: str | None = None,
    ) -> Decision:
        workers = eligible(pool, exclude)
        if key is None:
            return Decision(least_loaded(workers, self.rng), "no_key")
        if self._ring_version != pool.version:
            self._rebuild(pool)
        by_url = {w.url: w for w in workers}
        total = sum(w.inflight for w in workers)
        bound = math.ceil(self.load_factor * (total + 1) / len(workers))
        start = bisect.bisect(self._hashes, _hash64(key))
        n = len(self._hashes)
        home: str | None = None
        for step in range(n):
            url = self._owners[(start + step) % n]
            worker = by_url.get(url)
            if worker is None:
                continue
            if home is None:
                home = url
            if worker.inflight < bound:
                return Decision(worker, "ring_hit" if url == home else "ring_walk")
        return Decision(least_loaded(workers, self.rng), "ring_overloaded")


@dataclass(slots=True)
class Pin:
    url: str
    last_used: float


@dataclass(slots=True)
class Sticky:
    """Pin each routing key to one worker, chosen by least load on first sight.

    A pin holds until its worker leaves the pool, drains or is quarantined.
    New keys avoid workers holding more than ``spill_factor`` × the mean pin
    count (+1), so one worker does not collect every session. Keys idle for
    ``ttl`` seconds are forgotten, and at most ``max_keys`` pins are kept
    (least recently used go first).
    """

    rng: random.Random
    ttl: float = 3600.0
    spill_factor: float = 1.5
    max_keys: int = 1_000_000
    name: str = "sticky"
    pins: dict[str, Pin] = field(default_factory=dict)
    pin_counts: dict[str, int] = field(default_factory=dict)

    def choose(
        self,
        pool: WorkerPool,
        key: str | None,
        now: float,
        exclude: frozenset[str] = frozenset(),
        hint: str | None = None,
    ) -> Decision:
        self.expire(now)
        if key is None:
            return Decision(least_loaded(eligible(pool, exclude), self.rng), "no_key")
        pin = self.pins.pop(key, None)
        if pin is not None:
            worker = pool.get(pin.url)
            if worker is not None and worker.routable and pin.url not in exclude:
                pin.last_used = now
                self.pins[key] = pin  # re-insert: dict order is least recently used first
                return Decision(worker, "pin_hit")
            self._unpin(pin.url)
        workers = eligible(pool, exclude)
        total = sum(self.pin_counts.get(w.url, 0) for w in workers)
        bound = self.spill_factor * (total + 1) / len(workers)
        roomy = [w for w in workers if self.pin_counts.get(w.url, 0) < bound] or workers
        worker = least_loaded(roomy, self.rng)
        if len(self.pins) >= self.max_keys:
            oldest = next(iter(self.pins))
            self._unpin(self.pins.pop(oldest).url)
        self.pins[key] = Pin(worker.url, now)
        self.pin_counts[worker.url] = self.pin_counts.get(worker.url, 0) + 1
        return Decision(worker, "pin_new" if pin is None else "pin_moved")

    def expire(self, now: float) -> int:
        """Forget keys idle longer than ``ttl``; returns how many went."""
        expired = 0
        cutoff = now - self.ttl
        while self.pins:
            key = next(iter(self.pins))
            pin = self.pins[key]
            if pin.last_used > cutoff:
                break
            del self.pins[key]
            self._unpin(pin.url)
            expired += 1
        return expired

    def _unpin(self, url: str) -> None:
        left = self.pin_counts.get(url, 0) - 1
        if left > 0:
            self.pin_counts[url] = left
        else:
            self.pin_counts.pop(url, None)


@dataclass(slots=True)
class CacheAware:
    """Send a request to the worker that served its longest cached prefix.

    The token cache remembers which worker produced each cached span and
    passes it as ``hint``; following it keeps GRPO groups and later turns on
    the worker whose KV cache holds their prefix. When loads are imbalanced
    (max - min above ``balance_abs`` and max above ``balance_rel`` × min) or
    there is no hint, the least loaded worker gets the request instead.
    """

    rng: random.Random
    balance_abs: int = 32
    balance_rel: float = 1.5
    name: str = "cache_aware"

    def choose(
        self,
        pool: WorkerPool,
        key: str | None,
        now: float,
        exclude: frozenset[str] = frozenset(),
        hint: str | None = None,
    ) -> Decision:
        workers = eligible(pool, exclude)
        loads = [w.inflight for w in workers]
        low, high = min(loads), max(loads)
        if high - low > self.balance_abs and high > low * self.balance_rel:
            return Decision(least_loaded(workers, self.rng), "imbalanced")
        if hint is not None:
            for worker in workers:
                if worker.url == hint:
                    return Decision(worker, "cache_hit")
        return Decision(least_loaded(workers, self.rng), "cache_miss")


def make_policy(
    name: str,
    rng: random.Random,
    *,
    sticky_ttl: float = 3600.0,
    sticky_spill_factor: float = 1.5,
    hash_load_factor: float = 1.25,
    balance_abs: int = 32,
    balance_rel: float = 1.5,
) -> Policy:
    """Build a policy by its command-line name."""
    if name == "least_inflight":
        return LeastInflight(rng)
    if name == "cache_aware":
        return CacheAware(rng, balance_abs=balance_abs, balance_rel=balance_rel)
    if name == "round_robin":
        return RoundRobin()
    if name == "power_of_two":
        return PowerOfTwo(rng)
    if name == "random":
        return RandomChoice(rng)
    if name == "consistent_hash":
        return ConsistentHash(rng, load_factor=hash_load_factor)
    if name in ("sticky", "manual"):
        return Sticky(rng, ttl=sticky_ttl, spill_factor=sticky_spill_factor, name=name)
    raise ConfigError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
