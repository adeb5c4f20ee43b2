"""The simulated SGLang worker: tokenizer, fake decoding, wire format, faults, lifecycle."""

from __future__ import annotations

import base64
import sys
from array import array
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
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


def generated(handle: SimWorkerHandle) -> int:
    """Tokens generated so far by the worker's generations in flight."""
    return sum(len(job.dec.output_ids) for job in handle.app.jobs.values())


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

        # SGLang trims the matched stop token from the text, special or not, unless told
        params: dict[str, Any] = {"skip_special_tokens": False}
        raw = await client.post("/generate", json={"text": prompt, "sampling_params": params})
        assert raw.json()["text"] == out["text"]
        params["no_stop_trim"] = True
        kept = await client.post("/generate", json={"text": prompt, "sampling_params": params})
        assert kept.json()["text"] == out["text"] + "<|im_end|>"
        word = out["output_ids"][0]  # a plain token as a stop token is trimmed too
        params = {"stop_token_ids": [word], "ignore_eos": True}
        cut = await client.post("/generate", json={"text": prompt, "sampling_params": params})
        assert cut.json()["output_ids"] == [word]
        assert cut.json()["text"] == ""
        assert cut.json()["meta_info"]["finish_reason"] == {"type": "stop", "matched": word}


async def test_generate_refusals_have_sglang_s_three_shapes(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        unknown = await client.post(
            "/generate", json={"text": "a", "sampling_params": {"bogus": 1}}
        )
        assert unknown.status_code == 400
        assert unknown.json()["error"].startswith(
            "unknown field `bogus`, expected one of `max_new_tokens`, `stop`, `stop_token_ids`"
        )
        schema = [  # SGLang's JSON contract: {"error": "<serde message>"}
            ({"text": "a", "sampling_params": {"max_new_tokens": "x"}}, 'string "x", expected i64'),
            ({"text": "a", "stream": "yes"}, 'invalid type: string "yes", expected a boolean'),
            ({"text": "a", "sampling_params": {"stop": 3}}, "values for StringOrList"),
            ({"text": "a", "return_logprob": 1}, "integer `1`, expected a value or an array"),
            ({"text": "a", "stream": True, "sampling_params": {"n": "2"}}, "expected i64"),
        ]
        for body, message in schema:
            r = await client.post("/generate", json=body)
            assert r.status_code == 400, body
            assert message in r.json()["error"], body
        pydantic: list[Any] = [
            [1, 2],
            {"text": 5},
            {"input_ids": ["a"]},
            {"text": "a", "sampling_params": 3},
        ]
        for body in pydantic:  # FastAPI's validation document
            r = await client.post("/generate", json=body)
            assert r.status_code == 400, body
            assert r.json().keys() == {"object", "message", "type", "param", "code"}
            assert (r.json()["type"], r.json()["code"]) == ("Bad Request", 400)
        for raw in (b"{nope", b""):
            r = await client.post(
                "/generate", content=raw, headers={"content-type": "application/json"}
            )
            assert (r.status_code, r.json()["type"]) == (400, "Bad Request")
        refused = [  # the tokenizer manager's ValueError: {"error": {"message": ...}}
            ({}, "Either text, input_ids or input_embeds should be provided."),
            (
                {"text": "a", "sampling_params": {"max_new_tokens": -1}},
                "max_new_tokens must be at least 0, got -1.",
            ),
            (
                {"text": "a", "sampling_params": {"temperature": -1}},
                "temperature must be a non-negative finite number, got -1.",
            ),
            ({"input_ids": []}, "input_ids cannot be empty."),
            (
                {"input_ids": [TOK.vocab_size]},
                f"token id {TOK.vocab_size} is outside the vocabulary [0, {TOK.vocab_size})",
            ),
            ({"text": ["a", "b"]}, "batch requests are not supported by the simulator"),
            ({"input_ids": [[1], [2]]}, "batch requests are not supported by the simulator"),
            (
                {"text": "abc", "return_logprob": True, "logprob_start_len": 4},
                "req.logprob_start_len=4 is higher than the number of input tokens "
                "len(req.origin_input_ids)=3. Please use a smaller logprob_start_len.",
            ),
        ]
        for body, message in refused:
            r = await client.post("/generate", json=body)
            assert r.status_code == 400, body
            assert r.json() == {"error": {"message": message}}
            # once a stream has begun SGLang reports it as an event, then [DONE]
            async with client.stream("POST", "/generate", json={**body, "stream": True}) as s:
                assert s.status_code == 200
                assert s.headers["content-type"] == "text/event-stream; charset=utf-8"
                events = await sse_events(s)
            error = {
                "message": message,
                "type": "invalid_request_error",
                "code": 400,
                "retryable": False,
            }
            assert events == [{"error": error}, "[DONE]"]
        both = {"text": "abc", "input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}}
        out = (await client.post("/generate", json=both)).json()
        assert out["meta_info"]["prompt_tokens"] == 2  # input_ids win, as in SGLang
        top_unknown = {"text": "a", "bogus": 1, "sampling_params": {"max_new_tokens": 1}}
        assert (await client.post("/generate", json=top_unknown)).status_code == 200


async def test_a_prompt_must_fit_the_context(nursery: trio.Nursery) -> None:
    handle = await start(nursery, context_length=32)
    async with httpx.AsyncClient(base_url=handle.url) as client:
        with trio.fail_after(10):
            long = await client.post("/generate", json={"input_ids": [65] * 32})
            total = await client.post(
                "/generate", json={"input_ids": [65] * 31, "sampling_params": {"max_new_tokens": 2}}
            )
            fits = await client.post(
                "/generate", json={"input_ids": [65] * 31, "sampling_params": {"max_new_tokens": 1}}
            )
            chat = await client.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 40}]}
            )
    assert long.status_code == 400
    too_long = "The input (32 tokens) is longer than the model's context length (32 tokens)."
    assert long.json() == {"error": {"message": too_long}}
    assert total.status_code == 400
    assert total.json()["error"]["message"].startswith(
        "Requested token count exceeds the model's maximum context length of 32 tokens. "
        "You requested a total of 33 tokens: 31 tokens from the input messages and 2 tokens"
    )
    assert fits.status_code == 200
    assert chat.status_code == 400
    assert chat.json()["type"] == "BadRequestError"
    assert "is longer than the model's context length (32 tokens)" in chat.json()["message"]


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


