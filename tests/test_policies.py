"""Routing policies: load balance, fairness of ties, hashing, pins and their bounds."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from trio_router.errors import ConfigError, NoHealthyWorker
from trio_router.policies import (
    POLICY_NAMES,
    ConsistentHash,
    LeastInflight,
    Policy,
    PowerOfTwo,
    RandomChoice,
    RoundRobin,
    Sticky,
    make_policy,
)
from trio_router.pool import Lease, WorkerPool, WorkerState

from .pools import make_pool, url, worker


def load(pool: WorkerPool, i: int, n: int) -> list[Lease]:
    """Put ``n`` requests in flight on worker ``i``."""
    return [pool.acquire(worker(pool, i)) for _ in range(n)]


def quarantine(pool: WorkerPool, i: int) -> None:
    for _ in range(pool.rules.failure_threshold):
        pool.probe_failed(url(i), 0.0, "down")
    assert worker(pool, i).state is WorkerState.QUARANTINED


def rng() -> random.Random:
    return random.Random(1234)


def route(
    policy: Policy, pool: WorkerPool, keys: Sequence[str], now: float = 0.0
) -> dict[str, str]:
    return {k: policy.choose(pool, k, now).worker.url for k in keys}


KEYS = [f"session-{i}" for i in range(1000)]


# -- every policy ----------------------------------------------------------------


@pytest.mark.parametrize("name", POLICY_NAMES)
@pytest.mark.parametrize("key", [None, "session-1"])
def test_no_workers_raises_no_healthy_worker(name: str, key: str | None) -> None:
    policy = make_policy(name, rng())
    with pytest.raises(NoHealthyWorker, match="no workers registered") as info:
        policy.choose(WorkerPool(), key, 0.0)
    assert info.value.status == 503


@pytest.mark.parametrize("name", POLICY_NAMES)
@pytest.mark.parametrize("key", [None, "session-1"])
def test_no_healthy_worker_raises(name: str, key: str | None) -> None:
    pool = make_pool(2)
    quarantine(pool, 0)
    quarantine(pool, 1)
    pool.add(url(2), 0.0)  # pending
    policy = make_policy(name, rng())
    with pytest.raises(NoHealthyWorker, match="no healthy worker among 3 registered"):
        policy.choose(pool, key, 0.0)


@pytest.mark.parametrize("name", POLICY_NAMES)
@pytest.mark.parametrize("key", [None, "session-1"])
def test_every_policy_honours_exclude(name: str, key: str | None) -> None:
    pool = make_pool(3)
    policy = make_policy(name, rng())
    first = policy.choose(pool, key, 0.0).worker.url
    others = {url(i) for i in range(3)} - {first}
    for _ in range(50):
        retry = policy.choose(pool, key, 0.0, exclude=frozenset({first})).worker.url
        assert retry in others
    only = url(2)
    excluded = frozenset({url(0), url(1)})
    assert {policy.choose(pool, key, 0.0, exclude=excluded).worker.url for _ in range(20)} == {only}
    with pytest.raises(NoHealthyWorker):
        policy.choose(pool, key, 0.0, exclude=frozenset(url(i) for i in range(3)))


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_prefers_healthy_over_suspect(name: str) -> None:
    pool = make_pool(2)
    pool.request_failed(worker(pool, 0), 0.0, "reset")
    policy = make_policy(name, rng())
    chosen = {policy.choose(pool, f"k{i}", 0.0).worker.url for i in range(50)}
    assert chosen == {url(1)}


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_falls_back_to_suspect(name: str) -> None:
    pool = make_pool(2)
    pool.request_failed(worker(pool, 0), 0.0, "reset")
    quarantine(pool, 1)
    policy = make_policy(name, rng())
    assert policy.choose(pool, "k", 0.0).worker is worker(pool, 0)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_skips_draining_and_pending(name: str) -> None:
    pool = make_pool(3)
    lease = pool.acquire(worker(pool, 0))
    pool.remove(url(0))  # draining
    pool.add(url(9), 0.0)  # pending
    policy = make_policy(name, rng())
    chosen = {policy.choose(pool, f"k{i}", 0.0).worker.url for i in range(100)}
    assert chosen <= {url(1), url(2)}
    lease.release()


# -- make_policy -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("least_inflight", LeastInflight),
        ("round_robin", RoundRobin),
        ("power_of_two", PowerOfTwo),
        ("random", RandomChoice),
        ("consistent_hash", ConsistentHash),
        ("sticky", Sticky),
        ("manual", Sticky),
    ],
)
def test_make_policy_builds_each_name(name: str, cls: type[Any]) -> None:
    policy = make_policy(name, rng())
    assert isinstance(policy, cls)
    assert policy.name == name  # "manual" keeps its own name in metrics


def test_make_policy_covers_every_listed_name() -> None:
    assert set(POLICY_NAMES) == {
        "least_inflight",
        "cache_aware",
        "round_robin",
        "power_of_two",
        "random",
        "consistent_hash",
        "sticky",
        "manual",
    }
    pool = make_pool(2)
    for name in POLICY_NAMES:
        assert make_policy(name, rng()).choose(pool, "k", 0.0).worker.url in pool.urls()


def test_make_policy_passes_tuning_through() -> None:
    sticky = make_policy("manual", rng(), sticky_ttl=5.0, sticky_spill_factor=2.0)
    assert isinstance(sticky, Sticky)
    assert (sticky.ttl, sticky.spill_factor) == (5.0, 2.0)
    ring = make_policy("consistent_hash", rng(), hash_load_factor=1.5)
    assert isinstance(ring, ConsistentHash)
    assert ring.load_factor == 1.5


@pytest.mark.parametrize("name", ["", "least-inflight", "Sticky", "cache-aware", "hash"])
def test_make_policy_rejects_unknown_names(name: str) -> None:
    with pytest.raises(ConfigError, match="unknown policy") as info:
        make_policy(name, rng())
    assert "least_inflight" in info.value.message
    assert "consistent_hash" in info.value.message


# -- least_inflight ----------------------------------------------------------------


def test_least_inflight_picks_the_least_loaded() -> None:
    pool = make_pool(3)
    load(pool, 0, 3)
    load(pool, 1, 1)
    load(pool, 2, 2)
    policy = LeastInflight(rng())
    for _ in range(20):
        decision = policy.choose(pool, None, 0.0)
        assert decision.worker is worker(pool, 1)
        assert decision.branch == "least_load"


def test_least_inflight_breaks_ties_fairly() -> None:
    pool = make_pool(3)
    policy = LeastInflight(rng())
    counts: Counter[str] = Counter()
    for _ in range(3000):
        chosen = policy.choose(pool, None, 0.0).worker
        pool.acquire(chosen).release()
        counts[chosen.url] += 1
    assert set(counts) == {url(0), url(1), url(2)}
    for n in counts.values():
        assert 900 <= n <= 1100, counts


def test_least_inflight_breaks_ties_only_among_the_least_loaded() -> None:
    pool = make_pool(4)
    load(pool, 0, 1)
    load(pool, 3, 1)
    policy = LeastInflight(rng())
    counts = Counter(policy.choose(pool, None, 0.0).worker.url for _ in range(2000))
    assert set(counts) == {url(1), url(2)}
    assert 900 <= counts[url(1)] <= 1100, counts


def test_least_inflight_spreads_concurrent_load_evenly() -> None:
    pool = make_pool(4)
    policy = LeastInflight(rng())
    for _ in range(41):
        pool.acquire(policy.choose(pool, None, 0.0).worker)
        loads = [w.inflight for w in pool]
        assert max(loads) - min(loads) <= 1
    assert sorted(w.inflight for w in pool) == [10, 10, 10, 11]


# -- round_robin -------------------------------------------------------------------


def test_round_robin_cycles() -> None:
    pool = make_pool(3)
    load(pool, 0, 5)  # load does not matter
    policy = RoundRobin()
    chosen = [policy.choose(pool, None, 0.0) for _ in range(7)]
    assert [d.worker.url for d in chosen] == [url(i % 3) for i in range(7)]
    assert {d.branch for d in chosen} == {"next"}


def test_round_robin_skips_unavailable_workers() -> None:
    pool = make_pool(3)
    quarantine(pool, 1)
    policy = RoundRobin()
    chosen = [policy.choose(pool, None, 0.0).worker.url for _ in range(6)]
    assert chosen == [url(0), url(2)] * 3


# -- power_of_two ------------------------------------------------------------------


class RecordingRandom(random.Random):
    """Remembers the two workers power_of_two sampled."""

    last_sample: list[Any]

    def sample(self, population: Any, k: int, **kwargs: Any) -> list[Any]:
        self.last_sample = super().sample(population, k, **kwargs)
        return self.last_sample


def test_power_of_two_never_picks_the_more_loaded_sample() -> None:
    pool = make_pool(6)
    for i in range(6):
        load(pool, i, i)
    recorder = RecordingRandom(7)
    policy = PowerOfTwo(recorder)
    seen: Counter[str] = Counter()
    for _ in range(500):
        decision = policy.choose(pool, None, 0.0)
        a, b = recorder.last_sample
        assert a is not b
        assert decision.worker is min((a, b), key=lambda w: w.inflight)
        assert decision.branch == "two_choices"
        seen[decision.worker.url] += 1
    assert url(5) not in seen  # the busiest never wins a pair
    assert set(seen) == {url(i) for i in range(5)}


def test_power_of_two_with_two_workers_never_picks_the_busier() -> None:
    pool = make_pool(2)
    load(pool, 0, 1)
    policy = PowerOfTwo(rng())
    assert {policy.choose(pool, None, 0.0).worker.url for _ in range(200)} == {url(1)}


def test_power_of_two_with_one_worker() -> None:
    pool = make_pool(1)
    decision = PowerOfTwo(rng()).choose(pool, None, 0.0)
    assert (decision.worker, decision.branch) == (worker(pool, 0), "single")


# -- random ------------------------------------------------------------------------


def test_random_covers_all_workers() -> None:
    pool = make_pool(4)
    policy = RandomChoice(rng())
    decisions = [policy.choose(pool, None, 0.0) for _ in range(2000)]
    counts = Counter(d.worker.url for d in decisions)
    assert set(counts) == {url(i) for i in range(4)}
    assert all(400 <= n <= 600 for n in counts.values()), counts
    assert {d.branch for d in decisions} == {"random"}


# -- consistent_hash ---------------------------------------------------------------


def test_consistent_hash_same_key_same_worker() -> None:
    pool = make_pool(4)
    policy = ConsistentHash(rng())
    first = route(policy, pool, KEYS)
    assert route(policy, pool, KEYS) == first
    # independent of the rng and of the policy instance
    assert route(ConsistentHash(random.Random(99)), pool, KEYS) == first
    assert {policy.choose(pool, k, 0.0).branch for k in KEYS[:50]} == {"ring_hit"}


def test_consistent_hash_spreads_keys() -> None:
    pool = make_pool(4)
    counts = Counter(route(ConsistentHash(rng()), pool, KEYS).values())
    assert set(counts) == {url(i) for i in range(4)}
    assert all(150 <= n <= 350 for n in counts.values()), counts


def test_consistent_hash_removal_moves_only_that_workers_keys() -> None:
    pool = make_pool(4)
    policy = ConsistentHash(rng())
    before = route(policy, pool, KEYS)
    gone = url(2)
    assert sum(u == gone for u in before.values()) > 100

    pool.remove(gone)
    during = route(policy, pool, KEYS)
    for key in KEYS:
        if before[key] == gone:
            assert during[key] != gone
        else:
            assert during[key] == before[key], key
    moved_to = Counter(during[k] for k in KEYS if before[k] == gone)
    assert len(moved_to) == 3  # its keys spread over the survivors

    pool.add(gone, 1.0)
    pending = route(policy, pool, KEYS)
    assert gone not in pending.values()  # not routable until a probe passes
    pool.probe_succeeded(gone, 1.0)
    assert route(policy, pool, KEYS) == before


def test_consistent_hash_quarantine_moves_only_that_workers_keys() -> None:
    pool = make_pool(3)
    policy = ConsistentHash(rng())
    before = route(policy, pool, KEYS)
    quarantine(pool, 0)
    for key in KEYS:
        decision = policy.choose(pool, key, 0.0)
        if before[key] == url(0):
            assert decision.worker.url != url(0)
        else:
            assert (decision.worker.url, decision.branch) == (before[key], "ring_hit")
    pool.probe_succeeded(url(0), 1.0)
    pool.probe_succeeded(url(0), 2.0)
    assert route(policy, pool, KEYS) == before


def test_consistent_hash_drained_worker_gets_its_keys_back_when_readded() -> None:
    pool = make_pool(3)
    policy = ConsistentHash(rng())
    before = route(policy, pool, KEYS)
    # one request in flight everywhere: bound = ceil(1.25 * 4 / 3) = 2, so no load walk
    leases = [pool.acquire(worker(pool, i)) for i in range(3)]
    pool.remove(url(0))  # draining
    during = route(policy, pool, KEYS)
    assert url(0) not in during.values()
    pool.add(url(0), 1.0)  # back before its last request finished
    assert route(policy, pool, KEYS) == before
    for lease in leases:
        lease.release()
    assert pool.get(url(0)) is not None
    assert route(policy, pool, KEYS) == before


def test_consistent_hash_bounded_load_walks_past_a_busy_home() -> None:
    pool = make_pool(3)
    policy = ConsistentHash(rng())
    home = worker(pool, 0)
    key = next(k for k in KEYS if policy.choose(pool, k, 0.0).worker is home)
    assert policy.choose(pool, key, 0.0).branch == "ring_hit"

    leases = load(pool, 0, 10)  # bound = ceil(1.25 * 11 / 3) = 5
    decision = policy.choose(pool, key, 0.0)
    assert decision.worker is not home
    assert decision.branch == "ring_walk"

    for lease in leases:
        lease.release()
    decision = policy.choose(pool, key, 0.0)
    assert (decision.worker, decision.branch) == (home, "ring_hit")


def test_consistent_hash_keeps_home_under_moderate_load() -> None:
    pool = make_pool(3)
    policy = ConsistentHash(rng())
    home = worker(pool, 0)
    key = next(k for k in KEYS if policy.choose(pool, k, 0.0).worker is home)
    load(pool, 0, 2)
    load(pool, 1, 2)
    load(pool, 2, 2)
    # bound = ceil(1.25 * 7 / 3) = 3 > 2: still at home
    assert policy.choose(pool, key, 0.0).worker is home


def test_consistent_hash_without_key_uses_least_load() -> None:
    pool = make_pool(3)
    load(pool, 0, 2)
    load(pool, 2, 1)
    policy = ConsistentHash(rng())
    for _ in range(20):
        decision = policy.choose(pool, None, 0.0)
        assert (decision.worker, decision.branch) == (worker(pool, 1), "no_key")


# -- sticky ------------------------------------------------------------------------


def test_sticky_pins_new_key_by_least_load_and_keeps_it() -> None:
    pool = make_pool(3)
    load(pool, 0, 2)
    load(pool, 1, 1)
    policy = Sticky(rng())
    first = policy.choose(pool, "s", 0.0)
    assert (first.worker, first.branch) == (worker(pool, 2), "pin_new")
    assert policy.pins["s"].url == url(2)
    assert policy.pin_counts == {url(2): 1}

    load(pool, 2, 10)  # the pinned worker gets much busier
    for t in range(1, 20):
        decision = policy.choose(pool, "s", float(t))
        assert (decision.worker, decision.branch) == (worker(pool, 2), "pin_hit")
    assert policy.pins["s"].last_used == 19.0
    assert policy.pin_counts == {url(2): 1}


def test_sticky_without_key_uses_least_load() -> None:
    pool = make_pool(2)
    load(pool, 0, 1)
    policy = Sticky(rng())
    decision = policy.choose(pool, None, 0.0)
    assert (decision.worker, decision.branch) == (worker(pool, 1), "no_key")
    assert policy.pins == {}


def test_sticky_key_moves_when_its_worker_is_removed() -> None:
    pool = make_pool(3)
    policy = Sticky(rng())
    home = policy.choose(pool, "s", 0.0).worker
    pool.remove(home.url)
    moved = policy.choose(pool, "s", 1.0)
    assert moved.branch == "pin_moved"
    assert moved.worker.url != home.url
    assert policy.pin_counts == {moved.worker.url: 1}
    after = policy.choose(pool, "s", 2.0)
    assert (after.worker, after.branch) == (moved.worker, "pin_hit")


def test_sticky_key_moves_when_its_worker_drains() -> None:
    pool = make_pool(2)
    policy = Sticky(rng())
    home = policy.choose(pool, "s", 0.0).worker
    lease = pool.acquire(home)
    pool.remove(home.url)
    moved = policy.choose(pool, "s", 1.0)
    assert moved.branch == "pin_moved"
    assert moved.worker is not home
    lease.release()


def test_sticky_key_moves_when_its_worker_is_quarantined() -> None:
    pool = make_pool(3)
    policy = Sticky(rng())
    home = policy.choose(pool, "s", 0.0).worker
    for _ in range(3):
        pool.probe_failed(home.url, 1.0, "down")
    moved = policy.choose(pool, "s", 1.0)
    assert moved.branch == "pin_moved"
    assert moved.worker is not home
    # recovery does not steal it back
    pool.probe_succeeded(home.url, 2.0)
    pool.probe_succeeded(home.url, 3.0)
    assert home.state is WorkerState.HEALTHY
    assert policy.choose(pool, "s", 4.0).worker is moved.worker


def test_sticky_suspect_worker_keeps_its_pins() -> None:
    pool = make_pool(3)
    policy = Sticky(rng())
    home = policy.choose(pool, "s", 0.0).worker
    pool.request_failed(home, 1.0, "reset")
    assert home.state is WorkerState.SUSPECT
    decision = policy.choose(pool, "s", 2.0)
    assert (decision.worker, decision.branch) == (home, "pin_hit")
    # but new keys avoid it while healthy workers remain
    assert all(policy.choose(pool, f"new-{i}", 2.0).worker is not home for i in range(20))


def test_sticky_retry_never_returns_the_excluded_pin() -> None:
    pool = make_pool(3)
    policy = Sticky(rng())
    home = policy.choose(pool, "s", 0.0).worker
    retry = policy.choose(pool, "s", 1.0, exclude=frozenset({home.url}))
    assert retry.worker is not home
    assert sum(policy.pin_counts.values()) == len(policy.pins) == 1


def test_sticky_new_keys_spread_evenly_when_idle() -> None:
    pool = make_pool(3)
    policy = Sticky(rng())
    route(policy, pool, KEYS[:300])
    counts = Counter(pin.url for pin in policy.pins.values())
    assert all(80 <= n <= 120 for n in counts.values()), counts


def test_sticky_spill_over_bound_under_skewed_load() -> None:
    pool = make_pool(2)
    load(pool, 0, 50)  # least load alone would send every new key to worker 1
    policy = Sticky(rng(), spill_factor=1.5)
    for i, key in enumerate(KEYS[:100]):
        policy.choose(pool, key, 0.0)
        total = i + 1
        mean = total / 2
        for w in pool:
            assert policy.pin_counts.get(w.url, 0) <= policy.spill_factor * mean + 1
    counts = Counter(pin.url for pin in policy.pins.values())
    assert counts == Counter(policy.pin_counts)
    assert sum(counts.values()) == 100
    assert counts[url(1)] <= 76
    assert counts[url(0)] >= 24


def test_sticky_ttl_forgets_idle_keys_via_expire() -> None:
    pool = make_pool(2)
    policy = Sticky(rng(), ttl=10.0)
    policy.choose(pool, "a", 0.0)
    policy.choose(pool, "b", 5.0)
    policy.choose(pool, "a", 8.0)  # a is used again: its idle clock restarts
    assert policy.expire(14.0) == 0
    assert policy.expire(15.5) == 1
    assert set(policy.pins) == {"a"}
    assert policy.expire(18.5) == 1
    assert policy.pins == {}
    assert policy.pin_counts == {}


def test_sticky_ttl_forgets_idle_keys_via_choose() -> None:
    pool = make_pool(2)
    policy = Sticky(rng(), ttl=10.0)
    home = policy.choose(pool, "s", 0.0).worker
    other = next(w for w in pool if w is not home)
    leases = [pool.acquire(home) for _ in range(5)]  # a fresh pin would now avoid it
    assert policy.choose(pool, "s", 9.0).branch == "pin_hit"
    decision = policy.choose(pool, "s", 20.0)  # idle 11 s > ttl
    assert (decision.worker, decision.branch) == (other, "pin_new")
    assert policy.pin_counts == {other.url: 1}
    for lease in leases:
        lease.release()


def test_sticky_max_keys_evicts_least_recently_used() -> None:
    pool = make_pool(2)
    policy = Sticky(rng(), max_keys=3)
    for t, key in enumerate(["a", "b", "c"]):
        policy.choose(pool, key, float(t))
    assert policy.choose(pool, "a", 3.0).branch == "pin_hit"  # b is now the oldest
    assert policy.choose(pool, "d", 4.0).branch == "pin_new"
    assert list(policy.pins) == ["c", "a", "d"]
    assert sum(policy.pin_counts.values()) == 3
    assert Counter(p.url for p in policy.pins.values()) == Counter(policy.pin_counts)
    assert policy.choose(pool, "b", 5.0).branch == "pin_new"
    assert list(policy.pins) == ["a", "d", "b"]


def test_sticky_pin_counts_stay_consistent_through_churn() -> None:
    pool = make_pool(4)
    policy = Sticky(rng(), ttl=50.0, max_keys=40)
    r = random.Random(5)
    for t in range(2000):
        now = float(t)
        if t % 97 == 0:
            i = r.randrange(4)
            if pool.get(url(i)) is None:
                pool.add(url(i), now)
                pool.probe_succeeded(url(i), now)
            elif len(pool) > 1:
                pool.remove(url(i))
        key = f"k{r.randrange(120)}"
        decision = policy.choose(pool, key, now)
        assert decision.worker.routable
        assert policy.pins[key].url == decision.worker.url
        assert len(policy.pins) <= 40
        live = Counter(p.url for p in policy.pins.values())
        assert live == Counter(policy.pin_counts)
