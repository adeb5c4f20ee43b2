"""The data plane: a raw ASGI handler that relays any request to one worker.

No web framework on this path: the request body is read once, the response
is relayed chunk by chunk as the worker sends it, never parsed or
re-serialised. A watcher task cancels the exchange when the client goes
away, which closes the upstream connection and so stops the worker's work.
The in-flight lease is released synchronously in ``finally``, so no exit
path (error, cancellation, disconnect) can leak a counter.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import trio

from .errors import (
    Forbidden,
    NoHealthyWorker,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    RouterError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnanswered,
    error_body,
)
from .hooks import Outcome, ProxyRequest, Reply, ResponseHead
from .policies import Policy
from .router import Router
from .security import BROADCAST_PATHS, check_target, is_inference_or_read_only
from .tenancy import kv_scoped_body, needs_kv_scope
from .upstream import UpstreamResponse

log = logging.getLogger("trio_router.proxy")
access_log = logging.getLogger("trio_router.access")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: also never sent to a worker: the router's own session token (its credentials, the
#: Authorization header, are handled by ``Gate.worker_headers``)
DROP_REQUEST = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"x-session-token"}
DROP_RESPONSE = HOP_BY_HOP | {b"server", b"date"}
ROUTING_KEY_HEADERS = (b"x-smg-routing-key", b"x-session-id")
#: ``request.state[PROGRESS]`` is the request's ``Progress``: the exchanges middleware open
#: for it (``fetch``; the OpenAI front end copies it to its upstream requests) name the
#: worker that served it, for its log line, metrics and ``Outcome``
PROGRESS = "progress"
MAX_ROUTING_KEY = 256
END_HOOK_TIMEOUT = 10.0


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


def _also_dropped(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names listed in ``Connection:``, which are hop-by-hop too; and
    ``content-length`` beside a ``transfer-encoding``, which overrides it (RFC 9112
    §6.3: an intermediary removes it, or the body it relays is cut at that length)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        name = name.lower()  # httpcore keeps the worker's spelling
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
        elif name == b"transfer-encoding":
            tokens.add(b"content-length")
    return tokens


def forward_headers(
    headers: list[tuple[bytes, bytes]], drop: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    """``headers`` minus hop-by-hop ones (and those ``_also_dropped`` names)."""
    extra = _also_dropped(headers)
    if extra:
        drop = drop | extra
    return [(k, v) for k, v in headers if k.lower() not in drop]


def routing_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    for wanted in ROUTING_KEY_HEADERS:
        for name, value in headers:
            if name == wanted and value:
                return value[:MAX_ROUTING_KEY].decode("utf-8", "replace")
    return None


async def read_body(scope: Scope, receive: Receive, limit: int, within: float = 0.0) -> bytes:
    """The whole request body; 413 beyond ``limit`` bytes, 408 after ``within`` s (0: never)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                declared = 0
            if declared > limit:
                raise PayloadTooLarge(f"request body of {declared} bytes exceeds {limit}")
    chunks = []
    size = 0
    with trio.move_on_after(within if within > 0 else math.inf):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body exceeds {limit} bytes")
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    raise RequestTimeout(f"request body not received within {within:g} s ({size} bytes came)")


async def send_reply(send: Send, reply: Reply) -> int:
    """Send a whole ``reply`` with its length (not a relayed worker's, which may be
    stale); the bytes of its body."""
    assert isinstance(reply.body, bytes)
    headers = [h for h in reply.headers if h[0].lower() != b"content-length"]
    headers.append((b"content-length", str(len(reply.body)).encode()))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body, "more_body": False})
    return len(reply.body)


def error_reply(exc: RouterError) -> Reply:
    body = error_body(exc.message, exc.kind, exc.status)
    return Reply(exc.status, body, [(b"content-type", b"application/json"), *exc.headers()])


@dataclass(slots=True)
class Progress:
    """What has happened to one request so far (for metrics, logs, hooks)."""

    status: int = 0
    worker: str | None = None
    response_started: bool = False
    bytes_sent: int = 0
    completed: bool = False
    error: RouterError | None = None
    branch: str | None = None


