"""Deeply nested JSON bodies are a 400 on every endpoint that reads JSON, never a 500."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from trio_router.errors import BadRequest
from trio_router.request_json import MAX_DEPTH, loads_object

from .test_fuzz import snapshot, well_formed_error
from .test_openai import openai_router


def nested(levels: int) -> str:
    """JSON of ``levels`` arrays, one inside the other."""
    return "[" * levels + "1" + "]" * levels


@pytest.mark.parametrize("levels", [MAX_DEPTH, MAX_DEPTH + 1, 254, 1023, 1025, 5000])
def test_depth_is_counted_from_the_body(levels):
    raw = with_deep({"a": DEEP}, nested(levels - 1)).encode()  # the body itself is one level
    if levels <= MAX_DEPTH:
        assert loads_object(raw)["a"]
    else:
        with pytest.raises(BadRequest):
            loads_object(raw)


def test_many_shallow_containers_are_fine():
    raw = ("[" + ",".join(["{}"] * 10_000) + "]").encode()
    with pytest.raises(BadRequest, match="must be a JSON object"):
        loads_object(raw)
    assert len(loads_object(b'{"a": ' + raw + b"}")["a"]) == 10_000


DEEP = "<deep>"


def with_deep(body: Any, deep: str) -> str:
    """``body`` as JSON text, with the JSON text ``deep`` where it holds ``DEEP``."""
    return json.dumps(body).replace(json.dumps(DEEP), deep)


def bodies(deep: str) -> list[tuple[str, str]]:
    """(path, body) of every endpoint that reads JSON, with ``deep`` in a field it keeps."""
    user = {"role": "user", "content": "hi"}
    one = {"max_new_tokens": 1}
    worker = "http://127.0.0.1:1"
    shapes: list[tuple[str, dict[str, Any]]] = [
        ("/generate", {"text": "hi", "sampling_params": one, "x": DEEP}),
        ("/generate", {"input_ids": [1, 2], "sampling_params": one, "x": DEEP}),
        ("/v1/chat/completions", {"messages": [{**user, "x": DEEP}], "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": [user], "max_tokens": 1, "x": DEEP}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 1, "x": DEEP}),
        (
            "/sessions/{sid}/v1/chat/completions",
            {"messages": [{**user, "x": DEEP}], "max_tokens": 1},
        ),
        ("/sessions/{sid}/samples", {"format": "json", "x": DEEP}),
        ("/sessions", {"x": DEEP}),
        ("/retrieve_from_text", {"text": "hi", "x": DEEP}),
        ("/add_worker", {"url": worker, "x": DEEP}),
        ("/workers", {"url": worker, "x": DEEP}),
    ]
    return [(path, with_deep(body, deep)) for path, body in shapes]


@pytest.mark.parametrize("levels", [254, 600, 1023])
async def test_deep_bodies_are_a_400_everywhere(nursery, client, qwen3, levels):
    # orjson reads 1,024 levels but writes 254: these were 500s where the router wrote the
    # body again (/generate through the token cache, both OpenAI endpoints, session records)
    _worker, running = await openai_router(nursery, qwen3)
    with trio.fail_after(30):
        sid = (await client.post(running.url + "/sessions")).json()["session_id"]
        before = snapshot(running.router)
        for path, body in bodies(nested(levels)):
            url = running.url + path.format(sid=sid)
            r = await client.post(url, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, (path, r.text)
            assert well_formed_error(r)
            message = r.json()["error"]["message"]  # orjson stops at 1,024 levels itself
            assert "deeper than 128 levels" in message or "depth limit" in message, path
    assert snapshot(running.router) == before


async def test_bodies_within_the_depth_bound_are_served(nursery, client, qwen3):
    _worker, running = await openai_router(nursery, qwen3)
    deep = nested(MAX_DEPTH - 4)  # plus the body, the messages list and the message
    with trio.fail_after(30):
        sid = (await client.post(running.url + "/sessions")).json()["session_id"]
        for path, body in bodies(deep)[:6]:
            r = await client.post(running.url + path.format(sid=sid), content=body)
            assert r.status_code == 200, (path, r.text)
        # the session kept the message with its deep field, and can still write it out
        kept = await client.get(f"{running.url}/sessions/{sid}")
    assert kept.status_code == 200
    assert "x" in kept.json()["messages"][0]