async def test_routed_experts_have_a_row_per_token_but_the_last(client: httpx.AsyncClient) -> None:
    # SGLang: rows for positions [routed_experts_start_len, len(prompt + output) - 1)
    with trio.fail_after(10):
        body: dict[str, Any] = {"text": "moe", "return_routed_experts": True}
        out = (await client.post("/generate", json=body)).json()
        tail = {**body, "routed_experts_start_len": 2}
        later = (await client.post("/generate", json=tail)).json()
        plain = (await client.post("/generate", json={"text": "moe"})).json()
    meta = out["meta_info"]
    tokens = TOK.encode("moe") + out["output_ids"]
    raw = base64.b64decode(meta["routed_experts"])
    assert len(raw) == (len(tokens) - 1) * 4 * 2 * 4
    assert raw == routed_experts(tokens[:-1])
    # slime decodes it as reshape(len(tokens) - 1, layers, top_k)
    rows = np.frombuffer(raw, dtype="<i4").reshape(len(tokens) - 1, 4, 2)
    assert rows.shape[0] == len(tokens) - 1
    assert base64.b64decode(later["meta_info"]["routed_experts"]) == raw[2 * 4 * 2 * 4 :]
    assert list(meta).index("routed_experts") == list(meta).index("dp_rank") - 1
    assert "routed_experts" not in plain["meta_info"]


META_KEYS = ["id", "finish_reason", "prompt_tokens", "weight_version", "num_retractions"]
META_TAIL = ["reasoning_tokens", "completion_tokens", "cached_tokens", "weight_versions"]
META_END = ["cached_tokens_details", "dp_rank", "e2e_latency", "response_sent_to_client_ts"]
LOGPROB_KEYS = ["input_token_logprobs", "output_token_logprobs", "output_token_logprobs_length"]


