"""Token-exact trajectories end to end: /generate through the router, then /retrieve_from_text."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
import trio

from trio_router.tokenizer import Tokenizer

from .conftest import start_router, start_scripted, start_worker
from .scripted import Script
from .test_proxy import wait_until

PROMPT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
EOS = 151645


async def generate(client: httpx.AsyncClient, url: str, text: str, **extra: Any) -> dict[str, Any]:
    body = {"text": text, "sampling_params": {"max_new_tokens": 24}, **extra}
    response = await client.post(url + "/generate", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def retrieve(client: httpx.AsyncClient, url: str, text: str, **kw: Any) -> dict[str, Any]:
    response = await client.post(url + "/retrieve_from_text", json={"text": text}, **kw)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def cached_router(nursery: trio.Nursery, qwen3: Tokenizer, **overrides: Any):  # type: ignore[no-untyped-def]
    worker = await start_worker(nursery, tokenizer=qwen3)
    running = await start_router(
        nursery,
        tokenizer=qwen3,
        worker_urls=(worker.url,),
        radix_tree_max_size=overrides.pop("radix_tree_max_size", 1_000_000),
        **overrides,
    )
    return worker, running


async def test_one_turn_comes_back_exact_with_the_hidden_end_of_turn_token(nursery, client, qwen3):
    _worker, running = await cached_router(nursery, qwen3)
    with trio.fail_after(20):
        answer = await generate(client, running.url, PROMPT, return_logprob=False)
        got = await retrieve(client, running.url, PROMPT + answer["text"])
    output = answer["output_ids"]
    assert output[-1] == EOS
    assert "<|im_end|>" not in answer["text"]
    prompt_ids = qwen3.encode(PROMPT)
    assert got["tokens"] == prompt_ids + output
    assert got["loss_mask"] == [0] * len(prompt_ids) + [1] * len(output)
    expected_logps = [pair[0] for pair in answer["meta_info"]["output_token_logprobs"]]
    assert got["rollout_logp"][len(prompt_ids) :] == pytest.approx(expected_logps, abs=1e-6)
    assert got["weight_versions"] == [None] * len(prompt_ids) + ["v0"] * len(output)
    assert (got["token_length"], got["loss_mask_length"]) == (len(got["tokens"]),) * 2
    assert (got["cached_tokens"], got["fresh_tokens"]) == (len(got["tokens"]), 0)
    # the client never asked for logprobs; they are in the answer anyway (documented)
    assert "output_token_logprobs" in answer["meta_info"]


async def test_a_streamed_generate_is_relayed_and_recorded(nursery, client, qwen3):
    _worker, running = await cached_router(nursery, qwen3)
    events = []
    with trio.fail_after(20):
        body = {"text": PROMPT, "stream": True, "sampling_params": {"max_new_tokens": 16}}
        async with client.stream("POST", running.url + "/generate", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]"
        final = orjson.loads(events[-2])
        await wait_until(lambda: running.router.token_cache.counters.recorded == 1)  # type: ignore[union-attr]
        got = await retrieve(client, running.url, PROMPT + final["text"])
    assert len(events) - 1 == final["meta_info"]["completion_tokens"]
    assert got["tokens"] == qwen3.encode(PROMPT) + final["output_ids"]


async def test_turn_two_reuses_turn_one_exactly_and_masks_only_generated_spans(
    nursery, client, qwen3
):
    _worker, running = await cached_router(nursery, qwen3)
    with trio.fail_after(20):
        first = await generate(client, running.url, PROMPT)
        turn1 = PROMPT + first["text"]
        one = await retrieve(client, running.url, turn1)
        user2 = "<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"
        second = await generate(client, running.url, turn1 + user2)
        two = await retrieve(client, running.url, turn1 + user2 + second["text"])
    n1 = len(one["tokens"])
    assert two["tokens"][:n1] == one["tokens"]  # the engine's own ids, EOS included
    fresh_user = qwen3.encode(user2.removeprefix("<|im_end|>"))
    assert two["tokens"][n1 : n1 + len(fresh_user)] == fresh_user
    assert two["tokens"][n1 + len(fresh_user) :] == second["output_ids"]
    assert two["loss_mask"] == (
        one["loss_mask"] + [0] * len(fresh_user) + [1] * len(second["output_ids"])
    )
    assert second["meta_info"]["prompt_tokens"] == n1 + len(fresh_user)


async def test_a_next_turn_without_the_end_token_does_not_inherit_it(nursery, client, qwen3):
    _worker, running = await cached_router(nursery, qwen3)
    with trio.fail_after(20):
        first = await generate(client, running.url, "User: hi\nAssistant:")
        follow = "User: hi\nAssistant:" + first["text"] + "\nUser: more\nAssistant:"
        second = await generate(client, running.url, follow)
        got = await retrieve(client, running.url, follow + second["text"])
    assert first["output_ids"][-1] == EOS
    head = qwen3.encode("User: hi\nAssistant:") + first["output_ids"][:-1]
    assert got["tokens"][: len(head)] == head
    assert EOS not in got["tokens"][len(head) : len(head) + 5]


async def test_grpo_fan_out_of_8_shares_the_prompt_and_every_sample_is_exact(
    nursery, client, qwen3
):
    _worker, running = await cached_router(nursery, qwen3)
    answers: list[dict[str, Any]] = []

    async def sample(seed: int) -> None:
        answers.append(
            await generate(
                client,
                running.url,
                PROMPT,
                sampling_params={"max_new_tokens": 12, "sampling_seed": seed},
            )
        )

    with trio.fail_after(30):
        async with trio.open_nursery() as group:
            for seed in range(8):
                group.start_soon(sample, seed)
        results = [await retrieve(client, running.url, PROMPT + a["text"]) for a in answers]
    prompt_ids = qwen3.encode(PROMPT)
    for answer, got in zip(answers, results, strict=True):
        assert got["tokens"] == prompt_ids + answer["output_ids"]
    trie = running.router.token_cache.trie  # type: ignore[union-attr]
    distinct = {tuple(a["output_ids"]) for a in answers}
    assert trie.tokens <= len(prompt_ids) + sum(len(ids) for ids in distinct)


async def test_input_ids_pass_through_and_are_recorded_for_text_lookups(nursery, client, qwen3):
    _worker, running = await cached_router(nursery, qwen3)
    prompt_ids = qwen3.encode(PROMPT)
    with trio.fail_after(20):
        r = await client.post(
            running.url + "/generate",
            json={"input_ids": prompt_ids, "sampling_params": {"max_new_tokens": 8}},
        )
        answer = r.json()
        got = await retrieve(client, running.url, PROMPT + answer["text"])
    assert got["tokens"] == prompt_ids + answer["output_ids"]


async def test_unseen_text_is_tokenized_marked_fresh_and_not_cached(nursery, client, qwen3):
    _worker, running = await cached_router(nursery, qwen3)
    cache = running.router.token_cache
    assert cache is not None
    with trio.fail_after(20):
        got = await retrieve(client, running.url, "never generated here")
    assert got["tokens"] == qwen3.encode("never generated here")
    assert got["loss_mask"] == [0] * len(got["tokens"])
    assert got["rollout_logp"] == [0.0] * len(got["tokens"])
    assert (got["cached_tokens"], got["fresh_tokens"]) == (0, len(got["tokens"]))
    assert cache.trie.tokens == 0


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"text": ""}, 400, "must not be empty"),
        ({"text": 42}, 400, "must be a string"),
        ({}, 400, "must be a string"),
        ({"text": "x" * 3000}, 413, ""),
    ],
)
async def test_bad_retrieve_input_is_4xx_and_changes_nothing(
    nursery, client, qwen3, body, status, message
):
    _worker, running = await cached_router(nursery, qwen3, max_body_size=2048)
    cache = running.router.token_cache
    assert cache is not None
    with trio.fail_after(20):
        await generate(client, running.url, PROMPT)
        await wait_until(lambda: cache.counters.recorded == 1)
        before = cache.report()
        r = await client.post(running.url + "/retrieve_from_text", json=body)
    assert r.status_code == status
    assert message in r.json()["error"]["message"]
    assert cache.report() == before


async def test_retrieve_without_the_cache_says_how_to_turn_it_on(nursery, client):
    running = await start_router(nursery)
    with trio.fail_after(10):
        r = await client.post(running.url + "/retrieve_from_text", json={"text": "x"})
    assert r.status_code == 400
    assert "--radix-tree-max-size" in r.json()["error"]["message"]


async def test_namespaces_keep_tenants_trajectories_apart(nursery, client, qwen3):
    _worker, running = await cached_router(nursery, qwen3)
    a = {"x-trio-router-namespace": "tenant-a"}
    with trio.fail_after(20):
        r = await client.post(
            running.url + "/generate",
            json={"text": PROMPT, "sampling_params": {"max_new_tokens": 8}},
            headers=a,
        )
        text = PROMPT + r.json()["text"]
        mine = await retrieve(client, running.url, text, headers=a)
        theirs = await retrieve(
            client, running.url, text, headers={"x-trio-router-namespace": "tenant-b"}
        )
        nobody = await retrieve(client, running.url, text)
    assert sum(mine["loss_mask"]) > 0
    for other in (theirs, nobody):
        assert other["cached_tokens"] == 0
        assert set(other["loss_mask"]) == {0}
        assert set(other["rollout_logp"]) == {0.0}


async def test_a_namespace_name_longer_than_128_characters_is_refused(nursery, client, qwen3):
    worker, running = await cached_router(nursery, qwen3)
    long_name = {"x-trio-router-namespace": "n" * 16_384}
    with trio.fail_after(20):
        generated = await client.post(
            running.url + "/generate", json={"text": PROMPT}, headers=long_name
        )
        retrieved = await client.post(
            running.url + "/retrieve_from_text", json={"text": PROMPT}, headers=long_name
        )
    for r in (generated, retrieved):
        assert r.status_code == 400
        assert "at most 128" in r.json()["error"]["message"]
    assert worker.app.stats.requests["/generate"] == 0
    assert running.router.token_cache is not None
    assert running.router.token_cache.trie.roots == {}


async def test_a_body_the_router_rewrites_is_labelled_json_whatever_the_client_sent(
    nursery, client, qwen3
):
    """curl's ``-d`` sends a form content type; SGLang refuses that with a 400, so a
    body the token cache rewrote (text -> input_ids) must say it is JSON."""
    _worker, running = await cached_router(nursery, qwen3)
    body = orjson.dumps({"text": PROMPT, "sampling_params": {"max_new_tokens": 4}})
    with trio.fail_after(20):
        for content_type in ("application/x-www-form-urlencoded", None):
            headers = {"content-type": content_type} if content_type else {}
            r = await client.post(running.url + "/generate", content=body, headers=headers)
            assert r.status_code == 200, r.text


async def test_the_simulated_worker_refuses_a_body_not_labelled_json_as_sglang_does(
    nursery, client, qwen3
):
    worker = await start_worker(nursery, tokenizer=qwen3)
    with trio.fail_after(10):
        r = await client.post(
            worker.url + "/generate",
            content=b'{"text": "hi"}',
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
    assert r.status_code == 400
    assert r.json()["object"] == "error"


async def test_a_weight_update_shows_in_versions_and_gc_drops_the_old_ones(nursery, client, qwen3):
    worker, running = await cached_router(nursery, qwen3, gc_threshold_k=1)
    cache = running.router.token_cache
    assert cache is not None
    with trio.fail_after(20):
        old = await generate(client, running.url, "Q1: hello?\nA:")
        update = {"model_path": "trio-router/sim", "weight_version": "v1"}
        await client.post(worker.url + "/update_weights_from_disk", json=update)
        new = await generate(client, running.url, "Q2: hello?\nA:")
        fresh = await retrieve(client, running.url, "Q2: hello?\nA:" + new["text"])
        assert set(v for v in fresh["weight_versions"] if v) == {"v1"}
        assert cache.trie.versions == ["v0", "v1"]
        removed = cache.trie.drop_versions_older_than(cache.settings.gc_threshold_k)
        stale = await retrieve(client, running.url, "Q1: hello?\nA:" + old["text"])
    assert removed == len(old["output_ids"])
    assert cache.trie.versions == ["v1"]
    assert sum(stale["loss_mask"]) == 0  # the old generation is gone; its text is fresh now


# -- the retokenization cases, with a worker scripted to produce exact ids ----------------------


async def scripted_cache_router(nursery: trio.Nursery, qwen3: Tokenizer, answer: bytes):  # type: ignore[no-untyped-def]
    """A scripted upstream answering ``answer``, and a router with the token cache before it."""
    upstream, url = await start_scripted(nursery)
    upstream.script = Script(chunks=[answer])
    running = await start_router(
        nursery, tokenizer=qwen3, worker_urls=(url,), radix_tree_max_size=100_000
    )
    return upstream, running


def scripted_answer(qwen3: Tokenizer, ids: list[int], text: str | None = None) -> bytes:
    return orjson.dumps(
        {
            "text": qwen3.decode(ids) if text is None else text,
            "output_ids": ids,
            "meta_info": {
                "id": "r",
                "finish_reason": {"type": "length", "length": len(ids)},
                "prompt_tokens": 0,
                "completion_tokens": len(ids),
                "weight_version": "w7",
                "output_token_logprobs": [[-0.25 - i, t, None] for i, t in enumerate(ids)],
            },
        }
    )


@pytest.mark.parametrize(
    ("prompt", "ids", "joint"),
    [
        # enc("Answer: ") + [yes] != enc("Answer: yes") = [..., " yes"]
        ("Answer: ", [9693], [16141, 25, 9834]),
        # "...assistant\n" + "\nHello": the engine saw two "\n" tokens, not one "\n\n"
        ("<|im_start|>assistant\n", [198, 9707], [151644, 77091, 271, 9707]),
        # "...is Par" + "is.": the engine saw " Par", "is", not " Paris"
        ("The capital of France is Par", [285, 13], None),
        # a response cut in the middle of an emoji (U+1FAE0 is 3 tokens; only 2 generated)
        ("ok", [220, 9284, 104], None),
        # non-canonical pieces of one word: "Hel" + "lo" decodes to "Hello" = one token
        ("Say:", [32713, 385], None),
    ],
)
async def test_retokenization_traps_come_back_exact(nursery, client, qwen3, prompt, ids, joint):
    upstream, url = await start_scripted(nursery)
    upstream.script = Script(chunks=[scripted_answer(qwen3, ids)])
    running = await start_router(
        nursery, tokenizer=qwen3, worker_urls=(url,), radix_tree_max_size=100_000
    )
    with trio.fail_after(20):
        answer = await generate(client, running.url, prompt)
        got = await retrieve(client, running.url, prompt + answer["text"])
    sent = orjson.loads(upstream.seen[-1].body)
    prompt_ids = qwen3.encode(prompt)
    assert "text" not in sent
    assert sent["input_ids"] == prompt_ids
    assert sent["return_logprob"] is True
    assert got["tokens"] == prompt_ids + ids
    assert got["loss_mask"] == [0] * len(prompt_ids) + [1] * len(ids)
    assert got["rollout_logp"][len(prompt_ids) :] == pytest.approx(
        [-0.25 - i for i in range(len(ids))]
    )
    if joint is not None:
        assert qwen3.encode(prompt + answer["text"]) == joint != got["tokens"]


async def test_each_token_gets_the_version_sglang_says_generated_it(nursery, client, qwen3):
    """SGLang 0.5.23's ``weight_versions`` ranges: an answer that spans a weight update
    records each token's own version, not one version for all."""
    ids = qwen3.encode(" one two three four")
    answer = orjson.loads(scripted_answer(qwen3, ids))
    answer["meta_info"]["weight_version"] = "v2"
    answer["meta_info"]["weight_versions"] = [
        {"version": "v1", "start": 0, "end": 2},
        {"version": "v2", "start": 2, "end": len(ids)},
    ]
    _upstream, running = await scripted_cache_router(nursery, qwen3, orjson.dumps(answer))
    with trio.fail_after(20):
        text = PROMPT + (await generate(client, running.url, PROMPT))["text"]
        got = await retrieve(client, running.url, text)
    generated = got["weight_versions"][-len(ids) :]
    assert generated == ["v1", "v1"] + ["v2"] * (len(ids) - 2)


