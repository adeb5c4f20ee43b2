"""Serving: the router under hypercorn's trio worker, inside our own nursery.

``serve`` is started with ``nursery.start`` and reports a ``RunningRouter``
with the real bound URL (port 0 works), so tests, the demo and the CLI all
run the same code. Shutdown is a trigger: hypercorn stops accepting, gives
in-flight requests ``graceful_timeout`` seconds, then the router's loops stop.

At start the file-descriptor limit is raised to its hard limit and the client
connections are bounded below it (``connections.client_connection_budget``), so
a crowd of idle sockets cannot use up the descriptors that accepting needs.
"""

from __future__ import annotations

import errno
import itertools
import logging
import resource
import secrets
import signal
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from . import hypercorn_tuning
from .app import create_app
from .config import RouterConfig
from .connections import client_connection_budget
from .errors import AmbiguousRequest, ConfigError
from .health import Probe
from .log_throttle import Throttle
from .proxy import Receive, Scope, Send, error_reply, send_reply
from .router import Router, open_router
from .tokenizer import Tokenizer

log = logging.getLogger("trio_router.server")

ShutdownTrigger = Callable[[], Awaitable[None]]


#: connections the kernel queues for accept (capped by net.core.somaxconn); hypercorn's
#: 100 overflows when hundreds of clients connect at once, and a dropped SYN costs 1-7 s
LISTEN_BACKLOG = 4096
#: client connections of the Prometheus listener (scrapers are few)
PROMETHEUS_CONNECTIONS = 16
#: the file limit taken for "unlimited" (where the soft limit may not be raised to it)
UNLIMITED_FILES = 1 << 20
#: seconds between two log lines about failing accepts (each retried every 0.1 s)
ACCEPT_FAILURE_LOG_INTERVAL = 60.0


def hypercorn_config(
    host: str,
    port: int,
    *,
    graceful_timeout: float,
    max_header_size: int = 65536,
    keep_alive_timeout: float = 75.0,
    header_timeout: float = 10.0,
    max_connections: int = 0,
) -> HypercornConfig:
    cfg = hypercorn_tuning.TunedConfig(
        header_timeout=header_timeout, max_connections=max_connections
    )
    cfg.h11_max_incomplete_size = max_header_size
    cfg.backlog = LISTEN_BACKLOG
    cfg.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    cfg.graceful_timeout = graceful_timeout
    cfg.keep_alive_timeout = keep_alive_timeout
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")
    return cfg


def raise_file_limit() -> int:
    """Raise the soft limit of open files to the hard limit; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else UNLIMITED_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, wanted, exc)
            return soft
        return wanted
    return soft if soft != resource.RLIM_INFINITY else UNLIMITED_FILES


class AcceptFailures(logging.Filter):
    """trio's accept loop logs a traceback every 0.1 s while accept fails for lack of
    descriptors or memory: one short line per ``interval`` instead, with the count."""

    def __init__(self, interval: float = ACCEPT_FAILURE_LOG_INTERVAL) -> None:
        super().__init__()
        self.throttle = Throttle(interval)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            now = trio.current_time()
        except RuntimeError:  # not inside trio: leave the record alone
            return True
        held = self.throttle.passes(now)
        if held is None:
            return False
        code = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.msg = (
            "cannot accept client connections: %s (%s); retrying every 0.1 s "
            "(%d failed accepts since the last such line)"
        )
        reason = record.args[1] if isinstance(record.args, tuple) and len(record.args) > 1 else ""
        record.args = (code, reason, held)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        return True


def throttle_accept_failures() -> None:
    """Install ``AcceptFailures`` on trio's accept-loop logger (idempotent)."""
    logger = logging.getLogger("trio.serve_listeners")
    if not any(isinstance(f, AcceptFailures) for f in logger.filters):
        logger.addFilter(AcceptFailures())


def client_connection_limit(config: RouterConfig) -> int:
    """``--max-client-connections``, or what the (raised) file limit allows."""
    file_limit = raise_file_limit()
    limit = client_connection_budget(
        file_limit, config.max_connections + PROMETHEUS_CONNECTIONS, config.max_client_connections
    )
    if config.max_client_connections > limit:
        log.warning(
            "--max-client-connections %d lowered to %d: the open-file limit is %d",
            config.max_client_connections,
            limit,
            file_limit,
        )
    log.info("open-file limit %d: up to %d client connections", file_limit, limit)
    return limit


def _framed_twice(headers: list[tuple[bytes, bytes]]) -> bool:
    """Both Transfer-Encoding and Content-Length (h11 gives names in lower case)."""
    chunked = sized = False
    for name, _ in headers:
        if name == b"transfer-encoding":
            chunked = True
        elif name == b"content-length":
            sized = True
    return chunked and sized


