"""A scripted upstream for proxy tests: records what it receives, answers as told.

Unlike the simulated SGLang worker it answers with exact bytes chosen by the
test, and can hold a response at a gate, so tests can pin byte-for-byte
passthrough, incremental streaming and disconnects without timing guesses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from trio_router.server import answer_lifespan

Message = MutableMapping[str, Any]


@dataclass
class Seen:
    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass
class Script:
    """What the upstream answers: status, headers, then body chunks.

    A chunk that is a ``trio.Event`` is a gate: the upstream waits for it
    before sending the rest.
    """

    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(
        default_factory=lambda: [(b"content-type", b"application/json")]
    )
    chunks: list[bytes | trio.Event] = field(default_factory=lambda: [b"{}"])
    gate_before_start: trio.Event | None = None


class ScriptedUpstream:
    def __init__(self) -> None:
        self.script = Script()
        self.seen: list[Seen] = []
        self.active = 0
        self.cancelled = 0
        self.finished = 0
        self.sent_chunks = 0
        self.chunk_sent = trio.Event()

    async def __call__(
        self,
        scope: Message,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.seen.append(
            Seen(scope["method"], scope["path"], scope["query_string"], scope["headers"], body)
        )
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        script = self.script
        self.active += 1
        try:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    self.cancelled += 1
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                if script.gate_before_start is not None:
                    await script.gate_before_start.wait()
                await send(
                    {
                        "type": "http.response.start",
                        "status": script.status,
                        "headers": script.headers,
                    }
                )
                for chunk in script.chunks:
                    if isinstance(chunk, trio.Event):
                        await chunk.wait()
                        continue
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    self.sent_chunks += 1
                    self.chunk_sent.set()
                    self.chunk_sent = trio.Event()
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                self.finished += 1
                nursery.cancel_scope.cancel()
        finally:
            self.active -= 1


async def serve_scripted(
    *, task_status: trio.TaskStatus[tuple[ScriptedUpstream, str]] = trio.TASK_STATUS_IGNORED
) -> None:
    app = ScriptedUpstream()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.1
    await serve(  # type: ignore[arg-type]
        app, config, shutdown_trigger=trio.sleep_forever, task_status=_Started(task_status, app)
    )


class _Started:
    """Adapts hypercorn's ``started(binds)`` to ``started((app, url))``."""

    def __init__(self, inner: trio.TaskStatus[Any], app: ScriptedUpstream) -> None:
        self.inner = inner
        self.app = app

    def started(self, binds: list[str]) -> None:
        self.inner.started((self.app, binds[0]))