async def test_a_lone_partial_utf8_token_mid_answer_is_retrieved_exact(nursery, client, qwen3):
    """A token holding only part of a character, followed by a token that starts a new
    one: SGLang's text shows U+FFFD there. Retrieval must give the engine's ids, and the
    next turn's prompt must extend the trajectory."""
    lone = qwen3.bytes_table().index(b"\xe4")  # the first byte of a 3-byte character
    tail = " there, and then a good many more words after it"  # beyond any short opaque run
    ids = [*qwen3.encode(" Hi"), lone, *qwen3.encode(tail)]
    text = qwen3.decode(ids)
    assert "\ufffd" in text
    assert not text.endswith("\ufffd")
    upstream, running = await scripted_cache_router(
        nursery, qwen3, scripted_answer(qwen3, ids, text)
    )
    with trio.fail_after(20):
        answer = await generate(client, running.url, PROMPT)
        got = await retrieve(client, running.url, PROMPT + answer["text"])
        follow_up = PROMPT + answer["text"] + "<|im_end|>\n<|im_start|>user\nmore?"
        upstream.script = Script(chunks=[scripted_answer(qwen3, qwen3.encode(" ok"))])
        await generate(client, running.url, follow_up)
    assert got["tokens"][-len(ids) :] == ids
    assert got["loss_mask"][-len(ids) :] == [1] * len(ids)
    sent = orjson.loads(upstream.seen[-1].body)["input_ids"]
    assert sent[: len(got["tokens"])] == got["tokens"]


