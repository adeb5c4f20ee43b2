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
