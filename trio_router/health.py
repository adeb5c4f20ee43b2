"""The health loop: probes every worker at start and every interval.

Probing is injected (``Probe``: url -> None on success, else the reason), so
tests drive minutes of health checks on trio's MockClock with scripted
workers. Passive signals from the proxy ``wake`` the loop to probe a suspect
worker at once instead of waiting for the next round.

A worker that has not yet been healthy (``pending``: just registered, or an
engine still loading its model) is probed again soon: after 0.1 s, then twice
as long each time, up to the interval (``PendingBackoff``), so a router started
together with its workers serves as soon as one is up. Its first failure is
logged once; it stays ``pending`` until a probe passes (see ``pool``).

Each probe runs in its own task under the loop, one at a time per worker, so a
worker whose probe hangs until the timeout does not delay anyone else's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable

import httpx
import trio

from .pool import Transition, WorkerPool, WorkerState

log = logging.getLogger("trio_router.health")

Probe = Callable[[str], Awaitable[str | None]]

#: seconds before the second probe of a worker that is not healthy yet; doubled each time
FIRST_RETRY = 0.1


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


class PendingBackoff:
    """When to probe again each worker that has not been healthy yet (pure: ``now`` given).

    The delays double from ``first`` and stop below ``limit`` (the interval), where
    the regular rounds take over.
    """

    def __init__(self, limit: float, first: float = FIRST_RETRY) -> None:
        self.limit = limit
        self.first = first
        self._delay: dict[str, float] = {}
        self._due: dict[str, float] = {}

    def failed(self, url: str, now: float) -> None:
        """A probe of a pending worker failed: schedule its next one."""
        delay = self._delay.get(url, self.first)
        if delay >= self.limit:
            self._due.pop(url, None)  # the rounds probe it from now on
            return
        self._due[url] = now + delay
        self._delay[url] = delay * 2

    def forget(self, url: str) -> None:
        """The worker is no longer pending (or is gone)."""
        self._delay.pop(url, None)
        self._due.pop(url, None)

    def next_due(self) -> float:
        return min(self._due.values(), default=math.inf)

    def take_due(self, now: float) -> list[str]:
        """The workers due for a probe at ``now``, no longer scheduled."""
        due = [url for url, at in self._due.items() if at <= now]
        for url in due:
            del self._due[url]
        return due


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
        self.pending = PendingBackoff(interval)
        self._urgent: set[str] = set()
        self._probing: set[str] = set()
        self._announced: set[str] = set()  # pending workers whose failure was logged
        self._wakeup = trio.Event()
        self._changed = trio.Event()

    def wake(self, url: str) -> None:
        """Ask for a probe of ``url`` as soon as possible (sync, from the proxy)."""
        self._urgent.add(url)
        self._wakeup.set()

    async def check(self, url: str) -> None:
        """Probe one worker now and apply the result (skipped while it is being probed)."""
        if url in self._probing:
            return
        self._probing.add(url)
        try:
            reason = await self.probe(url)
        finally:
            self._probing.discard(url)
        self._apply(url, reason, trio.current_time())

    def _apply(self, url: str, reason: str | None, now: float) -> None:
        self.on_result(reason is None)
        if reason is None:
            transition = self.pool.probe_succeeded(url, now)
        else:
            transition = self.pool.probe_failed(url, now, reason)
        worker = self.pool.get(url)
        if worker is not None and worker.state is WorkerState.PENDING and reason is not None:
            self._not_ready_yet(url, reason)
            self.pending.failed(url, now)
            self._wakeup.set()  # the loop may have to wake sooner
        else:
            self.pending.forget(url)
            self._announced.discard(url)
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
            self._changed.set()
            self._changed = trio.Event()

    def _not_ready_yet(self, url: str, reason: str) -> None:
        """Log the first failed probe of a pending worker, once."""
        if url in self._announced:
            return
        self._announced.add(url)
        log.warning(
            "worker %s is not ready yet (%s); probing it again in %g s, then less often, "
            "up to every %g s",
            url,
            reason,
            self.pending.first,
            self.interval,
        )

    async def check_all(self, urls: Iterable[str]) -> None:
        async with trio.open_nursery() as nursery:
            for url in urls:
                nursery.start_soon(self.check, url)

    async def wait_until_healthy(self) -> None:
        """Return once at least one worker is healthy."""
        while not self.pool.statistics().healthy:
            await self._changed.wait()

    async def _round(self) -> None:
        await self.check_all(self.pool.urls())
        self.rounds += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Probe everyone, report ready, then probe every ``interval``; sooner a worker
        that is not healthy yet, and one the proxy ``wake``\\ s about."""
        await self._round()
        task_status.started()
        next_round = trio.current_time() + self.interval
        async with trio.open_nursery() as probes:
            while True:
                with trio.move_on_at(min(next_round, self.pending.next_due())):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
                now = trio.current_time()
                due = set(self.pending.take_due(now))
                if now >= next_round:
                    self._urgent.clear()
                    due.clear()
                    probes.start_soon(self._round)
                    next_round += self.interval
                    if next_round <= now:  # a slow clock: don't pile up
                        next_round = now + self.interval
                due |= self._urgent
                self._urgent.clear()
                for url in due:
                    if self.pool.get(url) is not None:
                        probes.start_soon(self.check, url)
