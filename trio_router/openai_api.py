"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions and /v1/models.

The router renders ``messages`` with the tokenizer's chat template, reuses
cached prefix tokens, sends ``input_ids`` to a worker's ``/generate``, records
the trajectory, and answers in OpenAI's format, streamed or not. So
``/retrieve_from_text`` on the rendered conversation returns the exact tokens.
With ``tools`` the request goes to the worker's own ``/v1/chat/completions``
(with the router's ``input_ids``), which parses tool calls server-side.

A built-in middleware: it answers these paths itself (see ``hooks.Reply``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import orjson
import trio

from .chat_template import ChatTemplate, TemplateLimits
from .errors import BadRequest, RouterError, UpstreamError, UpstreamProtocolError
from .hooks import Middleware, ProxyRequest, Reply
from .openai_fields import Call, parse_call, parse_messages, parse_tools
from .request_json import loads_object
from .token_cache import Pending, TokenCache

if TYPE_CHECKING:
    from .proxy import Fetched
    from .router import Router

SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
JSON = [(b"content-type", b"application/json")]
FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


class Chunks:
    """The server-sent events of one streamed completion: one id, time and model."""

    def __init__(self, kind: str, model: str | None) -> None:
        prefix = "chatcmpl" if kind == "chat.completion.chunk" else "cmpl"
        self.base = {
            "id": completion_id(prefix),
            "object": kind,
            "created": int(time.time()),
            "model": model,
        }

    def choice(self, *, usage: Generated | None = None, **fields: Any) -> bytes:
        """One event for choice 0, with the token counts of `usage` when given."""
        event = {**self.base, "choices": [{"index": 0, **fields}]}
        if usage is not None:
            event["usage"] = usage_of(usage)
        return sse(event)

    def usage(self, result: Generated) -> bytes:
        """The closing usage event of a chat stream (`stream_options.include_usage`)."""
        return sse({**self.base, "choices": [], "usage": usage_of(result)})


class SSEEvents:
    """Splits a byte stream into the data of its server-sent events."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        start = max(0, len(self.buffer) - 1)
        self.buffer += chunk
        end = self.buffer.rfind(b"\n\n", start)
        if end < 0:
            return []
        events = []
        for event in bytes(self.buffer[:end]).split(b"\n\n"):
            event = event.strip()
            if event.startswith(b"data:"):
                events.append(event[5:].strip())
        del self.buffer[: end + 2]
        return events


@dataclass(slots=True)
class Generated:
    """One generation's result, as the front ends need it."""

    text: str
    ids: list[int]
    logps: list[float]
    finish: str
    prompt_tokens: int
    meta: dict[str, Any]
    worker: str | None


class OpenAIFrontend(Middleware):
    """Answers the OpenAI endpoints from the token cache and the workers' /generate."""

    def __init__(self, router: Router, cache: TokenCache, model: str) -> None:
        self.router = router
        self.cache = cache
        self.model = model
        config = router.config
        self.template = ChatTemplate(
            cache.tokenizer,
            TemplateLimits(
                max_prompt_chars=config.max_prompt_chars,
                max_items=config.max_chat_messages,
                timeout=config.chat_template_timeout,
            ),
        )

    async def on_request(self, request: ProxyRequest) -> Reply | None:
        path, method = request.path, request.method
        if path == "/v1/models" and method == "GET":
            return Reply(200, orjson.dumps(self.models()), list(JSON))
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
            return None
        body = self.json_body(request)
        if path == "/v1/chat/completions":
            return await self.chat(request, body)
        return await self.completions(request, body)

    @staticmethod
    def json_body(request: ProxyRequest) -> dict[str, Any]:
        return loads_object(request.body)

    def parse_chat(
        self, body: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any], Call]:
        """A chat request's messages, tools, template kwargs and call, all checked."""
        limit = self.template.limits.max_items
        messages = parse_messages(body, max_items=limit)
        tools = parse_tools(body, max_items=limit)
        kwargs = self.template.keyword_arguments(body)
        return messages, tools, kwargs, parse_call(body, self.model, default_max=None)

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": self.model, "object": "model", "created": 0, "owned_by": "trio-router"}
            ],
        }

    # -- chat ---------------------------------------------------------------------

    async def chat(self, request: ProxyRequest, body: dict[str, Any]) -> Reply:
        messages, tools, kwargs, call = self.parse_chat(body)
        rendered = await self.template.render(messages, tools, kwargs)
        namespace = self.cache.namespace(request)
        pending = await self.cache.prepare_text(rendered, namespace)
        if tools:
            return await self._chat_with_tools(request, body, call, pending)
        if call.stream:
            return Reply(200, self._chat_stream(request, call, pending), list(SSE_HEADERS))
        try:
            results = await self.generate_n(request, call, pending)
        finally:
            self.cache.finish(pending)
        return Reply(200, orjson.dumps(self._chat_object(call, results)), list(JSON))

    def _chat_object(self, call: Call, results: list[Generated]) -> dict[str, Any]:
        choices = []
        for index, result in enumerate(results):
            choice: dict[str, Any] = {
                "index": index,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": self._chat_logprobs(call, result),
                "finish_reason": FINISH.get(result.finish, result.finish),
                "meta_info": result.meta,
            }
            choices.append(choice)
        completion = sum(len(r.ids) for r in results)
        prompt = results[0].prompt_tokens if results else 0
        return {
            "id": completion_id("chatcmpl"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": call.model,
            "choices": choices,
            "usage": usage_counts(prompt, completion),
        }

    def _chat_logprobs(self, call: Call, result: Generated) -> dict[str, Any] | None:
        if not call.logprobs:
            return None
        tokenizer = self.cache.tokenizer
        tops = result.meta.get("output_top_logprobs") or []
        content = []
        for i, (token, logp) in enumerate(zip(result.ids, result.logps, strict=True)):
            raw = tokenizer.token_bytes(token)
            top = []
            if call.top_logprobs and i < len(tops) and isinstance(tops[i], list):
                for entry in tops[i][: call.top_logprobs]:
                    if isinstance(entry, list) and len(entry) >= 2:
                        alt = tokenizer.token_bytes(int(entry[1]))
                        top.append(
                            {
                                "token": alt.decode("utf-8", "replace"),
                                "logprob": entry[0],
                                "bytes": list(alt),
                            }
                        )
            content.append(
                {
                    "token": raw.decode("utf-8", "replace"),
                    "logprob": logp,
                    "bytes": list(raw),
                    "top_logprobs": top,
                }
            )
        return {"content": content}

    async def _chat_stream(
        self, request: ProxyRequest, call: Call, pending: Pending
    ) -> AsyncIterator[bytes]:
        chunks = Chunks("chat.completion.chunk", call.model)
        try:
            yield chunks.choice(delta={"role": "assistant", "content": ""}, finish_reason=None)
            result: Generated | None = None
            async with aclosing(self.generate_stream(request, call, pending)) as items:
                async for item in items:
                    if isinstance(item, str):
                        if item:
                            yield chunks.choice(delta={"content": item}, finish_reason=None)
                    else:
                        result = item
            assert result is not None
            last: dict[str, Any] = {
                "delta": {},
                "finish_reason": FINISH.get(result.finish, result.finish),
                "meta_info": result.meta,
            }
            if call.logprobs:
                last["logprobs"] = self._chat_logprobs(call, result)
            yield chunks.choice(**last)
            if call.include_usage:
                yield chunks.usage(result)
        except RouterError as exc:
            yield sse({"error": {"message": exc.message, "type": exc.kind, "code": exc.status}})
        finally:
            self.cache.finish(pending)
        yield b"data: [DONE]\n\n"

    async def _chat_with_tools(
        self, request: ProxyRequest, body: dict[str, Any], call: Call, pending: Pending
    ) -> Reply:
        """Tool calls are parsed by the worker: send it the chat request with our ids."""
        try:
            fetched = await self.worker_chat(request, body, pending)
            if fetched.status != 200:
                return Reply(fetched.status, fetched.body, fetched.headers)
            answer = orjson.loads(fetched.body)
            for choice in answer.get("choices", []) if isinstance(answer, dict) else []:
                meta = choice.get("meta_info") if isinstance(choice, dict) else None
                if isinstance(meta, dict):
                    ids = meta.get("output_ids") or [
                        p[1] for p in meta.get("output_token_logprobs", [])
                    ]
                    self.cache.insert_answer(
                        replace(pending, chunks=[]),
                        {
                            "text": self.cache.tokenizer.decode(ids),
                            "meta_info": meta,
                        },
                        fetched.worker,
                    )
        except orjson.JSONDecodeError as exc:
            raise UpstreamProtocolError(f"worker sent invalid JSON: {exc}") from None
        finally:
            self.cache.finish(pending)
        if not call.logprobs and isinstance(answer, dict):
            for choice in answer.get("choices", []):
                if isinstance(choice, dict):
                    choice["logprobs"] = None
        if call.stream and isinstance(answer, dict):
            # tool calls are parsed once the answer is complete: send it as a short stream
            return Reply(200, as_chunks(answer, call.include_usage), list(SSE_HEADERS))
        return Reply(200, orjson.dumps(answer), list(JSON))

    async def worker_chat(
        self, request: ProxyRequest, body: dict[str, Any], pending: Pending
    ) -> Fetched:
        """A worker's own /v1/chat/completions answer to ``body``, prompted with our ids."""
        from .proxy import fetch

        # SGLang reports each choice's ids and logprobs in meta_info only when asked
        forward = {**body, "input_ids": pending.prompt.ids, "stream": False}
        forward.setdefault("logprobs", True)
        forward.setdefault("return_meta_info", True)
        upstream = self.upstream_request(request, "/v1/chat/completions", forward, pending)
        return await fetch(self.router, upstream)

    # -- completions --------------------------------------------------------------

    async def completions(self, request: ProxyRequest, body: dict[str, Any]) -> Reply:
        call = parse_call(body, self.model, default_max=16, completions=True)
        if body.get("echo") or body.get("suffix"):
            raise BadRequest("'echo' and 'suffix' are not supported")
        prompt = body.get("prompt")
        namespace = self.cache.namespace(request)
        if isinstance(prompt, str) and prompt:
            pending = await self.cache.prepare_text(prompt, namespace)
        elif (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
        ):
            pending = self.cache.prepare_ids(prompt, namespace)
        else:
            raise BadRequest("'prompt' must be a non-empty string or a list of token ids")
        if call.stream:
            return Reply(200, self._completion_stream(request, call, pending), list(SSE_HEADERS))
        try:
            results = await self.generate_n(request, call, pending)
        finally:
            self.cache.finish(pending)
        choices = [
            {
                "index": i,
                "text": r.text,
                "logprobs": self._completion_logprobs(call, r) if call.logprobs else None,
                "finish_reason": FINISH.get(r.finish, r.finish),
                "meta_info": r.meta,
            }
            for i, r in enumerate(results)
        ]
        completion = sum(len(r.ids) for r in results)
        answer = {
            "id": completion_id("cmpl"),
            "object": "text_completion",
            "created": int(time.time()),
            "model": call.model,
            "choices": choices,
            "usage": usage_counts(results[0].prompt_tokens, completion),
        }
        return Reply(200, orjson.dumps(answer), list(JSON))

    def _completion_logprobs(self, call: Call, result: Generated) -> dict[str, Any]:
        tokenizer = self.cache.tokenizer

        def text_of(token: int) -> str:
            return tokenizer.token_bytes(token).decode("utf-8", "replace")

        tokens = [text_of(t) for t in result.ids]
        offsets, at = [], 0
        for token in tokens:
            offsets.append(at)
            at += len(token)
        top: list[dict[str, float]] | None = None
        if call.top_logprobs:  # {token text: logprob} of the best alternatives, per token
            tops = result.meta.get("output_top_logprobs") or []
            top = [
                {
                    text_of(int(entry[1])): entry[0]
                    for entry in (tops[i] if i < len(tops) and isinstance(tops[i], list) else [])
                    if isinstance(entry, list) and len(entry) >= 2
                }
                for i in range(len(result.ids))
            ]
        return {
            "tokens": tokens,
            "token_logprobs": result.logps,
            "top_logprobs": top,
            "text_offset": offsets,
        }

    async def _completion_stream(
        self, request: ProxyRequest, call: Call, pending: Pending
    ) -> AsyncIterator[bytes]:
        chunks = Chunks("text_completion", call.model)
        try:
            result: Generated | None = None
            async with aclosing(self.generate_stream(request, call, pending)) as items:
                async for item in items:
                    if not isinstance(item, str):
                        result = item
                    elif item:
                        yield chunks.choice(text=item, logprobs=None, finish_reason=None)
            assert result is not None
            yield chunks.choice(
                text="",
                logprobs=None,
                finish_reason=FINISH.get(result.finish, result.finish),
                usage=result if call.include_usage else None,
            )
        except RouterError as exc:
            yield sse({"error": {"message": exc.message, "type": exc.kind, "code": exc.status}})
        finally:
            self.cache.finish(pending)
        yield b"data: [DONE]\n\n"

    # -- talking to workers ---------------------------------------------------------

    def upstream_request(
        self, request: ProxyRequest, path: str, body: dict[str, Any], pending: Pending
    ) -> ProxyRequest:
        headers = [(b"content-type", b"application/json")]
        for name, value in request.headers:
            if name in (b"authorization", b"x-request-id", b"x-smg-routing-key", b"traceparent"):
                headers.append((name, value))
        upstream = ProxyRequest(
            method="POST",
            path=path,
            query=b"",
            headers=headers,
            body=orjson.dumps(body),
            routing_key=request.routing_key,
            request_id=request.request_id,
            client=request.client,
            hint=pending.hint,
        )
        for key in ("policy", "progress"):  # its routing, and who served it (proxy.PROGRESS)
            if key in request.state:
                upstream.state[key] = request.state[key]
        return upstream

    def _generate_body(self, call: Call, pending: Pending, *, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            **call.extras,
            "input_ids": pending.prompt.ids,
            "sampling_params": dict(call.sampling),
            "return_logprob": True,
            "stream": stream,
        }
        if call.top_logprobs:
            body["top_logprobs_num"] = call.top_logprobs
        return body

    async def generate_one(
        self, request: ProxyRequest, call: Call, pending: Pending, *, record: bool = True
    ) -> Generated:
        """One non-streamed /generate with the prompt of ``pending`` (recorded in the cache)."""
        answer, worker, result = await self._fetch_one(request, call, pending)
        if record:
            self.cache.insert_answer(replace(pending, chunks=[]), answer, worker)
        return result

    async def _fetch_one(
        self, request: ProxyRequest, call: Call, pending: Pending
    ) -> tuple[Any, str, Generated]:
        from .proxy import fetch

        body = self._generate_body(call, pending, stream=False)
        fetched = await fetch(
            self.router, self.upstream_request(request, "/generate", body, pending)
        )
        answer = worker_answer(fetched)
        return answer, fetched.worker, _generated(answer, len(pending.prompt.ids), fetched.worker)

    async def generate_n(
        self, request: ProxyRequest, call: Call, pending: Pending
    ) -> list[Generated]:
        """``call.n`` samples of one prompt, recorded in the cache only if all of them
        succeed (a failed request leaves no trace)."""
        if call.n == 1:
            return [await self.generate_one(request, call, pending)]
        fetched: list[tuple[Any, str, Generated] | None] = [None] * call.n
        rids = call.extras.get("rid")

        async def sample(index: int) -> None:
            sampling = dict(call.sampling)
            if "sampling_seed" in sampling:
                sampling["sampling_seed"] += index
            extras = call.extras if rids is None else {**call.extras, "rid": rids[index]}
            fetched[index] = await self._fetch_one(
                request, replace(call, sampling=sampling, extras=extras), pending
            )

        try:
            async with trio.open_nursery() as nursery:
                for index in range(call.n):
                    nursery.start_soon(sample, index)
        except* RouterError as group:
            raise group.exceptions[0] from None  # one sample's own error, not a group
        done = [f for f in fetched if f is not None]
        for answer, worker, _ in done:
            self.cache.insert_answer(replace(pending, chunks=[]), answer, worker)
        return [result for _, _, result in done]

    async def generate_stream(
        self, request: ProxyRequest, call: Call, pending: Pending, *, record: bool = True
    ) -> AsyncGenerator[str | Generated, None]:
        """Text deltas as the worker streams them, then the recorded result."""
        from .proxy import open_exchange

        body = self._generate_body(call, pending, stream=True)
        upstream = self.upstream_request(request, "/generate", body, pending)
        sent = ""
        answer: dict[str, Any] | None = None
        async with open_exchange(self.router, upstream) as response:
            if response.status != 200:
                raw = b"".join([c async for c in response])
                raise worker_error(response.status, raw)
            events = SSEEvents()
            async for data in response:
                for event in events.feed(data):
                    if event == b"[DONE]":
                        continue
                    answer = stream_event(event)
                    text = answer.get("text", "")
                    if isinstance(text, str) and text.startswith(sent) and len(text) > len(sent):
                        delta, sent = text[len(sent) :], text
                        yield delta
            worker = response.url
        if answer is None:
            raise UpstreamProtocolError("worker ended the stream without an answer")
        result = _generated(answer, len(pending.prompt.ids), worker)
        if result.text.startswith(sent) and len(result.text) > len(sent):
            yield result.text[len(sent) :]
        if record:
            self.cache.insert_answer(replace(pending, chunks=[]), answer, worker)
        yield result


async def as_chunks(answer: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
    """A complete chat.completion as the chunk stream a streaming client expects."""
    base = {
        "id": answer.get("id", completion_id("chatcmpl")),
        "object": "chat.completion.chunk",
        "created": answer.get("created", int(time.time())),
        "model": answer.get("model"),
    }
    for choice in answer.get("choices", []):
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        delta: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
        if message.get("tool_calls"):
            delta["tool_calls"] = [
                {"index": i, **call} for i, call in enumerate(message["tool_calls"])
            ]
        yield sse({**base, "choices": [{"index": index, "delta": delta, "finish_reason": None}]})
        last = {"index": index, "delta": {}, "finish_reason": choice.get("finish_reason")}
        if "meta_info" in choice:
            last["meta_info"] = choice["meta_info"]
        yield sse({**base, "choices": [last]})
    if include_usage and answer.get("usage"):
        yield sse({**base, "choices": [], "usage": answer["usage"]})
    yield b"data: [DONE]\n\n"


def usage_counts(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def usage_of(result: Generated) -> dict[str, int]:
    counted = result.meta.get("completion_tokens")
    completion = len(result.ids) or (counted if isinstance(counted, int) else 0)
    return usage_counts(result.prompt_tokens, completion)


def worker_answer(fetched: Fetched) -> Any:
    """The JSON of a worker's 200 answer; any other status or a garbled body is an error."""
    if fetched.status != 200:
        raise worker_error(fetched.status, fetched.body)
    try:
        return orjson.loads(fetched.body)
    except orjson.JSONDecodeError as exc:
        raise UpstreamProtocolError(f"worker sent invalid JSON: {exc}") from None


def stream_event(event: bytes) -> dict[str, Any]:
    """One event of a worker's ``/generate`` stream; an error event (SGLang reports a
    request it refuses after answering 200 as ``{"error": {...}}``) is raised as such."""
    try:
        data = orjson.loads(event)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise UpstreamProtocolError("worker sent a malformed event")
    if "error" in data:
        error = data["error"]
        code = error.get("code") if isinstance(error, dict) else None
        status = code if type(code) is int and 400 <= code < 600 else 502
        raise worker_error(status, event)
    return data


def worker_error(status: int, raw: bytes) -> RouterError:
    message = raw[:500].decode("utf-8", "replace")
    try:
        data = orjson.loads(raw)
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            message = str(error.get("message", message))
        elif isinstance(error, str):  # SGLang's schema errors: {"error": "unknown field ..."}
            message = error
    except orjson.JSONDecodeError:
        pass
    if 400 <= status < 500:
        error = BadRequest(f"worker refused the request: {message}")
        error.status = status
        return error
    return UpstreamError(f"worker failed with {status}: {message}")


def generated_choice(answer: Any, prompt_tokens: int, worker: str | None) -> Generated:
    """The first choice of a worker's chat answer (with its meta_info), checked."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise UpstreamProtocolError("worker chat answer has no choices")
    choice = choices[0]
    message = choice.get("message")
    message = message if isinstance(message, dict) else {}
    reason = str(choice.get("finish_reason"))
    result = _generated(
        {
            "text": message.get("content") or "",
            "meta_info": {
                **(choice.get("meta_info") or {}),
                "finish_reason": {"type": "stop" if reason == "tool_calls" else reason},
            },
        },
        prompt_tokens,
        worker,
    )
    result.meta["message"] = message
    return result


def _output_ids(answer: dict[str, Any]) -> list[int]:
    """``output_ids`` of a worker answer, when it is a list of token ids."""
    ids = answer.get("output_ids")
    if isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return ids
    return []


def _generated(answer: Any, prompt_tokens: int, worker: str | None) -> Generated:
    if not isinstance(answer, dict):
        raise UpstreamProtocolError("worker answer is not a JSON object")
    meta = answer.get("meta_info")
    if not isinstance(meta, dict):
        raise UpstreamProtocolError("worker answer has no meta_info")
    pairs = meta.get("output_token_logprobs") or []
    try:
        ids = [int(p[1]) for p in pairs]
        logps = [float(p[0]) for p in pairs]
    except (TypeError, ValueError, IndexError, KeyError):
        raise UpstreamProtocolError("worker sent malformed output_token_logprobs") from None
    if not ids:  # no logprobs came: the ids are still the answer's own
        ids = _output_ids(answer)
        logps = [0.0] * len(ids)
    finish = meta.get("finish_reason")
    kind = finish.get("type", "stop") if isinstance(finish, dict) else "stop"
    return Generated(
        text=str(answer.get("text", "")),
        ids=ids,
        logps=logps,
        finish=str(kind),
        prompt_tokens=prompt_tokens,
        meta={**meta, "output_ids": ids},
        worker=worker,
    )