async def test_meta_info_has_sglang_s_keys_in_its_order(client: httpx.AsyncClient) -> None:
    prompt = "keys and order"
    params = {"max_new_tokens": 4, "ignore_eos": True}
    with trio.fail_after(10):
        plain = (
            await client.post("/generate", json={"text": prompt, "sampling_params": params})
        ).json()
        lp = {"text": prompt, "sampling_params": params, "return_logprob": True}
        with_lp = (await client.post("/generate", json=lp)).json()
        top = {**lp, "top_logprobs_num": 2, "logprob_start_len": 3, "return_text_in_logprobs": True}
        with_top = (await client.post("/generate", json=top)).json()
    meta = plain["meta_info"]
    assert list(meta) == META_KEYS + META_TAIL + META_END
    assert (meta["num_retractions"], meta["reasoning_tokens"], meta["dp_rank"]) == (0, 0, None)
    assert meta["weight_versions"] == [{"version": "v0", "start": 0, "end": 4}]
    assert meta["cached_tokens"] == 0
    assert meta["cached_tokens_details"] is None
    assert list(with_lp["meta_info"]) == META_KEYS + LOGPROB_KEYS + META_TAIL + META_END
    assert with_lp["meta_info"]["input_token_logprobs"] == []  # logprob_start_len -1
    assert with_lp["meta_info"]["output_token_logprobs_length"] == 4
    meta = with_top["meta_info"]
    tops = ["input_top_logprobs", "output_top_logprobs"]
    assert list(meta) == META_KEYS + LOGPROB_KEYS + tops + META_TAIL + META_END
    ids = TOK.encode(prompt)
    entries = meta["input_token_logprobs"]
    assert [e[1] for e in entries] == ids[3:]
    assert entries[0][0] is None
    assert all(-5 < e[0] < 0 for e in entries[1:])
    assert [e[2] for e in entries] == [TOK.decode([i]) for i in ids[3:]]
    assert meta["input_top_logprobs"][0] is None
    assert all(len(t) == 2 for t in meta["input_top_logprobs"][1:] + meta["output_top_logprobs"])
    for entry, alternatives in zip(
        meta["output_token_logprobs"], meta["output_top_logprobs"], strict=True
    ):
        assert alternatives[0] == entry  # the sampled token is the most likely one
        assert alternatives[1][0] < entry[0]
    # the prefix cache now holds the prompt, but SGLang recomputes what it reports logprobs for
    assert meta["cached_tokens"] <= 3


async def test_weight_versions_span_an_update_during_generation(nursery: trio.Nursery) -> None:
    handle = await start(nursery, latency_per_token_ms=5)
    body = {"text": "spans", "sampling_params": {"max_new_tokens": 40, "ignore_eos": True}}
    result: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=handle.url) as client:

        async def run() -> None:
            result.update((await client.post("/generate", json=body)).json())

        with trio.fail_after(10):
            async with trio.open_nursery() as inner:
                inner.start_soon(run)
                await wait_until(lambda: generated(handle) >= 5)
                update = {"model_path": "trio-router/sim", "weight_version": "v1"}
                updated = await client.post("/update_weights_from_disk", json=update)
    assert updated.status_code == 200
    meta = result["meta_info"]
    (old, new) = meta["weight_versions"]
    assert (old["version"], old["start"], new["version"], new["end"]) == ("v0", 0, "v1", 40)
    assert old["end"] == new["start"] >= 5
    assert meta["weight_version"] == "v1"


async def test_generate_stream_is_cumulative_and_incremental(nursery: trio.Nursery) -> None:
    handle = await start(nursery, latency_per_token_ms=5)
    body = {"text": "stream", "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}}
    async with httpx.AsyncClient(base_url=handle.url) as client:
        with trio.fail_after(10):
            expected = (await client.post("/generate", json=body)).json()
            events: list[Any] = []
            stream_body = {**body, "stream": True, "return_logprob": True}
            async with client.stream("POST", "/generate", json=stream_body) as r:
                assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
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
    # as in SGLang: the first event says when it was sent, the last one carries the spans
    first, middle, last = (ev["meta_info"] for ev in (data[0], data[3], data[-1]))
    assert "response_sent_to_client_ts" in first
    assert "response_sent_to_client_ts" not in middle
    assert "weight_versions" not in middle
    assert "e2e_latency" not in middle
    assert last["weight_versions"] == [{"version": "v0", "start": 0, "end": 8}]
    assert "e2e_latency" in last
    assert handle.app.stats.completed == 2


# ---------------------------------------------------------------- OpenAI endpoints

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}


