"""The simulated worker's OpenAI endpoints, in SGLang 0.5.23's shapes.

``/v1/chat/completions`` renders messages with a fixed ChatML template (not the model's),
answers a tool call when ``tools`` are given and the last user message mentions "weather",
and, like SGLang, sends ``meta_info`` only with ``return_meta_info`` (not when streaming).
``/v1/completions`` takes a text or token-id prompt. Batches and ``n`` > 1 are refused.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson

from .asgi import SSE, Dropped, parse_body, send_bytes
from .contract import Refusal, openai_error, validation_error, verify_sampling
from .generation import top_alternatives
from .job import Job, Returns, sampling

if TYPE_CHECKING:
    from .worker import SimWorker

__all__ = ["chat", "completions", "models"]

Message = Mapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

DEFAULT_CHAT_MAX_TOKENS: Final = 128
DEFAULT_COMPLETION_MAX_TOKENS: Final = 16  # OpenAI's default for /v1/completions
TOOL_ARGUMENTS: Final = '{"city": "Paris"}'
NO_STREAMED_META: Final = (
    "return_meta_info is not supported with streaming. "
    "Please set stream=false when using return_meta_info=true."
)


@dataclass(frozen=True, slots=True)
class _Ctx:
    """What shapes an OpenAI answer besides the generation itself."""

    model: str
    logprobs: bool
    top_logprobs: int
    tool_name: str | None
    include_usage: bool
    meta_info: bool


def _wrong(key: str, value: Any, kind: str) -> Refusal:
    return validation_error([{"type": f"{kind}_type", "loc": ("body", key), "input": value}])


def _field(body: Mapping[str, Any], key: str, kind: type, name: str) -> Any:
    """``body[key]`` if it is of ``kind`` (or absent/null), else pydantic's 400."""
    value = body.get(key)
    if value is not None and (
        not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)
    ):
        raise _wrong(key, value, name)
    return value


def _ids(value: Any, key: str) -> list[int]:
    if not isinstance(value, list) or not all(type(i) is int for i in value):
        raise _wrong(key, value, "list")
    return value


def _as_openai(refusal: Refusal) -> Refusal:
    """A tokenizer-manager refusal as the OpenAI layer words it."""
    error = refusal.document.get("error")
    message = error.get("message", "") if isinstance(error, dict) else str(error)
    return openai_error(message, refusal.status)


def _sampling(body: Mapping[str, Any], default_max: int) -> dict[str, Any]:
    """SGLang ``sampling_params`` from an OpenAI body (the fields the simulator reads)."""
    max_tokens = _field(body, "max_completion_tokens", int, "int")
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", int, "int")
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise _wrong("stop", stop, "list")
    sp: dict[str, Any] = {"max_new_tokens": default_max if max_tokens is None else max_tokens}
    for key in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty"):
        value = _field(body, key, (int, float), "float")  # type: ignore[arg-type]
        if value is not None:
            sp[key] = value
    if stop is not None:
        sp["stop"] = stop
    if body.get("stop_token_ids") is not None:
        sp["stop_token_ids"] = _ids(body["stop_token_ids"], "stop_token_ids")
    for key in ("ignore_eos", "skip_special_tokens", "no_stop_trim"):
        if _field(body, key, bool, "bool") is not None:
            sp[key] = body[key]
    return sp


def _new_job(
    worker: SimWorker, body: Mapping[str, Any], prompt: list[int], default_max: int, ctx: _Ctx
) -> Job:
    n = _field(body, "n", int, "int")
    if n is not None and n != 1:
        raise openai_error("only n=1 is supported by the simulator")
    if ctx.meta_info and _field(body, "stream", bool, "bool"):
        raise openai_error(NO_STREAMED_META, kind="BadRequest")
    rid = _field(body, "rid", str, "string")
    sp = _sampling(body, default_max)
    worker.check_prompt(prompt, sp["max_new_tokens"], openai_error)
    try:
        verify_sampling(sp, worker.tokenizer.vocab_size)
    except Refusal as refusal:
        raise _as_openai(refusal) from None
    rid = rid or uuid.uuid4().hex
    if rid in worker.jobs:
        raise openai_error(f"Duplicate request ID detected: {rid}")
    returns = Returns(logprob=ctx.logprobs, top_logprobs_num=ctx.top_logprobs)
    return worker.new_job(rid, prompt, sampling(sp), returns)


