"""A simulated SGLang worker: a raw ASGI 3 app speaking SGLang 0.5.23's HTTP wire format.

Deterministic (see ``generation``), cheap per request, all time through trio (so
``MockClock`` works), with runtime fault knobs for tests of the router's failure paths.
What it answers, and the few places it knowingly differs from SGLang, are in
docs/http-api.md (the simulated worker); ``tests/engine/test_differential.py`` compares it
with the real engine.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from typing import Any, Final

import hypercorn.config
import hypercorn.trio
import orjson
import trio

from ..config import option
from . import openai
from .asgi import (
    SSE,
    Dropped,
    is_json,
    not_json,
    parse_body,
    read_body,
    send_bytes,
    send_refusal,
    send_stream_refusal,
    sim_error,
)
from .contract import (
    Refusal,
    generate_contract_error,
    method_not_allowed,
    not_found,
    schema_error,
    validation_error,
    value_error,
    verify_sampling,
)
from .generation import Decoder, Finish, Vocab, vocab_from_tokenizer
from .job import Job, Params, Returns, sampling
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
Handler = Callable[[Receive, Send, bytes], Awaitable[None]]

ABORTED: Final = "Aborted"  # SGLang's message for a generation /abort_request stopped
FLUSHED: Final = (
    b"Cache flushed.\nPlease check backend logs for more details. (When there are running or "
    b"waiting requests, the operation will not be performed.)\n"
)

_LOG: Final = logging.getLogger("trio_router.sim")


@dataclass(frozen=True, slots=True)
class SimWorkerConfig:
    """Static settings of one simulated worker."""

    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(0, "port to listen on (0 picks a free one)")
    weight_version: str = option("v0", "weight_version reported in responses")
    latency_per_token_ms: float = option(0.0, "simulated time per generated token, in ms")
    model_path: str = option("trio-router/sim", "model path reported by /model_info")
    seed: int = option(0, "seed of the deterministic generator")
    tokenizer: str = option(
        "qwen3", "qwen3 (the shipped tokenizer), bytes (built in, tiny), or a tokenizer directory"
    )
    context_length: int = option(
        8192, "context length in tokens: longer prompts are refused as SGLang does"
    )
    health_seconds: float = option(
        0.0, "seconds /health and /health_generate take (real SGLang: 1 or more)"
    )
    startup_seconds: float = option(
        0.0, "seconds after start during which /health answers 503, as SGLang while starting"
    )

    def problems(self) -> list[str]:
        found = []
        if not 0 <= self.port <= 65535:
            found.append(f"port must be 0..65535, not {self.port}")
        if self.latency_per_token_ms < 0:
            found.append("latency_per_token_ms must be >= 0")
        if self.context_length < 1:
            found.append("context_length must be >= 1")
        if self.health_seconds < 0 or self.startup_seconds < 0:
            found.append("health_seconds and startup_seconds must be >= 0")
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


# ---------------------------------------------------------------- request parsing


def _id_or_ids(v: Any) -> bool:
    return type(v) is int or (isinstance(v, list) and all(type(i) is int for i in v))


def _pydantic_check(body: Mapping[str, Any]) -> None:
    """What pydantic refuses before SGLang's contract sees the body (the prompt fields)."""
    text, ids, sp = body.get("text"), body.get("input_ids"), body.get("sampling_params")
    wrong: list[dict[str, Any]] = []
    if text is not None and not (
        isinstance(text, str) or (isinstance(text, list) and all(isinstance(t, str) for t in text))
    ):
        wrong.append({"type": "string_type", "loc": ("body", "text"), "input": text})
    if ids is not None and not (isinstance(ids, list) and all(map(_id_or_ids, ids))):
        msg = "Value error, elements must be int or list"
        wrong.append({"type": "value_error", "loc": ("body", "input_ids"), "msg": msg})
    if sp is not None and not isinstance(sp, (dict, list)):
        wrong.append({"type": "dict_type", "loc": ("body", "sampling_params"), "input": sp})
    if wrong:
        raise validation_error(wrong)


def _is_batch(body: Mapping[str, Any]) -> bool:
    """Whether ``body`` uses one of SGLang's batch forms (lists of prompts, rids, ...)."""
    ids = body.get("input_ids")
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        return True
    keys = ("text", "rid", "sampling_params", "return_logprob", "logprob_start_len")
    return any(isinstance(body.get(k), list) for k in (*keys, "top_logprobs_num"))


# ---------------------------------------------------------------- the app