# -- concurrency: pinned spans, inserts racing, GC during traffic --------------------------------


async def test_an_in_flight_prefix_survives_eviction_and_gc_until_its_answer_is_recorded(
    nursery, client, qwen3
):
    upstream, url = await start_scripted(nursery)
    running = await start_router(
        nursery, tokenizer=qwen3, worker_urls=(url,), radix_tree_max_size=200
    )
    cache = running.router.token_cache
    assert cache is not None
    first_ids = qwen3.encode(" first answer")
    upstream.script = Script(chunks=[scripted_answer(qwen3, first_ids)])
    with trio.fail_after(20):
        first = await generate(client, running.url, "Turn one:")
        await wait_until(lambda: cache.counters.recorded == 1)
        turn1 = "Turn one:" + first["text"]
        gate = trio.Event()
        upstream.script = Script(chunks=[gate, scripted_answer(qwen3, qwen3.encode(" second"))])
        async with trio.open_nursery() as inflight:
            inflight.start_soon(generate, client, running.url, turn1 + " next:")
            await wait_until(
                lambda: (
                    sum(s.path == "/generate" for s in upstream.seen) == 2 and upstream.active == 1
                )
            )
            # flood the cache past its budget and collect every old version meanwhile
            slot = cache.trie.version_slot("flood")
            for i in range(20):
                junk = qwen3.encode(f"unrelated conversation number {i} " * 3)
                cache.trie.insert(junk, [0.0] * len(junk), [slot] * len(junk), now=1e9 + i)
            cache.trie.drop_versions_older_than(1)
            kept = cache.trie.trajectory(cache.trie.match(turn1.encode())).ids
            assert kept[-len(first_ids) :] == first_ids
            gate.set()
        got = await retrieve(client, running.url, turn1 + " next: second")
    assert got["tokens"][: len(qwen3.encode("Turn one:")) + len(first_ids)] == (
        qwen3.encode("Turn one:") + first_ids
    )
    assert got["tokens"][-len(qwen3.encode(" second")) :] == qwen3.encode(" second")
    assert cache.trie.tokens <= 200 or any(n.pins for n in cache.trie._all_nodes())


