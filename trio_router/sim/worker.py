"""A simulated SGLang worker: a raw ASGI 3 app speaking SGLang's HTTP wire format.

Deterministic (see ``generation``), cheap per request, all time through trio (so
``MockClock`` works), with runtime fault knobs for tests of the router's failure paths.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import socket
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final

import hypercorn.config
import hypercorn.trio
import orjson
import trio

from ..config import option
from .generation import Decoder, Finish, Vocab, routed_experts, vocab_from_tokenizer
from .kvcache import PrefixCache
from .tokenizer import ByteTokenizer, TokenizerLike

__all__ = [
    "Faults",
    "SimStats",
    "SimWorker",
    "SimWorkerConfig",
    "SimWorkerHandle",
    "serve_sim_worker",
]

Scope = Mapping[str, Any]
Message = Mapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

DEFAULT_MAX_NEW_TOKENS: Final = 128
DEFAULT_COMPLETION_MAX_TOKENS: Final = 16  # OpenAI's default for /v1/completions
MAX_BODY_BYTES: Final = 64 * 1024 * 1024
TOOL_ARGUMENTS: Final = '{"city": "Paris"}'

_CT_JSON: Final = (b"content-type", b"application/json")
_CT_TEXT: Final = (b"content-type", b"text/plain; charset=utf-8")
_SSE_START: Final[dict[str, Any]] = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
}
_DONE: Final = b"data: [DONE]\n\n"
_VERSION_RE: Final = re.compile(r"^(.*?)(\d+)$")
_LOG: Final = logging.getLogger("trio_router.sim")


@dataclass(frozen=True, slots=True)
class SimWorkerConfig:
    """Static settings of one simulated worker."""

    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(0, "port to listen on (0 picks a free one)")
    weight_version: str = option("v0", "weight_version reported in responses")
    latency_per_token_ms: float = option(0.0, "simulated time per generated token, in ms")
    model_path: str = option("trio-router/sim", "model path reported by /get_model_info")
    seed: int = option(0, "seed of the deterministic generator")
    tokenizer: str = option(
        "qwen3", "qwen3 (the shipped tokenizer), bytes (built in, tiny), or a tokenizer directory"
    )

    def problems(self) -> list[str]:
        found = []
        if not 0 <= self.port <= 65535:
            found.append(f"port must be 0..65535, not {self.port}")
        if self.latency_per_token_ms < 0:
            found.append("latency_per_token_ms must be >= 0")
        return found


@dataclass(slots=True)
class Faults:
    """Runtime fault knobs; mutate directly or ``POST /sim/faults``."""

    fail_status: int | None = None
    """Answer /generate and /v1/* with this status and a JSON error."""
    hang: bool = False
    """Generation endpoints never answer (until cancelled or aborted)."""
    health_status: int = 200
    health_delay_s: float = 0.0
    abort_after_tokens: int | None = None
    """Stop generation after this many tokens with finish_reason abort."""
    drop_after_events: int | None = None
    """Streams: drop the connection (no ``[DONE]``) after this many SSE events."""
    truncate_json: bool = False
    """Non-streaming generation answers are cut in half (content-length matches the cut)."""

    def update(self, changes: Mapping[str, Any]) -> None:
        """Merge validated ``changes``; the key ``reset: true`` first restores defaults."""
        types = _FAULT_TYPES
        for key, value in changes.items():
            if key == "reset":
                continue
            if key not in types:
                raise ValueError(f"unknown fault {key!r}")
            ok, nullable = types[key]
            if not (
                (value is None and nullable)
                or (isinstance(value, ok) and not (isinstance(value, bool) and ok is not bool))
            ):
                raise ValueError(f"bad value for fault {key!r}: {value!r}")
        if changes.get("reset") is True:
            for f in fields(self):
                setattr(self, f.name, f.default)
        for key, value in changes.items():
            if key != "reset":
                setattr(self, key, float(value) if key == "health_delay_s" else value)

    def to_json(self) -> dict[str, Any]:
        """The knobs as a JSON-able dict."""
        return asdict(self)


_FAULT_TYPES: Final[dict[str, tuple[type | tuple[type, ...], bool]]] = {
    "fail_status": (int, True),
    "hang": (bool, False),
    "health_status": (int, False),
    "health_delay_s": ((int, float), False),
    "abort_after_tokens": (int, True),
    "drop_after_events": (int, True),
    "truncate_json": (bool, False),
}


@dataclass(slots=True)
class SimStats:
    """Counters exposed at ``GET /sim/stats``."""

    requests: Counter[str] = field(default_factory=Counter)
    active: int = 0
    """Generation requests in progress."""
    cancelled: int = 0
    """Generations whose handler was cancelled (client went away, server killed)."""
    completed: int = 0
    """Generations whose handler ran to its end (whatever the finish reason)."""
    prompt_tokens: int = 0
    """Prompt tokens of /generate requests."""
    cached_tokens: int = 0
    """Of those, tokens whose KV the simulated prefix cache already held."""

    def to_json(self) -> dict[str, Any]:
        """The counters as a JSON-able dict."""
        return {
            "requests": dict(self.requests),
            "active": self.active,
            "cancelled": self.cancelled,
            "completed": self.completed,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
        }


class _HTTPError(Exception):
    """A client error, answered as JSON before the response has started."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


class _Dropped(Exception):
    """Raised inside a stream to simulate a dropped connection."""


def _error_body(status: int, message: str, kind: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "code": status}})


@dataclass(slots=True)
class _Params:
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True


class _Job:
    """One generation in flight: decoder state, text bookkeeping and abort plumbing."""

    __slots__ = (
        "_checked",
        "_frozen",
        "_lp",
        "_text",
        "_text_n",
        "abort_message",
        "cached_tokens",
        "dec",
        "disconnected",
        "prompt_ids",
        "responded",
        "return_logprob",
        "return_routed_experts",
        "rid",
        "skip_special",
        "start",
        "stops",
        "tokenizer",
        "wait_scope",
    )

    def __init__(
        self,
        rid: str,
        prompt_ids: list[int],
        params: _Params,
        worker: SimWorker,
        *,
        return_logprob: bool = False,
        return_routed_experts: bool = False,
    ) -> None:
        self.rid = rid
        self.prompt_ids = prompt_ids
        self.cached_tokens = 0
        self.dec = Decoder(
            prompt_ids,
            params.max_new_tokens,
            worker.vocab,
            stop_token_ids=params.stop_token_ids,
            ignore_eos=params.ignore_eos,
            seed=worker.config.seed,
        )
        self.stops = params.stop
        self.skip_special = params.skip_special_tokens
        self.tokenizer = worker.tokenizer
        self.return_logprob = return_logprob
        self.return_routed_experts = return_routed_experts
        self.start = trio.current_time()
        self.abort_message: str | None = None
        self.wait_scope: trio.CancelScope | None = None
        self.disconnected = False
        self.responded = False
        self._text = ""
        self._text_n = 0
        self._frozen = False
        self._checked = 0
        self._lp: list[list[Any]] = []

    @property
    def finish(self) -> Finish | None:
        return self.dec.finish

    def text(self) -> str:
        """Decoded output so far, trimmed at a matched stop string."""
        ids = self.dec.output_ids
        if not self._frozen and self._text_n != len(ids):
            self._text = self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)
            self._text_n = len(ids)
        return self._text

    def check_stops(self) -> None:
        """Finish on the earliest stop string in the newly decoded text, trimming it."""
        finish = self.dec.finish
        if self._frozen or (finish is not None and finish.type != "length"):
            return
        text = self.text()
        best: tuple[int, str] | None = None
        for stop in self.stops:
            i = text.find(stop, max(0, self._checked - len(stop) + 1))
            if i != -1 and (best is None or i < best[0]):
                best = (i, stop)
        self._checked = len(text)
        if best is not None:
            self._text = text[: best[0]]
            self._frozen = True
            self.dec.finish_with(Finish("stop", matched=best[1]))

    def logprob_entries(self) -> list[list[Any]]:
        """SGLang's ``output_token_logprobs``: ``[[logprob, token_id, None], ...]``."""
        lp, ids, logprobs = self._lp, self.dec.output_ids, self.dec.logprobs
        for i in range(len(lp), len(ids)):
            lp.append([logprobs[i], ids[i], None])
        return lp

    def abort(self, message: str) -> None:
        """Ask the generation loop to stop with finish_reason abort."""
        if self.dec.finish is None and self.abort_message is None:
            self.abort_message = message
            if self.wait_scope is not None:
                self.wait_scope.cancel()


class _SSE:
    """Sends SSE events, honouring ``drop_after_events``."""

    __slots__ = ("left", "send")

    def __init__(self, send: Send, drop_after: int | None) -> None:
        self.send = send
        self.left = drop_after

    async def start(self) -> None:
        await self.send(_SSE_START)

    async def event(self, data: bytes) -> None:
        if self.left is not None:
            if self.left <= 0:
                raise _Dropped
            self.left -= 1
        await self.send(
            {"type": "http.response.body", "body": b"data: " + data + b"\n\n", "more_body": True}
        )

    async def done(self, job: _Job) -> None:
        if self.left is not None and self.left <= 0:
            raise _Dropped
        job.responded = True
        await self.send({"type": "http.response.body", "body": _DONE, "more_body": False})


# ---------------------------------------------------------------- request parsing


def _bad(message: str) -> _HTTPError:
    return _HTTPError(400, message)


def _get_bool(d: Mapping[str, Any], key: str, default: bool) -> bool:
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(f"{key} must be a boolean")
    return v


def _get_int(d: Mapping[str, Any], key: str) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool):
        raise _bad(f"{key} must be an integer")
    return v


def _get_str(d: Mapping[str, Any], key: str) -> str | None:
    v = d.get(key)
    if v is not None and not isinstance(v, str):
        raise _bad(f"{key} must be a string")
    return v


def _id_list(v: object, key: str, vocab_size: int) -> list[int]:
    if not isinstance(v, list) or not all(type(i) is int for i in v):
        if isinstance(v, list) and v and isinstance(v[0], list):
            raise _bad("batch not supported by the simulator")
        raise _bad(f"{key} must be a list of integers")
    if v and (min(v) < 0 or max(v) >= vocab_size):
        raise _bad(f"{key} contains a token id outside [0, {vocab_size})")
    return v


def _sampling(d: Mapping[str, Any], max_key: Sequence[str], default_max: int) -> _Params:
    max_new: int | None = None
    for key in max_key:
        max_new = _get_int(d, key)
        if max_new is not None:
            break
    if max_new is None:
        max_new = default_max
    if max_new < 0:
        raise _bad(f"{max_key[0]} must be >= 0")
    stop = d.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(s for s in stop if s)
    else:
        raise _bad("stop must be a string or a list of strings")
    stop_ids = d.get("stop_token_ids")
    if stop_ids is not None and (
        not isinstance(stop_ids, list) or not all(type(i) is int for i in stop_ids)
    ):
        raise _bad("stop_token_ids must be a list of integers")
    return _Params(
        max_new_tokens=max_new,
        stop=stops,
        stop_token_ids=tuple(stop_ids or ()),
        ignore_eos=_get_bool(d, "ignore_eos", False),
        skip_special_tokens=_get_bool(d, "skip_special_tokens", True),
    )


def _content_text(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if not isinstance(part, dict):
                raise _bad("message content parts must be objects")
            text = part.get("text")
            if part.get("type") == "text" and isinstance(text, str):
                parts.append(text)
        return "".join(parts)
    raise _bad("message content must be a string, a list of parts, or null")


def _finish_reason(finish: Finish | None) -> str | None:
    return None if finish is None else finish.type


def _matched_stop(finish: Finish | None) -> int | str | None:
    return finish.matched if finish is not None and finish.type == "stop" else None


def _bump_version(version: str) -> str:
    m = _VERSION_RE.match(version)
    if m is None:
        return version + "1"
    return f"{m.group(1)}{int(m.group(2)) + 1}"


def _stream_options_usage(body: Mapping[str, Any]) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise _bad("stream_options must be an object")
    return _get_bool(opts, "include_usage", False)


def _check_n(body: Mapping[str, Any]) -> None:
    n = _get_int(body, "n")
    if n is not None and n != 1:
        raise _bad("only n=1 is supported by the simulator")


# ---------------------------------------------------------------- the app

_Handler = Callable[[Receive, Send, bytes], Awaitable[None]]


class SimWorker:
    """The ASGI 3 application of one simulated SGLang worker."""

    def __init__(
        self,
        config: SimWorkerConfig | None = None,
        tokenizer: TokenizerLike | None = None,
        faults: Faults | None = None,
    ) -> None:
        self.config = config if config is not None else SimWorkerConfig()
        self.tokenizer: TokenizerLike = tokenizer if tokenizer is not None else ByteTokenizer()
        self.faults = faults if faults is not None else Faults()
        self.stats = SimStats()
        self.vocab: Vocab = vocab_from_tokenizer(self.tokenizer)
        self.weight_version = self.config.weight_version
        self.weights_path = self.config.model_path
        self.url: str | None = None
        """Set by ``serve_sim_worker`` once bound."""
        self._latency_s = self.config.latency_per_token_ms / 1000.0
        self.prefix_cache = PrefixCache()
        self._jobs: dict[str, _Job] = {}
        self._pieces: dict[int, str] = {}
        self._wall_offset: float | None = None
        r = self._routes = dict[str, tuple[frozenset[str], bool, _Handler]]()
        post, get, both = frozenset({"POST"}), frozenset({"GET"}), frozenset({"GET", "POST"})
        r["/generate"] = (frozenset({"POST", "PUT"}), True, self._generate)
        r["/v1/chat/completions"] = (post, True, self._chat)
        r["/v1/completions"] = (post, True, self._completions)
        r["/v1/models"] = (get, True, self._models)
        r["/health"] = (get, False, self._health)
        r["/health_generate"] = (get, False, self._health_generate)
        r["/get_model_info"] = r["/model_info"] = (get, False, self._model_info)
        r["/get_server_info"] = r["/server_info"] = (get, False, self._server_info)
        r["/flush_cache"] = (both, False, self._flush_cache)
        r["/abort_request"] = (post, False, self._abort_request)
        r["/update_weights_from_disk"] = (post, False, self._update_weights)
        r["/get_weight_version"] = (get, False, self._get_weight_version)
        r["/sim/faults"] = (both, False, self._sim_faults)
        r["/sim/stats"] = (get, False, self._sim_stats)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    # ------------------------------------------------------------ plumbing

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        self.stats.requests[path] += 1
        route = self._routes.get(path)
        if route is None:
            await _send_error(send, _HTTPError(404, f"no route for {path}", "not_found_error"))
            return
        methods, faultable, handler = route
        if scope["method"] not in methods:
            err = _HTTPError(405, f"method {scope['method']} not allowed for {path}")
            await _send_error(send, err)
            return
        try:
            body = await _read_body(receive)
            if body is None:  # client went away while sending the request
                return
            if faultable and self.faults.fail_status is not None:
                status = self.faults.fail_status
                raise _HTTPError(status, "simulated failure", "sim_fault")
            if body and not _is_json(scope.get("headers", ())):
                await _send_bytes(send, 400, _NOT_JSON)
                return
            await handler(receive, send, body)
        except _HTTPError as err:
            await _send_error(send, err)

    def _created(self) -> int:
        now = trio.current_time()
        if self._wall_offset is None:
            self._wall_offset = time.time() - now
        return int(self._wall_offset + now)

    def _piece(self, token_id: int) -> str:
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._pieces[token_id] = piece
        return piece

    def _encode(self, text: str) -> list[int]:
        try:
            return self.tokenizer.encode(text)
        except (UnicodeError, ValueError) as exc:
            raise _bad(f"cannot tokenize prompt: {exc}") from None

    async def _send_json_result(self, send: Send, job: _Job, payload: object) -> None:
        body = orjson.dumps(payload)
        if self.faults.truncate_json:
            body = body[: len(body) // 2]
        job.responded = True
        await _send_bytes(send, 200, body)

    async def _wait(self, job: _Job, seconds: float | None) -> None:
        """Sleep (forever if ``seconds`` is None), returning early if the job is aborted."""
        if job.abort_message is not None:
            return
        with trio.CancelScope() as scope:
            job.wait_scope = scope
            if seconds is None:
                await trio.sleep_forever()
            else:
                await trio.sleep(seconds)
        job.wait_scope = None

    async def _decode(self, job: _Job, on_token: Callable[[], Awaitable[None]] | None) -> None:
        """Run the token loop until a finish reason is set, calling ``on_token`` per token."""
        dec = job.dec
        latency = self._latency_s
        faults = self.faults
        while dec.finish is None:
            limit = faults.abort_after_tokens
            if limit is not None and len(dec.output_ids) >= limit:
                job.abort(f"simulated abort after {limit} tokens")
            if latency > 0:
                await self._wait(job, latency)
            elif len(dec.output_ids) & 63 == 63:
                await trio.lowlevel.checkpoint()
            if job.abort_message is not None:
                dec.finish_with(Finish("abort", message=job.abort_message))
                break
            dec.step()
            if job.stops:
                job.check_stops()
            if on_token is not None:
                await on_token()

    async def _run_job(
        self, receive: Receive, job: _Job, respond: Callable[[_Job], Awaitable[None]]
    ) -> None:
        """Register ``job``, watch for client disconnect, run ``respond`` and count it."""
        if job.rid in self._jobs:
            raise _bad(f"duplicate request id {job.rid}")
        self._jobs[job.rid] = job
        stats = self.stats
        stats.active += 1
        completed = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_disconnect, receive, nursery.cancel_scope, job)
                if self.faults.hang:
                    await self._wait(job, None)
                await respond(job)
                nursery.cancel_scope.cancel()
            completed = not job.disconnected
        finally:
            stats.active -= 1
            del self._jobs[job.rid]
            if completed:
                stats.completed += 1
            else:
                stats.cancelled += 1

    # ------------------------------------------------------------ /generate

    async def _generate(self, receive: Receive, send: Send, raw: bytes) -> None:
        body = _parse_object(raw)
        text, input_ids = body.get("text"), body.get("input_ids")
        if (text is None) == (input_ids is None):
            raise _bad("exactly one of text and input_ids is required")
        if text is not None:
            if isinstance(text, list):
                raise _bad("batch not supported by the simulator")
            if not isinstance(text, str):
                raise _bad("text must be a string")
            prompt = self._encode(text)
        else:
            prompt = _id_list(input_ids, "input_ids", self.tokenizer.vocab_size)
        sp = body.get("sampling_params") or {}
        if not isinstance(sp, dict):
            raise _bad("sampling_params must be an object")
        rid = body.get("rid")
        if isinstance(rid, list):
            raise _bad("batch not supported by the simulator")
        if rid is not None and not isinstance(rid, str):
            raise _bad("rid must be a string")
        job = _Job(
            rid or uuid.uuid4().hex,
            prompt,
            _sampling(sp, ("max_new_tokens",), DEFAULT_MAX_NEW_TOKENS),
            self,
            return_logprob=_get_bool(body, "return_logprob", False),
            return_routed_experts=_get_bool(body, "return_routed_experts", False),
        )
        extra_key = body.get("extra_key") or ""
        if not isinstance(extra_key, str):
            raise _bad("extra_key must be a string")
        job.cached_tokens = self.prefix_cache.lookup(prompt, extra_key)
        self.stats.prompt_tokens += len(prompt)
        self.stats.cached_tokens += job.cached_tokens
        self.prefix_cache.insert(prompt, extra_key)
        try:
            if _get_bool(body, "stream", False):
                await self._run_job(receive, job, lambda j: self._generate_stream(send, j))
            else:
                await self._run_job(receive, job, lambda j: self._generate_once(send, j))
        finally:
            self.prefix_cache.insert(prompt + job.dec.output_ids, extra_key)

    def _generate_payload(self, job: _Job) -> dict[str, Any]:
        dec = job.dec
        finish = dec.finish
        meta: dict[str, Any] = {
            "id": job.rid,
            "finish_reason": None if finish is None else finish.to_json(),
            "prompt_tokens": len(job.prompt_ids),
            "completion_tokens": len(dec.output_ids),
            "cached_tokens": job.cached_tokens,
            "weight_version": self.weight_version,
            "e2e_latency": trio.current_time() - job.start,
        }
        if job.return_logprob:
            meta["output_token_logprobs"] = job.logprob_entries()
        if job.return_routed_experts and finish is not None:
            experts = routed_experts(job.prompt_ids + dec.output_ids)
            meta["routed_experts"] = base64.b64encode(experts).decode("ascii")
        return {"text": job.text(), "output_ids": dec.output_ids, "meta_info": meta}

    async def _generate_once(self, send: Send, job: _Job) -> None:
        await self._decode(job, None)
        await self._send_json_result(send, job, self._generate_payload(job))

    async def _generate_stream(self, send: Send, job: _Job) -> None:
        sse = _SSE(send, self.faults.drop_after_events)
        await sse.start()
        sent_final = False

        async def on_token() -> None:
            nonlocal sent_final
            await sse.event(orjson.dumps(self._generate_payload(job)))
            sent_final = job.finish is not None

        try:
            await self._decode(job, on_token)
            if not sent_final:
                await sse.event(orjson.dumps(self._generate_payload(job)))
            await sse.done(job)
        except _Dropped:
            return

    # ------------------------------------------------------------ OpenAI endpoints

    def _openai_meta(self, job: _Job) -> dict[str, Any]:
        finish = job.finish
        return {
            "id": job.rid,
            "finish_reason": None if finish is None else finish.to_json(),
            "prompt_tokens": len(job.prompt_ids),
            "completion_tokens": len(job.dec.output_ids),
            "cached_tokens": 0,
            "weight_version": self.weight_version,
            "e2e_latency": trio.current_time() - job.start,
            "output_ids": job.dec.output_ids,
            "output_token_logprobs": job.logprob_entries(),
        }

    @staticmethod
    def _usage(job: _Job) -> dict[str, int]:
        p, c = len(job.prompt_ids), len(job.dec.output_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _chat_logprob(self, i: int, job: _Job) -> dict[str, Any]:
        return {
            "token": self._piece(job.dec.output_ids[i]),
            "logprob": job.dec.logprobs[i],
            "bytes": None,
            "top_logprobs": [],
        }

    def _openai_job(self, body: dict[str, Any], prompt: list[int], default_max: int) -> _Job:
        _check_n(body)
        rid = _get_str(body, "rid")
        params = _sampling(body, ("max_completion_tokens", "max_tokens"), default_max)
        return _Job(rid or uuid.uuid4().hex, prompt, params, self)

    async def _chat(self, receive: Receive, send: Send, raw: bytes) -> None:
        body = _parse_object(raw)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("messages must be a non-empty list")
        rendered: list[str] = []
        last_user = ""
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _bad("each message must be an object with a string role")
            content = _content_text(m.get("content"))
            if m["role"] == "user":
                last_user = content
            rendered.append(f"<|im_start|>{m['role']}\n{content}<|im_end|>\n")
        tool_name: str | None = None
        tools = body.get("tools")
        if tools:
            if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
                raise _bad("tools must be a list of objects")
            fn = tools[0].get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise _bad("tools[0].function.name must be a string")
            if body.get("tool_choice") != "none" and "weather" in last_user.lower():
                tool_name = fn["name"]
        if body.get("input_ids") is not None:
            prompt = _id_list(body["input_ids"], "input_ids", self.tokenizer.vocab_size)
        else:
            prompt = self._encode("".join(rendered) + "<|im_start|>assistant\n")
        job = self._openai_job(body, prompt, DEFAULT_MAX_NEW_TOKENS)
        model = body.get("model") if isinstance(body.get("model"), str) else None
        chat = _ChatCtx(
            model=model or self.config.model_path,
            logprobs=_get_bool(body, "logprobs", False),
            tool_name=tool_name,
            include_usage=_stream_options_usage(body),
        )
        if _get_bool(body, "stream", False):
            await self._run_job(receive, job, lambda j: self._chat_stream(send, j, chat))
        else:
            await self._run_job(receive, job, lambda j: self._chat_once(send, j, chat))

    def _tool_calls(self, job: _Job, name: str) -> list[dict[str, Any]]:
        call_id = "call_" + job.rid[:24]
        fn = {"name": name, "arguments": TOOL_ARGUMENTS}
        return [{"id": call_id, "index": 0, "type": "function", "function": fn}]

    def _chat_finish(self, job: _Job, chat: _ChatCtx) -> str | None:
        reason = _finish_reason(job.finish)
        if chat.tool_name is not None and reason in ("stop", "length"):
            return "tool_calls"
        return reason

    async def _chat_once(self, send: Send, job: _Job, chat: _ChatCtx) -> None:
        await self._decode(job, None)
        message: dict[str, Any] = {"role": "assistant", "content": job.text()}
        if chat.tool_name is not None:
            message["content"] = None
            message["tool_calls"] = self._tool_calls(job, chat.tool_name)
        logprobs = None
        if chat.logprobs:
            n = len(job.dec.output_ids)
            logprobs = {"content": [self._chat_logprob(i, job) for i in range(n)]}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": self._chat_finish(job, chat),
            "matched_stop": _matched_stop(job.finish),
            "meta_info": self._openai_meta(job),
        }
        payload = {
            "id": "chatcmpl-" + job.rid,
            "object": "chat.completion",
            "created": self._created(),
            "model": chat.model,
            "choices": [choice],
            "usage": self._usage(job),
        }
        await self._send_json_result(send, job, payload)

    async def _chat_stream(self, send: Send, job: _Job, chat: _ChatCtx) -> None:
        sse = _SSE(send, self.faults.drop_after_events)
        head = {
            "id": "chatcmpl-" + job.rid,
            "object": "chat.completion.chunk",
            "created": self._created(),
            "model": chat.model,
        }
        sent = 0

        def chunk(delta: dict[str, Any], logprobs: object = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None}
            return orjson.dumps({**head, "choices": [choice]})

        async def on_token() -> None:
            nonlocal sent
            if chat.tool_name is not None:
                return
            text = job.text()
            piece, sent = text[sent:], max(sent, len(text))
            lp = None
            if chat.logprobs:
                lp = {"content": [self._chat_logprob(len(job.dec.output_ids) - 1, job)]}
            await sse.event(chunk({"content": piece}, lp))

        try:
            await sse.start()
            await sse.event(chunk({"role": "assistant"}))
            await self._decode(job, on_token)
            if chat.tool_name is not None:
                await sse.event(chunk({"tool_calls": self._tool_calls(job, chat.tool_name)}))
            final = {
                "index": 0,
                "delta": {},
                "logprobs": None,
                "finish_reason": self._chat_finish(job, chat),
                "matched_stop": _matched_stop(job.finish),
                "meta_info": self._openai_meta(job),
            }
            await sse.event(orjson.dumps({**head, "choices": [final]}))
            if chat.include_usage:
                await sse.event(orjson.dumps({**head, "choices": [], "usage": self._usage(job)}))
            await sse.done(job)
        except _Dropped:
            return

    async def _completions(self, receive: Receive, send: Send, raw: bytes) -> None:
        body = _parse_object(raw)
        prompt_in = body.get("prompt")
        if isinstance(prompt_in, str):
            prompt = self._encode(prompt_in)
        elif isinstance(prompt_in, list) and prompt_in and isinstance(prompt_in[0], str):
            raise _bad("batch not supported by the simulator")
        elif isinstance(prompt_in, list):
            prompt = _id_list(prompt_in, "prompt", self.tokenizer.vocab_size)
        else:
            raise _bad("prompt must be a string or a list of token ids")
        job = self._openai_job(body, prompt, DEFAULT_COMPLETION_MAX_TOKENS)
        lp_opt = body.get("logprobs")
        model = body.get("model") if isinstance(body.get("model"), str) else None
        ctx = _ChatCtx(
            model=model or self.config.model_path,
            logprobs=lp_opt is not None and lp_opt is not False,
            tool_name=None,
            include_usage=_stream_options_usage(body),
        )
        if _get_bool(body, "stream", False):
            await self._run_job(receive, job, lambda j: self._completion_stream(send, j, ctx))
        else:
            await self._run_job(receive, job, lambda j: self._completion_once(send, j, ctx))

    def _completion_logprobs(self, job: _Job, lo: int, offset: int) -> dict[str, Any]:
        tokens: list[str] = []
        offsets: list[int] = []
        for tid in job.dec.output_ids[lo:]:
            tokens.append(self._piece(tid))
            offsets.append(offset)
            offset += len(tokens[-1])
        return {
            "tokens": tokens,
            "token_logprobs": job.dec.logprobs[lo:],
            "top_logprobs": [None] * len(tokens),
            "text_offset": offsets,
        }

    async def _completion_once(self, send: Send, job: _Job, ctx: _ChatCtx) -> None:
        await self._decode(job, None)
        choice = {
            "index": 0,
            "text": job.text(),
            "logprobs": self._completion_logprobs(job, 0, 0) if ctx.logprobs else None,
            "finish_reason": _finish_reason(job.finish),
            "matched_stop": _matched_stop(job.finish),
            "meta_info": self._openai_meta(job),
        }
        payload = {
            "id": "cmpl-" + job.rid,
            "object": "text_completion",
            "created": self._created(),
            "model": ctx.model,
            "choices": [choice],
            "usage": self._usage(job),
        }
        await self._send_json_result(send, job, payload)

    async def _completion_stream(self, send: Send, job: _Job, ctx: _ChatCtx) -> None:
        sse = _SSE(send, self.faults.drop_after_events)
        head = {
            "id": "cmpl-" + job.rid,
            "object": "text_completion",
            "created": self._created(),
            "model": ctx.model,
        }
        sent = 0

        async def on_token() -> None:
            nonlocal sent
            text = job.text()
            n = len(job.dec.output_ids)
            lp = self._completion_logprobs(job, n - 1, sent) if ctx.logprobs else None
            piece, sent = text[sent:], max(sent, len(text))
            choice = {"index": 0, "text": piece, "logprobs": lp, "finish_reason": None}
            await sse.event(orjson.dumps({**head, "choices": [choice]}))

        try:
            await sse.start()
            await self._decode(job, on_token)
            final = {
                "index": 0,
                "text": "",
                "logprobs": None,
                "finish_reason": _finish_reason(job.finish),
                "matched_stop": _matched_stop(job.finish),
                "meta_info": self._openai_meta(job),
            }
            await sse.event(orjson.dumps({**head, "choices": [final]}))
            if ctx.include_usage:
                await sse.event(orjson.dumps({**head, "choices": [], "usage": self._usage(job)}))
            await sse.done(job)
        except _Dropped:
            return

    async def _models(self, receive: Receive, send: Send, raw: bytes) -> None:
        path = self.config.model_path
        model = {"id": path, "object": "model", "created": 0, "owned_by": "sglang", "root": path}
        await _send_bytes(send, 200, orjson.dumps({"object": "list", "data": [model]}))

    # ------------------------------------------------------------ management endpoints

    async def _health(self, receive: Receive, send: Send, raw: bytes) -> None:
        faults = self.faults
        if faults.health_delay_s > 0:
            await trio.sleep(faults.health_delay_s)
        await _send_bytes(send, faults.health_status, b"", ())

    async def _health_generate(self, receive: Receive, send: Send, raw: bytes) -> None:
        faults = self.faults
        if faults.health_delay_s > 0:
            await trio.sleep(faults.health_delay_s)
        if faults.health_status == 200:
            if faults.hang:
                await trio.sleep_forever()
            if faults.fail_status is not None:
                await _send_bytes(send, 503, b"", ())
                return
            if self._latency_s > 0:
                await trio.sleep(self._latency_s)
            Decoder([0], 1, self.vocab, seed=self.config.seed).step()
        await _send_bytes(send, faults.health_status, b"", ())

    async def _model_info(self, receive: Receive, send: Send, raw: bytes) -> None:
        info = {
            "model_path": self.weights_path,
            "tokenizer_path": getattr(self.tokenizer, "name_or_path", self.config.model_path),
            "is_generation": True,
            "weight_version": self.weight_version,
        }
        await _send_bytes(send, 200, orjson.dumps(info))

    async def _server_info(self, receive: Receive, send: Send, raw: bytes) -> None:
        cfg = self.config
        info = {
            **asdict(cfg),
            "model_path": self.weights_path,
            "served_model_name": cfg.model_path,
            "tokenizer_path": getattr(self.tokenizer, "name_or_path", cfg.model_path),
            "weight_version": self.weight_version,
            "url": self.url,
            "vocab_size": self.tokenizer.vocab_size,
            "version": "sim",
        }
        await _send_bytes(send, 200, orjson.dumps(info))

    async def _flush_cache(self, receive: Receive, send: Send, raw: bytes) -> None:
        await _send_bytes(send, 200, b"Cache flushed.\n", (_CT_TEXT,))

    async def _abort_request(self, receive: Receive, send: Send, raw: bytes) -> None:
        body = _parse_object(raw)
        rid = _get_str(body, "rid")
        if _get_bool(body, "abort_all", False):
            for job in self._jobs.values():
                job.abort("aborted by /abort_request (abort_all)")
        elif rid is not None and rid in self._jobs:
            self._jobs[rid].abort("aborted by /abort_request")
        await _send_bytes(send, 200, b"", ())

    async def _update_weights(self, receive: Receive, send: Send, raw: bytes) -> None:
        body = _parse_object(raw)
        path = _get_str(body, "model_path")
        if not path:
            raise _bad("model_path is required")
        version = _get_str(body, "weight_version")
        self.weight_version = version or _bump_version(self.weight_version)
        self.weights_path = path
        result = {
            "success": True,
            "message": "Succeeded to update model weights.",
            "weight_version": self.weight_version,
            "num_paused_requests": 0,
        }
        await _send_bytes(send, 200, orjson.dumps(result))

    async def _get_weight_version(self, receive: Receive, send: Send, raw: bytes) -> None:
        await _send_bytes(send, 200, orjson.dumps({"weight_version": self.weight_version}))

    async def _sim_faults(self, receive: Receive, send: Send, raw: bytes) -> None:
        if raw.strip():
            try:
                self.faults.update(_parse_object(raw))
            except ValueError as exc:
                raise _bad(str(exc)) from None
        await _send_bytes(send, 200, orjson.dumps(self.faults.to_json()))

    async def _sim_stats(self, receive: Receive, send: Send, raw: bytes) -> None:
        await _send_bytes(send, 200, orjson.dumps(self.stats.to_json()))


@dataclass(frozen=True, slots=True)
class _ChatCtx:
    model: str
    logprobs: bool
    tool_name: str | None
    include_usage: bool


# ---------------------------------------------------------------- ASGI helpers


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client disconnected first."""
    message = await receive()
    if message["type"] != "http.request":
        return None
    if not message.get("more_body", False):
        body: bytes = message.get("body", b"")
        return body
    chunks = [message.get("body", b"")]
    size = len(chunks[0])
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_BODY_BYTES:
            raise _HTTPError(413, "request body too large")
        if not message.get("more_body", False):
            return b"".join(chunks)


#: SGLang 0.5.23's answer to a body not labelled ``application/json`` (curl's ``-d``).
_NOT_JSON: Final = orjson.dumps(
    {
        "object": "error",
        "message": "1 validation error: {'type': 'dataclass_type', 'loc': ('body',), "
        "'msg': 'Input should be a dictionary or an instance of GenerateReqInput'}",
        "type": "Bad Request",
        "param": None,
        "code": 400,
    }
)


def _is_json(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether the request says its body is JSON (``application/json``, parameters allowed)."""
    for name, value in headers:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


def _parse_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    return body


async def _send_bytes(
    send: Send,
    status: int,
    body: bytes,
    headers: tuple[tuple[bytes, bytes], ...] = (_CT_JSON,),
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_error(send: Send, err: _HTTPError) -> None:
    await _send_bytes(send, err.status, _error_body(err.status, err.message, err.kind))


async def _watch_disconnect(receive: Receive, scope: trio.CancelScope, job: _Job) -> None:
    """Cancel ``scope`` when the client goes away before the response is complete."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not job.responded:
                job.disconnected = True
                scope.cancel()
            return


# ---------------------------------------------------------------- serving


@dataclass(slots=True)
class SimWorkerHandle:
    """A running simulated worker, as given by ``nursery.start(serve_sim_worker, ...)``."""

    url: str
    app: SimWorker
    _scope: trio.CancelScope = field(repr=False)
    _sockets: list[socket.socket] = field(repr=False)

    @property
    def port(self) -> int:
        """The bound TCP port."""
        return int(self.url.rsplit(":", 1)[1])

    def kill(self) -> None:
        """Stop abruptly: new connections are refused at once, open ones drop."""
        self._scope.cancel()
        for sock in self._sockets:
            # a shut-down listening socket refuses connections before trio closes it
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Config(hypercorn.config.Config):
    """Hypercorn config that remembers the listening sockets it creates."""

    def __init__(self) -> None:
        super().__init__()
        self.created_sockets: list[socket.socket] = []

    def create_sockets(self) -> hypercorn.config.Sockets:
        sockets = super().create_sockets()
        self.created_sockets.extend(sockets.insecure_sockets)
        return sockets


async def serve_sim_worker(
    config: SimWorkerConfig | None = None,
    *,
    tokenizer: TokenizerLike | None = None,
    faults: Faults | None = None,
    task_status: trio.TaskStatus[SimWorkerHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a ``SimWorker`` with hypercorn until ``handle.kill()`` (or cancellation)."""
    config = config if config is not None else SimWorkerConfig()
    if tokenizer is None:
        tokenizer = await trio.to_thread.run_sync(resolve_tokenizer, config.tokenizer)
    app = SimWorker(config, tokenizer, faults)
    hc = _Config()
    host = f"[{config.host}]" if ":" in config.host else config.host
    hc.bind = [f"{host}:{config.port}"]
    hc.accesslog = None
    hc.errorlog = _LOG  # our own logger: hypercorn reconfigures its named ones globally
    hc.graceful_timeout = 0.1
    hc.keep_alive_timeout = 75
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(hypercorn.trio.serve, app, hc)
            app.url = binds[0]
            task_status.started(SimWorkerHandle(binds[0], app, scope, hc.created_sockets))


def resolve_tokenizer(name: str) -> TokenizerLike:
    """The tokenizer a worker config names: ``bytes``, ``qwen3`` or a directory."""
    if name == "bytes":
        return ByteTokenizer()
    from ..tokenizer import load_tokenizer

    return load_tokenizer(None if name == "qwen3" else name)


async def run_sim_worker_until_signalled(config: SimWorkerConfig) -> None:
    """Serve a simulated worker until SIGINT/SIGTERM (the ``trio-router worker`` command)."""
    import signal

    async with trio.open_nursery() as nursery:
        handle: SimWorkerHandle = await nursery.start(serve_sim_worker, config)
        print(f"simulated SGLang worker listening on {handle.url}", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
        handle.kill()
