"""What SGLang refuses, and how its refusals reach the router's client."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import trio

from .conftest import Engine, start_engine_router
from .wire import GREEDY, chat_prompt, post

LONG = "word " * 9000  # past the model's 8192-token context
TOO_LONG = "longer than the model's context length"


async def events_of(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> list[Any]:
    """Status 200 and the ``data:`` events of a stream (``[DONE]`` kept as a string)."""
    async with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    return [line[6:] if line == "data: [DONE]" else orjson.loads(line[6:]) for line in lines]


async def test_a_form_typed_body_rewritten_by_the_cache_reaches_the_engine_as_json(
    nursery, client, qwen3, engine
):
    body = orjson.dumps({"text": chat_prompt("Hi"), "sampling_params": {"max_new_tokens": 2}})
    form = {"content-type": "application/x-www-form-urlencoded"}  # what curl -d sends
    router = await start_engine_router(nursery, qwen3, engine)
    with trio.fail_after(60):
        direct = await client.post(engine.url + "/generate", content=body, headers=form)
        routed = await client.post(router.url + "/generate", content=body, headers=form)
    assert direct.status_code == 400  # SGLang wants JSON ...
    assert routed.status_code == 200, routed.text  # ... and the router rewrote the body as JSON


async def test_a_prompt_past_the_context_is_refused_with_the_engine_message(
    nursery, client, qwen3, engine
):
    router = await start_engine_router(nursery, qwen3, engine)
    request = {"messages": [{"role": "user", "content": LONG}], "max_tokens": 2}
    with trio.fail_after(60):
        direct = await client.post(engine.url + "/generate", json={"text": LONG})
        chat = await client.post(router.url + "/v1/chat/completions", json=request)
    assert direct.status_code == 400
    assert TOO_LONG in direct.json()["error"]["message"]
    assert chat.status_code == 400
    assert TOO_LONG in chat.json()["error"]["message"]


async def test_a_streamed_generate_relays_the_engine_error_event(nursery, client, qwen3, engine):
    router = await start_engine_router(nursery, qwen3, engine)
    body = {"text": LONG, "stream": True, "sampling_params": {"max_new_tokens": 2, **GREEDY}}
    with trio.fail_after(60):
        direct = await events_of(client, engine.url + "/generate", body)
        routed = await events_of(client, router.url + "/generate", body)
    assert TOO_LONG in direct[0]["error"]["message"]
    assert direct[-1] == "[DONE]"
    assert routed == direct


async def stream_error(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": LONG}], "max_tokens": 2, "stream": True}
    events = await events_of(client, url, body)
    assert events[-1] == "[DONE]"
    errors = [e["error"] for e in events[:-1] if "error" in e]
    assert len(errors) == 1, events
    error: dict[str, Any] = errors[0]
    return error


async def test_a_streamed_chat_passes_the_engine_error_on(nursery, client, qwen3, engine):
    router = await start_engine_router(nursery, qwen3, engine)
    with trio.fail_after(60):
        error = await stream_error(client, router.url + "/v1/chat/completions")
    assert TOO_LONG in error["message"]
    assert error["code"] == 400


async def test_a_streamed_session_turn_passes_the_engine_error_on(
    nursery, client, qwen3, engine: Engine
):
    router = await start_engine_router(nursery, qwen3, engine)
    with trio.fail_after(60):
        sid = (await post(client, router.url, "/sessions", {}))["session_id"]
        error = await stream_error(client, f"{router.url}/sessions/{sid}/v1/chat/completions")
    assert TOO_LONG in error["message"]
    assert error["code"] == 400