async def test_concurrent_turns_on_one_prefix_are_each_recorded_once(nursery, client, qwen3):
    _worker, running = await cached_router(nursery, qwen3)
    cache = running.router.token_cache
    assert cache is not None
    with trio.fail_after(30):
        first = await generate(client, running.url, PROMPT)
        base = PROMPT + first["text"] + "<|im_end|>\n<|im_start|>user\n"
        answers: dict[int, dict[str, Any]] = {}

        async def turn(i: int) -> None:
            answers[i] = await generate(client, running.url, base + f"Question {i}?")

        async with trio.open_nursery() as group:
            for i in range(12):
                group.start_soon(turn, i)
        await wait_until(lambda: cache.counters.recorded == 13)
        for i, answer in answers.items():
            got = await retrieve(client, running.url, base + f"Question {i}?" + answer["text"])
            assert got["tokens"][-len(answer["output_ids"]) :] == answer["output_ids"]
            assert got["fresh_tokens"] == 0
    assert cache.counters.recorded == 13
    assert all(n.pins == 0 for n in cache.trie._all_nodes())


# -- aborts -----------------------------------------------------------------------------------


async def test_an_aborted_generate_is_continued_and_stitched_exactly(nursery, client, qwen3):
    worker = await start_worker(nursery, tokenizer=qwen3, latency_per_token_ms=20)
    running = await start_router(
        nursery,
        tokenizer=qwen3,
        worker_urls=(worker.url,),
        radix_tree_max_size=100_000,
        abort_retries=2,
        abort_retry_backoff=0.3,
    )
    result: dict[str, Any] = {}

    async def long_generation() -> None:
        result.update(
            await generate(
                client,
                running.url,
                PROMPT,
                sampling_params={"max_new_tokens": 30, "ignore_eos": True},
            )
        )

    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(long_generation)
            await wait_until(lambda: worker.app.stats.active == 1)
            await trio.sleep(0.15)  # let a few tokens out, then a weight update aborts it
            await client.post(worker.url + "/abort_request", json={"abort_all": True})
            update = {"model_path": "trio-router/sim", "weight_version": "v1"}
            await client.post(worker.url + "/update_weights_from_disk", json=update)
        got = await retrieve(client, running.url, PROMPT + result["text"])
    meta = result["meta_info"]
    assert meta["continued_aborts"] == 1
    assert meta["finish_reason"]["type"] == "length"
    assert len(result["output_ids"]) == meta["completion_tokens"] == 30
    versions = meta["output_token_weight_versions"]
    cut = versions.index("v1")
    assert 0 < cut < 30
    assert versions == ["v0"] * cut + ["v1"] * (30 - cut)
    prompt_ids = qwen3.encode(PROMPT)
    assert got["tokens"] == prompt_ids + result["output_ids"]
    assert got["weight_versions"][len(prompt_ids) :] == versions
    assert got["rollout_logp"][len(prompt_ids) :] == pytest.approx(
        [pair[0] for pair in meta["output_token_logprobs"]], abs=1e-6
    )
    # the continuation really continued: its prompt was the original prompt plus the first piece
    assert worker.app.stats.requests["/generate"] == 2


