"""A simulated SGLang worker with the shipped Qwen3 tokenizer that records what it was fed.

Benchmarks that need the engine's side of the truth start this script instead of
``python -m trio_router worker`` (as a child process, on loopback)::

    python bench/_qwen_worker.py --port P [--latency-per-token-ms X] [--seed S]

It serves ``trio_router.sim.worker.SimWorker`` (the same app as ``trio-router worker``) with
``load_tokenizer()``, behind a thin ASGI layer that keeps, for every ``/generate`` that carries
a string ``rid``, the prompt ids the engine consumed (``input_ids`` as received, or the
worker's own tokenization of ``text``). ``GET /bench/prompts`` returns them as
``{"prompts": {rid: [ids...]}}``: the ground truth of what was fed to the engine, read from
the worker side without changing the project. It prints
``simulated SGLang worker listening on URL`` once bound and exits on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import hypercorn.config
import hypercorn.trio
import orjson
import trio

from trio_router.sim.worker import SimWorker, SimWorkerConfig
from trio_router.tokenizer import load_tokenizer

MAX_RECORDS = 200_000  # bound on remembered prompts (oldest are not evicted: new ones dropped)

Scope = Mapping[str, Any]
Message = Mapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class PromptRecorder:
    """ASGI wrapper: remembers each ``/generate`` prompt by ``rid``; serves them back."""

    def __init__(self, app: SimWorker) -> None:
        self.app = app
        self.prompts: dict[str, list[int]] = {}
        self.dropped = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/bench/prompts":
            body = orjson.dumps({"prompts": self.prompts, "dropped": self.dropped})
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        if scope["type"] != "http" or scope["path"] != "/generate":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []

        async def tapped() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    self.note(b"".join(chunks))
            return message

        await self.app(scope, tapped, send)

    def note(self, raw: bytes) -> None:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if not isinstance(body, dict) or not isinstance(body.get("rid"), str):
            return
        ids = body.get("input_ids")
        if ids is None and isinstance(body.get("text"), str):
            ids = self.app.tokenizer.encode(body["text"])
        if not isinstance(ids, list):
            return
        if len(self.prompts) >= MAX_RECORDS:
            self.dropped += 1
            return
        self.prompts[body["rid"]] = ids


async def serve(config: SimWorkerConfig) -> None:
    app = SimWorker(config, load_tokenizer())
    recorder = PromptRecorder(app)
    hc = hypercorn.config.Config()
    hc.bind = [f"{config.host}:{config.port}"]
    hc.accesslog = None
    hc.graceful_timeout = 0.1
    hc.keep_alive_timeout = 75
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(hypercorn.trio.serve, recorder, hc)
        app.url = binds[0]
        print(f"simulated SGLang worker listening on {binds[0]}", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-per-token-ms", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weight-version", default="v0")
    args = parser.parse_args(argv)
    config = SimWorkerConfig(
        host=args.host,
        port=args.port,
        weight_version=args.weight_version,
        latency_per_token_ms=args.latency_per_token_ms,
        seed=args.seed,
    )
    if problems := config.problems():
        parser.error("; ".join(problems))
    trio.run(serve, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