@dataclass(frozen=True, slots=True)
class _Route:
    methods: frozenset[str]
    handler: Handler
    faultable: bool = False
    """The ``fail_status`` fault applies."""
    json: bool = False
    """The body must be JSON (SGLang parses it into a request model)."""


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
        self.started_at: float | None = None
        """trio time the worker started (``startup_seconds`` count from it)."""
        self._latency_s = self.config.latency_per_token_ms / 1000.0
        self.prefix_cache = PrefixCache()
        self.jobs: dict[str, Job] = {}
        self._pieces: dict[int, str] = {}
        self._wall_offset: float | None = None
        get, post = frozenset({"GET"}), frozenset({"POST"})
        both = frozenset({"GET", "POST"})
        self._routes: dict[str, _Route] = {
            "/generate": _Route(frozenset({"POST", "PUT"}), self._generate, True, True),
            "/v1/chat/completions": _Route(post, partial(openai.chat, self), True, True),
            "/v1/completions": _Route(post, partial(openai.completions, self), True, True),
            "/v1/models": _Route(get, partial(openai.models, self), True),
            "/health": _Route(get, self._health),
            "/health_generate": _Route(get, self._health_generate),
            "/model_info": _Route(get, self._model_info),
            "/get_model_info": _Route(get, self._model_info),
            "/server_info": _Route(get, self._server_info),
            "/get_server_info": _Route(get, self._server_info),
            "/flush_cache": _Route(both, self._flush_cache),
            "/abort_request": _Route(post, self._abort_request, json=True),
            "/update_weights_from_disk": _Route(post, self._update_weights, json=True),
            "/sim/faults": _Route(both, self._sim_faults),
            "/sim/stats": _Route(get, self._sim_stats),
        }

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
        if self.started_at is None:
            self.started_at = trio.current_time()
        try:
            route = self._routes.get(path)
            if route is None:
                raise not_found()
            if scope["method"] not in route.methods:
                raise method_not_allowed(route.methods)
            body = await read_body(receive)
            if body is None:  # client went away while sending the request
                return
            if route.faultable and self.faults.fail_status is not None:
                raise sim_error(self.faults.fail_status, "simulated failure", "sim_fault")
            if route.json and body and not is_json(scope["headers"]):
                raise not_json()
            await route.handler(receive, send, body)
        except Refusal as refusal:
            await send_refusal(send, refusal)

    def created(self) -> int:
        """Wall-clock seconds, as the ``created`` of OpenAI answers."""
        return int(self.wall_clock())

    def wall_clock(self) -> float:
        """Wall-clock time, derived from trio's clock (so ``MockClock`` moves it)."""
        now = trio.current_time()
        if self._wall_offset is None:
            self._wall_offset = time.time() - now
        return self._wall_offset + now

    def piece(self, token_id: int) -> str:
        """The text of one token, special tokens included."""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._pieces[token_id] = piece
        return piece

    def encode(self, text: str, refuse: Callable[[str], Refusal] = value_error) -> list[int]:
        try:
            return self.tokenizer.encode(text)
        except (UnicodeError, ValueError) as exc:
            raise refuse(f"cannot tokenize prompt: {exc}") from None

    def check_prompt(
        self, ids: list[int], max_new_tokens: int | None, refuse: Callable[[str], Refusal]
    ) -> None:
        """SGLang's prompt checks: not empty, known ids, within the context length."""
        if not ids:
            raise refuse("input_ids cannot be empty.")
        vocab = self.tokenizer.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            bad = min(ids) if min(ids) < 0 else max(ids)
            raise refuse(f"token id {bad} is outside the vocabulary [0, {vocab})")
        n, context = len(ids), self.config.context_length
        if n >= context:
            raise refuse(
                f"The input ({n} tokens) is longer than the model's context length "
                f"({context} tokens)."
            )
        if max_new_tokens is not None and n + max_new_tokens > context:
            raise refuse(
                "Requested token count exceeds the model's maximum context length of "
                f"{context} tokens. You requested a total of {n + max_new_tokens} tokens: "
                f"{n} tokens from the input messages and {max_new_tokens} tokens for the "
                "completion. Please reduce the number of tokens in the input messages or the "
                "completion to fit within the limit."
            )

    def new_job(
        self, rid: str, prompt: list[int], params: Params, returns: Returns | None = None
    ) -> Job:
        return Job(
            rid,
            prompt,
            params,
            vocab=self.vocab,
            tokenizer=self.tokenizer,
            piece=self.piece,
            weight_version=self.weight_version,
            seed=self.config.seed,
            returns=returns,
        )

    def meta_info(self, job: Job) -> dict[str, Any]:
        return job.meta_info(self.weight_version, self.wall_clock())

    async def send_json_result(self, send: Send, job: Job, payload: object) -> None:
        body = orjson.dumps(payload)
        if self.faults.truncate_json:
            body = body[: len(body) // 2]
        job.responded = True
        await send_bytes(send, 200, body)

    async def _wait(self, job: Job, seconds: float | None) -> None:
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

    async def decode(self, job: Job, on_token: Callable[[], Awaitable[None]] | None) -> None:
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
            job.step(self.weight_version)
            if on_token is not None:
                await on_token()

    async def run_job(
        self, receive: Receive, job: Job, respond: Callable[[Job], Awaitable[None]]
    ) -> None:
        """Register ``job``, watch for client disconnect, run ``respond`` and count it."""
        self.jobs[job.rid] = job
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
            del self.jobs[job.rid]
            if completed:
                stats.completed += 1
            else:
                stats.cancelled += 1

    # ------------------------------------------------------------ /generate

    async def _generate(self, receive: Receive, send: Send, raw: bytes) -> None:
        body = parse_body(raw, "GenerateReqInput")
        _pydantic_check(body)
        contract = generate_contract_error(body)
        if contract is not None:
            raise schema_error(contract)
        stream = body.get("stream") is True
        try:
            job, extra_key = self._generate_job(body)
        except Refusal as refusal:
            if stream and refusal.streamed:  # SGLang has already answered 200
                await send_stream_refusal(send, refusal)
                return
            raise
        prompt = job.prompt_ids
        job.cached_tokens = self.prefix_cache.lookup(prompt, extra_key)
        if job.returns.logprob and job.returns.logprob_start_len >= 0:
            # SGLang recomputes what it must report logprobs for
            job.cached_tokens = min(job.cached_tokens, job.returns.logprob_start_len)
        self.stats.prompt_tokens += len(prompt)
        self.stats.cached_tokens += job.cached_tokens
        self.prefix_cache.insert(prompt, extra_key)
        try:
            if stream:
                await self.run_job(receive, job, lambda j: self._generate_stream(send, j))
            else:
                await self.run_job(receive, job, lambda j: self._generate_once(send, j))
        finally:
            self.prefix_cache.insert(prompt + job.dec.output_ids, extra_key)

    def _generate_job(self, body: dict[str, Any]) -> tuple[Job, str]:
        """The job a contract-checked ``/generate`` body asks for, or SGLang's refusal."""
        if _is_batch(body):
            raise value_error("batch requests are not supported by the simulator")
        text, input_ids = body.get("text"), body.get("input_ids")
        if text is None and input_ids is None:
            raise value_error("Either text, input_ids or input_embeds should be provided.")
        rid = body.get("rid") or uuid.uuid4().hex
        if rid in self.jobs:
            raise value_error(f"Duplicate request ID detected: {rid}")
        sp: dict[str, Any] = body.get("sampling_params") or {}
        prompt = list(input_ids) if input_ids is not None else self.encode(str(text))
        self.check_prompt(prompt, sp.get("max_new_tokens"), value_error)
        verify_sampling(sp, self.tokenizer.vocab_size)
        returns = Returns(
            logprob=body.get("return_logprob") is True,
            logprob_start_len=_int(body, "logprob_start_len", -1),
            top_logprobs_num=_int(body, "top_logprobs_num", 0),
            text_in_logprobs=body.get("return_text_in_logprobs") is True,
            routed_experts=body.get("return_routed_experts") is True,
            routed_experts_start_len=_int(body, "routed_experts_start_len", 0),
        )
        if returns.logprob and returns.logprob_start_len > len(prompt):
            raise value_error(
                f"req.logprob_start_len={returns.logprob_start_len} is higher than the number "
                f"of input tokens len(req.origin_input_ids)={len(prompt)}. Please use a smaller "
                "logprob_start_len."
            )
        job = self.new_job(rid, prompt, sampling(sp), returns)
        return job, str(body.get("extra_key") or "")

    def _generate_payload(self, job: Job) -> dict[str, Any]:
        return {
            "text": job.text(),
            "output_ids": list(job.dec.output_ids),
            "meta_info": self.meta_info(job),
        }

    async def _generate_once(self, send: Send, job: Job) -> None:
        await self.decode(job, None)
        await self.send_json_result(send, job, self._generate_payload(job))

    async def _generate_stream(self, send: Send, job: Job) -> None:
        sse = SSE(send, self.faults.drop_after_events)
        await sse.start()
        sent_final = False

        async def on_token() -> None:
            nonlocal sent_final
            await sse.event(orjson.dumps(self._generate_payload(job)))
            sent_final = job.finish is not None

        try:
            await self.decode(job, on_token)
            if not sent_final:
                await sse.event(orjson.dumps(self._generate_payload(job)))
            await sse.done(job)
        except Dropped:
            return

    # ------------------------------------------------------------ management endpoints

    async def _health(self, receive: Receive, send: Send, raw: bytes) -> None:
        if await self._health_ready(send):
            await send_bytes(send, self.faults.health_status, b"", ())

    async def _health_generate(self, receive: Receive, send: Send, raw: bytes) -> None:
        if not await self._health_ready(send):
            return
        faults = self.faults
        if faults.health_status == 200:
            if faults.hang:
                await trio.sleep_forever()
            if faults.fail_status is not None:
                await send_bytes(send, 503, b"", ())
                return
            if self._latency_s > 0:
                await trio.sleep(self._latency_s)
            Decoder([0], 1, self.vocab, seed=self.config.seed).step()
        await send_bytes(send, faults.health_status, b"", ())

    async def _health_ready(self, send: Send) -> bool:
        """SGLang's health timing: 503 while starting (answered here: False), else the
        probe's delay, then True."""
        started = self.started_at if self.started_at is not None else trio.current_time()
        if trio.current_time() < started + self.config.startup_seconds:
            await send_bytes(send, 503, b"", ())
            return False
        delay = self.config.health_seconds + self.faults.health_delay_s
        if delay > 0:
            await trio.sleep(delay)
        return True

    async def _model_info(self, receive: Receive, send: Send, raw: bytes) -> None:
        info = {
            "model_path": self.weights_path,
            "served_model_name": self.config.model_path,
            "tokenizer_path": getattr(self.tokenizer, "name_or_path", self.config.model_path),
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": self.weight_version,
            "load_format": "auto",
            "reasoning_parser": None,
            "tool_call_parser": None,
            "disaggregation_mode": "null",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": "sim",
            "architectures": ["SimulatedForCausalLM"],
            "embedding": {"family": "none", "task": "none", "enabled": False},
        }
        await send_bytes(send, 200, orjson.dumps(info))

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
        await send_bytes(send, 200, orjson.dumps(info))

    async def _flush_cache(self, receive: Receive, send: Send, raw: bytes) -> None:
        await send_bytes(send, 200, FLUSHED, ())

    async def _abort_request(self, receive: Receive, send: Send, raw: bytes) -> None:
        body = parse_body(raw, "AbortReq")
        rid, abort_all = body.get("rid"), body.get("abort_all")
        if (rid is not None and not isinstance(rid, str)) or not isinstance(
            abort_all, (bool, type(None))
        ):
            raise validation_error([{"type": "is_instance_of", "loc": ("body",), "input": body}])
        if abort_all:
            for job in self.jobs.values():
                job.abort(ABORTED)
        elif rid is not None and rid in self.jobs:
            self.jobs[rid].abort(ABORTED)
        await send_bytes(send, 200, b"", ())

    async def _update_weights(self, receive: Receive, send: Send, raw: bytes) -> None:
        body = parse_body(raw, "UpdateWeightFromDiskReqInput")
        path, version = body.get("model_path"), body.get("weight_version")
        if not isinstance(path, str) or not isinstance(version, (str, type(None))):
            error = {"type": "missing", "loc": ("body", "model_path"), "msg": "Field required"}
            if isinstance(path, str):
                error = {"type": "string_type", "loc": ("body", "weight_version")}
            raise validation_error([error])
        if not await _has_weights(path, (self.weights_path, self.config.model_path)):
            message = (
                f"Failed to get weights iterator: Cannot find any model weights with `{path}`."
            )
            failed = {"success": False, "message": message, "num_paused_requests": 0}
            await send_bytes(send, 400, orjson.dumps(failed))
            return
        self.weights_path = path
        message = "Succeeded to update model weights."
        if version is not None:  # without one, SGLang keeps the version it had
            self.weight_version = version
            message += f" Weight version updated to {version}."
        result = {"success": True, "message": message, "num_paused_requests": 0}
        await send_bytes(send, 200, orjson.dumps(result))

    async def _sim_faults(self, receive: Receive, send: Send, raw: bytes) -> None:
        if raw.strip():
            try:
                changes = orjson.loads(raw)
                if not isinstance(changes, dict):
                    raise ValueError("the body must be a JSON object")
                self.faults.update(changes)
            except ValueError as exc:  # orjson.JSONDecodeError is one
                raise sim_error(400, str(exc)) from None
        await send_bytes(send, 200, orjson.dumps(self.faults.to_json()))

    async def _sim_stats(self, receive: Receive, send: Send, raw: bytes) -> None:
        await send_bytes(send, 200, orjson.dumps(self.stats.to_json()))


async def _has_weights(path: str, served: tuple[str, ...]) -> bool:
    """Whether SGLang would find weights at ``path``: the served model, or a directory with
    ``*.safetensors`` or ``*.bin`` files (the simulator reads none of them)."""
    if path in served:
        return True
    directory = trio.Path(path)
    if not await directory.is_dir():
        return False
    return any(p.suffix in (".safetensors", ".bin") for p in await directory.iterdir())


def _int(body: Mapping[str, Any], key: str, default: int) -> int:
    value = body.get(key)
    return default if value is None else int(value)


# ---------------------------------------------------------------- ASGI helpers


async def _watch_disconnect(receive: Receive, scope: trio.CancelScope, job: Job) -> None:
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
    app.started_at = trio.current_time()
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
