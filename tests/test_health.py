"""The health loop and the supervisor on trio's MockClock: minutes of probes, no real sleeps."""

from __future__ import annotations

import httpx
import pytest
import trio

from trio_router.health import HealthChecker, http_probe
from trio_router.pool import HealthRules, Transition, WorkerPool, WorkerState
from trio_router.supervise import ServiceBoard, supervise

W = "http://10.0.0.1:8000"


def scripted_probe(down: list[tuple[float, float]]):  # type: ignore[no-untyped-def]
    """A probe that fails while the clock is inside one of the ``down`` windows."""

    async def probe(url: str) -> str | None:
        now = trio.current_time()
        if any(start <= now < end for start, end in down):
            return "connection refused"
        return None

    return probe


async def run_checker_for(checker: HealthChecker, seconds: float) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(checker.run)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()


async def test_quarantine_after_n_failures_and_readmission_after_m_successes(autojump_clock):
    pool = WorkerPool(HealthRules(failure_threshold=3, success_threshold=2))
    pool.add(W, 0.0)
    seen: list[tuple[float, str, str]] = []

    def record(t: Transition) -> None:
        seen.append((trio.current_time(), t.old.value, t.new.value))

    checker = HealthChecker(
        pool, scripted_probe([(55.0, 115.0)]), interval=10.0, on_transition=record
    )
    with trio.fail_after(1000):
        await run_checker_for(checker, 305.0)
    # probes at 0, 10, ..., 300 (31 rounds): failures at 60, 70, 80 -> quarantined at 80;
    # successes at 120, 130 -> healthy again at 130.
    assert seen == [
        (0.0, "pending", "healthy"),
        (80.0, "healthy", "quarantined"),
        (130.0, "quarantined", "healthy"),
    ]
    assert checker.rounds == 31
    assert pool.get(W).state is WorkerState.HEALTHY  # type: ignore[union-attr]


async def test_a_failure_between_successes_restarts_the_readmission_count(autojump_clock):
    pool = WorkerPool(HealthRules(failure_threshold=1, success_threshold=3))
    pool.add(W, 0.0)
    seen: list[tuple[float, str]] = []
    # down at 10; up at 20, 30; down at 40; up from 50 on
    checker = HealthChecker(
        pool,
        scripted_probe([(5.0, 15.0), (35.0, 45.0)]),
        interval=10.0,
        on_transition=lambda t: seen.append((trio.current_time(), t.new.value)),
    )
    with trio.fail_after(1000):
        await run_checker_for(checker, 100.0)
    assert seen == [(0.0, "healthy"), (10.0, "quarantined"), (70.0, "healthy")]


async def test_a_hanging_health_endpoint_counts_as_a_failure_after_the_timeout(autojump_clock):
    async def hang(request: httpx.Request) -> httpx.Response:
        await trio.sleep(100)
        return httpx.Response(200)

    async with httpx.AsyncClient(transport=httpx.MockTransport(hang)) as client:
        probe = http_probe(client, "/health", timeout=2.0)
        with trio.fail_after(1000):
            began = trio.current_time()
            reason = await probe(W)
    assert reason == "health probe timed out after 2 s"
    assert trio.current_time() - began == pytest.approx(2.0)


