"""The health loop: probes every worker at start and every interval.

Probing is injected (``Probe``: url -> None on success, else the reason), so
tests drive minutes of health checks on trio's MockClock with scripted
workers. Passive signals from the proxy ``wake`` the loop to probe a suspect
worker at once instead of waiting for the next round.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

import httpx
import trio

from .pool import Transition, WorkerPool

log = logging.getLogger("trio_router.health")

Probe = Callable[[str], Awaitable[str | None]]


def http_probe(client: httpx.AsyncClient, endpoint: str, timeout: float) -> Probe:
    """A probe that GETs ``endpoint`` on the worker and wants a 2xx within ``timeout``."""

    async def probe(url: str) -> str | None:
        with trio.move_on_after(timeout):
            try:
                response = await client.get(url + endpoint)
            except httpx.HTTPError as exc:
                return f"health probe failed: {type(exc).__name__}: {exc}"
            if 200 <= response.status_code < 300:
                return None
            return f"health probe answered {response.status_code}"
        return f"health probe timed out after {timeout:g} s"

    return probe


class HealthChecker:
    def __init__(
        self,
        pool: WorkerPool,
        probe: Probe,
        *,
        interval: float,
        on_transition: Callable[[Transition], None] = lambda t: None,
        on_result: Callable[[bool], None] = lambda ok: None,
    ) -> None:
        self.pool = pool
        self.probe = probe
        self.interval = interval
        self.on_transition = on_transition
        self.on_result = on_result
        self.rounds = 0
        self._urgent: set[str] = set()
        self._wakeup = trio.Event()

    def wake(self, url: str) -> None:
        """Ask for a probe of ``url`` as soon as possible (sync, from the proxy)."""
        self._urgent.add(url)
        self._wakeup.set()

    async def check(self, url: str) -> None:
        """Probe one worker now and apply the result."""
        reason = await self.probe(url)
        now = trio.current_time()
        self.on_result(reason is None)
        if reason is None:
            transition = self.pool.probe_succeeded(url, now)
        else:
            transition = self.pool.probe_failed(url, now, reason)
        if transition is not None:
            level = logging.INFO if transition.new.value == "healthy" else logging.WARNING
            log.log(
                level,
                "worker %s: %s -> %s (%s)",
                url,
                transition.old.value,
                transition.new.value,
                transition.reason,
            )
            self.on_transition(transition)

    async def check_all(self, urls: Iterable[str]) -> None:
        async with trio.open_nursery() as nursery:
            for url in urls:
                nursery.start_soon(self.check, url)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Probe everyone, report ready, then probe every ``interval`` (and on wake-ups)."""
        await self.check_all(self.pool.urls())
        self.rounds += 1
        task_status.started()
        next_round = trio.current_time() + self.interval
        while True:
            with trio.move_on_at(next_round):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            if trio.current_time() >= next_round:
                self._urgent.clear()
                await self.check_all(self.pool.urls())
                self.rounds += 1
                next_round += self.interval
                if next_round <= trio.current_time():  # a slow round: don't pile up
                    next_round = trio.current_time() + self.interval
            elif self._urgent:
                urgent, self._urgent = self._urgent, set()
                await self.check_all(u for u in urgent if self.pool.get(u) is not None)
