"""The simulated worker against real SGLang: the same requests, answers of the same shape.

Each case goes to the engine and to a simulated worker (the same tokenizer, SGLang's health
timing) and the two answers are reduced to what must not drift apart: the status, the
content type (and ``allow``), the JSON document's keys in order with each value's type (a few
values, such as ``object`` and ``type``, literally), SSE framing (``data:`` events, the first,
the middle and the last one's shape, ``[DONE]``), and, where SGLang's text is deterministic
(its refusals), the whole document. The generated text differs (a random model against a
hash), so requests ask for a fixed length. What the simulator knowingly does otherwise is
listed in docs/http-api.md (the simulated worker) and left out here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
import trio

from trio_router.sim import SimWorkerHandle
from trio_router.sim.contract import error_shape

from ..conftest import start_worker
from .conftest import Engine
from .wire import GREEDY, chat_prompt

PROMPT = chat_prompt("Hi there")
FIXED = {"max_new_tokens": 4, "ignore_eos": True, **GREEDY}
LONG = "word " * 9000  # past both contexts (8192 tokens)
MESSAGES = [{"role": "user", "content": "Hi"}]
CHAT = {"messages": MESSAGES, "max_tokens": 3, "ignore_eos": True, "temperature": 0}
#: values compared as they are, not only by type
LITERAL = frozenset({"object", "type", "code", "param", "success", "retryable", "owned_by"})
#: values whose type depends on the state of a prefix cache: compared by presence only
EITHER = frozenset({"cached_tokens_details", "embedding"})


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    body: Any = None  # JSON, or bytes sent as they are
    headers: dict[str, str] = field(default_factory=dict)
    exact: bool = False
    """The whole document must be equal (SGLang's deterministic refusals)."""

    def __str__(self) -> str:
        return self.name


def generate(name: str, exact: bool = False, **body: Any) -> Case:
    return Case(name, "POST", "/generate", body, exact=exact)


def openai(name: str, path: str, exact: bool = False, **body: Any) -> Case:
    return Case(name, "POST", path, body, exact=exact)


JSON = {"content-type": "application/json"}
FORM = {"content-type": "application/x-www-form-urlencoded"}
LOGPROBS = {"return_logprob": True}
CASES = [
    # /generate answers
    generate("text", text=PROMPT, sampling_params=FIXED),
    generate("input_ids", input_ids=[1, 2, 3], sampling_params=FIXED),
    generate("logprobs", text=PROMPT, sampling_params=FIXED, **LOGPROBS),
    generate(
        "logprobs from 0", text=PROMPT, sampling_params=FIXED, logprob_start_len=0, **LOGPROBS
    ),
    generate(
        "logprobs from 3", text=PROMPT, sampling_params=FIXED, logprob_start_len=3, **LOGPROBS
    ),
    generate(
        "top logprobs with text",
        text=PROMPT,
        sampling_params=FIXED,
        top_logprobs_num=2,
        return_text_in_logprobs=True,
        **LOGPROBS,
    ),
    generate(
        "top logprobs from 0",
        text=PROMPT,
        sampling_params=FIXED,
        top_logprobs_num=2,
        logprob_start_len=0,
        **LOGPROBS,
    ),
    generate("no new tokens", text=PROMPT, sampling_params={"max_new_tokens": 0}),
    generate("text and input_ids", text=PROMPT, input_ids=[1], sampling_params=FIXED),
    generate("unknown top-level field", text=PROMPT, bogus=1, sampling_params=FIXED),
    generate("streamed", text=PROMPT, stream=True, sampling_params=FIXED),
    generate("streamed with logprobs", text=PROMPT, stream=True, sampling_params=FIXED, **LOGPROBS),
    generate(
        "streamed with top logprobs from 5",
        text=PROMPT,
        stream=True,
        sampling_params=FIXED,
        top_logprobs_num=1,
        logprob_start_len=5,
        **LOGPROBS,
    ),
    Case("PUT /generate", "PUT", "/generate", {"text": PROMPT, "sampling_params": FIXED}),
    # /generate refusals: the JSON contract
    generate("unknown sampling param", True, text=PROMPT, sampling_params={"bogus": 1}),
    generate(
        "unknown sampling param, streamed",
        True,
        text=PROMPT,
        stream=True,
        sampling_params={"bogus": 1},
    ),
    generate("max_new_tokens a string", True, text=PROMPT, sampling_params={"max_new_tokens": "5"}),
    generate("ignore_eos an integer", True, text=PROMPT, sampling_params={"ignore_eos": 1}),
    generate("stream a string", True, text=PROMPT, stream="yes"),
    generate("return_logprob a string", True, text=PROMPT, return_logprob="yes"),
    # ... pydantic
    generate("text a number", text=5),
    generate("input_ids of strings", input_ids=["a"]),
    Case("a JSON array", "POST", "/generate", [1, 2]),
    Case("invalid JSON", "POST", "/generate", b"{not json", JSON),
    Case("an empty body", "POST", "/generate", b"", JSON),
    Case("a form-typed body", "POST", "/generate", b'{"text": "Hi"}', FORM),
    # ... the tokenizer manager, plain and streamed
    generate("no prompt", True, sampling_params={"max_new_tokens": 1}),
    generate("no prompt, streamed", True, stream=True, sampling_params={"max_new_tokens": 1}),
    generate("empty input_ids", True, input_ids=[], sampling_params={"max_new_tokens": 1}),
    generate("max_new_tokens -1", True, text=PROMPT, sampling_params={"max_new_tokens": -1}),
    generate(
        "max_new_tokens -1, streamed",
        True,
        text=PROMPT,
        stream=True,
        sampling_params={"max_new_tokens": -1},
    ),
    generate("temperature -1", True, text=PROMPT, sampling_params={"temperature": -1}),
    generate("longer than the context", True, text=LONG, sampling_params={"max_new_tokens": 2}),
    generate(
        "longer than the context, streamed",
        True,
        text=LONG,
        stream=True,
        sampling_params={"max_new_tokens": 2},
    ),
    generate(
        "prompt and output past the context",
        True,
        input_ids=[1] * 8000,
        sampling_params={"max_new_tokens": 500},
    ),
    generate(
        "exactly the context", True, input_ids=[1] * 8192, sampling_params={"max_new_tokens": 0}
    ),
    generate(
        "logprob_start_len past the prompt",
        True,
        text=PROMPT,
        logprob_start_len=100,
        sampling_params={"max_new_tokens": 1},
        **LOGPROBS,
    ),
    Case("GET /generate", "GET", "/generate"),
    # other endpoints
    Case("health", "GET", "/health"),
    Case("health_generate", "GET", "/health_generate"),
    Case("model_info", "GET", "/model_info"),
    Case("get_model_info", "GET", "/get_model_info"),
    Case("get_weight_version", "GET", "/get_weight_version", exact=True),
    Case("get_load", "GET", "/get_load", exact=True),
    Case("an unknown path", "POST", "/nowhere", {}, exact=True),
    Case("models", "GET", "/v1/models"),
    Case("flush_cache", "POST", "/flush_cache"),
    Case("flush_cache by GET", "GET", "/flush_cache"),
    Case("abort an unknown rid", "POST", "/abort_request", {"rid": "nothing"}),
    Case("abort all", "POST", "/abort_request", {"abort_all": True}),
    Case("abort, form-typed", "POST", "/abort_request", b'{"abort_all": true}', FORM),
    Case("update weights, no model_path", "POST", "/update_weights_from_disk", {}),
    Case("update weights, a bad path", "POST", "/update_weights_from_disk", {"model_path": "/tmp"}),
    # OpenAI
    openai("chat", "/v1/chat/completions", **CHAT),
    openai("chat, logprobs", "/v1/chat/completions", **CHAT, logprobs=True, top_logprobs=1),
    openai("chat, meta_info", "/v1/chat/completions", **CHAT, return_meta_info=True),
    openai("chat, input_ids", "/v1/chat/completions", **CHAT, input_ids=[1, 2, 3]),
    openai("chat, streamed", "/v1/chat/completions", **CHAT, stream=True),
    openai(
        "chat, streamed with usage",
        "/v1/chat/completions",
        **CHAT,
        stream=True,
        stream_options={"include_usage": True},
    ),
    openai("chat, no messages", "/v1/chat/completions", max_tokens=2),
    openai("chat, empty messages", "/v1/chat/completions", True, messages=[], max_tokens=2),
    openai("chat, max_tokens -1", "/v1/chat/completions", True, messages=MESSAGES, max_tokens=-1),
    openai(
        "chat, streamed meta_info",
        "/v1/chat/completions",
        True,
        **CHAT,
        stream=True,
        return_meta_info=True,
    ),
    Case("chat, form-typed", "POST", "/v1/chat/completions", b"{}", FORM),
    openai("completions", "/v1/completions", prompt="Hello", max_tokens=3, ignore_eos=True),
    openai(
        "completions, logprobs",
        "/v1/completions",
        prompt="Hello",
        max_tokens=2,
        ignore_eos=True,
        logprobs=1,
    ),
    openai(
        "completions, streamed",
        "/v1/completions",
        prompt="Hello",
        max_tokens=3,
        ignore_eos=True,
        stream=True,
    ),
    openai(
        "completions, streamed with usage",
        "/v1/completions",
        prompt="Hello",
        max_tokens=3,
        ignore_eos=True,
        stream=True,
        stream_options={"include_usage": True},
    ),
    openai("completions, past the context", "/v1/completions", True, prompt=LONG, max_tokens=2),
]


def shape(value: Any, key: str | None = None) -> Any:
    """``value`` reduced to its structure: keys in order, value types, a few literals."""
    if key in EITHER:
        return "present"
    if key in LITERAL and not isinstance(value, (dict, list)):
        return value
    if isinstance(value, dict):
        if key == "top_logprobs[]" and "token" not in value:  # completions: {token: logprob}
            return ["map", *(shape(v) for v in list(value.values())[:1])]
        return [(k, shape(v, k)) for k, v in value.items()]
    if isinstance(value, list):
        return ["list", shape(value[0], f"{key}[]")] if value else ["list"]
    if value is None or isinstance(value, (bool, str)):
        return {None: "null", True: "bool", False: "bool"}.get(value, "str")  # type: ignore[call-overload]
    return "int" if isinstance(value, int) else "float"


def stream_shape(events: list[Any]) -> dict[str, Any]:
    """SSE framing: the keys of the first data event, the last one's whole shape, and
    ``[DONE]`` last. SGLang merges events when it falls behind (under load the first
    token's event may be the one that finishes), so neither how many events there are
    nor the value types of the earlier ones are compared."""
    done = bool(events) and events[-1] == "[DONE]"
    data = events[:-1] if done else events
    summary: dict[str, Any] = {"done": done, "any": bool(data)}
    if data:
        summary["first"] = keys_only(shape(data[0]))
        summary["last"] = shape(data[-1])
    summary["errors"] = [e for e in data if isinstance(e, dict) and "error" in e]
    return summary


def keys_only(value: Any) -> Any:
    """A ``shape`` cut down to its keys, in order: the event's own, and those of the
    objects in its lists (``choices``); everything below is left out (a merged event may
    carry a value where another carries null)."""

    def items(of: Any) -> Any:
        return (
            [k for k, _ in of] if isinstance(of, list) and of and isinstance(of[0], tuple) else "*"
        )

    if not (isinstance(value, list) and value and isinstance(value[0], tuple)):
        return "*"
    return [
        (
            k,
            ["list", *(items(v) for v in v[1:])]
            if isinstance(v, list) and v[:1] == ["list"]
            else "*",
        )
        for k, v in value
    ]


@dataclass
class Answer:
    status: int
    content_type: str | None
    allow: list[str] | None
    body: Any


async def ask(client: httpx.AsyncClient, url: str, case: Case) -> Answer:
    kwargs: dict[str, Any] = {"headers": case.headers}
    if isinstance(case.body, bytes):
        kwargs["content"] = case.body
    elif case.body is not None:
        kwargs["json"] = case.body
    async with client.stream(case.method, url + case.path, **kwargs) as response:
        raw = await response.aread()
    content_type = response.headers.get("content-type")
    if content_type is not None and "event-stream" in content_type:
        events = [
            e[6:] if e == "data: [DONE]" else orjson.loads(e[6:])
            for e in raw.decode().split("\n\n")
            if e
        ]
        body: Any = events if case.exact else stream_shape(events)
    elif content_type == "application/json":
        document = orjson.loads(raw)
        body = (
            document
            if case.exact
            else [error_shape(document, response.status_code), shape(document)]
        )
    else:
        body = raw.decode()[:14]  # empty, or the start of SGLang's "Cache flushed." text
    allow = response.headers.get("allow")  # SGLang lists the methods in no fixed order
    methods = None if allow is None else sorted(m.strip() for m in allow.split(","))
    return Answer(response.status_code, content_type, methods, body)


@pytest.fixture
async def sim(nursery: trio.Nursery, qwen3: Any) -> SimWorkerHandle:
    """A simulated worker set up as the engine is: its tokenizer, SGLang's health timing."""
    return await start_worker(nursery, tokenizer=qwen3, health_seconds=1.0)


@pytest.mark.parametrize("case", CASES, ids=str)
async def test_the_simulated_worker_answers_like_sglang(
    case: Case, client: httpx.AsyncClient, engine: Engine, sim: SimWorkerHandle
) -> None:
    with trio.fail_after(120):
        real = await ask(client, engine.url, case)
        simulated = await ask(client, sim.url, case)
    for a, b in ((real, simulated), (simulated, real)):
        if isinstance(a.body, dict) and a.body.get("middle") == [] and isinstance(b.body, dict):
            b.body["middle"] = []  # the engine merged all its middle events into the last
    assert simulated == real


async def test_an_aborted_generation_finishes_alike(
    client: httpx.AsyncClient, engine: Engine, nursery: trio.Nursery, qwen3: Any
) -> None:
    slow = await start_worker(nursery, tokenizer=qwen3, latency_per_token_ms=20)
    answers: dict[str, Any] = {}

    async def generate_then_abort(url: str, key: str) -> None:
        body = {
            "text": PROMPT,
            "rid": f"differential-{key}",
            "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True},
        }
        async with trio.open_nursery() as inner:

            async def run() -> None:
                answers[key] = (await client.post(url + "/generate", json=body)).json()

            inner.start_soon(run)
            await trio.sleep(1.5)  # a second or so of generation, then abort it
            await client.post(url + "/abort_request", json={"rid": body["rid"]})

    with trio.fail_after(120):
        await generate_then_abort(engine.url, "real")
        await generate_then_abort(slow.url, "sim")
    real, simulated = answers["real"]["meta_info"], answers["sim"]["meta_info"]
    assert real["finish_reason"] == {
        "type": "abort",
        "message": "Aborted",
        "status_code": None,
        "err_type": None,
    }
    assert simulated["finish_reason"] == real["finish_reason"]
    assert shape(simulated) == shape(real)


async def test_a_weight_update_without_a_version_keeps_it_alike(
    client: httpx.AsyncClient, disposable_engine: Engine, sim: SimWorkerHandle
) -> None:
    answers = []
    with trio.fail_after(120):
        for url in (disposable_engine.url, sim.url):
            before = (await client.get(url + "/model_info")).json()
            update = {"model_path": before["model_path"]}
            done = await client.post(url + "/update_weights_from_disk", json=update)
            after = (await client.get(url + "/model_info")).json()["weight_version"]
            answers.append((done.status_code, done.json(), after == before["weight_version"]))
    succeeded = {"success": True, "message": "Succeeded to update model weights."}
    assert answers[1] == answers[0] == (200, {**succeeded, "num_paused_requests": 0}, True)
