"""The worker pool: URL normalisation, membership, leases, draining and health."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from trio_router.errors import BadRequest, NotFound
from trio_router.pool import (
    HealthRules,
    Lease,
    WorkerPool,
    WorkerState,
    normalize_worker_url,
)

from .pools import make_pool, url, worker


def candidate_urls(pool: WorkerPool) -> set[str]:
    return {w.url for w in pool.candidates()}


# -- normalize_worker_url ----------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://10.0.0.1:8000", "http://10.0.0.1:8000"),
        ("  http://10.0.0.1:8000  ", "http://10.0.0.1:8000"),
        ("http://10.0.0.1:8000/", "http://10.0.0.1:8000"),
        ("HTTP://Worker-1.Example.COM:30000", "http://worker-1.example.com:30000"),
        ("http://worker", "http://worker:80"),
        ("https://worker", "https://worker:443"),
        ("https://worker:8443", "https://worker:8443"),
        ("http://[::1]:8000", "http://[::1]:8000"),
        ("http://[2001:DB8::1]", "http://[2001:db8::1]:80"),
        ("https://[fe80::1]/", "https://[fe80::1]:443"),
    ],
)
def test_normalize_worker_url_canonical_form(raw: str, expected: str) -> None:
    assert normalize_worker_url(raw) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (None, "worker url is required"),
        (8000, "worker url is required"),
        ("", "worker url is required"),
        ("   ", "worker url is required"),
        ("10.0.0.1:8000", "needs a scheme"),
        ("localhost", "needs a scheme"),
        ("ftp://10.0.0.1:8000", "scheme must be http or https"),
        ("unix://socket", "scheme must be http or https"),
        ("http://", "has no host"),
        ("http://:8000", "has no host"),
        ("http://user:secret@10.0.0.1:8000", "must not carry credentials"),
        ("http://user@10.0.0.1:8000", "must not carry credentials"),
        ("http://10.0.0.1:8000/generate", "without a path"),
        ("http://10.0.0.1:8000?x=1", "without a path"),
        ("http://10.0.0.1:8000#frag", "without a path"),
        ("http://10.0.0.1:99999", "invalid worker url"),
        ("http://10.0.0.1:port", "invalid worker url"),
        ("http://[::1:8000", "invalid worker url"),
        # found by the hostile pass: a 500 on /add_worker, a traceback for --worker-urls
        ("http://a..b:8000", "'a..b' is not a valid host name"),
        ("http://.a:8000", "not a valid host name"),
        ("http://-a-:8000", "not a valid host name"),
        ("http://a%20b:8000", "not a valid host name"),
        ("http://" + "a" * 64 + ":8000", "not a valid host name"),
        ("http://" + "a." * 127 + "a:8000", "not a valid host name"),  # 255 characters
        ("http://10.0.0.1:0", "port 0 is not a port to connect to"),
    ],
)
def test_normalize_worker_url_rejects_bad_input(raw: object, message: str) -> None:
    with pytest.raises(BadRequest, match=message) as info:
        normalize_worker_url(raw)
    assert info.value.status == 400


def test_spellings_of_one_url_register_one_worker() -> None:
    pool = WorkerPool()
    spellings = ["http://Worker:80", "http://worker", "HTTP://WORKER/", " http://worker:80 "]
    workers = [pool.add(normalize_worker_url(s), 0.0)[0] for s in spellings]
    assert all(w is workers[0] for w in workers)
    assert pool.urls() == ["http://worker:80"]


# -- membership ----------------------------------------------------------------


def test_add_is_idempotent() -> None:
    pool = WorkerPool()
    first, new = pool.add(url(0), 1.0)
    assert new is True
    assert pool.version == 1
    again, new_again = pool.add(url(0), 2.0)
    assert new_again is False
    assert again is first
    assert again.added_at == 1.0
    assert len(pool) == 1
    assert pool.version == 1


def test_readding_keeps_health_and_counters() -> None:
    pool = make_pool(1)
    w = worker(pool, 0)
    pool.acquire(w).release()
    same, new = pool.add(url(0), 5.0)
    assert (same, new) == (w, False)
    assert same.state is WorkerState.HEALTHY
    assert same.requests_total == 1


def test_new_worker_is_pending_and_not_a_candidate_until_probe_succeeds() -> None:
    pool = WorkerPool()
    w, _ = pool.add(url(0), 0.0)
    assert w.state is WorkerState.PENDING
    assert not w.routable
    assert pool.candidates() == []
    transition = pool.probe_succeeded(url(0), 1.0)
    assert transition is not None
    assert (transition.old, transition.new) == (WorkerState.PENDING, WorkerState.HEALTHY)
    assert w.state_since == 1.0
    assert pool.candidates() == [w]


def test_remove_idle_worker_deletes_it_and_bumps_version() -> None:
    pool = make_pool(2)
    version = pool.version
    removed = pool.remove(url(0))
    assert removed.url == url(0)
    assert pool.get(url(0)) is None
    assert pool.urls() == [url(1)]
    assert len(pool) == 1
    assert pool.version == version + 1


def test_remove_unknown_worker_raises_not_found() -> None:
    pool = make_pool(1)
    with pytest.raises(NotFound, match=r"not registered: http://10\.0\.0\.9:8000"):
        pool.remove(url(9))
    pool.remove(url(0))
    with pytest.raises(NotFound):
        pool.remove(url(0))


def test_probes_for_unknown_workers_are_ignored() -> None:
    pool = WorkerPool()
    assert pool.probe_succeeded(url(0), 0.0) is None
    assert pool.probe_failed(url(0), 0.0, "refused") is None
    assert len(pool) == 0


# -- leases and draining -------------------------------------------------------


def test_leases_count_inflight_and_release_is_idempotent() -> None:
    pool = make_pool(1)
    w = worker(pool, 0)
    a = pool.acquire(w)
    b = pool.acquire(w)
    assert isinstance(a, Lease)
    assert (w.inflight, w.requests_total) == (2, 2)
    a.release()
    a.release()
    assert w.inflight == 1
    b.release()
    b.release()
    assert (w.inflight, w.requests_total) == (0, 2)


def test_removing_a_busy_worker_drains_it() -> None:
    pool = make_pool(2)
    busy = worker(pool, 0)
    leases = [pool.acquire(busy), pool.acquire(busy)]
    version = pool.version

    pool.remove(url(0))

    assert busy.draining
    assert pool.version == version + 1
    assert pool.get(url(0)) is busy
    assert list(pool) == [busy, worker(pool, 1)]  # still listed, as draining
    assert busy.snapshot()["state"] == "draining"
    assert busy.snapshot()["healthy"] is False
    assert pool.urls() == [url(1)]
    assert candidate_urls(pool) == {url(1)}
    with pytest.raises(BadRequest, match="not accepting requests"):
        pool.acquire(busy)
    with pytest.raises(NotFound):
        pool.remove(url(0))  # already on its way out

    leases[0].release()
    assert pool.get(url(0)) is busy
    assert pool.version == version + 1
    leases[1].release()
    assert pool.get(url(0)) is None
    assert list(pool) == [worker(pool, 1)]
    assert pool.version == version + 2
    leases[1].release()  # idempotent even after the worker is gone
    assert busy.inflight == 0


def test_readding_a_draining_worker_keeps_it() -> None:
    pool = make_pool(2)
    busy = worker(pool, 0)
    lease = pool.acquire(busy)
    pool.remove(url(0))
    version = pool.version

    same, new = pool.add(url(0), 3.0)

    assert same is busy
    assert new is False
    assert not busy.draining
    assert busy.state is WorkerState.HEALTHY
    assert pool.version == version + 1  # back in urls(): policies must rebuild
    assert pool.urls() == [url(0), url(1)]
    assert candidate_urls(pool) == {url(0), url(1)}
    lease.release()
    assert pool.get(url(0)) is busy
    assert busy.inflight == 0


def test_stale_worker_object_cannot_be_acquired() -> None:
    pool = make_pool(1)
    old = worker(pool, 0)
    pool.remove(url(0))
    pool.add(url(0), 1.0)
    with pytest.raises(BadRequest):
        pool.acquire(old)


def test_release_of_old_lease_does_not_delete_a_readded_worker() -> None:
    pool = make_pool(1)
    old = worker(pool, 0)
    lease = pool.acquire(old)
    pool.remove(url(0))
    pool.add(url(0), 1.0)  # un-drains the same object
    pool.remove(url(0))  # drains again
    lease.release()
    assert pool.get(url(0)) is None
    assert len(pool) == 0


# -- active health: probes -----------------------------------------------------


def test_quarantine_after_failure_threshold_consecutive_probe_failures() -> None:
    pool = make_pool(1, rules=HealthRules(failure_threshold=3, success_threshold=2))
    w = worker(pool, 0)
    assert pool.probe_failed(url(0), 1.0, "timeout") is None
    assert pool.probe_failed(url(0), 2.0, "timeout") is None
    assert w.state is WorkerState.HEALTHY
    assert w.consecutive_failures == 2
    transition = pool.probe_failed(url(0), 3.0, "connection refused")
    assert transition is not None
    assert (transition.old, transition.new) == (WorkerState.HEALTHY, WorkerState.QUARANTINED)
    assert transition.reason == "connection refused"
    assert w.last_error == "connection refused"
    assert w.last_checked == 3.0
    assert w.state_since == 3.0
    assert pool.candidates() == []
    # further failures do not report another transition
    assert pool.probe_failed(url(0), 4.0, "timeout") is None


def test_probe_success_between_failures_resets_the_failure_count() -> None:
    pool = make_pool(1, rules=HealthRules(failure_threshold=3))
    w = worker(pool, 0)
    for t in range(10):
        pool.probe_failed(url(0), float(t), "timeout")
        pool.probe_failed(url(0), float(t), "timeout")
        pool.probe_succeeded(url(0), float(t))
    assert w.state is WorkerState.HEALTHY


def test_a_pending_worker_stays_pending_through_failed_probes() -> None:
    # an engine still loading its model refuses connections, then answers 503: it is
    # not failing, it has not started (quarantining it would put it on probation)
    pool = WorkerPool(rules=HealthRules(failure_threshold=2))
    w, _ = pool.add(url(0), 0.0)
    for t in range(1, 6):
        assert pool.probe_failed(url(0), float(t), "health probe answered 503") is None
    assert w.state is WorkerState.PENDING
    assert w.last_error == "health probe answered 503"
    assert pool.candidates() == []
    transition = pool.probe_succeeded(url(0), 6.0)
    assert transition is not None
    assert (transition.old, transition.new) == (WorkerState.PENDING, WorkerState.HEALTHY)
    assert (w.quarantines, w.last_error) == (0, None)


def test_a_recovered_worker_shows_no_stale_last_error() -> None:
    pool = make_pool(1, rules=HealthRules(failure_threshold=1, success_threshold=1))
    w = worker(pool, 0)
    pool.probe_failed(url(0), 1.0, "health probe failed: ConnectError")
    assert (w.state, w.last_error) == (WorkerState.QUARANTINED, "health probe failed: ConnectError")
    pool.probe_succeeded(url(0), 2.0)
    assert (w.state, w.last_error) == (WorkerState.HEALTHY, None)
    assert w.snapshot()["last_error"] is None


def test_readmission_needs_success_threshold_consecutive_successes() -> None:
    pool = make_pool(1, rules=HealthRules(failure_threshold=2, success_threshold=3))
    w = worker(pool, 0)
    pool.probe_failed(url(0), 1.0, "down")
    pool.probe_failed(url(0), 2.0, "down")
    assert w.state is WorkerState.QUARANTINED

    assert pool.probe_succeeded(url(0), 3.0) is None
    assert pool.probe_succeeded(url(0), 4.0) is None
    assert w.state is WorkerState.QUARANTINED
    pool.probe_failed(url(0), 5.0, "flap")  # resets the success streak
    assert pool.probe_succeeded(url(0), 6.0) is None
    assert pool.probe_succeeded(url(0), 7.0) is None
    assert w.state is WorkerState.QUARANTINED
    assert pool.candidates() == []

    transition = pool.probe_succeeded(url(0), 8.0)
    assert transition is not None
    assert (transition.old, transition.new) == (WorkerState.QUARANTINED, WorkerState.HEALTHY)
    assert transition.reason == "recovered"
    assert w.consecutive_failures == 0
    assert pool.candidates() == [w]


def test_passive_success_does_not_readmit_a_quarantined_worker() -> None:
    pool = make_pool(1, rules=HealthRules(failure_threshold=1))
    w = worker(pool, 0)
    lease = pool.acquire(w)
    pool.probe_failed(url(0), 1.0, "down")
    assert w.state is WorkerState.QUARANTINED
    assert pool.request_succeeded(w, 2.0) is None  # a request that was already in flight
    lease.release()
    assert w.state is WorkerState.QUARANTINED


# -- passive health: proxied requests --------------------------------------------


def test_passive_failure_makes_healthy_worker_suspect() -> None:
    pool = make_pool(2)
    w = worker(pool, 0)
    transition = pool.request_failed(w, 1.0, "502 from upstream")
    assert transition is not None
    assert (transition.old, transition.new) == (WorkerState.HEALTHY, WorkerState.SUSPECT)
    assert transition.reason == "502 from upstream"
    assert w.errors_total == 1
    assert w.routable
    assert w.snapshot()["healthy"] is False
    assert candidate_urls(pool) == {url(1)}  # healthy ones first


def test_suspect_worker_is_used_only_when_no_healthy_one_remains() -> None:
    pool = make_pool(2, rules=HealthRules(failure_threshold=2))
    suspect = worker(pool, 0)
    pool.request_failed(suspect, 1.0, "reset")
    assert candidate_urls(pool) == {url(1)}
    pool.probe_failed(url(1), 2.0, "down")
    pool.probe_failed(url(1), 3.0, "down")
    assert worker(pool, 1).state is WorkerState.QUARANTINED
    assert pool.candidates() == [suspect]


def test_successful_request_returns_suspect_to_healthy() -> None:
    pool = make_pool(1)
    w = worker(pool, 0)
    pool.request_failed(w, 1.0, "reset")
    transition = pool.request_succeeded(w, 2.0)
    assert transition is not None
    assert (transition.old, transition.new, transition.reason) == (
        WorkerState.SUSPECT,
        WorkerState.HEALTHY,
        "request ok",
    )
    assert w.consecutive_failures == 0
    assert pool.request_succeeded(w, 3.0) is None  # nothing to report


def test_successful_probe_returns_suspect_to_healthy() -> None:
    pool = make_pool(1)
    w = worker(pool, 0)
    pool.request_failed(w, 1.0, "reset")
    transition = pool.probe_succeeded(url(0), 2.0)
    assert transition is not None
    assert (transition.old, transition.new) == (WorkerState.SUSPECT, WorkerState.HEALTHY)
    assert w.consecutive_failures == 0


def test_consecutive_passive_failures_quarantine() -> None:
    pool = make_pool(1, rules=HealthRules(failure_threshold=3))
    w = worker(pool, 0)
    states = []
    for t in range(3):
        pool.request_failed(w, float(t), "503")
        states.append(w.state)
    assert states == [WorkerState.SUSPECT, WorkerState.SUSPECT, WorkerState.QUARANTINED]
    assert w.errors_total == 3
    assert not w.routable


def test_probe_and_request_failures_are_counted_apart() -> None:
    pool = make_pool(1, rules=HealthRules(failure_threshold=3))
    w = worker(pool, 0)
    pool.request_failed(w, 1.0, "reset")
    pool.probe_failed(url(0), 2.0, "timeout")
    pool.probe_failed(url(0), 3.0, "timeout")
    assert w.state is WorkerState.SUSPECT
    transition = pool.probe_failed(url(0), 4.0, "timeout")
    assert transition is not None
    assert (transition.old, transition.new) == (WorkerState.SUSPECT, WorkerState.QUARANTINED)


def test_worker_that_passes_probes_but_fails_requests_is_still_quarantined() -> None:
    pool = make_pool(1, rules=HealthRules(failure_threshold=3))
    w = worker(pool, 0)
    for t in range(2):
        pool.request_failed(w, float(t), "503")
        assert w.state is WorkerState.SUSPECT
        pool.probe_succeeded(url(0), t + 0.5)
        assert w.state is WorkerState.HEALTHY
    transition = pool.request_failed(w, 3.0, "503")
    assert transition is not None
    assert transition.new is WorkerState.QUARANTINED


def test_healthy_worker_success_after_failed_probe_clears_failures() -> None:
    pool = make_pool(1, rules=HealthRules(failure_threshold=2))
    w = worker(pool, 0)
    pool.probe_failed(url(0), 1.0, "timeout")
    assert pool.request_succeeded(w, 2.0) is None
    assert w.consecutive_failures == 0
    pool.probe_failed(url(0), 3.0, "timeout")
    assert w.state is WorkerState.HEALTHY


def test_failure_threshold_one_quarantines_on_first_passive_failure() -> None:
    pool = make_pool(1, rules=HealthRules(failure_threshold=1))
    w = worker(pool, 0)
    transition = pool.request_failed(w, 1.0, "reset")
    assert transition is not None
    assert (transition.old, transition.new) == (WorkerState.HEALTHY, WorkerState.QUARANTINED)


def test_request_failure_on_a_removed_worker_only_counts_the_error() -> None:
    pool = make_pool(1)
    w = worker(pool, 0)
    pool.remove(url(0))
    assert pool.request_failed(w, 1.0, "reset") is None
    assert w.errors_total == 1
    assert w.state is WorkerState.HEALTHY


# -- statistics ----------------------------------------------------------------


def test_statistics() -> None:
    pool = make_pool(5, rules=HealthRules(failure_threshold=1))
    pool.add(url(5), 0.0)  # pending
    leases = [pool.acquire(worker(pool, 0)) for _ in range(2)]
    pool.request_failed(worker(pool, 1), 1.0, "reset")  # quarantined (threshold 1)
    pool.rules = HealthRules(failure_threshold=3)
    pool.request_failed(worker(pool, 2), 1.0, "reset")  # suspect
    leases.append(pool.acquire(worker(pool, 3)))
    pool.remove(url(3))  # draining with one request in flight
    pool.remove(url(4))  # gone

    stats = pool.statistics()

    assert stats.total == 4  # 0, 1, 2, 5: not the draining one
    assert stats.healthy == 1  # 0
    assert stats.routable == 2  # 0 and the suspect 2
    assert stats.total_inflight == 3  # includes the draining worker
    assert stats.loads == {url(0): 2, url(1): 0, url(2): 0, url(3): 1, url(5): 0}

    for lease in leases:
        lease.release()
    stats = pool.statistics()
    assert stats.total_inflight == 0
    assert url(3) not in stats.loads


# -- property: random operation sequences ----------------------------------------

URLS = [url(i) for i in range(4)]
url_strategy = st.sampled_from(URLS)


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = WorkerPool(rules=HealthRules(failure_threshold=2, success_threshold=2))
        self.leases: list[Lease] = []
        self.now = 0.0

    def tick(self) -> float:
        self.now += 1.0
        return self.now

    @rule(u=url_strategy)
    def add(self, u: str) -> None:
        before = self.pool.get(u)
        w, new = self.pool.add(u, self.tick())
        assert new is (before is None)
        assert not w.draining

    @rule(u=url_strategy)
    def remove(self, u: str) -> None:
        w = self.pool.get(u)
        if w is None or w.draining:
            with pytest.raises(NotFound):
                self.pool.remove(u)
            return
        self.pool.remove(u)
        assert u not in self.pool.urls()
        assert (self.pool.get(u) is w) is (w.inflight > 0)

    @rule(index=st.integers(min_value=0, max_value=7))
    def acquire(self, index: int) -> None:
        candidates = self.pool.candidates()
        if not candidates:
            return
        w = candidates[index % len(candidates)]
        assert w.routable
        self.leases.append(self.pool.acquire(w))

    @rule(u=url_strategy)
    def acquire_any(self, u: str) -> None:
        w = self.pool.get(u)
        if w is None:
            return
        if w.draining:
            with pytest.raises(BadRequest):
                self.pool.acquire(w)
        else:
            self.leases.append(self.pool.acquire(w))

    @rule(index=st.integers(min_value=0, max_value=20), twice=st.booleans())
    def release(self, index: int, twice: bool) -> None:
        if not self.leases:
            return
        lease = self.leases[index % len(self.leases)]
        lease.release()
        if twice:
            lease.release()

    @rule(u=url_strategy, ok=st.booleans())
    def probe(self, u: str, ok: bool) -> None:
        if ok:
            self.pool.probe_succeeded(u, self.tick())
        else:
            self.pool.probe_failed(u, self.tick(), "probe failed")

    @rule(index=st.integers(min_value=0, max_value=20), ok=st.booleans())
    def request_outcome(self, index: int, ok: bool) -> None:
        if not self.leases:
            return
        w = self.leases[index % len(self.leases)].worker
        if ok:
            self.pool.request_succeeded(w, self.tick())
        else:
            self.pool.request_failed(w, self.tick(), "502")

    @invariant()
    def inflight_matches_open_leases(self) -> None:
        open_by_worker: dict[int, int] = {}
        for lease in self.leases:
            assert lease.worker.inflight >= 0
            if not lease.released:
                key = id(lease.worker)
                open_by_worker[key] = open_by_worker.get(key, 0) + 1
        for w in self.pool:
            assert w.inflight == open_by_worker.get(id(w), 0)
            assert not w.draining or w.inflight > 0
        stats = self.pool.statistics()
        assert stats.total_inflight == sum(open_by_worker.values())
        assert set(self.pool.urls()) == {w.url for w in self.pool if not w.draining}
        assert all(w.routable for w in self.pool.candidates())

    def teardown(self) -> None:
        for lease in self.leases:
            lease.release()
        assert self.pool.statistics().total_inflight == 0
        assert not any(w.draining for w in self.pool)
        assert all(w.inflight == 0 for w in self.pool)
        assert all(lease.worker.inflight == 0 for lease in self.leases)


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


# -- re-admission on probation, held out longer each time ----------------------------


def quarantine_by_requests(pool: WorkerPool, i: int, now: float) -> None:
    w = worker(pool, i)
    while w.state is not WorkerState.QUARANTINED:
        pool.request_failed(w, now, "worker answered 502")


def test_repeated_quarantines_hold_a_worker_out_longer_each_time() -> None:
    rules = HealthRules(hold=10.0, max_hold=300.0)
    holds = [rules.hold_after(n) for n in range(1, 9)]
    assert holds == [0.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0]
    assert rules.hold_after(10_000) == 300.0


def test_a_worker_that_passes_probes_but_fails_requests_is_not_readmitted_over_and_over() -> None:
    # what the hostile pass saw: probes re-admitted it, requests failed, over and over
    rules = HealthRules(failure_threshold=3, success_threshold=2, hold=10.0, max_hold=300.0)
    pool = make_pool(1, rules=rules)
    w = worker(pool, 0)
    quarantine_by_requests(pool, 0, 1.0)
    assert (w.state, w.quarantines, w.held_until) == (WorkerState.QUARANTINED, 1, 1.0)
    pool.probe_succeeded(url(0), 2.0)
    transition = pool.probe_succeeded(url(0), 3.0)
    assert transition is not None  # the first time, back after the success threshold
    assert (transition.new, transition.reason) == (WorkerState.HEALTHY, "recovered")
    # on probation: one failed request is enough to quarantine it again, held 10 s
    transition = pool.request_failed(w, 4.0, "worker answered 502")
    assert transition is not None
    assert (transition.old, transition.new) == (WorkerState.HEALTHY, WorkerState.QUARANTINED)
    assert (w.quarantines, w.held_until) == (2, 14.0)
    for t in (5.0, 6.0, 13.9):
        assert pool.probe_succeeded(url(0), t) is None  # held out, however many probes pass
    assert pool.probe_succeeded(url(0), 14.0) is not None
    pool.request_failed(w, 15.0, "worker answered 502")  # again: held 20 s this time
    assert (w.state, w.quarantines, w.held_until) == (WorkerState.QUARANTINED, 3, 35.0)
    assert pool.probe_succeeded(url(0), 34.0) is None
    assert pool.probe_succeeded(url(0), 35.0) is not None
    assert w.state is WorkerState.HEALTHY


def test_a_completed_request_ends_the_probation() -> None:
    pool = make_pool(2, rules=HealthRules(failure_threshold=3, success_threshold=1))
    w = worker(pool, 0)
    quarantine_by_requests(pool, 0, 1.0)
    pool.probe_succeeded(url(0), 2.0)
    assert w.state is WorkerState.HEALTHY
    pool.request_succeeded(w, 3.0)
    assert w.quarantines == 0
    transition = pool.request_failed(w, 4.0, "worker answered 502")
    assert transition is not None
    assert transition.new is WorkerState.SUSPECT  # one failure no longer quarantines
    quarantine_by_requests(pool, 0, 5.0)
    assert (w.quarantines, w.held_until) == (1, 5.0)  # a first quarantine again: no hold


def test_an_answer_from_before_the_quarantine_does_not_end_the_probation() -> None:
    pool = make_pool(1, rules=HealthRules(failure_threshold=1, success_threshold=1))
    w = worker(pool, 0)
    lease = pool.acquire(w)
    quarantine_by_requests(pool, 0, 1.0)
    pool.request_succeeded(w, 2.0)  # the request that was already in flight
    lease.release()
    assert (w.state, w.quarantines) == (WorkerState.QUARANTINED, 1)
