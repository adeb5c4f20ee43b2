"""Supervision of background loops: restart with backoff, visibly.

A loop started on a bare nursery that crashes either takes the server down
or, under quart's app nursery, silently vanishes. ``supervise`` does neither:
a crash before the loop reported ready fails start-up loudly; a crash after
it is logged, counted on the ``ServiceBoard`` (shown in /health and metrics)
and the loop is restarted after an exponential backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

log = logging.getLogger("trio_router.supervise")


class Service(Protocol):
    def __call__(self, *, task_status: trio.TaskStatus[None]) -> Awaitable[None]: ...


@dataclass(slots=True)
class ServiceStatus:
    running: bool = False
    restarts: int = 0
    last_error: str | None = None


@dataclass(slots=True)
class ServiceBoard:
    """What each supervised service is doing, for /health and metrics."""

    services: dict[str, ServiceStatus] = field(default_factory=dict)

    def restarts(self) -> dict[str, int]:
        return {name: s.restarts for name, s in self.services.items()}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {
            name: {"running": s.running, "restarts": s.restarts, "last_error": s.last_error}
            for name, s in self.services.items()
        }


@dataclass(slots=True)
class _Started:
    """Forwards ``started()`` to the real task status and remembers it happened."""

    inner: trio.TaskStatus[None]
    done: bool = False

    def started(self, value: None = None) -> None:
        if not self.done:
            self.done = True
            self.inner.started()


async def supervise(
    name: str,
    service: Callable[..., Awaitable[None]],
    board: ServiceBoard,
    *,
    backoff: float = 1.0,
    max_backoff: float = 30.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``service(task_status=...)`` forever, restarting it when it crashes."""
    status = board.services.setdefault(name, ServiceStatus())
    started = _Started(task_status)
    delay = backoff
    while True:
        began = trio.current_time()
        status.running = True
        try:
            await service(task_status=started)
            log.info("service %s finished", name)
            status.running = False
            return
        except Exception as exc:
            status.running = False
            if not started.done:
                raise  # it never came up: fail start-up loudly
            status.restarts += 1
            status.last_error = f"{type(exc).__name__}: {exc}"
            if trio.current_time() - began > max_backoff:
                delay = backoff  # it ran fine for a while: start the backoff over
            log.exception("service %s crashed; restarting in %.1f s", name, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, max_backoff)
