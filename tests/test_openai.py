"""The OpenAI API, driven by the official openai client, checked token-exact."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import orjson
import pytest
import trio

from .conftest import start_router, start_scripted, start_worker
from .scripted import Script

MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is 2+2?"},
]


async def openai_router(nursery, qwen3, **overrides: Any):  # type: ignore[no-untyped-def]
    worker = await start_worker(nursery, tokenizer=qwen3)
    running = await start_router(
        nursery,
        tokenizer=qwen3,
        worker_urls=(worker.url,),
        radix_tree_max_size=1_000_000,
        **overrides,
    )
    return worker, running


async def retrieve(url: str, text: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        r = await client.post(url + "/retrieve_from_text", json={"text": text})
    assert r.status_code == 200
    result: dict[str, Any] = r.json()
    return result


def render(qwen3, messages):  # type: ignore[no-untyped-def]
    return qwen3.apply_chat_template(messages, add_generation_prompt=True)


async def test_sync_client_chat_is_token_exact(nursery, qwen3):
    _worker, running = await openai_router(nursery, qwen3)

    def call() -> Any:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        return client.chat.completions.create(
            model="default", messages=MESSAGES, max_tokens=16, logprobs=True
        )

    with trio.fail_after(30):
        completion = await trio.to_thread.run_sync(call)
        choice = completion.choices[0]
        got = await retrieve(running.url, render(qwen3, MESSAGES) + choice.message.content)
    prompt_ids = qwen3.encode(render(qwen3, MESSAGES))
    output_ids = choice.meta_info["output_ids"]  # type: ignore[attr-defined]
    assert got["tokens"] == prompt_ids + output_ids
    assert completion.usage.prompt_tokens == len(prompt_ids)
    assert completion.usage.completion_tokens == len(output_ids)
    assert choice.finish_reason in ("stop", "length")
    logprobs = [entry.logprob for entry in choice.logprobs.content]
    assert got["rollout_logp"][len(prompt_ids) :] == pytest.approx(logprobs, abs=1e-6)


async def test_async_client_streams_chunks_that_add_up_to_the_recorded_answer(nursery, qwen3):
    worker, running = await openai_router(nursery, qwen3)
    client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
    with trio.fail_after(30):
        stream = await client.chat.completions.create(
            model="default",
            messages=MESSAGES,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        plain = await client.chat.completions.create(
            model="default", messages=MESSAGES, max_tokens=16
        )
        got = await retrieve(running.url, render(qwen3, MESSAGES) + text)
        await client.close()
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length")
    assert text == plain.choices[0].message.content  # deterministic worker: same content
    prompt_ids = qwen3.encode(render(qwen3, MESSAGES))
    generated = plain.choices[0].meta_info["output_ids"]  # type: ignore[attr-defined]
    assert chunks[-1].usage.completion_tokens == len(generated)
    assert got["tokens"] == prompt_ids + generated  # the streamed answer was recorded exactly
    assert got["cached_tokens"] == len(got["tokens"])
    assert worker.app.stats.requests["/generate"] == 2


async def test_a_second_turn_reuses_the_cached_first_turn(nursery, qwen3):
    _worker, running = await openai_router(nursery, qwen3)
    client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
    with trio.fail_after(30):
        first = await client.chat.completions.create(model="default", messages=MESSAGES)
        turn2 = [
            *MESSAGES,
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "And 3+3?"},
        ]
        second = await client.chat.completions.create(model="default", messages=turn2)
        got = await retrieve(running.url, render(qwen3, turn2) + second.choices[0].message.content)
        await client.close()
    cache = running.router.token_cache
    assert cache is not None
    first_ids = first.choices[0].meta_info["output_ids"]  # type: ignore[attr-defined]
    prompt1 = qwen3.encode(render(qwen3, MESSAGES))
    assert got["tokens"][: len(prompt1) + len(first_ids)] == prompt1 + first_ids
    assert cache.counters.cached_prompt_tokens >= len(prompt1) + len(first_ids)


async def test_standard_parameters_map_to_sglang_and_extensions_pass_through(nursery, qwen3):
    upstream, url = await start_scripted(nursery)
    answer = {
        "text": " four",
        "output_ids": [3040],
        "meta_info": {
            "finish_reason": {"type": "stop", "matched": "."},
            "output_token_logprobs": [[-0.5, 3040, None]],
            "weight_version": "v3",
        },
    }
    upstream.script = Script(chunks=[orjson.dumps(answer)])
    running = await start_router(
        nursery, tokenizer=qwen3, worker_urls=(url,), radix_tree_max_size=100_000
    )
    client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
    with trio.fail_after(30):
        completion = await client.chat.completions.create(
            model="default",
            messages=MESSAGES,
            max_completion_tokens=7,
            temperature=0.5,
            top_p=0.9,
            stop=".",
            seed=11,
            presence_penalty=0.1,
            frequency_penalty=0.2,
            extra_body={"top_k": 5, "return_routed_experts": True, "lora_path": "a"},
        )
        await client.close()
    sent = orjson.loads(upstream.seen[-1].body)
    assert sent["input_ids"] == qwen3.encode(render(qwen3, MESSAGES))
    assert sent["sampling_params"] == {
        "max_new_tokens": 7,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["."],
        "sampling_seed": 11,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "top_k": 5,
    }
    assert sent["return_routed_experts"] is True
    assert sent["lora_path"] == "a"
    assert completion.choices[0].message.content == " four"
    assert completion.choices[0].finish_reason == "stop"


async def test_n_samples_fan_out_and_are_each_recorded(nursery, qwen3):
    worker, running = await openai_router(nursery, qwen3)
    client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
    with trio.fail_after(30):
        completion = await client.chat.completions.create(
            model="default", messages=MESSAGES, n=4, max_tokens=8, seed=1
        )
        results = [
            await retrieve(running.url, render(qwen3, MESSAGES) + c.message.content)
            for c in completion.choices
        ]
        await client.close()
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert worker.app.stats.requests["/generate"] == 4
    for choice, got in zip(completion.choices, results, strict=True):
        ids = choice.meta_info["output_ids"]  # type: ignore[attr-defined]
        assert got["tokens"][-len(ids) :] == ids


async def test_tool_calls_come_from_the_worker_chat_endpoint(nursery, qwen3):
    worker, running = await openai_router(nursery, qwen3)
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    ]
    client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    with trio.fail_after(30):
        completion = await client.chat.completions.create(
            model="default", messages=messages, tools=tools
        )
        await client.close()
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert completion.choices[0].finish_reason == "tool_calls"
    assert worker.app.stats.requests["/v1/chat/completions"] == 1
    assert running.router.token_cache.counters.recorded == 1  # type: ignore[union-attr]


async def test_completions_with_text_or_ids_and_streaming(nursery, qwen3):
    _worker, running = await openai_router(nursery, qwen3)
    client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
    ids = qwen3.encode("Once upon a time")
    with trio.fail_after(30):
        by_text = await client.completions.create(
            model="default", prompt="Once upon a time", max_tokens=6
        )
        by_ids = await client.completions.create(model="default", prompt=ids, max_tokens=6)
        stream = await client.completions.create(
            model="default",
            prompt="Once upon a time",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces = [c async for c in stream]
        streamed = "".join(c.choices[0].text for c in pieces)
        models = await client.models.list()
        await client.close()
    assert by_text.choices[0].text == by_ids.choices[0].text == streamed
    assert by_text.usage.prompt_tokens == len(ids)
    assert len({c.id for c in pieces}) == 1
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")
    assert pieces[-1].usage is not None
    assert pieces[-1].usage.model_dump() == by_text.usage.model_dump()
    assert [m.id for m in models.data] == ["default"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "'messages' must be a non-empty list"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": "hi"}, "'messages' must be a non-empty list"),
        ({"messages": [{"content": "hi"}]}, "messages[0] has no 'role'"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "is not one of"),
        ({"messages": [{"role": "user", "content": 5}]}, "must be a string, a list or null"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "'temperature'"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "'max_tokens'"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2, "stream": True}, "'n'"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": [1]}, "'stop'"),
    ],
)
async def test_bad_chat_requests_get_openai_style_400s(nursery, qwen3, body, message):
    worker, running = await openai_router(nursery, qwen3)
    async with httpx.AsyncClient() as client:
        with trio.fail_after(10):
            r = await client.post(running.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert message in error["message"]
    assert worker.app.stats.requests.get("/generate", 0) == 0


async def test_malformed_json_is_400(nursery, qwen3):
    _worker, running = await openai_router(nursery, qwen3)
    async with httpx.AsyncClient() as client:
        r = await client.post(running.url + "/v1/chat/completions", content=b"{nope")
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]["message"]


async def test_worker_failures_map_to_5xx_with_clear_messages(nursery, qwen3):
    worker, running = await openai_router(nursery, qwen3)
    worker.app.faults.fail_status = 500
    client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
    with trio.fail_after(30):
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="default", messages=MESSAGES)
        await client.close()
    assert caught.value.status_code == 502
    assert "worker failed with 500" in str(caught.value)


async def test_no_worker_is_503(nursery, qwen3):
    running = await start_router(nursery, tokenizer=qwen3, radix_tree_max_size=1000)
    client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
    with trio.fail_after(30):
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="default", messages=MESSAGES)
        await client.close()
    assert caught.value.status_code == 503


async def test_tool_calls_can_be_streamed(nursery, qwen3):
    worker, running = await openai_router(nursery, qwen3)
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    ]
    client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    with trio.fail_after(30):
        stream = await client.chat.completions.create(
            model="default", messages=messages, tools=tools, stream=True
        )
        chunks = [c async for c in stream]
        await client.close()
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert worker.app.stats.requests["/v1/chat/completions"] == 1
    assert worker.app.stats.requests.get("/generate", 0) == 0


async def test_one_failing_sample_of_n_gives_the_worker_error_not_a_500(nursery, qwen3):
    worker, running = await openai_router(nursery, qwen3)
    worker.app.faults.fail_status = 503
    client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
    with trio.fail_after(30):
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="default", messages=MESSAGES, n=3)
        await client.close()
    assert caught.value.status_code == 502


def recorded(running) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    cache = running.router.token_cache
    return cache.trie.statistics().tokens, cache.counters.recorded


async def test_n_samples_are_recorded_only_when_all_of_them_succeed(nursery, qwen3):
    # found by the fuzzer: a 400 for one sample left the others' trajectories recorded
    good = await start_worker(nursery, tokenizer=qwen3)
    bad = await start_worker(nursery, tokenizer=qwen3)
    bad.app.faults.fail_status = 400  # the client's fault: passed on, no retry, no quarantine
    running = await start_router(
        nursery,
        tokenizer=qwen3,
        worker_urls=(good.url, bad.url),
        policy="round_robin",
        radix_tree_max_size=1_000_000,
    )
    before = recorded(running)
    async with httpx.AsyncClient() as client:
        with trio.fail_after(10):
            r = await client.post(
                running.url + "/v1/chat/completions",
                json={"messages": MESSAGES, "n": 4, "max_tokens": 4},
            )
    assert r.status_code == 400
    assert good.app.stats.completed >= 1  # some samples did succeed ...
    assert recorded(running) == before  # ... and none of them was recorded


@pytest.mark.parametrize("rid", ["one", ["a", "b"], ["a", "a", "b"], ["a", 1, "c"]])
async def test_a_request_id_for_n_samples_must_name_each_sample(nursery, qwen3, rid):
    worker, running = await openai_router(nursery, qwen3)
    async with httpx.AsyncClient() as client:
        with trio.fail_after(10):
            r = await client.post(
                running.url + "/v1/chat/completions",
                json={"messages": MESSAGES, "n": 3, "rid": rid},
            )
    assert r.status_code == 400
    assert (
        "'rid' with n = 3 must be a list of 3 distinct request ids" in r.json()["error"]["message"]
    )
    assert worker.app.stats.requests.get("/generate", 0) == 0


async def test_each_of_n_samples_carries_its_own_request_id(nursery, qwen3):
    _worker, running = await openai_router(nursery, qwen3)
    async with httpx.AsyncClient() as client:
        with trio.fail_after(10):
            r = await client.post(
                running.url + "/v1/chat/completions",
                json={"messages": MESSAGES, "n": 3, "max_tokens": 4, "rid": ["a", "b", "c"]},
            )
    assert r.status_code == 200
    ids = sorted(choice["meta_info"]["id"] for choice in r.json()["choices"])
    assert ids == ["a", "b", "c"]


#: (field, a wrong-typed value, what the 400 names) -- each was accepted before (issue 16)
WRONG_CHAT_FIELDS = [
    ("logprobs", 1, "'logprobs' must be a boolean"),
    ("logprobs", "yes", "'logprobs' must be a boolean"),
    ("top_logprobs", False, "'top_logprobs'"),
    ("stream_options", "", "'stream_options' must be an object"),
    ("stream_options", False, "'stream_options' must be an object"),
    ("stream_options", {"include_usage": 1}, "'stream_options.include_usage' must be a boolean"),
    ("model", 0, "'model' must be a string"),
    ("model", [], "'model' must be a string"),
    ("tool_choice", 5, "'tool_choice' must be a string or object"),
    ("parallel_tool_calls", "yes", "'parallel_tool_calls' must be a boolean"),
    ("chat_template_kwargs", [], "'chat_template_kwargs' must be an object"),
    ("user", 5, "'user' must be a string"),
    ("response_format", "json", "'response_format' must be an object"),
    ("logit_bias", 5, "'logit_bias' must be an object"),
    ("metadata", 5, "'metadata' must be an object"),
    ("store", "yes", "'store' must be a boolean"),
    ("top_k", "5", "'top_k' must be an integer"),
    ("top_k", True, "'top_k' must be an integer"),
    ("min_p", True, "'min_p' must be a number"),
    ("repetition_penalty", "1", "'repetition_penalty' must be a number"),
    ("min_new_tokens", True, "'min_new_tokens' must be an integer"),
    ("ignore_eos", 1, "'ignore_eos' must be a boolean"),
    ("stop_token_ids", [True], "'stop_token_ids' must be a list of integers"),
    ("skip_special_tokens", "no", "'skip_special_tokens' must be a boolean"),
    ("spaces_between_special_tokens", 1, "'spaces_between_special_tokens' must be a boolean"),
    ("no_stop_trim", 1, "'no_stop_trim' must be a boolean"),
    ("regex", 5, "'regex' must be a string"),
    ("json_schema", {}, "'json_schema' must be a string"),
    ("rid", 5, "'rid' must be a string"),
    ("max_tokens", True, "'max_tokens' must be an integer"),
    ("temperature", True, "'temperature' must be a number"),
    ("seed", True, "'seed' must be an integer"),
    ("n", 1.5, "'n' must be an integer"),
    ("stream", "yes", "'stream' must be a boolean"),
    ("tools", {}, "'tools' must be a list"),
    ("tools", [{}], "'tools[0]' must be an object of type 'function'"),
    ("tools", [{"type": "function", "function": {"name": 5}}], "'tools[0].function.name'"),
]
#: wrong-typed fields of the second message (an assistant's, after a user's)
WRONG_MESSAGE_FIELDS = [
    ("content", [{"type": "text", "text": 5}], "'messages[1].content[0].text' must be a string"),
    ("content", [{"type": "text"}], "'messages[1].content[0].text' must be a string"),
    ("name", 5, "'messages[1].name' must be a string"),
    ("tool_call_id", 5, "'messages[1].tool_call_id' must be a string"),
    ("reasoning_content", {}, "'messages[1].reasoning_content' must be a string"),
    (
        "tool_calls",
        [{"function": {"name": 5, "arguments": "{}"}}],
        "'messages[1].tool_calls[0].function.name' must be a string",
    ),
    (
        "tool_calls",
        [{"function": {"name": "f", "arguments": 5}}],
        "'messages[1].tool_calls[0].function.arguments' must be a string or object",
    ),
    (
        "tool_calls",
        [{"id": 5, "function": {"name": "f", "arguments": "{}"}}],
        "'messages[1].tool_calls[0].id' must be a string",
    ),
]
WRONG_COMPLETION_FIELDS = [
    ("logprobs", True, "'logprobs' must be an integer within [0, 5]"),
    ("logprobs", "1", "'logprobs' must be an integer within [0, 5]"),
    ("logprobs", 6, "'logprobs' must be an integer within [0, 5]"),
    ("echo", "yes", "'echo' must be a boolean"),
    ("suffix", 5, "'suffix' must be a string"),
    ("best_of", True, "'best_of' must be an integer"),
    ("prompt", [True], "'prompt' must be a non-empty string or a list of token ids"),
]


async def test_wrong_typed_fields_are_a_400_naming_the_field(nursery, qwen3):
    worker, running = await openai_router(nursery, qwen3)
    chat, completions = running.url + "/v1/chat/completions", running.url + "/v1/completions"
    cases = [(chat, {"messages": MESSAGES, name: v}, m) for name, v, m in WRONG_CHAT_FIELDS]
    for name, value, message in WRONG_MESSAGE_FIELDS:
        messages = [MESSAGES[1], {"role": "assistant", "content": "4", name: value}, MESSAGES[1]]
        cases.append((chat, {"messages": messages}, message))
    for name, value, message in WRONG_COMPLETION_FIELDS:
        cases.append((completions, {"prompt": "Once", name: value}, message))
    wrong = []
    async with httpx.AsyncClient() as client:
        with trio.fail_after(30):
            for url, body, message in cases:
                r = await client.post(url, json={"max_tokens": 2, **body})
                if r.status_code != 400 or message not in r.json()["error"]["message"]:
                    wrong.append(f"{body}: {r.status_code} {r.text[:200]}")
    assert wrong == []
    assert worker.app.stats.requests.get("/generate", 0) == 0


async def test_null_leaves_every_optional_field_unset(nursery, qwen3):
    _worker, running = await openai_router(nursery, qwen3)
    optional = [name for name, _, _ in WRONG_CHAT_FIELDS if name != "rid"]
    nulls = dict.fromkeys([*optional, "max_completion_tokens", "top_p", "stop"])
    async with httpx.AsyncClient() as client:
        with trio.fail_after(30):
            chat = await client.post(
                running.url + "/v1/chat/completions",
                json={**nulls, "messages": [{**MESSAGES[1], "name": None}], "max_tokens": 2},
            )
            completion = await client.post(
                running.url + "/v1/completions",
                json={**nulls, "logprobs": None, "echo": None, "prompt": "Once", "max_tokens": 2},
            )
    assert chat.status_code == 200, chat.text
    assert completion.status_code == 200, completion.text
    assert chat.json()["model"] == "default"


async def test_null_extension_fields_never_reach_the_worker(nursery, qwen3):
    """The official client sends ``null`` for extension fields left unset; SGLang rejects
    or misreads nulls, so they mean unset."""
    upstream, url = await start_scripted(nursery)
    answer = {
        "text": " four",
        "output_ids": [3040],
        "meta_info": {
            "finish_reason": {"type": "stop"},
            "output_token_logprobs": [[-0.5, 3040, None]],
        },
    }
    upstream.script = Script(chunks=[orjson.dumps(answer)])
    running = await start_router(
        nursery, tokenizer=qwen3, worker_urls=(url,), radix_tree_max_size=100_000
    )
    client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
    with trio.fail_after(30):
        await client.chat.completions.create(
            model="default",
            messages=MESSAGES,
            extra_body={"top_k": None, "stop_token_ids": None, "lora_path": None, "rid": None},
        )
        await client.close()
    sent = orjson.loads(upstream.seen[-1].body)
    assert not {"top_k", "stop_token_ids", "lora_path", "rid"} & set(sent)
    assert not {"top_k", "stop_token_ids"} & set(sent["sampling_params"])


async def test_usage_counts_the_answer_when_the_worker_sends_no_logprobs(nursery, qwen3):
    upstream, url = await start_scripted(nursery)
    answer = {
        "text": " four five",
        "output_ids": [3040, 4330],
        "meta_info": {"finish_reason": {"type": "length"}, "completion_tokens": 2},
    }
    upstream.script = Script(chunks=[orjson.dumps(answer)])
    running = await start_router(
        nursery, tokenizer=qwen3, worker_urls=(url,), radix_tree_max_size=100_000
    )
    client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
    with trio.fail_after(30):
        completion = await client.chat.completions.create(model="default", messages=MESSAGES)
        await client.close()
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 2


async def test_completions_logprobs_n_gives_the_n_best_alternatives(nursery, qwen3):
    """The legacy API's ``logprobs: N``: SGLang answers each token's N best alternatives
    as ``{token text: logprob}``; the router asks the worker for them and passes them on."""
    upstream, url = await start_scripted(nursery)
    four, five, other = (qwen3.encode(w)[0] for w in (" four", " five", " for"))
    answer = {
        "text": " four five",
        "output_ids": [four, five],
        "meta_info": {
            "finish_reason": {"type": "length"},
            "output_token_logprobs": [[-0.5, four, None], [-0.7, five, None]],
            "output_top_logprobs": [
                [[-0.5, four, None], [-1.5, other, None]],
                [[-0.7, five, None], [-2.0, other, None]],
            ],
        },
    }
    upstream.script = Script(chunks=[orjson.dumps(answer)])
    running = await start_router(
        nursery, tokenizer=qwen3, worker_urls=(url,), radix_tree_max_size=100_000
    )
    client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
    with trio.fail_after(30):
        completion = await client.completions.create(
            model="default", prompt="Two and two make", max_tokens=2, logprobs=2
        )
        await client.close()
    sent = orjson.loads(upstream.seen[-1].body)
    assert sent["top_logprobs_num"] == 2
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.top_logprobs == [{" four": -0.5, " for": -1.5}, {" five": -0.7, " for": -2.0}]


#: how SGLang 0.5.23 refuses a streamed request it has already answered 200 to
ENGINE_STREAM_ERROR = Script(
    headers=[(b"content-type", b"text/event-stream; charset=utf-8")],
    chunks=[
        b'data: {"error":{"message":"The input (9001 tokens) is longer than the model\'s'
        b' context length (8192 tokens).","type":"invalid_request_error","code":400,'
        b'"retryable":false}}\n\n',
        b"data: [DONE]\n\n",
    ],
)
TOO_LONG = "The input (9001 tokens) is longer than the model's context length (8192 tokens)."


async def stream_events(url: str, body: dict[str, Any]) -> list[Any]:
    """The ``data:`` payloads of a streamed answer (``[DONE]`` kept as the string)."""
    async with httpx.AsyncClient() as client, client.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        lines = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else orjson.loads(line) for line in lines]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": MESSAGES}),
        ("/v1/completions", {"prompt": "Once upon"}),
    ],
)
async def test_an_engine_error_inside_a_stream_is_passed_on_as_an_error_event(
    nursery, qwen3, path, body
):
    upstream, url = await start_scripted(nursery)
    upstream.script = ENGINE_STREAM_ERROR
    running = await start_router(
        nursery, tokenizer=qwen3, worker_urls=(url,), radix_tree_max_size=100_000
    )
    before = recorded(running)
    with trio.fail_after(30):
        events = await stream_events(running.url + path, {**body, "stream": True})
    errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
    assert errors == [
        {
            "message": f"worker refused the request: {TOO_LONG}",
            "type": "invalid_request_error",
            "code": 400,
        }
    ]
    assert events[-1] == "[DONE]"
    assert recorded(running) == before


async def test_an_engine_error_inside_a_stream_from_the_simulated_worker(nursery, qwen3):
    _worker, running = await openai_router(nursery, qwen3)
    long = {"role": "user", "content": "word " * 9000}  # past the worker's 8192-token context
    with trio.fail_after(30):
        events = await stream_events(
            running.url + "/v1/chat/completions",
            {"messages": [long], "max_tokens": 2, "stream": True},
        )
    (error,) = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
    assert "is longer than the model's context length (8192 tokens)" in error["message"]
    assert error["code"] == 400
    assert events[-1] == "[DONE]"


async def test_an_engine_schema_error_is_passed_on_as_its_message(nursery, qwen3):
    upstream, url = await start_scripted(nursery)
    refusal = {"error": "unknown field `bogus`, expected one of `max_new_tokens`, `stop`"}
    upstream.script = Script(status=400, chunks=[orjson.dumps(refusal)])  # SGLang's shape
    running = await start_router(
        nursery, tokenizer=qwen3, worker_urls=(url,), radix_tree_max_size=100_000
    )
    async with httpx.AsyncClient() as client:
        with trio.fail_after(30):
            r = await client.post(running.url + "/v1/chat/completions", json={"messages": MESSAGES})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == f"worker refused the request: {refusal['error']}"