class Proxy:
    """ASGI callable for every path the control plane does not own."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self._ids = itertools.count(1)
        self.active = 0  # requests being handled, for --max-concurrent-requests
        self._id_prefix = f"tr-{router.rng.getrandbits(32):08x}-"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        router = self.router
        started = trio.current_time()
        try:
            body = await read_body(
                scope, receive, router.config.max_body_size, router.config.body_timeout
            )
        except ClientGone:
            return
        except RouterError as exc:
            await send_reply(send, error_reply(exc))
            router.metrics.observe(scope["path"], "none", exc.status, 0.0)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        request_id = None
        for name, value in headers:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
                break
        if request_id is None:  # give the request an id, and pass it on to the worker
            request_id = f"{self._id_prefix}{next(self._ids)}"
            headers = [*headers, (b"x-request-id", request_id.encode())]
        client = scope.get("client")
        request = ProxyRequest(
            method=scope["method"],
            path=scope["path"],
            raw_path=scope.get("raw_path"),
            query=scope["query_string"],
            headers=headers,
            body=body,
            routing_key=routing_key(headers),
            request_id=request_id,
            client=client[0] if client else None,
        )
        limit = router.config.max_concurrent_requests
        if limit and self.active >= limit:
            busy = Overloaded(f"the router is handling {limit} requests; retry shortly")
            await send_reply(send, error_reply(busy))
            router.metrics.observe(request.path, "none", busy.status, 0.0)
            return
        self.active += 1
        progress = Progress()
        request.state[PROGRESS] = progress
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope, progress)
                await self._exchange(request, send, progress)
                nursery.cancel_scope.cancel()
        finally:
            self.active -= 1
            outcome = self._finish(request, progress, started)
            if router.chain.has_end_hooks:
                with trio.CancelScope(shield=True), trio.move_on_after(END_HOOK_TIMEOUT):
                    await router.chain.on_response_end(request, outcome)

    async def _exchange(self, request: ProxyRequest, send: Send, progress: Progress) -> None:
        """Answer one request; turns every failure into an error reply or a cut stream."""
        router = self.router
        timeout = router.config.request_timeout
        try:
            with trio.move_on_after(timeout if timeout > 0 else math.inf) as deadline:
                authorization = request.header_text(b"authorization")
                if request.path in BROADCAST_PATHS:
                    router.gate.check_admin(authorization, request.client)
                    await self._answer(request, await broadcast(router, request), send, progress)
                    return
                tenant = router.gate.tenant(authorization)
                if tenant is not None:
                    request.state["tenant"] = tenant
                    scoped = (
                        kv_scoped_body(request.body, tenant)
                        if needs_kv_scope(request.path, request.method)
                        else None
                    )
                    if scoped is not None:
                        request.set_json_body(scoped)
                reply = await router.chain.on_request(request) if router.chain.active else None
                if reply is not None:
                    await self._answer(request, reply, send, progress)
                    return
                await self._forward(request, send, progress)
            if deadline.cancelled_caught:
                raise UpstreamTimeout(f"request exceeded the router's {timeout:g} s deadline")
        except RouterError as exc:
            self._failed(progress, exc)
            if not progress.response_started:
                progress.bytes_sent = await send_reply(send, error_reply(exc))
        except Exception as exc:
            log.exception("internal error proxying %s %s", request.method, request.path)
            self._failed(progress, RouterError(f"internal router error: {type(exc).__name__}"))
            if not progress.response_started:
                internal = error_reply(RouterError("internal router error"))
                progress.bytes_sent = await send_reply(send, internal)

    async def _answer(
        self, request: ProxyRequest, reply: Reply, send: Send, progress: Progress
    ) -> None:
        """Send a middleware's own answer; a streamed one chunk by chunk.

        A whole answer built from what a worker answered (the token cache's continued
        /generate, a non-streamed OpenAI or session answer) goes through
        ``on_response_start`` first, as the worker's own answer would, naming the worker.
        """
        chain = self.router.chain
        if isinstance(reply.body, bytes) and progress.worker is not None and chain.active:
            head = ResponseHead(reply.status, list(reply.headers), progress.worker)
            await chain.on_response_start(request, head)
            reply = Reply(head.status, reply.body, head.headers)
        progress.status = reply.status
        if isinstance(reply.body, bytes):
            progress.completed = True
            progress.bytes_sent = await send_reply(send, reply)
            return
        body = reply.body
        try:
            await send(
                {"type": "http.response.start", "status": reply.status, "headers": reply.headers}
            )
            progress.response_started = True
            async for chunk in body:
                progress.bytes_sent += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            progress.completed = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                with trio.CancelScope(shield=True):
                    await aclose()

    @staticmethod
    def _failed(progress: Progress, exc: RouterError) -> None:
        progress.error = exc
        if not progress.response_started:
            progress.status = exc.status

    async def _forward(self, request: ProxyRequest, send: Send, progress: Progress) -> None:
        router = self.router
        if not router.gate.relays(request.path):
            raise Forbidden(
                f"{request.path} is not relayed to workers; relay it with --proxy-allow "
                "(worker-control paths are admin broadcasts)"
            )
        async with open_exchange(router, request, progress) as response:
            url = response.url
            head = ResponseHead(
                response.status, forward_headers(response.headers, DROP_RESPONSE), url
            )
            body: AsyncIterator[bytes] = response
            if router.chain.active:
                await router.chain.on_response_start(request, head)
                body, replaced = router.chain.transform_body(request, head, body)
                if replaced:
                    head.headers = [(k, v) for k, v in head.headers if k != b"content-length"]
            length = _content_length(head.headers)
            progress.status = head.status
            await send(
                {"type": "http.response.start", "status": head.status, "headers": head.headers}
            )
            progress.response_started = True
            sent = 0
            async for chunk in body:
                sent += len(chunk)
                progress.bytes_sent = sent
                if length is not None and sent >= length:
                    # Read the end of the message (already buffered) before the last
                    # send, so httpcore can reuse the connection even if the server's
                    # "stream closed" cancels us right after that send.
                    async for _ in body:
                        pass
                    progress.completed = True
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            else:
                progress.completed = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _finish(self, request: ProxyRequest, progress: Progress, started: float) -> Outcome:
        router = self.router
        duration = trio.current_time() - started
        status = progress.status if progress.completed or progress.status else 499
        if not progress.completed and progress.error is None:
            router.metrics.disconnects.inc()
        if progress.response_started and not progress.completed:
            router.metrics.cut.labels("client" if progress.error is None else "upstream").inc()
        router.metrics.observe(request.path, progress.worker or "none", status, duration)
        if router.config.verbose:
            pending = request.state.get("token_cache")
            prompt = getattr(getattr(pending, "prompt", None), "ids", None)
            access_log.info(
                "request_id=%s method=%s path=%s worker=%s decision=%s status=%d bytes=%d "
                "ms=%.1f prompt_tokens=%s completed=%s",
                request.request_id,
                request.method,
                request.path,
                progress.worker or "none",
                progress.branch or "none",
                status,
                progress.bytes_sent,
                duration * 1000,
                len(prompt) if prompt is not None else "-",
                "yes" if progress.completed else "no",
            )
        return Outcome(
            status=status,
            worker=progress.worker,
            bytes_sent=progress.bytes_sent,
            duration=duration,
            completed=progress.completed,
            error=progress.error,
        )


@asynccontextmanager
async def open_exchange(
    router: Router, request: ProxyRequest, progress: Progress | None = None
) -> AsyncIterator[UpstreamResponse]:
    """Choose a worker, lease it and open its response to ``request``.

    A request that provably never reached a worker (connection refused) is
    sent to another, up to ``max_retries`` times; so is an inference request
    whose worker broke the connection before answering (``resend_unanswered``).
    Connection errors, 5xx answers, a worker slower to begin its answer than
    ``first_byte_timeout``, and the request's deadline passing while the worker's
    answer is unfinished count against the worker; the lease is released however
    the block ends. The router's own credentials never reach a worker
    (``Gate.worker_headers``), nor does a path a worker might read otherwise
    (``check_target``: 400).
    """
    if progress is None:
        progress = request.state.get(PROGRESS) or Progress()
    check_target(request.target.decode("latin-1"))
    tried: set[str] = set()
    headers = router.gate.worker_headers(forward_headers(request.headers, DROP_REQUEST))
    method = request.method.encode()
    policy: Policy = request.state.get("policy") or router.policy
    first_byte = router.config.first_byte_timeout or math.inf
    deadline = trio.current_effective_deadline()  # the request's, as the exchange begins
    last_error: UpstreamConnectError | UpstreamUnanswered | None = None
    while True:
        try:
            decision = policy.choose(
                router.pool,
                request.routing_key,
                trio.current_time(),
                frozenset(tried),
                request.hint,
            )
        except NoHealthyWorker:
            if last_error is not None:
                raise last_error from None  # every worker tried refused the connection
            raise
        router.metrics.decided(policy.name, decision.branch)
        if router.chain.active:
            router.chain.on_route(request, decision)
        worker = decision.worker
        progress.worker = worker.url
        progress.branch = f"{policy.name}:{decision.branch}"
        async with AsyncExitStack() as stack:
            stack.callback(router.pool.acquire(worker).release)
            response: UpstreamResponse | None = None
            opening = router.upstream.stream(
                worker.url, method, request.target, headers, request.body
            )
            try:
                if first_byte == math.inf:  # no cancel scope per request when it is off
                    response = await stack.enter_async_context(opening)
                else:
                    with trio.move_on_after(first_byte):
                        response = await stack.enter_async_context(opening)
                    if response is None:
                        raise UpstreamTimeout(
                            f"worker {worker.url} did not begin its answer within {first_byte:g} s"
                        )
            except (UpstreamConnectError, UpstreamUnanswered) as exc:
                passive_failure(router, worker.url, exc)
                if len(tried) >= router.config.max_retries or not may_resend(router, request, exc):
                    raise
                last_error = exc
                tried.add(worker.url)
                router.metrics.retries.labels(request.path).inc()
                log.info("retrying %s on another worker: %s", request.path, exc.message)
                continue
            except UpstreamError as exc:  # it reached the worker, which broke the exchange
                passive_failure(router, worker.url, exc)
                raise
            except trio.Cancelled:
                _deadline_passed(router, worker.url, deadline)
                raise
            failed = response.status >= 500
            if failed:
                passive_failure(
                    router, worker.url, UpstreamError(f"worker answered {response.status}")
                )
            try:
                yield response
            except UpstreamError as exc:
                passive_failure(router, worker.url, exc)
                raise
            except trio.Cancelled:
                if not response.finished:
                    _deadline_passed(router, worker.url, deadline)
                raise
            if not failed:  # only a whole answer clears the worker's failure count
                transition = router.pool.request_succeeded(worker, trio.current_time())
                if transition is not None:
                    router.health.on_transition(transition)
            return


def _deadline_passed(router: Router, url: str, deadline: float) -> None:
    """The exchange with ``url`` was cancelled unfinished: if by the request's deadline
    (not a client going away, nor shutdown), the worker was too slow: count it."""
    if trio.current_time() >= deadline:
        passive_failure(
            router, url, UpstreamTimeout(f"worker {url} had not answered at the request deadline")
        )


def may_resend(router: Router, request: ProxyRequest, exc: UpstreamError) -> bool:
    """Whether a failed attempt may go to another worker: it never reached the first, or
    (``resend_unanswered``) the first dropped an inference or read-only call unanswered."""
    if isinstance(exc, UpstreamConnectError):
        return True
    return router.config.resend_unanswered and is_inference_or_read_only(request.path)


@dataclass(slots=True)
class Fetched:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    worker: str


async def fetch(router: Router, request: ProxyRequest) -> Fetched:
    """Send ``request`` to a worker and read the whole answer (for middleware)."""
    async with open_exchange(router, request) as response:
        chunks = [chunk async for chunk in response]
        return Fetched(
            response.status,
            forward_headers(response.headers, DROP_RESPONSE),
            b"".join(chunks),
            response.url,
        )


def passive_failure(router: Router, url: str, exc: RouterError) -> None:
    """A proxied request failed on ``url``: count it and have the worker probed now."""
    worker = router.pool.get(url)
    if worker is None:
        return
    transition = router.pool.request_failed(worker, trio.current_time(), exc.message)
    if transition is not None:
        log.warning(
            "worker %s: %s -> %s (%s)", url, transition.old.value, transition.new.value, exc.message
        )
        router.health.on_transition(transition)
    router.health.wake(url)


async def broadcast(router: Router, request: ProxyRequest) -> Reply:
    """Send a worker-control call to every registered worker; report each result."""
    check_target(request.target.decode("latin-1"))
    results: dict[str, dict[str, Any]] = {}
    headers = dict(router.gate.worker_headers(forward_headers(request.headers, DROP_REQUEST)))
    timeout = router.config.request_timeout or None

    async def one(url: str) -> None:
        try:
            response = await router.http.request(
                request.method,
                url + request.target.decode("latin-1"),
                content=request.body,
                headers={k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items()},
                timeout=timeout,
            )
        except httpx.HTTPError as exc:
            results[url] = {"status": None, "error": f"{type(exc).__name__}: {exc}"}
            return
        try:
            body: Any = response.json() if response.content else None
        except ValueError:
            body = response.text
        results[url] = {"status": response.status_code, "body": body}

    urls = router.pool.urls()
    async with trio.open_nursery() as nursery:
        for url in urls:
            nursery.start_soon(one, url)
    ok = bool(urls) and all(
        r.get("status") is not None and r["status"] < 300 for r in results.values()
    )
    document = {"ok": ok, "workers": len(urls), "results": results}
    return Reply(200 if ok else 502, orjson.dumps(document))


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _cancel_on_disconnect(
    receive: Receive, scope: trio.CancelScope, progress: Progress
) -> None:
    """Cancel the exchange if the client goes away before its response is complete.

    The server also reports "disconnect" when a complete response ends, from
    inside our last ``send``; cancelling then would interrupt the server's own
    connection handling (an idle keep-alive connection would never be closed).
    """
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not progress.completed:
                scope.cancel()
            return
