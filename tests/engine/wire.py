"""Talking to a router and to an engine alike, and comparing what they answer."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import orjson

EOS = 151645  # <|im_end|>
#: meta_info fields that differ between two runs of the same request
VOLATILE = frozenset(
    {"id", "e2e_latency", "response_sent_to_client_ts", "cached_tokens", "cached_tokens_details"}
)
#: what the token cache adds to a /generate answer that asked for no logprobs (documented)
FORCED_LOGPROB_KEYS = frozenset(
    {"input_token_logprobs", "output_token_logprobs", "output_token_logprobs_length"}
)
GREEDY = {"temperature": 0.0}


def chat_prompt(question: str, system: str = "You are helpful.") -> str:
    """A Qwen3 chat prompt written out, as RL code sends it to /generate."""
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )


async def post(client: httpx.AsyncClient, url: str, path: str, body: Any) -> Any:
    """POST JSON and return the decoded 200 answer."""
    response = await client.post(url + path, json=body)
    assert response.status_code == 200, f"{path} -> {response.status_code}: {response.text}"
    return response.json()


async def generate(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Any:
    return await post(client, url, "/generate", body)


async def retrieve(client: httpx.AsyncClient, url: str, text: str) -> dict[str, Any]:
    answer: dict[str, Any] = await post(client, url, "/retrieve_from_text", {"text": text})
    return answer


async def sse(
    client: httpx.AsyncClient, url: str, path: str, body: dict[str, Any]
) -> tuple[httpx.Response, list[Any]]:
    """Stream ``body`` to ``path``: the response and its decoded ``data:`` events, then
    the string ``"[DONE]"`` if the stream ended with it."""
    events: list[Any] = []
    async with client.stream("POST", url + path, json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                data = line[5:].strip()
                events.append(data if data == "[DONE]" else orjson.loads(data))
    return response, events


def comparable(answer: Any) -> Any:
    """``answer`` without the fields that differ from run to run (lists: each item)."""
    if isinstance(answer, list):
        return [comparable(item) for item in answer]
    answer = copy.deepcopy(answer)
    meta = answer.get("meta_info")
    if isinstance(meta, dict):
        for key in VOLATILE:
            meta.pop(key, None)
    return answer


def consumed_ids(answer: dict[str, Any]) -> list[int]:
    """The prompt ids the engine says it read (needs ``logprob_start_len: 0``)."""
    entries = answer["meta_info"]["input_token_logprobs"]
    return [entry[1] for entry in entries]


def output_logps(answer: dict[str, Any]) -> list[float]:
    return [entry[0] for entry in answer["meta_info"]["output_token_logprobs"]]


def versions_of(answer: dict[str, Any]) -> list[str]:
    """The weight version of each generated token, from SGLang's per-token ranges."""
    meta = answer["meta_info"]
    versions = [meta["weight_version"]] * len(answer["output_ids"])
    for span in meta.get("weight_versions") or []:
        versions[span["start"] : span["end"]] = [span["version"]] * (span["end"] - span["start"])
    return versions