def _stream_options_usage(body: Mapping[str, Any]) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise _wrong("stream_options", opts, "dict")
    return _field(opts, "include_usage", bool, "bool") is True


def _usage(job: Job) -> dict[str, Any]:
    p, c = len(job.prompt_ids), len(job.dec.output_ids)
    return {
        "prompt_tokens": p,
        "total_tokens": p + c,
        "completion_tokens": c,
        "prompt_tokens_details": None,
        "reasoning_tokens": 0,
        "completion_tokens_details": None,
    }


def _metadata(job: Job) -> dict[str, Any]:
    spans = job.weight_versions()
    return {"weight_version": spans[-1]["version"], "weight_versions": spans}


def _finish_reason(job: Job, ctx: _Ctx) -> str | None:
    finish = job.finish
    if finish is None:
        return None
    if ctx.tool_name is not None and finish.type in ("stop", "length"):
        return "tool_calls"
    return finish.type


def _matched_stop(job: Job) -> int | str | None:
    finish = job.finish
    return finish.matched if finish is not None and finish.type == "stop" else None


def _head(worker: SimWorker, job: Job, ctx: _Ctx, kind: str) -> dict[str, Any]:
    """The fields every OpenAI answer (and each chunk of a stream) starts with."""
    return {"id": job.rid, "object": kind, "created": worker.created(), "model": ctx.model}


def _answer(
    worker: SimWorker, job: Job, ctx: _Ctx, kind: str, choice: dict[str, Any]
) -> dict[str, Any]:
    """A whole OpenAI answer of one choice, with SGLang's ``metadata``."""
    if ctx.meta_info:
        choice["meta_info"] = worker.meta_info(job)
    return {
        **_head(worker, job, ctx, kind),
        "choices": [choice],
        "usage": _usage(job),
        "metadata": _metadata(job),
    }


async def _end_stream(
    sse: SSE, job: Job, ctx: _Ctx, head: dict[str, Any], *, drop_nulls: bool = False
) -> None:
    """The usage chunk (``stream_options.include_usage``), then ``[DONE]``. SGLang leaves
    the null details out of a streamed completion's usage (``drop_nulls``)."""
    if ctx.include_usage:
        usage = _usage(job)
        if drop_nulls:
            usage = {k: v for k, v in usage.items() if v is not None}
        await sse.event(orjson.dumps({**head, "choices": [], "usage": usage}))
    await sse.done(job)


def _context(body: Mapping[str, Any], logprobs: bool, top: int, tool: str | None) -> _Ctx:
    return _Ctx(
        model=_field(body, "model", str, "string") or "default",
        logprobs=logprobs,
        top_logprobs=top,
        tool_name=tool,
        include_usage=_stream_options_usage(body),
        meta_info=_field(body, "return_meta_info", bool, "bool") is True,
    )


@dataclass(frozen=True, slots=True)
class _Kind:
    """How one endpoint answers: whole, or as a stream."""

    whole: Callable[[SimWorker, Job, _Ctx], dict[str, Any]]
    stream: Callable[[SimWorker, Send, Job, _Ctx], Awaitable[None]]


async def _serve(
    worker: SimWorker,
    receive: Receive,
    send: Send,
    body: Mapping[str, Any],
    prompt: list[int],
    default_max: int,
    ctx: _Ctx,
    kind: _Kind,
) -> None:
    job = _new_job(worker, body, prompt, default_max, ctx)

    async def whole(j: Job) -> None:
        await worker.decode(j, None)
        await worker.send_json_result(send, j, kind.whole(worker, j, ctx))

    async def streamed(j: Job) -> None:
        await kind.stream(worker, send, j, ctx)

    await worker.run_job(receive, job, streamed if body.get("stream") is True else whole)


# ---------------------------------------------------------------- /v1/chat/completions


