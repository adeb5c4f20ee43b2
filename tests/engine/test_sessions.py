"""An agent session over a real engine: its sample is what SGLang read and wrote."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from safetensors.numpy import load as load_safetensors

from .conftest import start_engine_router
from .wire import consumed_ids, post, sse

SYSTEM = {"role": "system", "content": "You are helpful."}
#: temperature 0, and the engine lists the prompt ids it read (logprob_start_len 0)
TURN = {"max_tokens": 8, "temperature": 0, "logprob_start_len": 0}


def engine_view(meta: dict[str, Any]) -> tuple[list[int], list[int], list[float]]:
    """(prompt ids read, ids written, their logprobs) from a choice's meta_info."""
    prompt = consumed_ids({"meta_info": meta})
    output = meta["output_ids"]
    return prompt, output, [entry[0] for entry in meta["output_token_logprobs"]]


async def test_a_two_turn_session_samples_exactly_what_the_engine_saw(
    nursery, client, qwen3, engine
):
    messages: list[Any] = [SYSTEM, {"role": "user", "content": "Plan a trip."}]
    with trio.fail_after(120):
        router = await start_engine_router(nursery, qwen3, engine)
        sid = (await post(client, router.url, "/sessions", {}))["session_id"]
        turns = f"{router.url}/sessions/{sid}/v1/chat/completions"
        first = await post(client, turns, "", {"messages": messages, **TURN})
        direct = await post(
            client, engine.url, "/v1/chat/completions", {"messages": messages, **TURN}
        )
        messages += [first["choices"][0]["message"], {"role": "user", "content": "Why?"}]
        _head, events = await sse(client, turns, "", {"messages": messages, **TURN, "stream": True})
        sample = await post(client, router.url, f"/sessions/{sid}/samples", {})
        binary = await client.post(
            f"{router.url}/sessions/{sid}/samples", json={"format": "safetensors"}
        )
    assert first["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    last = [e for e in events if e != "[DONE]" and e["choices"]][-1]["choices"][0]
    prompt1, out1, logps1 = engine_view(first["choices"][0]["meta_info"])
    prompt2, out2, logps2 = engine_view(last["meta_info"])
    assert prompt2[: len(prompt1) + len(out1)] == prompt1 + out1  # turn 2 extends turn 1
    assert sample["tokens"] == prompt2 + out2
    n1, n2 = len(prompt1), len(prompt2)
    assert sample["loss_mask"] == (
        [0] * n1 + [1] * len(out1) + [0] * (n2 - n1 - len(out1)) + [1] * len(out2)
    )
    generated = [lp for lp, m in zip(sample["rollout_logp"], sample["loss_mask"], strict=True) if m]
    assert generated == pytest.approx(logps1 + logps2, abs=1e-6)
    assert set(sample["weight_versions"]) == {None, "v0"}
    tensors = load_safetensors(binary.content)
    assert tensors["tokens"].tolist() == sample["tokens"]
    assert tensors["loss_mask"].tolist() == sample["loss_mask"]
