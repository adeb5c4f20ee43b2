"""Worker-control broadcasts through the router, and where weight versions go."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
import trio

from trio_router.security import DEFAULT_RELAYED

from .conftest import Engine, start_engine_router
from .test_retrieval import slowed_down
from .wire import GREEDY, chat_prompt, generate, post, retrieve, versions_of

PROMPT = chat_prompt("What is 2+2?")


async def model_path(client: httpx.AsyncClient, engine: Engine) -> str:
    path: str = (await client.get(engine.url + "/model_info")).json()["model_path"]
    return path


async def test_flush_cache_reaches_the_engine(nursery, client, qwen3, engine):
    router = await start_engine_router(nursery, qwen3, engine)
    with trio.fail_after(60):
        flushed = await post(client, router.url, "/flush_cache", {})
    assert flushed["ok"] is True
    result = flushed["results"][engine.url]
    assert result["status"] == 200
    assert result["body"].startswith("Cache flushed.")


@pytest.mark.xfail(
    strict=True,
    reason="issue 10 §2: /get_weight_version and /get_load are relayed by default, "
    "and SGLang 0.5.23 has neither (404)",
)
async def test_every_path_relayed_by_default_exists_on_the_engine(client, engine):
    missing = []
    with trio.fail_after(60):
        for path in DEFAULT_RELAYED:
            if path.endswith("/"):
                continue  # a prefix (/v1/)
            # FastAPI: 404 for a path it does not serve, 405 for a method it does not
            if (await client.get(engine.url + path)).status_code == 404:
                missing.append(path)
    assert missing == []


async def test_a_new_weight_version_reaches_the_trajectories(
    nursery, client, qwen3, disposable_engine
):
    engine = disposable_engine
    router = await start_engine_router(nursery, qwen3, engine)
    request = {"text": PROMPT, "sampling_params": {"max_new_tokens": 4, **GREEDY}}
    with trio.fail_after(120):
        before = await generate(client, router.url, request)
        update = {"model_path": await model_path(client, engine), "weight_version": "v1"}
        updated = await post(client, router.url, "/update_weights_from_disk", update)
        info = (await client.get(engine.url + "/model_info")).json()
        prompt = PROMPT + before["text"] + "<|im_end|>\n<|im_start|>user\nAgain?<|im_end|>\n"
        after = await generate(client, router.url, {**request, "text": prompt})
        got = await retrieve(client, router.url, prompt + after["text"])
    assert updated["ok"] is True
    assert updated["results"][engine.url]["status"] == 200
    assert info["weight_version"] == after["meta_info"]["weight_version"] == "v1"
    versions = [v for v in got["weight_versions"] if v is not None]
    assert versions == ["v0"] * len(before["output_ids"]) + ["v1"] * len(after["output_ids"])


@pytest.mark.xfail(
    strict=True,
    reason="issue 10 §2: SGLang's per-token meta_info.weight_versions are ignored; every "
    "token of a generation that spans a weight update gets the last version",
)
async def test_a_generation_spanning_a_weight_update_keeps_each_token_version(
    nursery, client, qwen3, disposable_engine
):
    engine = disposable_engine
    router = await start_engine_router(nursery, qwen3, engine)
    request: dict[str, Any] = {
        "text": PROMPT,
        "stream": True,
        "sampling_params": {"max_new_tokens": 48, "ignore_eos": True, **GREEDY},
    }
    flowing = trio.Event()
    result: dict[str, Any] = {}

    async def long_generation() -> None:
        async with client.stream("POST", router.url + "/generate", json=request) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    result.update(orjson.loads(line[6:]))
                    if len(result["output_ids"]) >= 3:
                        flowing.set()

    update = {"model_path": await model_path(client, engine), "weight_version": "v-next"}
    update["flush_cache"] = False  # in-place pause: the running request keeps its KV cache
    with trio.fail_after(180):
        async with slowed_down(client, engine, 0.05), trio.open_nursery() as inner:
            inner.start_soon(long_generation)
            await flowing.wait()
            # the RL weight sync: pause in place, load, continue
            await post(client, router.url, "/pause_generation", {"mode": "in_place"})
            await post(client, router.url, "/update_weights_from_disk", update)
            await post(client, router.url, "/continue_generation", {})
        got = await retrieve(client, router.url, PROMPT + result["text"])
    spans = result["meta_info"]["weight_versions"]
    assert [span["version"] for span in spans][-1] == "v-next"
    assert len(spans) == 2, "the update did not land in the middle of the generation"
    generated = got["weight_versions"][-len(result["output_ids"]) :]
    assert generated == versions_of(result)
