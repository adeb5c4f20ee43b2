"""Small middleware to copy from. Enable with ``--middleware-paths``, e.g.::

    trio-router serve --worker-urls http://127.0.0.1:18001 \\
        --middleware-paths trio_router.middleware_examples.StampWorker
"""

from __future__ import annotations

import logging

from .hooks import Middleware, Outcome, ProxyRequest, ResponseHead

log = logging.getLogger("trio_router.examples")


class StampWorker(Middleware):
    """Adds an ``x-trio-router-worker`` response header naming the worker that answered."""

    async def on_response_start(self, request: ProxyRequest, head: ResponseHead) -> None:
        head.headers.append((b"x-trio-router-worker", head.worker.encode()))


class SlowRequestLog(Middleware):
    """Logs every request that took longer than ``threshold`` seconds."""

    threshold = 5.0

    async def on_response_end(self, request: ProxyRequest, outcome: Outcome) -> None:
        if outcome.duration > self.threshold:
            log.warning(
                "slow request %s %s on %s: %.2f s, status %d",
                request.method,
                request.path,
                outcome.worker,
                outcome.duration,
                outcome.status,
            )
