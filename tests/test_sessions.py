"""Agent sessions over real sockets: exact token-in/token-out across turns."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import numpy as np
import openai
import orjson
import pytest
import trio
from safetensors.numpy import load as load_safetensors

from trio_router.errors import BadRequest, NotFound, Overloaded, Unauthorized
from trio_router.sessions import SessionTable, delta_text
from trio_router.sim.generation import routed_experts

from .conftest import start_router, start_scripted, start_worker
from .scripted import Script
from .test_openai import ENGINE_STREAM_ERROR, TOO_LONG
from .test_proxy import wait_until

SYSTEM = {"role": "system", "content": "You are helpful."}
EOS = 151645


async def session_router(nursery, qwen3, workers: int = 1, **overrides: Any):  # type: ignore[no-untyped-def]
    handles = [await start_worker(nursery, tokenizer=qwen3, seed=i) for i in range(workers)]
    running = await start_router(
        nursery,
        tokenizer=qwen3,
        worker_urls=tuple(w.url for w in handles),
        radix_tree_max_size=1_000_000,
        **overrides,
    )
    return handles, running


async def open_session(client: httpx.AsyncClient, url: str, **kw: Any) -> str:
    r = await client.post(url + "/sessions", **kw)
    assert r.status_code == 200
    session_id: str = r.json()["session_id"]
    return session_id


async def turn(
    client: httpx.AsyncClient, url: str, sid: str, messages: list[Any], **extra: Any
) -> dict[str, Any]:
    r = await client.post(
        f"{url}/sessions/{sid}/v1/chat/completions",
        json={"messages": messages, "max_tokens": 12, **extra},
    )
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


async def state(client: httpx.AsyncClient, url: str, sid: str) -> dict[str, Any]:
    r = await client.get(f"{url}/sessions/{sid}")
    assert r.status_code == 200
    result: dict[str, Any] = r.json()
    return result


def scripted(qwen3, ids: list[int], **meta: Any) -> bytes:  # type: ignore[no-untyped-def]
    return orjson.dumps(
        {
            "text": qwen3.decode(ids),
            "output_ids": ids,
            "meta_info": {
                "finish_reason": {"type": "stop" if ids[-1] == EOS else "length"},
                "weight_version": "v5",
                "output_token_logprobs": [[-0.5, t, None] for t in ids],
                **meta,
            },
        }
    )


async def test_create_read_delete_and_unknown_ids(nursery, client, qwen3):
    _workers, running = await session_router(nursery, qwen3)
    url = running.url
    with trio.fail_after(20):
        sid = await open_session(client, url)
        fresh = await state(client, url, sid)
        deleted = await client.delete(f"{url}/sessions/{sid}")
        gone = await client.get(f"{url}/sessions/{sid}")
        unknown = await client.post(f"{url}/sessions/nope/v1/chat/completions", json={})
    assert len(sid) == 32
    assert fresh["metadata"]["accumulated_token_ids"] == []
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert gone.status_code == 404
    assert "session not found" in gone.json()["error"]["message"]
    assert unknown.status_code == 404


async def test_later_turns_append_only_the_rendered_delta(nursery, client, qwen3):
    upstream, url = await start_scripted(nursery)
    running = await start_router(
        nursery, tokenizer=qwen3, worker_urls=(url,), radix_tree_max_size=100_000
    )
    # turn 1 answers with a thinking block the Qwen3 template drops from past turns
    first = [*qwen3.encode("<think>\nadd them\n</think>\n\nfour"), EOS]
    second = [*qwen3.encode(" six"), EOS]
    messages = [SYSTEM, {"role": "user", "content": "2+2?"}]
    with trio.fail_after(20):
        sid = await open_session(client, running.url)
        upstream.script = Script(chunks=[scripted(qwen3, first)])
        one = await turn(client, running.url, sid, messages)
        sent1 = orjson.loads(upstream.seen[-1].body)["input_ids"]
        messages += [one["choices"][0]["message"], {"role": "user", "content": "3+3?"}]
        upstream.script = Script(chunks=[scripted(qwen3, second)])
        await turn(client, running.url, sid, messages)
        sent2 = orjson.loads(upstream.seen[-1].body)["input_ids"]
        info = await state(client, running.url, sid)
    assert sent1 == qwen3.encode(
        qwen3.apply_chat_template(messages[:2], add_generation_prompt=True)
    )
    delta = "\n<|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n"
    assert sent2 == sent1 + first + qwen3.encode(delta)
    # a re-render would have dropped the past <think> block: the session did not
    rerendered = qwen3.encode(qwen3.apply_chat_template(messages, add_generation_prompt=True))
    assert rerendered != sent2
    ids = info["metadata"]["accumulated_token_ids"]
    assert ids == sent2 + second
    mask = info["metadata"]["loss_mask"]
    assert mask == [0] * len(sent1) + [1] * len(first) + [0] * len(qwen3.encode(delta)) + [1] * len(
        second
    )


async def test_three_turns_through_the_official_client_stay_on_one_worker(nursery, qwen3):
    workers, running = await session_router(nursery, qwen3, workers=2)
    async with httpx.AsyncClient() as raw:
        sid = await open_session(raw, running.url)
    client = openai.AsyncOpenAI(
        base_url=f"{running.url}/sessions/{sid}/v1", api_key="unused", max_retries=0
    )
    messages: list[Any] = [SYSTEM, {"role": "user", "content": "Plan a trip."}]
    with trio.fail_after(30):
        for step in range(3):
            completion = await client.chat.completions.create(
                model="default", messages=messages, max_tokens=8
            )
            messages += [
                {"role": "assistant", "content": completion.choices[0].message.content},
                {"role": "user", "content": f"Step {step + 2}?"},
            ]
        await client.close()
        async with httpx.AsyncClient() as raw:
            info = await state(raw, running.url, sid)
    served = [w.app.stats.requests.get("/generate", 0) for w in workers]
    assert sorted(served) == [0, 3]
    assert len(info["records"]) == 3
    prompts = [r["prompt_tokens"] for r in info["records"]]
    completions = [r["completion_tokens"] for r in info["records"]]
    assert prompts[1] > prompts[0] + completions[0]
    assert len(info["metadata"]["accumulated_token_ids"]) == prompts[2] + completions[2]


async def test_every_upstream_call_carries_the_session_routing_key(nursery, client, qwen3):
    upstream, url = await start_scripted(nursery)
    running = await start_router(
        nursery, tokenizer=qwen3, worker_urls=(url,), radix_tree_max_size=100_000
    )
    upstream.script = Script(chunks=[scripted(qwen3, [*qwen3.encode(" ok"), EOS])])
    with trio.fail_after(20):
        sid = await open_session(client, running.url)
        await turn(client, running.url, sid, [SYSTEM, {"role": "user", "content": "hi"}])
    headers = dict(upstream.seen[-1].headers)
    assert headers[b"x-smg-routing-key"] == sid.encode()


async def test_a_retried_turn_rolls_back_one_step_and_deeper_divergence_is_refused(
    nursery, client, qwen3
):
    _workers, running = await session_router(nursery, qwen3)
    url = running.url
    messages = [SYSTEM, {"role": "user", "content": "Pick a city."}]
    with trio.fail_after(30):
        sid = await open_session(client, url)
        one = await turn(client, url, sid, messages)
        history = [*messages, one["choices"][0]["message"]]
        await turn(client, url, sid, [*history, {"role": "user", "content": "Why?"}])
        before = await state(client, url, sid)
        retried = await turn(client, url, sid, [*history, {"role": "user", "content": "Why not?"}])
        after = await state(client, url, sid)
        deep = await client.post(
            f"{url}/sessions/{sid}/v1/chat/completions",
            json={"messages": [SYSTEM, {"role": "user", "content": "Something else."}]},
        )
        with_assistant = await client.post(
            f"{url}/sessions/{sid}/v1/chat/completions",
            json={
                "messages": [
                    *history,
                    {"role": "user", "content": "Why not?"},
                    retried["choices"][0]["message"],
                    {"role": "assistant", "content": "made up"},
                ]
            },
        )
    assert len(after["records"]) == len(before["records"]) == 2
    turn1_end = before["records"][1]["prompt_tokens"] - len(
        qwen3.encode("\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n")
    )
    assert (
        after["metadata"]["accumulated_token_ids"][:turn1_end]
        == (before["metadata"]["accumulated_token_ids"][:turn1_end])
    )
    assert after["messages"][-2] == {"role": "user", "content": "Why not?"}
    assert deep.status_code == 400
    assert "diverge from the session at message 1" in deep.json()["error"]["message"]
    assert with_assistant.status_code == 400
    assert "assistant turns" in with_assistant.json()["error"]["message"]


async def test_a_stale_concurrent_commit_is_not_recorded_twice(nursery, client, qwen3):
    upstream, url = await start_scripted(nursery)
    running = await start_router(
        nursery, tokenizer=qwen3, worker_urls=(url,), radix_tree_max_size=100_000
    )
    gate = trio.Event()
    upstream.script = Script(chunks=[gate, scripted(qwen3, [*qwen3.encode(" same"), EOS])])
    messages = [SYSTEM, {"role": "user", "content": "hi"}]
    answers: list[dict[str, Any]] = []

    async def send() -> None:
        answers.append(await turn(client, running.url, sid, messages))

    with trio.fail_after(20):
        sid = await open_session(client, running.url)
        async with trio.open_nursery() as both:
            both.start_soon(send)
            both.start_soon(send)
            await wait_until(lambda: upstream.active == 2)
            gate.set()
        info = await state(client, running.url, sid)
    assert len(answers) == 2
    assert len(info["records"]) == 1
    assert running.router.sessions.stale_commits == 1  # type: ignore[union-attr]


async def test_streaming_and_plain_turns_give_the_same_content_and_records(nursery, client, qwen3):
    _workers, running = await session_router(nursery, qwen3)
    url = running.url
    messages = [SYSTEM, {"role": "user", "content": "Tell me a story."}]
    with trio.fail_after(30):
        plain_sid = await open_session(client, url)
        plain = await turn(client, url, plain_sid, messages)
        stream_sid = await open_session(client, url)
        text = ""
        events = []
        async with client.stream(
            "POST",
            f"{url}/sessions/{stream_sid}/v1/chat/completions",
            json={
                "messages": messages,
                "max_tokens": 12,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = orjson.loads(line[6:])
                    events.append(event)
                    for choice in event.get("choices", []):
                        text += choice["delta"].get("content") or ""
        a = await state(client, url, plain_sid)
        b = await state(client, url, stream_sid)
    assert text == plain["choices"][0]["message"]["content"]
    assert a["metadata"] == b["metadata"]
    assert events[-1]["choices"] == []
    assert events[-1]["usage"] == plain["usage"]
    last_choice = events[-2]["choices"][0]
    assert last_choice["finish_reason"] == plain["choices"][0]["finish_reason"]
    # SGLang stamps response_sent_to_client_ts on the first event of a stream only
    streamed_keys = last_choice["meta_info"].keys() | {"response_sent_to_client_ts"}
    assert streamed_keys == plain["choices"][0]["meta_info"].keys()


async def test_samples_export_json_and_safetensors_with_truncation_and_r3(nursery, client, qwen3):
    _workers, running = await session_router(nursery, qwen3, strip_routed_experts=True)
    url = running.url
    messages: list[Any] = [SYSTEM, {"role": "user", "content": "Go."}]
    with trio.fail_after(30):
        sid = await open_session(client, url)
        for step in range(2):
            answer = await turn(client, url, sid, messages, return_routed_experts=True)
            assert (
                "routed_experts" not in answer["choices"][0]["meta_info"]
            )  # stripped from replies
            messages += [
                answer["choices"][0]["message"],
                {"role": "user", "content": f"And {step}?"},
            ]
        info = await state(client, url, sid)
        full = (await client.post(f"{url}/sessions/{sid}/samples")).json()
        first_end = info["records"][0]["prompt_tokens"] + info["records"][0]["completion_tokens"]
        cut = (
            await client.post(f"{url}/sessions/{sid}/samples", json={"max_seq_len": first_end + 1})
        ).json()
        binary = await client.post(f"{url}/sessions/{sid}/samples", json={"format": "safetensors"})
        too_short = await client.post(f"{url}/sessions/{sid}/samples", json={"max_seq_len": 3})
    ids = info["metadata"]["accumulated_token_ids"]
    assert full["tokens"] == ids
    assert full["loss_mask"] == info["metadata"]["loss_mask"]
    assert set(full["weight_versions"]) == {None, "v0"}
    assert full["status"] in ("completed", "truncated")
    # SGLang's R3 rows: one per token but the last, which no forward pass consumed
    assert full["routed_experts_rows"] == len(ids) - 1
    assert base64.b64decode(full["routed_experts"]) == routed_experts(ids[:-1])
    assert slime_r3(full).shape == (len(ids) - 1, 4, 2)
    assert cut["tokens"] == ids[:first_end]
    assert cut["status"] == "truncated"
    assert cut["routed_experts_rows"] == first_end - 1
    assert base64.b64decode(cut["routed_experts"]) == routed_experts(ids[: first_end - 1])
    assert slime_r3(cut).shape == (first_end - 1, 4, 2)
    tensors = load_safetensors(binary.content)
    assert tensors["tokens"].tolist() == ids
    assert tensors["loss_mask"].tolist() == full["loss_mask"]
    assert tensors["routed_experts"].shape == (len(ids) - 1, 8)
    assert too_short.status_code == 400


def slime_r3(sample: dict[str, Any], layers: int = 4, top_k: int = 2) -> Any:
    """A sample's routed experts decoded the way slime reads SGLang's ``meta_info``."""
    raw = np.frombuffer(base64.b64decode(sample["routed_experts"]), dtype=np.int32)
    return raw.reshape(len(sample["tokens"]) - 1, layers, top_k)


async def test_session_tokens_are_required_when_configured(nursery, client, qwen3):
    _workers, running = await session_router(nursery, qwen3, session_auth=True)
    url = running.url
    messages = [SYSTEM, {"role": "user", "content": "hi"}]
    with trio.fail_after(20):
        created = (await client.post(url + "/sessions")).json()
        sid, token = created["session_id"], created["session_token"]
        missing = await client.get(f"{url}/sessions/{sid}")
        wrong = await client.get(f"{url}/sessions/{sid}", headers={"X-Session-Token": "nope"})
        right = await client.post(
            f"{url}/sessions/{sid}/v1/chat/completions",
            json={"messages": messages},
            headers={"X-Session-Token": token},
        )
    assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 200)


def test_the_table_expires_idle_sessions_and_caps_count_and_tokens():
    table = SessionTable(max_sessions=2, ttl=60.0, max_tokens=100)
    a = table.create(0.0)
    table.create(10.0)
    with pytest.raises(Overloaded):
        table.create(20.0)
    assert table.get(a.id, 50.0, None) is a
    assert table.expire(75.0) != []  # the second one, idle since 10
    table.create(80.0)
    a.ids.extend(range(90))
    with pytest.raises(Overloaded):
        table.check_budget(20)
    with pytest.raises(NotFound):
        table.get(a.id, 200.0, None)
    locked = table.create(300.0, with_token=True)
    with pytest.raises(Unauthorized):
        table.get(locked.id, 301.0, "guess")
    with pytest.raises(NotFound):
        table.get(locked.id, 301.0, locked.token, namespace="other-tenant")


def test_delta_rendering_follows_the_engine_end_token(qwen3):
    def render(messages: list[Any], generation_prompt: bool) -> str:
        return qwen3.apply_chat_template(messages, add_generation_prompt=generation_prompt)

    prior = [SYSTEM, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    new = [{"role": "user", "content": "c"}]
    ended = delta_text(prior, new, render, "<|im_end|>", ended_with_eos=True)
    cut = delta_text(prior, new, render, "<|im_end|>", ended_with_eos=False)
    assert ended == "\n<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"
    assert cut == "<|im_end|>" + ended
    with pytest.raises(BadRequest):
        delta_text(prior, new, render, "<|never|>", ended_with_eos=True)


async def test_a_tool_turn_is_answered_by_the_worker_chat_endpoint_and_recorded(
    nursery, client, qwen3
):
    workers, running = await session_router(nursery, qwen3)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    with trio.fail_after(20):
        sid = await open_session(client, running.url)
        answer = await turn(
            client,
            running.url,
            sid,
            [SYSTEM, {"role": "user", "content": "What is the weather in Paris?"}],
            tools=tools,
        )
        info = await state(client, running.url, sid)
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert workers[0].app.stats.requests["/v1/chat/completions"] == 1
    assert info["records"][0]["completion_tokens"] == len(choice["meta_info"]["output_ids"]) > 0
    assert info["messages"][-1]["tool_calls"] == choice["message"]["tool_calls"]


async def test_an_invalid_body_opens_no_session(nursery, client, qwen3):
    _workers, running = await session_router(nursery, qwen3)
    table = running.router.sessions.table
    refused = []
    with trio.fail_after(20):
        for body in [
            b"{",
            b"5",
            b"[]",
            b'"x"',
            b"null",
            b'{"a": ' + b"[" * 200 + b"]" * 200 + b"}",
        ]:
            r = await client.post(running.url + "/sessions", content=body)
            refused.append((r.status_code, len(table)))
        empty = await client.post(running.url + "/sessions")
        an_object = await client.post(running.url + "/sessions", json={"anything": 1})
    assert refused == [(400, 0)] * 6  # validated first, created after
    assert empty.status_code == an_object.status_code == 200
    assert len(table) == 2


async def test_wrong_typed_turn_and_sample_fields_are_a_400(nursery, client, qwen3):
    [worker], running = await session_router(nursery, qwen3)
    url = running.url
    user = {"role": "user", "content": "hi"}
    with trio.fail_after(30):
        sid = await open_session(client, url)
        await turn(client, url, sid, [SYSTEM, user])
        before = await state(client, url, sid)
        cases = [
            (f"/sessions/{sid}/v1/chat/completions", {name: value}, message)
            for name, value, message in [
                ("logprobs", 1, "'logprobs' must be a boolean"),
                ("model", False, "'model' must be a string"),
                ("chat_template_kwargs", [], "'chat_template_kwargs' must be an object"),
                ("chat_template_kwargs", {"tokenize": True}, "'chat_template_kwargs.tokenize'"),
                ("n", True, "'n' must be an integer"),
                ("tools", {}, "'tools' must be a list"),
                ("stream", "yes", "'stream' must be a boolean"),
            ]
        ]
        cases += [
            (f"/sessions/{sid}/samples", {"max_seq_len": True}, "'max_seq_len' must be"),
            (f"/sessions/{sid}/samples", {"max_seq_len": 1.5}, "'max_seq_len' must be"),
            (f"/sessions/{sid}/samples", {"max_seq_len": "5"}, "'max_seq_len' must be"),
            (f"/sessions/{sid}/samples", {"format": 5}, "'format' must be json or safetensors"),
        ]
        wrong = []
        for path, fields, message in cases:
            messages = [*before["messages"], {"role": "user", "content": "more"}]
            r = await client.post(url + path, json={"messages": messages, **fields})
            if r.status_code != 400 or message not in r.json()["error"]["message"]:
                wrong.append(f"{path} {fields}: {r.status_code} {r.text[:200]}")
        after = await state(client, url, sid)
        null_format = await client.post(f"{url}/sessions/{sid}/samples", json={"format": None})
    assert wrong == []
    assert after == before
    assert worker.app.stats.requests["/generate"] == 1
    assert null_format.status_code == 200


async def test_an_engine_error_inside_a_streamed_turn_is_passed_on_and_changes_nothing(
    nursery, client, qwen3
):
    upstream, url = await start_scripted(nursery)
    running = await start_router(
        nursery, tokenizer=qwen3, worker_urls=(url,), radix_tree_max_size=100_000
    )
    upstream.script = ENGINE_STREAM_ERROR
    messages = [SYSTEM, {"role": "user", "content": "Tell me a story."}]
    with trio.fail_after(30):
        sid = await open_session(client, running.url)
        before = await state(client, running.url, sid)
        body = {"messages": messages, "max_tokens": 4, "stream": True}
        path = f"{running.url}/sessions/{sid}/v1/chat/completions"
        async with client.stream("POST", path, json=body) as r:
            lines = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
        after = await state(client, running.url, sid)
    errors = [orjson.loads(line)["error"] for line in lines if line.startswith('{"error"')]
    assert errors == [
        {
            "message": f"worker refused the request: {TOO_LONG}",
            "type": "invalid_request_error",
            "code": 400,
        }
    ]
    assert lines[-1] == "[DONE]"
    assert after == before


async def test_r3_rows_are_read_as_sglang_sends_them_when_their_width_is_ambiguous(
    nursery, client, qwen3
):
    # SGLang sends len(prompt + output) - 1 rows; when the row width is a multiple of the
    # token count, the byte size alone fits len(prompt + output) rows of another width too
    upstream, url = await start_scripted(nursery)
    running = await start_router(
        nursery, tokenizer=qwen3, worker_urls=(url,), radix_tree_max_size=100_000
    )
    messages = [SYSTEM, {"role": "user", "content": "Hi"}]
    output = [*qwen3.encode(" ok"), EOS]
    upstream.script = Script(chunks=[scripted(qwen3, output)])
    with trio.fail_after(30):
        probe = await open_session(client, running.url)
        await turn(client, running.url, probe, messages)
        tokens = len(orjson.loads(upstream.seen[-1].body)["input_ids"]) + len(output)
        layers, top_k = tokens, 1  # a row of `tokens` experts: the ambiguous width
        rows = np.arange((tokens - 1) * layers * top_k, dtype="<i4")
        r3 = base64.b64encode(rows.tobytes()).decode()
        upstream.script = Script(chunks=[scripted(qwen3, output, routed_experts=r3)])
        sid = await open_session(client, running.url)
        await turn(client, running.url, sid, messages, return_routed_experts=True)
        sample = (await client.post(f"{running.url}/sessions/{sid}/samples")).json()
    assert len(sample["tokens"]) == tokens
    assert sample["routed_experts_rows"] == tokens - 1
    decoded = slime_r3(sample, layers, top_k)
    assert decoded.reshape(-1).tolist() == rows.tolist()
