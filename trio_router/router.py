"""The Router: everything one router process owns, and ``open_router`` that runs it.

``open_router`` is the single owner of every background task: it opens one
nursery, starts each loop under ``supervise`` with ``nursery.start`` (so a
loop that cannot come up fails start-up), yields the ready ``Router``, and on
exit cancels the loops before closing the connections they use.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from .config import RouterConfig
from .errors import ConfigError, RouterError
from .guarded import GuardedTransport
from .health import HealthChecker, Probe, http_probe
from .hooks import Middleware, MiddlewareChain, load_middleware
from .lean_upstream import LeanUpstream
from .metrics import CacheCollector, Metrics
from .openai_api import OpenAIFrontend
from .policies import Policy, make_policy
from .pool import HealthRules, Transition, Worker, WorkerPool, normalize_worker_url
from .security import (
    DEFAULT_RELAYED,
    Gate,
    address_guard,
    check_worker,
    parse_allow,
    resolve_host,
)
from .session_api import SessionFrontend
from .sessions import SessionTable
from .supervise import ServiceBoard, supervise
from .token_cache import CacheSettings, TokenCache
from .tokenizer import Tokenizer, load_tokenizer
from .upstream import Upstream, UpstreamClient, UpstreamLimits

log = logging.getLogger("trio_router.router")


class Router:
    """The router's state and the operations the HTTP edge calls."""

    def __init__(
        self,
        config: RouterConfig,
        *,
        http: httpx.AsyncClient,
        probe: Probe,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.config = config
        self.http = http
        self.rng = random.Random(config.seed)
        self.pool = WorkerPool(
            HealthRules(
                failure_threshold=config.health_check_failure_threshold,
                success_threshold=config.health_check_success_threshold,
                hold=config.quarantine_hold,
                max_hold=config.quarantine_max_hold,
            )
        )
        self.policy: Policy = make_policy(
            config.policy,
            self.rng,
            sticky_ttl=config.sticky_ttl,
            sticky_spill_factor=config.sticky_spill_factor,
            hash_load_factor=config.hash_load_factor,
            balance_abs=config.balance_abs_threshold,
            balance_rel=config.balance_rel_threshold,
        )
        self.services = ServiceBoard()
        self.gate = Gate(
            admin_token=config.admin_token,
            insecure_admin=config.insecure_admin,
            api_keys=config.api_key,
            relayed=DEFAULT_RELAYED + config.proxy_allow,
            worker_api_key=config.worker_api_key,
        )
        self.allow_rules = parse_allow(config.worker_allow)
        guard = address_guard(self.allow_rules)  # checks every new connection to a worker
        self.metrics = Metrics(self.pool, self.services.restarts)
        self.health = HealthChecker(
            self.pool,
            probe,
            interval=config.health_check_interval,
            on_transition=self._count_transition,
            on_result=self._count_probe,
        )
        limits = UpstreamLimits(
            max_connections=config.max_connections,
            keepalive_expiry=config.keepalive_expiry,
            connect_timeout=config.connect_timeout,
        )
        self.upstream: UpstreamClient = (
            Upstream(limits, guard)
            if config.upstream_client == "httpcore"
            else LeanUpstream(limits, guard=guard)
        )
        self.token_cache: TokenCache | None = None
        self.sessions: SessionFrontend | None = None
        builtin: list[Middleware] = []
        if config.radix_tree_max_size > 0:
            if tokenizer is None:
                raise ConfigError("the token cache needs a tokenizer")
            self.token_cache = TokenCache(
                tokenizer,
                CacheSettings(
                    max_tokens=config.radix_tree_max_size,
                    gc_threshold_k=config.gc_threshold_k,
                    gc_interval=config.cache_gc_interval,
                    namespace_header=config.namespace_header.lower().encode(),
                    max_text_bytes=config.max_text_bytes,
                    abort_retries=config.abort_retries,
                    abort_retry_backoff=config.abort_retry_backoff,
                    cache_threshold=config.cache_threshold,
                ),
                router=self,
            )
            builtin.append(self.token_cache)
            frontend = OpenAIFrontend(self, self.token_cache, config.served_model_name)
            builtin.append(frontend)
            self.sessions = SessionFrontend(
                self,
                frontend,
                SessionTable(
                    max_sessions=config.max_sessions,
                    ttl=config.session_ttl,
                    max_tokens=config.session_max_tokens,
                ),
                require_token=config.session_auth,
                strip_routed_experts=config.strip_routed_experts,
            )
            builtin.append(self.sessions)
        self.chain = MiddlewareChain([*builtin, *load_middleware(config.middleware_paths, self)])
        if self.token_cache is not None:
            self.metrics.registry.register(CacheCollector(self.token_cache.report))

    def _count_transition(self, t: Transition) -> None:
        self.metrics.transitions.labels(t.url, t.old.value, t.new.value).inc()

    def _count_probe(self, ok: bool) -> None:
        self.metrics.health_checks.labels("ok" if ok else "failed").inc()

    # -- worker administration ----------------------------------------------

    async def admit_url(self, raw_url: object) -> str:
        """A worker URL that passed validation and the allow-list (4xx saying why if not)."""
        url = normalize_worker_url(raw_url)
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or 80
        check_worker(url, await resolve_host(host, port), self.allow_rules)
        return url

    async def add_worker(self, raw_url: object) -> tuple[Worker, bool]:
        """Register a worker and probe it at once; idempotent."""
        url = await self.admit_url(raw_url)
        worker, added = self.pool.add(url, trio.current_time())
        if added:
            with trio.move_on_after(self.config.health_check_timeout + 1):
                await self.health.check(url)
        return worker, added

    def remove_worker(self, raw_url: object) -> Worker:
        """Unregister a worker; one with requests in flight drains first."""
        return self.pool.remove(normalize_worker_url(raw_url))

    # -- reports --------------------------------------------------------------

    def worker_loads(self) -> dict[str, int]:
        return {w.url: w.inflight for w in self.pool if not w.draining}

    def health_report(self) -> dict[str, Any]:
        stats = self.pool.statistics()
        if stats.healthy == 0:
            status = "unavailable"
        elif stats.healthy < stats.total or any(
            not s.running for s in self.services.services.values()
        ):
            status = "degraded"
        else:
            status = "ok"
        return {
            "status": status,
            "healthy_workers": stats.healthy,
            "total_workers": stats.total,
            "services": self.services.snapshot(),
        }

    def json_metrics(self) -> dict[str, Any]:
        stats = self.pool.statistics()
        return {
            "router": {
                "active_workers": stats.healthy,
                "total_workers": stats.total,
                "worker_loads": self.worker_loads(),
                "total_in_flight": stats.total_inflight,
                "policy": self.policy.name,
                "workers": [w.snapshot() for w in self.pool],
                "pins": dict(getattr(self.policy, "pin_counts", {})),
                "decisions": self.metrics.decision_counts(),
                "latency": self.metrics.latency_summary(),
                "services": self.services.snapshot(),
            },
            "cache": self.token_cache.report() if self.token_cache else {"enabled": False},
            "sessions": self.sessions.report() if self.sessions else {"enabled": False},
        }


@asynccontextmanager
async def open_router(
    config: RouterConfig, *, probe: Probe | None = None, tokenizer: Tokenizer | None = None
) -> AsyncIterator[Router]:
    """Build a Router, start its supervised loops, and stop them on exit.

    ``tokenizer`` overrides ``--hf-checkpoint`` (tests share one loaded copy).
    """
    problems = config.problems()
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    if config.hf_checkpoint is not None and config.radix_tree_max_size == 0:
        log.warning(
            "--hf-checkpoint %s is not used: the token cache is off (turn it on with "
            "--radix-tree-max-size)",
            config.hf_checkpoint,
        )
    # Probes and broadcasts: connections checked against the allow-list like the data
    # plane's, and the worker's own key (if any) on every call.
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=4)
    timeout = httpx.Timeout(config.health_check_timeout, connect=config.connect_timeout)
    transport = GuardedTransport(address_guard(parse_allow(config.worker_allow)), limits=limits)
    headers = {}
    if config.worker_api_key is not None:
        headers["authorization"] = f"Bearer {config.worker_api_key}"
    async with httpx.AsyncClient(transport=transport, timeout=timeout, headers=headers) as http:
        if probe is None:
            probe = http_probe(http, config.health_check_endpoint, config.health_check_timeout)
        if tokenizer is None and config.radix_tree_max_size > 0:
            tokenizer = await trio.to_thread.run_sync(load_tokenizer, config.hf_checkpoint)
        router = Router(config, http=http, probe=probe, tokenizer=tokenizer)
        now = trio.current_time()
        for raw in config.worker_urls:
            try:
                router.pool.add(await router.admit_url(raw), now)
            except RouterError as exc:
                raise ConfigError(f"--worker-urls: {exc.message}") from None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(supervise, "health", router.health.run, router.services)
                if router.token_cache is not None:
                    await nursery.start(
                        supervise, "cache_gc", router.token_cache.gc_loop, router.services
                    )
                if router.sessions is not None:
                    await nursery.start(
                        supervise, "session_gc", router.sessions.expiry_loop, router.services
                    )
                try:
                    yield router
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await router.upstream.aclose()
