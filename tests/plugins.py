"""Middleware used by the tests (loaded by dotted path, like a user's plugin)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson

from trio_router.errors import Forbidden
from trio_router.hooks import Middleware, Outcome, ProxyRequest, Reply, ResponseHead
from trio_router.policies import Decision

CALLS: list[str] = []


class First(Middleware):
    async def on_request(self, request: ProxyRequest) -> Reply | None:
        CALLS.append("first.on_request")
        return None

    def on_route(self, request: ProxyRequest, decision: Decision) -> None:
        CALLS.append(f"first.on_route:{decision.branch}")

    async def on_response_start(self, request: ProxyRequest, head: ResponseHead) -> None:
        CALLS.append("first.on_response_start")

    async def on_response_end(self, request: ProxyRequest, outcome: Outcome) -> None:
        CALLS.append(f"first.on_response_end:{outcome.status}:{outcome.completed}")


class Second(Middleware):
    def __init__(self, router: object) -> None:
        self.router = router

    async def on_request(self, request: ProxyRequest) -> Reply | None:
        CALLS.append("second.on_request")
        return None

    async def on_response_end(self, request: ProxyRequest, outcome: Outcome) -> None:
        CALLS.append("second.on_response_end")


class AnswerPing(Middleware):
    """Answers /plugin/ping itself; no worker is asked."""

    async def on_request(self, request: ProxyRequest) -> Reply | None:
        if request.path == "/plugin/ping":
            return Reply(200, b'{"pong": true}')
        return None


class RewriteBody(Middleware):
    """Adds a field to JSON bodies on their way to the worker."""

    async def on_request(self, request: ProxyRequest) -> Reply | None:
        if request.body:
            data = orjson.loads(request.body)
            data["added_by_plugin"] = True
            request.body = orjson.dumps(data)
        return None


class Shout(Middleware):
    """Upper-cases the response body as it streams."""

    def transform_body(
        self, request: ProxyRequest, head: ResponseHead, body: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        async def upper() -> AsyncIterator[bytes]:
            async for chunk in body:
                yield chunk.upper()

        return upper()


class Boom(Middleware):
    """Fails when asked to, in the hook the header names."""

    async def on_request(self, request: ProxyRequest) -> Reply | None:
        if request.header(b"x-boom") == b"on_request":
            raise ValueError("kaboom")
        if request.header(b"x-boom") == b"forbidden":
            raise Forbidden("plugins may refuse requests with their own status")
        return None

    async def on_response_start(self, request: ProxyRequest, head: ResponseHead) -> None:
        if request.header(b"x-boom") == b"on_response_start":
            raise RuntimeError("late kaboom")


class NotAMiddleware:
    pass
