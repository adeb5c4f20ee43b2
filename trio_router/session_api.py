"""The session API: ``/sessions`` and token-in/token-out chat turns.

    POST   /sessions                              -> {"session_id", "session_token"?}
    GET    /sessions/{id}                         -> records and accumulated token ids
    DELETE /sessions/{id}                         -> 204
    POST   /sessions/{id}/v1/chat/completions     -> one turn (streamed or not)
    POST   /sessions/{id}/samples                 -> the training sample (JSON or safetensors)

Every upstream call of a session carries ``X-SMG-Routing-Key: <session id>``
and is routed by the router's sticky policy, so a session stays on the worker
whose KV cache holds its prefix.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import orjson
import trio

from .errors import BadRequest, NotFound, RouterError
from .hooks import Middleware, ProxyRequest, Reply
from .openai_api import (
    FINISH,
    JSON,
    SSE_HEADERS,
    Chunks,
    Generated,
    OpenAIFrontend,
    as_chunks,
    completion_id,
    generated_choice,
    sse,
    usage_of,
    worker_answer,
)
from .openai_fields import Call, is_kind
from .policies import Sticky
from .radix import Trajectory
from .request_json import loads_object
from .sessions import Plan, Session, SessionTable, Turn, plan_turn, render_delta, routed_rows
from .token_cache import Pending, token_versions

if TYPE_CHECKING:
    from .router import Router

STATUS = {"stop": "completed", "length": "truncated", "abort": "aborted"}


class SessionFrontend(Middleware):
    """Serves /sessions on top of the OpenAI front end's generation calls."""

    def __init__(
        self,
        router: Router,
        frontend: OpenAIFrontend,
        table: SessionTable,
        *,
        require_token: bool,
        strip_routed_experts: bool,
    ) -> None:
        self.router = router
        self.frontend = frontend
        self.table = table
        self.require_token = require_token
        self.strip_routed_experts = strip_routed_experts
        self.policy = Sticky(router.rng, ttl=table.ttl)
        self._locks: dict[str, trio.Lock] = {}
        self.stale_commits = 0

    async def expiry_loop(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Forget idle sessions (every minute, or every TTL when it is shorter)."""
        task_status.started()
        while True:
            await trio.sleep(min(60.0, self.table.ttl))
            for session_id in self.table.expire(trio.current_time()):
                self._locks.pop(session_id, None)

    def report(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "sessions": len(self.table),
            "tokens": self.table.tokens,
            "max_sessions": self.table.max_sessions,
            "max_tokens": self.table.max_tokens,
            "stale_commits": self.stale_commits,
        }

    async def on_request(self, request: ProxyRequest) -> Reply | None:
        path = request.path
        if path != "/sessions" and not path.startswith("/sessions/"):
            return None
        parts = path.strip("/").split("/")
        method = request.method
        if len(parts) == 1:
            if method != "POST":
                raise BadRequest("use POST /sessions to open a session")
            return self.create(request)
        session = self.table.get(
            parts[1],
            trio.current_time(),
            request.header_text(b"x-session-token"),
            self.frontend.cache.namespace(request),
        )
        rest = "/".join(parts[2:])
        if rest == "" and method == "GET":
            return Reply(200, orjson.dumps(self.describe(session)), list(JSON))
        if rest == "" and method == "DELETE":
            self.table.delete(session)
            self._locks.pop(session.id, None)
            return Reply(204, b"", [])
        if rest == "v1/chat/completions" and method == "POST":
            return await self.turn(request, session)
        if rest == "samples" and method == "POST":
            return self.samples(request, session)
        raise NotFound(f"no such session endpoint: {method} {path}")

    def create(self, request: ProxyRequest) -> Reply:
        if request.body.strip():
            loads_object(request.body)  # its fields are ignored, but it must be an object
        session = self.table.create(
            trio.current_time(),
            namespace=self.frontend.cache.namespace(request),
            with_token=self.require_token,
        )
        body: dict[str, Any] = {"session_id": session.id}
        if session.token is not None:
            body["session_token"] = session.token
        return Reply(200, orjson.dumps(body), list(JSON))

    def describe(self, session: Session) -> dict[str, Any]:
        return {
            "session_id": session.id,
            "records": [
                {
                    "turn": i,
                    "timestamp": t.timestamp,
                    "messages_before": t.messages_before,
                    "prompt_tokens": t.prompt_tokens,
                    "completion_tokens": t.completion_tokens,
                    "finish_reason": t.finish,
                    "weight_version": t.weight_version,
                }
                for i, t in enumerate(session.turns)
            ],
            "messages": session.messages,
            "metadata": {
                "accumulated_token_ids": session.ids,
                "loss_mask": session.mask,
                "turns": len(session.turns),
            },
        }

    # -- a turn -----------------------------------------------------------------------

    async def turn(self, request: ProxyRequest, session: Session) -> Reply:
        body = self.frontend.json_body(request)
        messages, tools, kwargs, call = self.frontend.parse_chat(body)
        if call.n != 1:
            raise BadRequest("a session turn generates one answer ('n' must be 1)")
        template = self.frontend.template
        template.check_size(messages)
        render = template.renderer(tools, kwargs)
        tokenizer = self.frontend.cache.tokenizer
        lock = self._locks.setdefault(session.id, trio.Lock())
        async with lock:
            eos_text = tokenizer.decode([tokenizer.eos_token_id], False)
            # the engine stopped on a special token (<|im_end|>, <|endoftext|>): the turn's
            # end marker is then already among the ids
            plan = plan_turn(session, messages, tokenizer.is_special)
            delta = await template.run(
                lambda: render_delta(plan, render, eos_text), messages, tools
            )
            fresh = await tokenizer.aencode(delta)
            self.table.check_budget(len(fresh))
            prompt = Trajectory(
                session.ids[: plan.keep_tokens],
                session.logps[: plan.keep_tokens],
                session.mask[: plan.keep_tokens],
                session.versions[: plan.keep_tokens],
            )
            prompt.extend(
                Trajectory(fresh, [0.0] * len(fresh), [0] * len(fresh), [None] * len(fresh))
            )
        pending = Pending(session.namespace, prompt, b"", False, None)
        upstream = replace(
            request,
            routing_key=session.id,
            headers=[*request.headers, (b"x-smg-routing-key", session.id.encode())],
        )
        upstream.state["policy"] = self.policy
        if call.stream and not tools:
            return Reply(
                200,
                self._streamed_turn(upstream, call, pending, session, plan, messages),
                list(SSE_HEADERS),
            )
        if tools:  # the worker parses tool calls once the answer is complete
            result = await self._tool_turn(upstream, body, pending)
        else:
            result = await self.frontend.generate_one(upstream, call, pending, record=False)
        self._commit(session, plan, messages, prompt, result)
        completion = self._completion(call, result)
        if call.stream:
            return Reply(200, as_chunks(completion, call.include_usage), list(SSE_HEADERS))
        return Reply(200, orjson.dumps(completion), list(JSON))

    async def _tool_turn(
        self, request: ProxyRequest, body: dict[str, Any], pending: Pending
    ) -> Generated:
        fetched = await self.frontend.worker_chat(request, body, pending)
        answer = worker_answer(fetched)
        return generated_choice(answer, len(pending.prompt.ids), fetched.worker)

    async def _streamed_turn(
        self,
        request: ProxyRequest,
        call: Call,
        pending: Pending,
        session: Session,
        plan: Plan,
        messages: list[dict[str, Any]],
    ) -> AsyncIterator[bytes]:
        chunks = Chunks("chat.completion.chunk", call.model)
        try:
            yield chunks.choice(delta={"role": "assistant", "content": ""}, finish_reason=None)
            result: Generated | None = None
            async with aclosing(
                self.frontend.generate_stream(request, call, pending, record=False)
            ) as items:
                async for item in items:
                    if not isinstance(item, str):
                        result = item
                    elif item:
                        yield chunks.choice(delta={"content": item}, finish_reason=None)
            assert result is not None
            self._commit(session, plan, messages, pending.prompt, result)
            yield chunks.choice(
                delta={},
                finish_reason=FINISH.get(result.finish, result.finish),
                meta_info=self._meta(result),
            )
            if call.include_usage:
                yield chunks.usage(result)
        except RouterError as exc:
            yield sse({"error": {"message": exc.message, "type": exc.kind, "code": exc.status}})
        yield b"data: [DONE]\n\n"

    def _commit(
        self,
        session: Session,
        plan: Plan,
        messages: list[dict[str, Any]],
        prompt: Trajectory,
        result: Generated,
    ) -> None:
        """Record a finished turn, unless another turn was committed meanwhile."""
        if session.generation != plan.generation:
            self.stale_commits += 1
            return
        session.truncate(plan.keep_turns)
        version = result.meta.get("weight_version")
        version = str(version) if version is not None else None
        start = len(session.ids)
        fresh = prompt.ids[start:]
        session.ids.extend(fresh)
        session.logps.extend([0.0] * len(fresh))
        session.mask.extend([0] * len(fresh))
        session.versions.extend([None] * len(fresh))
        session.ids.extend(result.ids)
        session.logps.extend(result.logps)
        session.mask.extend([1] * len(result.ids))
        session.versions.extend(token_versions(result.meta, len(result.ids)))
        message = result.meta.get("message") or {"role": "assistant", "content": result.text}
        messages_before = plan.prior_messages
        session.messages = [*messages, {k: v for k, v in message.items() if v is not None}]
        session.messages[-1].setdefault("content", "")
        rows = _routed_rows(result.meta.get("routed_experts"), len(prompt.ids) + len(result.ids))
        session.turns.append(
            Turn(
                messages_before=messages_before,
                tokens_before=start,
                prompt_tokens=len(prompt.ids),
                completion_tokens=len(result.ids),
                finish=result.finish,
                weight_version=version,
                routed_experts=result.meta.get("routed_experts"),
                routed_rows=rows,
                timestamp=time.time(),
            )
        )
        session.generation += 1

    def _meta(self, result: Generated) -> dict[str, Any]:
        meta = {k: v for k, v in result.meta.items() if k != "message"}
        if self.strip_routed_experts:
            meta.pop("routed_experts", None)
        return meta

    def _completion(self, call: Call, result: Generated) -> dict[str, Any]:
        message = result.meta.get("message") or {"role": "assistant", "content": result.text}
        return {
            "id": completion_id("chatcmpl"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": call.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": "tool_calls"
                    if message.get("tool_calls")
                    else FINISH.get(result.finish, result.finish),
                    "meta_info": self._meta(result),
                }
            ],
            "usage": usage_of(result),
        }

    # -- samples ------------------------------------------------------------------------

    def samples(self, request: ProxyRequest, session: Session) -> Reply:
        body = loads_object(request.body) if request.body.strip() else {}
        max_len = body.get("max_seq_len")
        if max_len is not None and (not is_kind(max_len, "integer") or max_len < 1):
            raise BadRequest("'max_seq_len' must be a positive integer")
        fmt = body.get("format")
        if fmt is None:
            fmt = "json"
        if fmt not in ("json", "safetensors"):
            raise BadRequest("'format' must be json or safetensors")
        if not session.turns:
            raise BadRequest("the session has no turn yet")
        turns = list(session.turns)
        status = STATUS.get(turns[-1].finish, "completed")
        if max_len is not None:
            # cut at a turn boundary: keep the turns that end within max_seq_len
            kept = [t for t in turns if t.prompt_tokens + t.completion_tokens <= max_len]
            if not kept:
                raise BadRequest(f"the first turn alone is longer than max_seq_len={max_len}")
            if len(kept) < len(turns):
                status = "truncated"
            turns = kept
        end = turns[-1].prompt_tokens + turns[-1].completion_tokens
        last = turns[-1]
        experts, rows = routed_rows(last.routed_experts, last.routed_rows, end)
        sample = {
            "session_id": session.id,
            "tokens": session.ids[:end],
            "loss_mask": session.mask[:end],
            "rollout_logp": session.logps[:end],
            "weight_versions": session.versions[:end],
            "status": status,
            "turns": len(turns),
            "routed_experts": experts,
            "routed_experts_rows": rows,
        }
        if fmt == "json":
            return Reply(200, orjson.dumps(sample), list(JSON))
        return Reply(200, _safetensors(sample), [(b"content-type", b"application/octet-stream")])


def _routed_rows(payload: Any, tokens: int) -> int:
    """Rows of a routed-experts payload: one per token but the last, which no forward pass
    consumed (SGLang's shape, tried first: a size that fits it may fit ``tokens`` rows of
    another width too), else one per token."""
    if not isinstance(payload, str) or tokens <= 0:
        return 0
    size = len(payload) // 4 * 3 - payload.count("=")
    for rows in (tokens - 1, tokens):
        if rows > 0 and size % (rows * 4) == 0:
            return rows
    return tokens


def _safetensors(sample: dict[str, Any]) -> bytes:
    import base64

    import numpy as np
    from safetensors.numpy import save

    tensors: dict[str, Any] = {
        "tokens": np.asarray(sample["tokens"], dtype=np.int64),
        "loss_mask": np.asarray(sample["loss_mask"], dtype=np.int8),
        "rollout_logp": np.asarray(sample["rollout_logp"], dtype=np.float32),
    }
    if sample["routed_experts"]:
        raw = np.frombuffer(base64.b64decode(sample["routed_experts"]), dtype="<i4")
        tensors["routed_experts"] = raw.reshape(sample["routed_experts_rows"], -1).copy()
    metadata = {
        "session_id": sample["session_id"],
        "status": sample["status"],
        "turns": str(sample["turns"]),
        "weight_versions": orjson.dumps(sample["weight_versions"]).decode(),
    }
    result: bytes = save(tensors, metadata=metadata)
    return result
