"""The simulated SGLang worker: tokenizer, fake decoding, wire format, faults, lifecycle."""

from __future__ import annotations

import base64
import sys
from array import array
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trio_router.sim import (
    ByteTokenizer,
    Faults,
    SimWorker,
    SimWorkerConfig,
    SimWorkerHandle,
    Vocab,
    generate,
    next_token,
    serve_sim_worker,
    vocab_from_tokenizer,
)
from trio_router.sim.generation import routed_experts
from trio_router.sim.tokenizer import WORDS

Message = Mapping[str, Any]
TOK = ByteTokenizer()
VOCAB = vocab_from_tokenizer(TOK)
EOS = TOK.eos_token_id


async def start(nursery: trio.Nursery, **config: Any) -> SimWorkerHandle:
    config.setdefault("tokenizer", "bytes")
    handle: SimWorkerHandle = await nursery.start(serve_sim_worker, SimWorkerConfig(**config))
    return handle


@pytest.fixture
async def worker(nursery: trio.Nursery) -> SimWorkerHandle:
    return await start(nursery)


@pytest.fixture
async def client(worker: SimWorkerHandle) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=worker.url, timeout=10) as c:
        yield c


async def sse_events(response: httpx.Response) -> list[Any]:
    """Parsed ``data:`` payloads of an SSE response; ``[DONE]`` kept as the string."""
    events: list[Any] = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else orjson.loads(data))
    return events


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` (callers bound the wait with ``fail_after``)."""
    while not predicate():  # noqa: ASYNC110 - the state lives in another object
        await trio.sleep(0.005)


async def settled(handle: SimWorkerHandle) -> None:
    """Wait until the worker has no generation in progress (handlers finish after replying)."""
    await wait_until(lambda: handle.app.stats.active == 0)


async def call_app(app: SimWorker, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """Call the ASGI app directly (no sockets), returning status and body."""
    sent: list[Message] = []
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        if pending:
            return pending.pop()
        await trio.sleep_forever()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"content-type", b"application/json")]
    await app({"type": "http", "method": method, "path": path, "headers": headers}, receive, send)
    assert sent[0]["type"] == "http.response.start"
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def first_prompt_ending(finish_type: str) -> str:
    """A prompt whose default-length generation ends with ``finish_type``."""
    for i in range(1000):
        prompt = f"prompt number {i}"
        _, finish = generate(TOK.encode(prompt), 128, VOCAB)
        if finish.type == finish_type:
            return prompt
    raise AssertionError("no such prompt")


# ---------------------------------------------------------------- tokenizer


@given(st.text())
def test_byte_tokenizer_round_trip(text: str) -> None:
    ids = TOK.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert TOK.decode(ids) == text
    assert TOK.decode(ids, skip_special_tokens=False) == text


def test_byte_tokenizer_words_and_special_tokens() -> None:
    first_word = TOK.first_word_id
    assert TOK.vocab_size == first_word + len(WORDS)
    ids = [first_word, first_word + 1, EOS]
    assert TOK.decode(ids) == f" {WORDS[0]} {WORDS[1]}"
    assert TOK.decode(ids, skip_special_tokens=False) == f" {WORDS[0]} {WORDS[1]}<|im_end|>"
    assert TOK.decode([0xFF, *TOK.encode("ok")]) == "\ufffdok"
    with pytest.raises(ValueError, match="out of range"):
        TOK.decode([TOK.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        TOK.decode([-1])


# ---------------------------------------------------------------- generation


def test_generation_is_deterministic() -> None:
    prompt = TOK.encode("Hello there")
    a = generate(prompt, 64, VOCAB)
    assert a == generate(prompt, 64, VOCAB)
    assert generate(TOK.encode("Hello therE"), 64, VOCAB) != a
    assert generate(prompt, 64, VOCAB, seed=1) != a
    tokens, _ = a
    assert next_token(prompt, [], 0, VOCAB) == tokens[0]
    assert next_token(prompt, [tokens[0][0]], 1, VOCAB) == tokens[1]
    for tid, lp in tokens:
        assert tid == EOS or tid in VOCAB.word_ids
        assert -5 < lp < 0


def test_generation_finish_reasons() -> None:
    reasons = {generate(TOK.encode(str(i)), 24, VOCAB)[1].type for i in range(200)}
    assert reasons == {"stop", "length"}
    tokens, finish = generate(TOK.encode(first_prompt_ending("stop")), 128, VOCAB)
    assert finish.to_json() == {"type": "stop", "matched": EOS}
    assert tokens[-1][0] == EOS
    assert len(tokens) >= 3
    tokens, finish = generate(TOK.encode("x"), 300, VOCAB, ignore_eos=True)
    assert finish.to_json() == {"type": "length", "length": 300}
    assert EOS not in [t for t, _ in tokens]
    stop_id = tokens[5][0]
    tokens, finish = generate(
        TOK.encode("x"), 300, VOCAB, ignore_eos=True, stop_token_ids=[stop_id]
    )
    assert finish.matched == stop_id
    assert tokens[-1][0] == stop_id
    assert generate(TOK.encode("x"), 0, VOCAB)[0] == []


def test_vocab_from_foreign_tokenizer() -> None:
    class Foreign:
        eos_token_id = 2
        vocab_size = 100_000
        pieces = ("<s>", "!", "</s>", "ab", " Hello", "é", " two words", *[" wo"] * 60)

        def encode(self, text: str) -> list[int]:
            return [4]

        def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
            return "".join(self.pieces[i] if i < len(self.pieces) else "##" for i in ids)

    vocab = vocab_from_tokenizer(Foreign())
    assert vocab.eos_token_id == 2
    assert vocab.word_ids == (4, *range(7, 67))
    with pytest.raises(ValueError, match="no word ids"):
        Vocab((), 0)


def test_routed_experts_shape() -> None:
    raw = routed_experts([1, 2, 3])
    values = array("i", raw)
    if sys.byteorder == "big":
        values.byteswap()
    assert len(values) == 3 * 4 * 2
    assert all(0 <= v < 64 for v in values)
    assert all(values[i] != values[i + 1] for i in range(0, len(values), 2))


# ---------------------------------------------------------------- /generate


async def test_generate_text_and_input_ids(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        req = {"text": "The sky is", "sampling_params": {"max_new_tokens": 16}}
        r = await client.post("/generate", json=req)
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        out = r.json()
        meta = out["meta_info"]
        assert meta["prompt_tokens"] == len(TOK.encode("The sky is"))
        assert meta["completion_tokens"] == len(out["output_ids"]) <= 16
        assert meta["weight_version"] == "v0"
        assert meta["cached_tokens"] == 0
        assert meta["e2e_latency"] >= 0
        assert len(meta["id"]) == 32
        assert "output_token_logprobs" not in meta
        assert out["text"] == TOK.decode(out["output_ids"])

        params = {"max_new_tokens": 16}
        ids_req = {"input_ids": TOK.encode("The sky is"), "rid": "abc", "sampling_params": params}
        again = (await client.post("/generate", json=ids_req)).json()
        assert again["output_ids"] == out["output_ids"]
        assert again["text"] == out["text"]
        assert again["meta_info"]["id"] == "abc"

        put = await client.put("/generate", json=req)
        assert put.json()["output_ids"] == out["output_ids"]


async def test_generate_logprobs_and_eos(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        prompt = first_prompt_ending("stop")
        r = await client.post("/generate", json={"text": prompt, "return_logprob": True})
        out = r.json()
        meta = out["meta_info"]
        assert meta["finish_reason"] == {"type": "stop", "matched": EOS}
        assert out["output_ids"][-1] == EOS
        assert meta["completion_tokens"] == len(out["output_ids"])
        assert "<|im_end|>" not in out["text"]
        assert out["text"] == TOK.decode(out["output_ids"][:-1])
        lps = meta["output_token_logprobs"]
        assert len(lps) == meta["completion_tokens"]
        for (lp, tid, text), out_id in zip(lps, out["output_ids"], strict=True):
            assert tid == out_id
            assert text is None
            assert -5 < lp < 0

        params = {"skip_special_tokens": False}
        raw = await client.post("/generate", json={"text": prompt, "sampling_params": params})
        assert raw.json()["text"].endswith("<|im_end|>")


async def test_generate_validation(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        bad: list[Any] = [
            {},
            {"text": "a", "input_ids": [1]},
            {"text": ["a", "b"]},
            {"input_ids": [[1], [2]]},
            {"input_ids": [TOK.vocab_size]},
            {"text": "a", "sampling_params": {"max_new_tokens": "x"}},
            {"text": "a", "sampling_params": {"stop": 3}},
            [1, 2],
        ]
        for body in bad:
            r = await client.post("/generate", json=body)
            assert r.status_code == 400, body
            assert r.json()["error"]["type"] == "invalid_request_error"
        r = await client.post(
            "/generate", content=b"{nope", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400
        assert "invalid JSON" in r.json()["error"]["message"]


async def test_stop_strings_are_trimmed(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        sp: dict[str, Any] = {"max_new_tokens": 40, "ignore_eos": True}
        base = {"text": "stop test", "sampling_params": sp}
        full = (await client.post("/generate", json=base)).json()
        words = full["text"].split(" ")
        stop = " " + words[4]
        cut = full["text"].find(stop)
        params = {**sp, "stop": ["zzz", stop]}
        out = (await client.post("/generate", json={**base, "sampling_params": params})).json()
        assert out["text"] == full["text"][:cut]
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
        n = out["meta_info"]["completion_tokens"]
        assert out["output_ids"] == full["output_ids"][:n]
        assert TOK.decode(out["output_ids"]).startswith(out["text"] + stop)


async def test_routed_experts(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        body = {"text": "moe", "return_routed_experts": True}
        out = (await client.post("/generate", json=body)).json()
        meta = out["meta_info"]
        n = meta["prompt_tokens"] + meta["completion_tokens"]
        raw = base64.b64decode(meta["routed_experts"])
        assert len(raw) == n * 4 * 2 * 4
        assert raw == routed_experts(TOK.encode("moe") + out["output_ids"])


async def test_generate_stream_is_cumulative_and_incremental(nursery: trio.Nursery) -> None:
    handle = await start(nursery, latency_per_token_ms=5)
    body = {"text": "stream", "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}}
    async with httpx.AsyncClient(base_url=handle.url) as client:
        with trio.fail_after(10):
            expected = (await client.post("/generate", json=body)).json()
            events: list[Any] = []
            stream_body = {**body, "stream": True, "return_logprob": True}
            async with client.stream("POST", "/generate", json=stream_body) as r:
                assert r.headers["content-type"] == "text/event-stream"
                async for line in r.aiter_lines():
                    if not line:
                        continue
                    assert line.startswith("data: ")
                    if line == "data: [DONE]":
                        events.append("[DONE]")
                        continue
                    if not events:  # the worker is still generating when it arrives
                        assert handle.app.stats.active == 1
                    events.append(orjson.loads(line[6:]))
            await settled(handle)
    assert events[-1] == "[DONE]"
    data = events[:-1]
    assert len(data) == 8
    for i, ev in enumerate(data):
        assert ev["output_ids"] == expected["output_ids"][: i + 1]
        assert ev["text"] == TOK.decode(ev["output_ids"])
        assert ev["meta_info"]["completion_tokens"] == i + 1
        assert len(ev["meta_info"]["output_token_logprobs"]) == i + 1
        assert (ev["meta_info"]["finish_reason"] is None) == (i < 7)
    assert data[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
    assert data[-1]["text"] == expected["text"]
    assert handle.app.stats.completed == 2


# ---------------------------------------------------------------- OpenAI endpoints

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}


async def test_chat_completion(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        r = await client.post("/v1/chat/completions", json={**CHAT, "logprobs": True})
        out = r.json()
        assert out["object"] == "chat.completion"
        assert out["id"].startswith("chatcmpl-")
        assert isinstance(out["created"], int)
        assert out["model"] == "m"
        (choice,) = out["choices"]
        meta = choice["meta_info"]
        ids = meta["output_ids"]
        assert choice["message"] == {"role": "assistant", "content": TOK.decode(ids)}
        assert choice["finish_reason"] in ("stop", "length")
        assert meta["completion_tokens"] == len(ids) == len(meta["output_token_logprobs"])
        assert meta["weight_version"] == "v0"
        content = choice["logprobs"]["content"]
        assert [c["token"] for c in content] == [
            TOK.decode([i], skip_special_tokens=False) for i in ids
        ]
        assert all(c["bytes"] is None and c["top_logprobs"] == [] for c in content)
        prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        p = len(TOK.encode(prompt))
        assert out["usage"] == {
            "prompt_tokens": p,
            "completion_tokens": len(ids),
            "total_tokens": p + len(ids),
        }
        # SGLang's input_ids extension: the same prompt gives the same tokens.
        r2 = await client.post(
            "/v1/chat/completions", json={**CHAT, "input_ids": TOK.encode(prompt)}
        )
        assert r2.json()["choices"][0]["meta_info"]["output_ids"] == ids
        assert (await client.post("/v1/chat/completions", json={**CHAT, "n": 2})).status_code == 400
        bad = await client.post("/v1/chat/completions", json={"messages": []})
        assert bad.status_code == 400


async def test_chat_stream(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        full = (await client.post("/v1/chat/completions", json=CHAT)).json()["choices"][0]
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            events = await sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    n = len(full["meta_info"]["output_ids"])
    token_chunks = chunks[1 : 1 + n]
    assert (
        "".join(c["choices"][0]["delta"]["content"] for c in token_chunks)
        == (full["message"]["content"])
    )
    assert all(c["choices"][0]["finish_reason"] is None for c in token_chunks)
    final = chunks[1 + n]["choices"][0]
    assert final["delta"] == {}
    assert final["finish_reason"] == full["finish_reason"]
    assert final["meta_info"]["output_ids"] == full["meta_info"]["output_ids"]
    usage = chunks[2 + n]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == n
    assert len(chunks) == n + 3


async def test_chat_tool_call(client: httpx.AsyncClient) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    messages = [{"role": "user", "content": [{"type": "text", "text": "What's the Weather?"}]}]
    body = {"messages": messages, "tools": tools, "max_tokens": 4}
    with trio.fail_after(10):
        out = (await client.post("/v1/chat/completions", json=body)).json()
        choice = out["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        assert call["id"].startswith("call_")
        assert call["type"] == "function"
        assert call["index"] == 0
        assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        assert choice["meta_info"]["completion_tokens"] == len(choice["meta_info"]["output_ids"])

        async with client.stream(
            "POST", "/v1/chat/completions", json={**body, "stream": True}
        ) as r:
            events = await sse_events(r)
        deltas = [e["choices"][0]["delta"] for e in events[:-1]]
        assert deltas[0] == {"role": "assistant"}
        assert deltas[1]["tool_calls"][0]["function"]["name"] == "get_weather"
        assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"

        plain = {**body, "messages": [{"role": "user", "content": "hello"}]}
        out = (await client.post("/v1/chat/completions", json=plain)).json()
        assert out["choices"][0]["message"]["content"] is not None


async def test_completions(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        body = {"model": "m", "prompt": "Once upon", "max_tokens": 5, "logprobs": 0}
        out = (await client.post("/v1/completions", json=body)).json()
        assert out["object"] == "text_completion"
        assert out["id"].startswith("cmpl-")
        choice = out["choices"][0]
        ids = choice["meta_info"]["output_ids"]
        assert choice["text"] == TOK.decode(ids)
        assert len(choice["logprobs"]["token_logprobs"]) == len(ids)
        assert out["usage"]["prompt_tokens"] == len(TOK.encode("Once upon"))
        by_ids = {**body, "prompt": TOK.encode("Once upon")}
        again = (await client.post("/v1/completions", json=by_ids)).json()
        assert again["choices"][0]["meta_info"]["output_ids"] == ids

        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/completions", json=stream) as r:
            events = await sse_events(r)
        assert events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["text"] for e in events[:-3]) == choice["text"]
        assert events[-3]["choices"][0]["finish_reason"] == choice["finish_reason"]
        assert events[-2]["usage"] == out["usage"]
        batch = {**body, "prompt": ["a", "b"]}
        assert (await client.post("/v1/completions", json=batch)).status_code == 400


async def test_info_endpoints(client: httpx.AsyncClient, worker: SimWorkerHandle) -> None:
    with trio.fail_after(10):
        models = (await client.get("/v1/models")).json()
        assert models["object"] == "list"
        assert models["data"][0]["id"] == "trio-router/sim"
        assert models["data"][0]["owned_by"] == "sglang"
        for path in ("/get_model_info", "/model_info"):
            info = (await client.get(path)).json()
            assert info["is_generation"] is True
            assert info["weight_version"] == "v0"
            assert info["model_path"] == "trio-router/sim"
        for path in ("/get_server_info", "/server_info"):
            info = (await client.get(path)).json()
            assert info["version"] == "sim"
            assert info["url"] == worker.url
        health = await client.get("/health")
        assert health.status_code == 200
        assert health.content == b""
        assert "server" in health.headers
        assert "date" in health.headers
        assert (await client.get("/health_generate")).status_code == 200
        assert (await client.post("/flush_cache")).status_code == 200
        missing = await client.get("/nope")
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "not_found_error"
        assert (await client.get("/generate")).status_code == 405
        stats = (await client.get("/sim/stats")).json()
        assert stats["requests"]["/v1/models"] == 1
        assert stats["requests"]["/nope"] == 1
        assert stats["active"] == 0


async def test_update_weights_bumps_version(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        r = await client.post("/update_weights_from_disk", json={"model_path": "/ckpt/1"})
        assert r.json() == {
            "success": True,
            "message": "Succeeded to update model weights.",
            "weight_version": "v1",
            "num_paused_requests": 0,
        }
        assert (await client.get("/get_weight_version")).json() == {"weight_version": "v1"}
        out = (await client.post("/generate", json={"text": "a"})).json()
        assert out["meta_info"]["weight_version"] == "v1"
        body = {"model_path": "/ckpt/2", "weight_version": "step-7"}
        await client.post("/update_weights_from_disk", json=body)
        chat = (await client.post("/v1/chat/completions", json=CHAT)).json()
        assert chat["choices"][0]["meta_info"]["weight_version"] == "step-7"
        assert (await client.get("/get_model_info")).json()["model_path"] == "/ckpt/2"
        assert (await client.post("/update_weights_from_disk", json={})).status_code == 400


# ---------------------------------------------------------------- abort, faults, lifecycle


async def test_abort_request_returns_partial_output(nursery: trio.Nursery) -> None:
    handle = await start(nursery, latency_per_token_ms=10)
    params = {"max_new_tokens": 1000, "ignore_eos": True}
    results: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=handle.url) as client:

        async def run(rid: str) -> None:
            body = {"text": "long", "rid": rid, "sampling_params": params, "return_logprob": True}
            results[rid] = (await client.post("/generate", json=body)).json()

        with trio.fail_after(10):
            async with trio.open_nursery() as inner:
                inner.start_soon(run, "slow-1")
                inner.start_soon(run, "slow-2")
                await wait_until(lambda: handle.app.stats.active == 2)
                await trio.sleep(0.05)
                r = await client.post("/abort_request", json={"rid": "slow-1"})
                assert r.status_code == 200
                await wait_until(lambda: "slow-1" in results)
                assert "slow-2" not in results
                await client.post("/abort_request", json={"abort_all": True})
            await settled(handle)
    for rid in ("slow-1", "slow-2"):
        meta = results[rid]["meta_info"]
        assert meta["finish_reason"]["type"] == "abort"
        assert "abort" in meta["finish_reason"]["message"]
        assert 1 <= meta["completion_tokens"] < 1000
        assert len(results[rid]["output_ids"]) == meta["completion_tokens"]
        assert len(meta["output_token_logprobs"]) == meta["completion_tokens"]
    assert handle.app.stats.completed == 2
    assert handle.app.stats.active == 0


async def test_hang_fault_and_abort_all(worker: SimWorkerHandle, client: httpx.AsyncClient) -> None:
    worker.app.faults.hang = True
    results: list[Any] = []

    async def run() -> None:
        results.append((await client.post("/generate", json={"text": "x", "stream": True})).text)

    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            inner.start_soon(run)
            await wait_until(lambda: worker.app.stats.active == 1)
            await trio.sleep(0.05)
            assert not results
            await client.post("/abort_request", json={"abort_all": True})
    events = [orjson.loads(x[6:]) for x in results[0].split("\n\n") if x.startswith("data: {")]
    assert len(events) == 1
    assert events[0]["meta_info"]["finish_reason"]["type"] == "abort"
    assert events[0]["output_ids"] == []
    assert results[0].endswith("data: [DONE]\n\n")


async def test_abort_after_tokens_fault(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        r = await client.post("/sim/faults", json={"abort_after_tokens": 3})
        assert r.json()["abort_after_tokens"] == 3
        body = {"text": "x", "sampling_params": {"ignore_eos": True}}
        out = (await client.post("/generate", json=body)).json()
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
        assert out["meta_info"]["completion_tokens"] == 3
        chat = (await client.post("/v1/chat/completions", json=CHAT)).json()
        assert chat["choices"][0]["finish_reason"] == "abort"


async def test_fail_status_and_health_faults(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        r = await client.post("/sim/faults", json={"fail_status": 503, "health_status": 500})
        assert r.status_code == 200
        for path in ("/generate", "/v1/chat/completions", "/v1/completions"):
            err = await client.post(path, json={"text": "x"})
            assert err.status_code == 503
            assert err.json()["error"]["code"] == 503
        assert (await client.get("/v1/models")).status_code == 503
        assert (await client.get("/health")).status_code == 500
        assert (await client.get("/get_model_info")).status_code == 200
        bad = await client.post("/sim/faults", json={"no_such_fault": 1})
        assert bad.status_code == 400
        assert (await client.post("/sim/faults", json={"hang": "yes"})).status_code == 400
        await client.post("/sim/faults", json={"reset": True, "health_delay_s": 0.05})
        with trio.move_on_after(0.02) as scope:
            await client.get("/health")
        assert scope.cancelled_caught
        assert (await client.get("/health")).status_code == 200
        assert (await client.post("/generate", json={"text": "x"})).status_code == 200


async def test_truncate_json_fault(worker: SimWorkerHandle, client: httpx.AsyncClient) -> None:
    worker.app.faults.truncate_json = True
    with trio.fail_after(10):
        r = await client.post("/generate", json={"text": "x"})
        assert r.status_code == 200
        assert int(r.headers["content-length"]) == len(r.content) > 0
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(r.content)


async def test_drop_after_events_fault(worker: SimWorkerHandle, client: httpx.AsyncClient) -> None:
    worker.app.faults.drop_after_events = 3
    body = {
        "text": "x",
        "stream": True,
        "sampling_params": {"max_new_tokens": 20, "ignore_eos": True},
    }
    lines: list[str] = []

    async def read() -> None:
        async with client.stream("POST", "/generate", json=body) as r:
            async for line in r.aiter_lines():
                if line:
                    lines.append(line)

    with trio.fail_after(10), pytest.raises(httpx.RemoteProtocolError):
        await read()
    assert len(lines) == 3
    assert "data: [DONE]" not in lines


async def test_client_disconnect_cancels_generation(nursery: trio.Nursery) -> None:
    handle = await start(nursery, latency_per_token_ms=10)
    body = orjson.dumps(
        {
            "text": "x",
            "stream": True,
            "sampling_params": {"max_new_tokens": 500, "ignore_eos": True},
        }
    )
    request = (
        b"POST /generate HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    with trio.fail_after(10):
        host, port = handle.url.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(request)
            received = b""
            while b"data: {" not in received:
                received += await stream.receive_some()
            assert received.startswith(b"HTTP/1.1 200")
            assert handle.app.stats.active == 1
        await settled(handle)
    assert handle.app.stats.cancelled == 1
    assert handle.app.stats.completed == 0


async def test_time_goes_through_trio(autojump_clock: trio.testing.MockClock) -> None:
    app = SimWorker(SimWorkerConfig(latency_per_token_ms=1000), faults=Faults(health_delay_s=30))
    with trio.fail_after(100):
        t0 = trio.current_time()
        body = {"text": "x", "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}}
        status, raw = await call_app(app, "POST", "/generate", orjson.dumps(body))
        assert status == 200
        assert trio.current_time() - t0 == pytest.approx(5.0)
        assert orjson.loads(raw)["meta_info"]["e2e_latency"] == pytest.approx(5.0)
        t0 = trio.current_time()
        assert await call_app(app, "GET", "/health") == (200, b"")
        assert trio.current_time() - t0 == pytest.approx(30.0)


async def test_kill_refuses_connections() -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
            handle = await start(nursery, latency_per_token_ms=50)
            assert (await client.get(handle.url + "/health")).status_code == 200

            async def slow() -> None:
                with pytest.raises(httpx.TransportError):
                    await client.post(handle.url + "/generate", json={"text": "x"})

            nursery.start_soon(slow)
            await wait_until(lambda: handle.app.stats.active == 1)
            handle.kill()
            with pytest.raises(httpx.ConnectError):
                await client.get(handle.url + "/health")
        # serve_sim_worker returned (the nursery closed) and the open request was dropped.
        assert handle.app.stats.active == 0
        assert handle.app.stats.cancelled == 1
