"""Serving: the router under hypercorn's trio worker, inside our own nursery.

``serve`` is started with ``nursery.start`` and reports a ``RunningRouter``
with the real bound URL (port 0 works), so tests, the demo and the CLI all
run the same code. Shutdown is a trigger: hypercorn stops accepting, gives
in-flight requests ``graceful_timeout`` seconds, then the router's loops stop.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from . import hypercorn_tuning
from .app import create_app
from .config import RouterConfig
from .health import Probe
from .proxy import Receive, Scope, Send
from .router import Router, open_router
from .tokenizer import Tokenizer

log = logging.getLogger("trio_router.server")

ShutdownTrigger = Callable[[], Awaitable[None]]


def hypercorn_config(
    host: str,
    port: int,
    *,
    graceful_timeout: float,
    max_header_size: int = 65536,
    keep_alive_timeout: float = 75.0,
) -> HypercornConfig:
    cfg = HypercornConfig()
    cfg.h11_max_incomplete_size = max_header_size
    cfg.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    cfg.graceful_timeout = graceful_timeout
    cfg.keep_alive_timeout = keep_alive_timeout
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")
    return cfg


@dataclass(frozen=True, slots=True)
class RunningRouter:
    router: Router
    url: str
    prometheus_url: str | None = None


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge an ASGI lifespan's startup and shutdown (for apps with no set-up)."""
    while True:
        message = await receive()
        kind = message["type"].removeprefix("lifespan.")
        await send({"type": f"lifespan.{kind}.complete"})
        if kind == "shutdown":
            return


class PrometheusApp:
    """A tiny ASGI app serving only the Prometheus exposition (extra listener)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"] not in ("/metrics", "/prometheus") or scope["method"] != "GET":
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        body = self.router.metrics.render()
        headers = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def serve(
    config: RouterConfig,
    *,
    shutdown_trigger: ShutdownTrigger | None = None,
    probe: Probe | None = None,
    tokenizer: Tokenizer | None = None,
    task_status: trio.TaskStatus[RunningRouter] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the router until ``shutdown_trigger`` returns (or forever)."""
    trigger = shutdown_trigger or trio.sleep_forever
    hypercorn_tuning.install()
    async with open_router(config, probe=probe, tokenizer=tokenizer) as router:
        cfg = hypercorn_config(
            config.host,
            config.port,
            graceful_timeout=config.graceful_timeout,
            max_header_size=config.max_header_size,
            keep_alive_timeout=config.keep_alive_timeout,
        )
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                partial(
                    hypercorn_serve, cast(Any, create_app(router)), cfg, shutdown_trigger=trigger
                )
            )
            prometheus_url = None
            if config.prometheus_port is not None:
                pcfg = hypercorn_config(
                    config.prometheus_host, config.prometheus_port, graceful_timeout=1
                )
                prometheus_binds = await nursery.start(
                    partial(
                        hypercorn_serve,
                        cast(Any, PrometheusApp(router)),
                        pcfg,
                        shutdown_trigger=trigger,
                    )
                )
                prometheus_url = prometheus_binds[0]
            task_status.started(RunningRouter(router, binds[0], prometheus_url))


async def run_until_signalled(
    config: RouterConfig,
    on_ready: Callable[[RunningRouter], None] = lambda running: None,
) -> None:
    """Serve until SIGINT/SIGTERM, drain, and return (a second signal stops at once)."""
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    if shutdown.is_set():
                        log.warning("second signal: stopping now")
                        nursery.cancel_scope.cancel()
                        return
                    log.info(
                        "%s: draining (up to %g s)",
                        signal.Signals(signum).name,
                        config.graceful_timeout,
                    )
                    shutdown.set()

        async def serve_then_stop(task_status: trio.TaskStatus[RunningRouter]) -> None:
            await serve(config, shutdown_trigger=shutdown.wait, task_status=task_status)
            nursery.cancel_scope.cancel()  # drained: stop watching signals too

        nursery.start_soon(watch_signals)
        running = await nursery.start(serve_then_stop)
        on_ready(running)
    log.info("stopped")