async def test_without_abort_retries_an_abort_is_returned_as_is(nursery, client, qwen3):
    worker = await start_worker(nursery, tokenizer=qwen3)
    worker.app.faults.abort_after_tokens = 3
    _w, running = (
        worker,
        await start_router(
            nursery, tokenizer=qwen3, worker_urls=(worker.url,), radix_tree_max_size=100_000
        ),
    )
    with trio.fail_after(20):
        answer = await generate(client, running.url, PROMPT)
    assert answer["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(answer["output_ids"]) == 3


async def test_cache_figures_are_in_json_and_prometheus_metrics(nursery, client, qwen3):
    _worker, running = await cached_router(nursery, qwen3)
    with trio.fail_after(20):
        answer = await generate(client, running.url, PROMPT)
        await generate(client, running.url, PROMPT + answer["text"] + "<|im_end|>\n")
        cache = (await client.get(running.url + "/metrics")).json()["cache"]
        text = (await client.get(running.url + "/prometheus")).text
    assert cache["enabled"] is True
    assert cache["recorded"] == 2
    assert cache["cache_hits"] == 1
    assert cache["cached_prompt_tokens"] == len(qwen3.encode(PROMPT)) + len(answer["output_ids"])
    assert cache["max_cache_size"] == 1_000_000
    assert f"trio_router_cache_tokens {float(cache['cur_cache_size'])}" in text
    assert "trio_router_cache_recorded_total 2.0" in text
    assert "trio_router_cache_hits_total 1.0" in text


async def test_a_run_of_lone_partial_tokens_at_the_end_comes_back_exact(nursery, client, qwen3):
    """Real SGLang's answer on the partial-UTF-8 test model: nine tokens that are each a
    part of a character, at the end of the answer (shown as nine U+FFFD)."""
    ids = [144051, 144051, 30779, 144051, 150844, 144051, 150844, 15927, *[100988] * 8]
    text = "뭔뭔  \n  \n뭔ꪱ뭔ꪱ" + "\ufffd" * 9
    assert qwen3.decode(ids) == text
    _upstream, running = await scripted_cache_router(
        nursery, qwen3, scripted_answer(qwen3, ids, text)
    )
    with trio.fail_after(20):
        answer = await generate(client, running.url, PROMPT)
        got = await retrieve(client, running.url, PROMPT + answer["text"])
    assert got["tokens"] == qwen3.encode(PROMPT) + ids
    assert got["loss_mask"][-len(ids) :] == [1] * len(ids)