class RefuseAmbiguousFraming:
    """An ASGI wrapper: a request with both Transfer-Encoding and Content-Length gets a
    400 and its connection is closed (RFC 9112 §6.1: a proxy must not pass it on)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _framed_twice(scope["headers"]):
            refusal = AmbiguousRequest(
                "a request must not carry both Transfer-Encoding and Content-Length"
            )
            await send_reply(send, error_reply(refusal))
            return
        await self.app(scope, receive, send)


#: what a socket that cannot listen fails with: the port is taken, the address is not
#: this host's, a port below 1024 without the right (a host that does not resolve: gaierror)
BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


def find_exception(
    exc: BaseException, wanted: Callable[[BaseException], bool]
) -> BaseException | None:
    """``exc``, or the first exception in its (nested) exception groups, that is ``wanted``."""
    if wanted(exc):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_exception(inner, wanted)
            if found is not None:
                return found
    return None


def _cannot_bind(exc: BaseException) -> bool:
    return isinstance(exc, socket.gaierror) or (
        isinstance(exc, OSError) and exc.errno in BIND_ERRNOS
    )


def bind_failure(exc: BaseException) -> OSError | None:
    """The socket error behind ``exc`` if it says a listener could not be opened (also
    inside the exception groups of hypercorn's nurseries)."""
    found = find_exception(exc, _cannot_bind)
    return found if isinstance(found, OSError) else None


def cannot_listen(bind: str, flag: str, exc: OSError) -> ConfigError:
    """The one-line start-up error for a listener that could not be opened."""
    reason = exc.strerror or str(exc)
    hint = " (another process has it: choose another " + flag + ")"
    return ConfigError(
        f"cannot listen on {bind} ({flag}): {reason}"
        + (hint if exc.errno == errno.EADDRINUSE else "")
    )


async def start_listener(
    nursery: trio.Nursery, app: Any, cfg: HypercornConfig, trigger: ShutdownTrigger, flag: str
) -> list[str]:
    """Start hypercorn on ``cfg.bind``; the bound URLs. A bind failure is a ConfigError."""
    try:
        binds: list[str] = await nursery.start(
            partial(hypercorn_serve, app, cfg, shutdown_trigger=trigger)
        )
    except (OSError, BaseExceptionGroup) as exc:
        failure = bind_failure(exc)
        if failure is None:
            raise
        raise cannot_listen(cfg.bind[0], flag, failure) from None
    return binds


async def wait_for_workers(router: Router, seconds: float) -> None:
    """Return once a worker is healthy; a ConfigError when none is within ``seconds``."""
    if router.pool.statistics().healthy:
        return
    log.info("waiting up to %g s for a worker to be healthy (--wait-for-workers)", seconds)
    with trio.move_on_after(seconds):
        await router.health.wait_until_healthy()
        return
    reasons = "; ".join(f"{w.url}: {w.last_error or w.state.value}" for w in router.pool)
    raise ConfigError(
        f"no worker became healthy within {seconds:g} s (--wait-for-workers): {reasons}"
    )


class RequestIds:
    """An ASGI wrapper, outermost: every request has an X-Request-ID (the client's, else a
    new ``tr-...`` one), which the proxy forwards to the worker and logs; with ``echo``,
    every answer carries exactly that one (a worker's own is replaced), whoever built it:
    the worker, a middleware, the control plane, an error document."""

    def __init__(self, app: Any, *, echo: bool) -> None:
        self.app = app
        self.echo = echo
        self._prefix = f"tr-{secrets.randbits(32):08x}-"
        self._ids = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        for name, value in headers:
            if name == b"x-request-id":
                request_id = value
                break
        else:
            request_id = f"{self._prefix}{next(self._ids)}".encode()
            scope["headers"] = [*headers, (b"x-request-id", request_id)]
        if not self.echo:
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                stamped = [h for h in message["headers"] if h[0].lower() != b"x-request-id"]
                stamped.append((b"x-request-id", request_id))
                message = {**message, "headers": stamped}
            await send(message)

        await self.app(scope, receive, send_with_id)


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
    throttle_accept_failures()
    connections = client_connection_limit(config)
    async with open_router(config, probe=probe, tokenizer=tokenizer) as router:
        if config.wait_for_workers > 0:
            await wait_for_workers(router, config.wait_for_workers)
        cfg = hypercorn_config(
            config.host,
            config.port,
            graceful_timeout=config.graceful_timeout,
            max_header_size=config.max_header_size,
            keep_alive_timeout=config.keep_alive_timeout,
            header_timeout=config.header_timeout,
            max_connections=connections,
        )
        app = RequestIds(RefuseAmbiguousFraming(create_app(router)), echo=config.echo_request_id)
        async with trio.open_nursery() as nursery:
            binds = await start_listener(nursery, cast(Any, app), cfg, trigger, "--port")
            prometheus_url = None
            if config.prometheus_port is not None:
                pcfg = hypercorn_config(
                    config.prometheus_host,
                    config.prometheus_port,
                    graceful_timeout=1,
                    header_timeout=config.header_timeout,
                    max_connections=PROMETHEUS_CONNECTIONS,
                )
                prometheus_binds = await start_listener(
                    nursery, cast(Any, PrometheusApp(router)), pcfg, trigger, "--prometheus-port"
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