async def test_http_probe_wants_a_2xx():
    async def answer(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/health"
        return httpx.Response(503 if "bad" in request.url.host else 200)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        probe = http_probe(client, "/health", timeout=2.0)
        assert await probe("http://good:1") is None
        assert await probe("http://bad:1") == "health probe answered 503"


async def test_wake_probes_a_suspect_worker_at_once(autojump_clock):
    pool = WorkerPool(HealthRules(failure_threshold=3))
    worker, _ = pool.add(W, 0.0)
    probes: list[float] = []

    async def probe(url: str) -> str | None:
        probes.append(trio.current_time())
        return None

    checker = HealthChecker(pool, probe, interval=60.0)
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            await nursery.start(checker.run)
            await trio.sleep(7.0)
            pool.request_failed(worker, trio.current_time(), "502")
            assert worker.state is WorkerState.SUSPECT
            checker.wake(W)
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()
    assert probes == [0.0, 7.0]
    assert worker.state is WorkerState.HEALTHY


async def test_removed_workers_are_no_longer_probed(autojump_clock):
    pool = WorkerPool()
    pool.add(W, 0.0)
    probed: list[str] = []

    async def probe(url: str) -> str | None:
        probed.append(url)
        return None

    checker = HealthChecker(pool, probe, interval=10.0)
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            await nursery.start(checker.run)
            pool.remove(W)
            await trio.sleep(35.0)
            nursery.cancel_scope.cancel()
    assert probed == [W]


async def test_supervisor_restarts_a_crashed_loop_with_backoff(autojump_clock):
    board = ServiceBoard()
    starts: list[float] = []

    async def flaky(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        starts.append(trio.current_time())
        task_status.started()
        if len(starts) < 5:
            raise RuntimeError(f"crash {len(starts)}")
        await trio.sleep_forever()

    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            await nursery.start(supervise, "flaky", flaky, board)
            await trio.sleep(100)
            status = board.services["flaky"]
            assert (status.running, status.restarts) == (True, 4)
            assert status.last_error == "RuntimeError: crash 4"
            nursery.cancel_scope.cancel()
    assert starts == [0.0, 1.0, 3.0, 7.0, 15.0]


async def test_a_loop_that_cannot_start_fails_start_up_loudly():
    async def broken(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise OSError("cannot bind")

    with pytest.RaisesGroup(pytest.RaisesExc(OSError, match="cannot bind")):
        async with trio.open_nursery() as nursery:
            await nursery.start(supervise, "broken", broken, ServiceBoard())


def probe_recording(up_from: float, probes: list[float], answer: str = "connection refused"):  # type: ignore[no-untyped-def]
    """A probe that fails before ``up_from`` (as a worker still starting) and records when."""

    async def probe(url: str) -> str | None:
        probes.append(round(trio.current_time(), 6))
        return None if trio.current_time() >= up_from else answer

    return probe


async def test_a_worker_not_healthy_yet_is_probed_again_soon_with_backoff(autojump_clock):
    pool = WorkerPool(HealthRules(failure_threshold=3))
    worker, _ = pool.add(W, 0.0)
    probes: list[float] = []
    checker = HealthChecker(pool, probe_recording(1.0, probes), interval=10.0)
    with trio.fail_after(1000):
        await run_checker_for(checker, 25.0)
    # started together with its router, up after 1 s: healthy at 1.5 s, not at 10 s
    assert probes[:6] == [0.0, 0.1, 0.3, 0.7, 1.5, 10.0]
    assert worker.state is WorkerState.HEALTHY


async def test_backoff_grows_to_the_interval_for_a_worker_that_stays_down(autojump_clock):
    pool = WorkerPool(HealthRules(failure_threshold=3))
    worker, _ = pool.add(W, 0.0)
    probes: list[float] = []
    checker = HealthChecker(
        pool, probe_recording(1e9, probes, "health probe answered 503"), interval=10.0
    )
    with trio.fail_after(1000):
        await run_checker_for(checker, 45.0)
    assert probes == [0.0, 0.1, 0.3, 0.7, 1.5, 3.1, 6.3, 10.0, 20.0, 30.0, 40.0]
    # an engine that answers 503 while it starts is pending, not failing
    assert worker.state is WorkerState.PENDING
    assert worker.last_error == "health probe answered 503"


async def test_the_first_failure_of_a_pending_worker_is_logged_once(autojump_clock, caplog):
    pool = WorkerPool()
    pool.add(W, 0.0)
    checker = HealthChecker(pool, probe_recording(5.0, []), interval=10.0)
    with caplog.at_level("INFO", logger="trio_router.health"), trio.fail_after(1000):
        await run_checker_for(checker, 8.0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"worker {W} is not ready yet (connection refused); probing it again in 0.1 s, "
        "then less often, up to every 10 s",
        f"worker {W}: pending -> healthy (probe ok)",
    ]


async def test_a_slow_probe_does_not_delay_the_other_workers(autojump_clock):
    slow, fast = "http://10.0.0.1:8000", "http://10.0.0.2:8000"
    pool = WorkerPool()
    pool.add(slow, 0.0)
    pool.add(fast, 0.0)
    probed: list[tuple[float, str]] = []
    slow_starts: list[float] = []

    async def probe(url: str) -> str | None:
        if url == slow:
            slow_starts.append(trio.current_time())
        if url == slow and trio.current_time() > 0:
            await trio.sleep(25.0)  # hangs (the probe's timeout would end it)
        probed.append((trio.current_time(), url))
        return None

    checker = HealthChecker(pool, probe, interval=10.0)
    with trio.fail_after(1000):
        await run_checker_for(checker, 31.0)
    assert [t for t, url in probed if url == fast] == [0.0, 10.0, 20.0, 30.0]
    assert slow_starts == [0.0, 10.0]  # one probe of it in flight at a time


async def test_wait_until_healthy_returns_when_the_first_worker_is_up(autojump_clock):
    pool = WorkerPool()
    pool.add(W, 0.0)
    checker = HealthChecker(pool, probe_recording(2.0, []), interval=10.0)
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            await nursery.start(checker.run)
            await checker.wait_until_healthy()
            assert trio.current_time() == pytest.approx(3.1)
            nursery.cancel_scope.cancel()