USAGE_KEYS = [
    "prompt_tokens",
    "total_tokens",
    "completion_tokens",
    "prompt_tokens_details",
    "reasoning_tokens",
    "completion_tokens_details",
]


async def test_chat_completion(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        body = {**CHAT, "logprobs": True, "top_logprobs": 1, "return_meta_info": True}
        out = (await client.post("/v1/chat/completions", json=body)).json()
        assert list(out) == ["id", "object", "created", "model", "choices", "usage", "metadata"]
        assert out["object"] == "chat.completion"
        assert isinstance(out["created"], int)
        assert out["model"] == "m"
        (choice,) = out["choices"]
        meta = choice["meta_info"]
        assert out["id"] == meta["id"]  # SGLang's request id
        ids = [entry[1] for entry in meta["output_token_logprobs"]]
        text = TOK.decode(ids)
        message = {"role": "assistant", "content": text, "reasoning_content": None}
        assert choice["message"] == message
        assert choice["finish_reason"] in ("stop", "length")
        assert meta["completion_tokens"] == len(ids)
        assert meta["weight_version"] == "v0"
        assert out["metadata"] == {
            "weight_version": "v0",
            "weight_versions": [{"version": "v0", "start": 0, "end": len(ids)}],
        }
        content = choice["logprobs"]["content"]
        pieces = [TOK.decode([i], skip_special_tokens=False) for i in ids]
        assert [c["token"] for c in content] == pieces
        assert all(c["bytes"] == list(c["token"].encode()) for c in content)
        assert all([t["token"] for t in c["top_logprobs"]] == [c["token"]] for c in content)
        prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        p = len(TOK.encode(prompt))
        assert list(out["usage"]) == USAGE_KEYS
        assert out["usage"]["prompt_tokens"] == p
        assert out["usage"]["total_tokens"] == p + len(ids)
        # SGLang's input_ids extension: the same prompt gives the same tokens.
        by_ids = {**body, "input_ids": TOK.encode(prompt)}
        r2 = (await client.post("/v1/chat/completions", json=by_ids)).json()
        assert (
            r2["choices"][0]["meta_info"]["output_token_logprobs"] == meta["output_token_logprobs"]
        )
        # like SGLang, meta_info only when asked for, and never in a stream
        bare = (await client.post("/v1/chat/completions", json=CHAT)).json()
        assert "meta_info" not in bare["choices"][0]
        assert bare["choices"][0]["logprobs"] is None
        streamed_meta = {**CHAT, "stream": True, "return_meta_info": True}
        refused = await client.post("/v1/chat/completions", json=streamed_meta)
        assert refused.status_code == 400
        assert refused.json()["message"].startswith(
            "return_meta_info is not supported with streaming"
        )
        n2 = await client.post("/v1/chat/completions", json={**CHAT, "n": 2})
        assert (n2.status_code, n2.json()["type"]) == (400, "BadRequestError")
        empty = await client.post("/v1/chat/completions", json={"messages": []})
        assert empty.json() == {
            "object": "error",
            "message": "Messages cannot be empty.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
        missing = await client.post("/v1/chat/completions", json={"max_tokens": 1})
        assert (missing.status_code, missing.json()["type"]) == (400, "Bad Request")
        negative = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": -1})
        assert negative.json()["message"] == "max_new_tokens must be at least 0, got -1."
        default = (
            await client.post("/v1/chat/completions", json={"messages": CHAT["messages"]})
        ).json()
        assert default["model"] == "default"


async def test_chat_stream(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        full = (await client.post("/v1/chat/completions", json=CHAT)).json()["choices"][0]
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
            events = await sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    first = chunks[0]["choices"][0]
    assert first["delta"] == {"reasoning_content": None, "role": "assistant", "content": ""}
    assert list(first) == ["index", "delta", "logprobs", "finish_reason", "matched_stop"]
    token_chunks = chunks[1:-2]
    text = "".join(c["choices"][0]["delta"]["content"] for c in token_chunks)
    assert text == full["message"]["content"]
    assert all(c["choices"][0]["finish_reason"] is None for c in token_chunks)
    final = chunks[-2]["choices"][0]
    assert final["delta"] == {"reasoning_content": None}
    assert final["finish_reason"] == full["finish_reason"]
    assert "meta_info" not in final
    usage = chunks[-1]
    assert usage["choices"] == []
    assert usage["usage"] == full_usage(full, len(token_chunks))


def full_usage(choice: dict[str, Any], completion: int) -> dict[str, Any]:
    prompt = len(TOK.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"))
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None,
        "reasoning_tokens": 0,
        "completion_tokens_details": None,
    }


async def test_chat_tool_call(client: httpx.AsyncClient) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    messages = [{"role": "user", "content": [{"type": "text", "text": "What's the Weather?"}]}]
    body = {"messages": messages, "tools": tools, "max_tokens": 4, "return_meta_info": True}
    with trio.fail_after(10):
        out = (await client.post("/v1/chat/completions", json=body)).json()
        choice = out["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == ""  # SGLang: never null
        (call,) = choice["message"]["tool_calls"]
        assert call["id"].startswith("call_")
        assert call["type"] == "function"
        assert call["index"] == 0
        assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        assert choice["meta_info"]["completion_tokens"] >= 1

        streamed = {**body, "stream": True, "return_meta_info": False}
        async with client.stream("POST", "/v1/chat/completions", json=streamed) as r:
            events = await sse_events(r)
        deltas = [e["choices"][0]["delta"] for e in events[:-1]]
        assert deltas[0]["role"] == "assistant"
        assert deltas[1]["tool_calls"][0]["function"]["name"] == "get_weather"
        assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"

        plain = {**body, "messages": [{"role": "user", "content": "hello"}]}
        out = (await client.post("/v1/chat/completions", json=plain)).json()
        assert "tool_calls" not in out["choices"][0]["message"]


async def test_completions(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        body = {"model": "m", "prompt": "Once upon", "max_tokens": 5, "logprobs": 1}
        out = (await client.post("/v1/completions", json=body)).json()
        assert out["object"] == "text_completion"
        assert list(out) == ["id", "object", "created", "model", "choices", "usage", "metadata"]
        choice = out["choices"][0]
        assert list(choice) == ["index", "text", "logprobs", "finish_reason", "matched_stop"]
        logprobs = choice["logprobs"]
        assert list(logprobs) == ["text_offset", "token_logprobs", "tokens", "top_logprobs"]
        assert "".join(logprobs["tokens"]) == choice["text"] or choice["finish_reason"] == "stop"
        n = out["usage"]["completion_tokens"]
        assert logprobs["text_offset"] == [-1] * n
        assert [list(t) for t in logprobs["top_logprobs"]] == [[t] for t in logprobs["tokens"]]
        assert out["usage"]["prompt_tokens"] == len(TOK.encode("Once upon"))
        by_ids = {**body, "prompt": TOK.encode("Once upon")}
        again = (await client.post("/v1/completions", json=by_ids)).json()
        assert again["choices"][0]["text"] == choice["text"]

        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/completions", json=stream) as r:
            events = await sse_events(r)
        assert events[-1] == "[DONE]"
        pieces = events[:-2]
        assert "".join(e["choices"][0]["text"] for e in pieces) == choice["text"]
        assert all(e["usage"] is None for e in pieces)
        # the last piece carries the finish reason, as SGLang sends it
        assert [e["choices"][0]["finish_reason"] for e in pieces][-1] == choice["finish_reason"]
        # streamed, SGLang leaves the null details out of the usage
        assert events[-2]["usage"] == {k: v for k, v in out["usage"].items() if v is not None}
        batch = {**body, "prompt": ["a", "b"]}
        assert (await client.post("/v1/completions", json=batch)).status_code == 400


MODEL_INFO_KEYS = [
    "model_path",
    "served_model_name",
    "tokenizer_path",
    "is_generation",
    "preferred_sampling_params",
    "weight_version",
    "load_format",
    "reasoning_parser",
    "tool_call_parser",
    "disaggregation_mode",
    "has_image_understanding",
    "has_audio_understanding",
    "model_type",
    "architectures",
    "embedding",
]


async def test_info_endpoints(client: httpx.AsyncClient, worker: SimWorkerHandle) -> None:
    with trio.fail_after(10):
        models = (await client.get("/v1/models")).json()
        assert models["object"] == "list"
        (model,) = models["data"]
        assert list(model) == [
            "id",
            "object",
            "created",
            "owned_by",
            "root",
            "parent",
            "max_model_len",
        ]
        assert (model["id"], model["owned_by"], model["max_model_len"]) == (
            "trio-router/sim",
            "sglang",
            8192,
        )
        for path in ("/get_model_info", "/model_info"):
            info = (await client.get(path)).json()
            assert list(info) == MODEL_INFO_KEYS
            assert info["is_generation"] is True
            assert info["weight_version"] == "v0"
            assert info["model_path"] == info["served_model_name"] == "trio-router/sim"
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
        flushed = await client.post("/flush_cache")
        assert flushed.status_code == 200
        assert flushed.text.startswith("Cache flushed.\nPlease check backend logs")
        assert "content-type" not in flushed.headers
        for path in ("/nope", "/get_weight_version", "/get_load"):  # SGLang 0.5.23 serves neither
            missing = await client.get(path)
            assert missing.status_code == 404
            assert missing.json() == {"detail": "Not Found"}
        wrong = await client.get("/generate")
        assert wrong.status_code == 405
        assert wrong.json() == {"detail": "Method Not Allowed"}
        assert wrong.headers["allow"] == "POST, PUT"
        stats = (await client.get("/sim/stats")).json()
        assert stats["requests"]["/v1/models"] == 1
        assert stats["requests"]["/nope"] == 1
        assert stats["active"] == 0


async def test_update_weights_keeps_the_version_unless_given(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    def version() -> Any:
        return client.get("/model_info")

    with trio.fail_after(10):
        same = await client.post(
            "/update_weights_from_disk", json={"model_path": "trio-router/sim"}
        )
        assert same.json() == {
            "success": True,
            "message": "Succeeded to update model weights.",
            "num_paused_requests": 0,
        }
        assert (await version()).json()["weight_version"] == "v0"
        (tmp_path / "model.safetensors").write_bytes(b"")  # where SGLang looks for weights
        body = {"model_path": str(tmp_path), "weight_version": "step-7"}
        moved = await client.post("/update_weights_from_disk", json=body)
        assert moved.json()["message"] == (
            "Succeeded to update model weights. Weight version updated to step-7."
        )
        info = (await version()).json()
        assert (info["weight_version"], info["model_path"]) == ("step-7", str(tmp_path))
        out = (await client.post("/generate", json={"text": "a"})).json()
        assert out["meta_info"]["weight_version"] == "step-7"
        chat = (await client.post("/v1/chat/completions", json=CHAT)).json()
        assert chat["metadata"]["weight_version"] == "step-7"
        (tmp_path / "empty").mkdir()
        for missing in (tmp_path / "missing", tmp_path / "empty"):
            bad = {"model_path": str(missing), "weight_version": "v9"}
            failed = await client.post("/update_weights_from_disk", json=bad)
            assert failed.status_code == 400
            assert failed.json() == {
                "success": False,
                "message": "Failed to get weights iterator: Cannot find any model weights with "
                f"`{missing}`.",
                "num_paused_requests": 0,
            }
        assert (await version()).json()["weight_version"] == "step-7"
        for wrong in ({}, {"model_path": "trio-router/sim", "weight_version": 5}):
            refused = await client.post("/update_weights_from_disk", json=wrong)
            assert (refused.status_code, refused.json()["type"]) == (400, "Bad Request")


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
        assert meta["finish_reason"] == {
            "type": "abort",
            "message": "Aborted",
            "status_code": None,
            "err_type": None,
        }
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


async def test_health_is_slow_and_503_while_starting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # SGLang's /health runs a one-token generation and waits at least 1 s; 503 while starting
    app = SimWorker(SimWorkerConfig(health_seconds=1.0, startup_seconds=30.0))
    with trio.fail_after(100):
        for path in ("/health", "/health_generate"):
            t0 = trio.current_time()
            assert await call_app(app, "GET", path) == (503, b"")
            assert trio.current_time() == t0
        await trio.sleep(30)
        for path in ("/health", "/health_generate"):
            t0 = trio.current_time()
            assert await call_app(app, "GET", path) == (200, b"")
            assert trio.current_time() - t0 == pytest.approx(1.0)


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