def _content_text(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if not isinstance(part, dict):
                raise _wrong("messages", content, "dict")
            text = part.get("text")
            if part.get("type") == "text" and isinstance(text, str):
                parts.append(text)
        return "".join(parts)
    raise _wrong("messages", content, "string")


def _render(body: Mapping[str, Any]) -> tuple[str, str]:
    """The ChatML text of ``messages`` and the last user message (pydantic's checks)."""
    messages = body.get("messages")
    if messages is None:
        error = {"type": "missing", "loc": ("body", "messages"), "msg": "Field required"}
        raise validation_error([error])
    if not isinstance(messages, list):
        raise _wrong("messages", messages, "list")
    if not messages:
        raise openai_error("Messages cannot be empty.")
    rendered: list[str] = []
    last_user = ""
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _wrong("messages", m, "dict")
        content = _content_text(m.get("content"))
        if m["role"] == "user":
            last_user = content
        rendered.append(f"<|im_start|>{m['role']}\n{content}<|im_end|>\n")
    return "".join(rendered) + "<|im_start|>assistant\n", last_user


def _tool_name(body: Mapping[str, Any], last_user: str) -> str | None:
    tools = body.get("tools")
    if not tools:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise _wrong("tools", tools, "list")
    fn = tools[0].get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise _wrong("tools", tools, "dict")
    if body.get("tool_choice") != "none" and "weather" in last_user.lower():
        name: str = fn["name"]
        return name
    return None


async def chat(worker: SimWorker, receive: Receive, send: Send, raw: bytes) -> None:
    body = parse_body(raw, "ChatCompletionRequest")
    text, last_user = _render(body)
    if body.get("input_ids") is not None:  # SGLang's extension: the prompt as ids
        prompt = _ids(body["input_ids"], "input_ids")
    else:
        prompt = worker.encode(text, openai_error)
    top = _field(body, "top_logprobs", int, "int")
    logprobs = _field(body, "logprobs", bool, "bool") is True
    ctx = _context(body, logprobs, top or 0, _tool_name(body, last_user))
    await _serve(worker, receive, send, body, prompt, DEFAULT_CHAT_MAX_TOKENS, ctx, _CHAT)


def _tool_calls(job: Job, name: str) -> list[dict[str, Any]]:
    call_id = "call_" + job.rid[:24]
    fn = {"name": name, "arguments": TOOL_ARGUMENTS}
    return [{"id": call_id, "index": 0, "type": "function", "function": fn}]


def _chat_logprob(worker: SimWorker, job: Job, i: int, top: int) -> dict[str, Any]:
    token_id, logprob = job.dec.output_ids[i], job.dec.logprobs[i]
    piece = worker.piece(token_id)
    alternatives = []
    for lp, alt in top_alternatives(token_id, logprob, top, job.dec.vocab, i):
        text = worker.piece(alt)
        alternatives.append({"token": text, "bytes": list(text.encode()), "logprob": lp})
    return {
        "token": piece,
        "bytes": list(piece.encode()),
        "logprob": logprob,
        "top_logprobs": alternatives,
    }


def _chat_object(worker: SimWorker, job: Job, ctx: _Ctx) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": job.text(),
        "reasoning_content": None,
    }
    if ctx.tool_name is not None:
        message["content"] = ""  # SGLang: never null, for retokenization
        message["tool_calls"] = _tool_calls(job, ctx.tool_name)
    logprobs = None
    if ctx.logprobs:
        n = len(job.dec.output_ids)
        logprobs = {"content": [_chat_logprob(worker, job, i, ctx.top_logprobs) for i in range(n)]}
    choice = {
        "index": 0,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": _finish_reason(job, ctx),
        "matched_stop": _matched_stop(job),
    }
    return _answer(worker, job, ctx, "chat.completion", choice)


async def _chat_stream(worker: SimWorker, send: Send, job: Job, ctx: _Ctx) -> None:
    sse = SSE(send, worker.faults.drop_after_events)
    head = _head(worker, job, ctx, "chat.completion.chunk")
    sent = 0

    def chunk(delta: dict[str, Any], logprobs: object = None, finish: object = None) -> bytes:
        choice = {
            "index": 0,
            "delta": {"reasoning_content": None, **delta},
            "logprobs": logprobs,
            "finish_reason": finish,
            "matched_stop": _matched_stop(job) if finish is not None else None,
        }
        return orjson.dumps({**head, "choices": [choice]})

    async def on_token() -> None:
        nonlocal sent
        if ctx.tool_name is not None:
            return
        text = job.text()
        piece, sent = text[sent:], max(sent, len(text))
        lp = None
        if ctx.logprobs:
            i = len(job.dec.output_ids) - 1
            lp = {"content": [_chat_logprob(worker, job, i, ctx.top_logprobs)]}
        await sse.event(chunk({"content": piece}, lp))

    try:
        await sse.start()
        await sse.event(chunk({"role": "assistant", "content": ""}))
        await worker.decode(job, on_token)
        if ctx.tool_name is not None:
            await sse.event(chunk({"tool_calls": _tool_calls(job, ctx.tool_name)}))
        await sse.event(chunk({}, finish=_finish_reason(job, ctx)))
        await _end_stream(sse, job, ctx, head)
    except Dropped:
        return


