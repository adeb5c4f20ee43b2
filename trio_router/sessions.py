"""Agent sessions: token-in/token-out across turns (pure; time is ``now``).

A session keeps the exact token ids of everything the engine consumed and
produced so far. A later turn appends only the rendered *delta* of its new
messages to those ids, so past tokens never change, whatever the chat
template does to old turns (dropped ``<think>`` blocks, re-spaced tool-call
JSON). A client that retries the last turn rolls it back cleanly; any other
divergence from the stored conversation is an error that says where.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from .errors import BadRequest, NotFound, Overloaded, Unauthorized

Render = Callable[[list[dict[str, Any]], bool], str]
"""render(messages, add_generation_prompt) -> text, with the session's tools bound."""


@dataclass(slots=True)
class Turn:
    """One committed turn: where it started, so it can be rolled back."""

    messages_before: int
    tokens_before: int
    prompt_tokens: int
    completion_tokens: int
    finish: str
    weight_version: str | None
    routed_experts: str | None  # base64 int32 rows, one per token up to this turn's end
    routed_rows: int
    timestamp: float


@dataclass(slots=True, eq=False)
class Session:
    id: str
    created: float
    last_used: float
    namespace: str
    token: str | None
    messages: list[dict[str, Any]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    versions: list[str | None] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    #: bumped by every commit; a turn prepared against an older one is stale
    generation: int = 0

    def truncate(self, turns: int) -> None:
        """Drop every turn from index ``turns`` on."""
        if turns >= len(self.turns):
            return
        turn = self.turns[turns]
        del self.messages[turn.messages_before :]
        for seq in (self.ids, self.logps, self.mask, self.versions):
            del seq[turn.tokens_before :]
        del self.turns[turns:]


@dataclass(slots=True)
class Plan:
    """What a turn will send: the stored ids to keep, then the ids of the rendered text of
    ``new`` as it follows ``prior`` (see ``render_delta``)."""

    keep_turns: int
    keep_tokens: int
    prior_messages: int
    prior: list[dict[str, Any]]
    new: list[dict[str, Any]]
    ended_with_eos: bool
    rolled_back: bool
    generation: int


def same_message(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal for the conversation: role, content, tool calls (JSON compared as values)."""
    if a.get("role") != b.get("role") or (a.get("content") or "") != (b.get("content") or ""):
        return False
    for key in ("name", "tool_call_id"):
        if a.get(key) != b.get(key):
            return False
    return _calls(a) == _calls(b)


def _calls(message: dict[str, Any]) -> list[tuple[Any, Any]]:
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function", {}) if isinstance(call, dict) else {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            with contextlib.suppress(orjson.JSONDecodeError):
                arguments = orjson.loads(arguments)
        calls.append((function.get("name"), arguments))
    return calls


def common_prefix(stored: Sequence[dict[str, Any]], sent: Sequence[dict[str, Any]]) -> int:
    n = 0
    while n < min(len(stored), len(sent)) and same_message(stored[n], sent[n]):
        n += 1
    return n


def plan_turn(
    session: Session,
    messages: list[dict[str, Any]],
    ends_turn: Callable[[int], bool],
) -> Plan:
    """Decide how the request's messages extend (or retry) the session's conversation.

    Nothing is rendered here: ``render_delta`` renders the plan (on a worker thread).
    """
    if not session.turns:
        return Plan(0, 0, 0, [], list(messages), False, False, session.generation)
    stored = session.messages
    shared = common_prefix(stored, messages)
    keep_turns = len(session.turns)
    if shared < len(stored):
        last = session.turns[-1]
        if shared < last.messages_before:
            raise BadRequest(
                f"messages diverge from the session at message {shared}; only the last turn "
                f"(from message {last.messages_before}) can be retried"
            )
        keep_turns -= 1  # a retry of the last turn
        prior = stored[: last.messages_before]
        keep_tokens = last.tokens_before
    else:
        prior = list(stored)
        keep_tokens = len(session.ids)
    new = messages[len(prior) :]
    if not new:
        raise BadRequest("the request adds no new message to the session")
    if any(m.get("role") == "assistant" for m in new):
        raise BadRequest(
            "new messages may not include assistant turns: the session records those itself"
        )
    rolled_back = keep_turns < len(session.turns)
    if keep_turns == 0:
        return Plan(0, 0, 0, [], list(messages), False, rolled_back, session.generation)
    ended = keep_tokens > 0 and ends_turn(session.ids[keep_tokens - 1])
    return Plan(
        keep_turns, keep_tokens, len(prior), prior, new, ended, rolled_back, session.generation
    )


def render_delta(plan: Plan, render: Render, eos_text: str) -> str:
    """The text whose ids follow the plan's kept ids (the whole prompt for a first turn)."""
    if plan.keep_turns == 0:
        return render(plan.new, True)
    return delta_text(plan.prior, plan.new, render, eos_text, ended_with_eos=plan.ended_with_eos)


def delta_text(
    prior: list[dict[str, Any]],
    new: list[dict[str, Any]],
    render: Render,
    eos_text: str,
    *,
    ended_with_eos: bool,
) -> str:
    """The template text of ``new`` messages, as it follows the engine's last token.

    Old turns are never re-rendered into tokens. The template may rewrite them
    once new turns follow (Qwen3 drops past ``<think>`` blocks), but it keeps
    one end-of-turn marker per turn: the new text is what follows the marker
    that closes the prior conversation.
    """
    turns = render(prior, False).count(eos_text)
    full = render(prior + new, True)
    where = -len(eos_text)
    for _ in range(turns):
        where = full.find(eos_text, where + len(eos_text))
        if where < 0:
            raise BadRequest("the chat template renders fewer turns than the session holds")
    if turns == 0:
        raise BadRequest(f"the chat template does not end turns with {eos_text!r}")
    return full[where + len(eos_text) :] if ended_with_eos else full[where:]


class SessionTable:
    """All sessions, with a TTL, a cap on their number and on the tokens they hold."""

    def __init__(self, *, max_sessions: int, ttl: float, max_tokens: int) -> None:
        self.max_sessions = max_sessions
        self.ttl = ttl
        self.max_tokens = max_tokens
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def tokens(self) -> int:
        return sum(len(s.ids) for s in self._sessions.values())

    def create(self, now: float, *, namespace: str = "", with_token: bool = False) -> Session:
        self.expire(now)
        if len(self._sessions) >= self.max_sessions:
            raise Overloaded(f"too many sessions ({self.max_sessions}); delete some", status=429)
        session = Session(
            id=uuid.uuid4().hex,
            created=now,
            last_used=now,
            namespace=namespace,
            token=secrets.token_urlsafe(24) if with_token else None,
        )
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str, now: float, token: str | None, namespace: str = "") -> Session:
        session = self._sessions.get(session_id)
        if session is None or now - session.last_used > self.ttl:
            if session is not None:
                del self._sessions[session_id]
            raise NotFound(f"session not found: {session_id}")
        if session.namespace != namespace:
            raise NotFound(f"session not found: {session_id}")
        if session.token is not None and not hmac.compare_digest(
            session.token.encode(), (token or "").encode()
        ):
            raise Unauthorized("this session needs the X-Session-Token it was created with")
        session.last_used = now
        return session

    def delete(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    def expire(self, now: float) -> list[str]:
        """Forget sessions idle longer than the TTL; returns their ids."""
        stale = [s.id for s in self._sessions.values() if now - s.last_used > self.ttl]
        for session_id in stale:
            del self._sessions[session_id]
        return stale

    def check_budget(self, extra: int) -> None:
        if self.tokens + extra > self.max_tokens:
            raise Overloaded(
                f"sessions hold {self.tokens} tokens; the limit is {self.max_tokens}", status=429
            )


def routed_rows(payload: str | None, rows: int, keep: int) -> tuple[str | None, int]:
    """The first ``keep`` rows of a base64 int32 routed-experts payload of ``rows`` rows."""
    if payload is None or rows <= 0:
        return None, 0
    raw = base64.b64decode(payload)
    width = len(raw) // rows
    keep = min(keep, rows)
    return base64.b64encode(raw[: keep * width]).decode(), keep