_CHAT: Final = _Kind(_chat_object, _chat_stream)


# ---------------------------------------------------------------- /v1/completions


async def completions(worker: SimWorker, receive: Receive, send: Send, raw: bytes) -> None:
    body = parse_body(raw, "CompletionRequest")
    prompt_in = body.get("prompt")
    if isinstance(prompt_in, str):
        prompt = worker.encode(prompt_in, openai_error)
    elif isinstance(prompt_in, list) and prompt_in and isinstance(prompt_in[0], (str, list)):
        raise openai_error("batch requests are not supported by the simulator")
    elif isinstance(prompt_in, list):
        prompt = _ids(prompt_in, "prompt")
    else:
        raise _wrong("prompt", prompt_in, "string")
    lp = _field(body, "logprobs", int, "int")
    ctx = _context(body, lp is not None, lp or 0, None)
    await _serve(
        worker, receive, send, body, prompt, DEFAULT_COMPLETION_MAX_TOKENS, ctx, _COMPLETION
    )


def _completion_logprobs(worker: SimWorker, job: Job, lo: int, top: int) -> dict[str, Any]:
    ids, logprobs = job.dec.output_ids[lo:], job.dec.logprobs[lo:]
    tops = []
    for i, (token_id, logprob) in enumerate(zip(ids, logprobs, strict=True)):
        alternatives = top_alternatives(token_id, logprob, top, job.dec.vocab, lo + i)
        tops.append({worker.piece(alt): lp for lp, alt in alternatives})
    return {
        "text_offset": [-1] * len(ids),
        "token_logprobs": logprobs,
        "tokens": [worker.piece(t) for t in ids],
        "top_logprobs": tops,
    }


def _completion_object(worker: SimWorker, job: Job, ctx: _Ctx) -> dict[str, Any]:
    choice = {
        "index": 0,
        "text": job.text(),
        "logprobs": _completion_logprobs(worker, job, 0, ctx.top_logprobs)
        if ctx.logprobs
        else None,
        "finish_reason": _finish_reason(job, ctx),
        "matched_stop": _matched_stop(job),
    }
    return _answer(worker, job, ctx, "text_completion", choice)


async def _completion_stream(worker: SimWorker, send: Send, job: Job, ctx: _Ctx) -> None:
    sse = SSE(send, worker.faults.drop_after_events)
    head = _head(worker, job, ctx, "text_completion")
    sent = 0
    finished = False

    def chunk(text: str, logprobs: object) -> bytes:
        finish = _finish_reason(job, ctx)
        choice = {
            "index": 0,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish,
            "matched_stop": _matched_stop(job),
        }
        return orjson.dumps({**head, "choices": [choice], "usage": None})

    async def on_token() -> None:
        nonlocal sent, finished
        text = job.text()
        n = len(job.dec.output_ids)
        lp = _completion_logprobs(worker, job, n - 1, ctx.top_logprobs) if ctx.logprobs else None
        piece, sent = text[sent:], max(sent, len(text))
        await sse.event(chunk(piece, lp))
        finished = job.finish is not None  # SGLang: the last piece carries the finish reason

    try:
        await sse.start()
        await worker.decode(job, on_token)
        if not finished:
            await sse.event(chunk("", None))
        await _end_stream(sse, job, ctx, head, drop_nulls=True)
    except Dropped:
        return


_COMPLETION: Final = _Kind(_completion_object, _completion_stream)


# ---------------------------------------------------------------- /v1/models


async def models(worker: SimWorker, receive: Receive, send: Send, raw: bytes) -> None:
    path = worker.config.model_path
    model = {
        "id": path,
        "object": "model",
        "created": worker.created(),
        "owned_by": "sglang",
        "root": path,
        "parent": None,
        "max_model_len": worker.config.context_length,
    }
    await send_bytes(send, 200, orjson.dumps({"object": "list", "data": [model]}))
