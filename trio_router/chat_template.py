"""The model's chat template as requests may use it.

A request never chooses the template, nor any keyword argument the template does not read:
``chat_template_kwargs`` may only name the variables of the tokenizer's own template (for
Qwen3: ``enable_thinking`` and ``clear_thinking``), each with a JSON scalar. The template
renders on worker threads (a small ``CapacityLimiter`` of its own), within
``--chat-template-timeout``, from a bounded number of messages, and the prompt it renders is
bounded by ``--max-prompt-chars``. A thread cannot be stopped, so the bounds on the inputs
are what keep a rendering short; the timeout answers the client when they do not (or when
every thread is busy), and the thread keeps its limiter slot until it ends.

Like the tokenizer's short texts, a tiny conversation (``INLINE_MAX_MESSAGES`` plain messages,
under ``INLINE_MAX_CHARS``, no tools) renders inline: a fraction of a millisecond, where the
trip through a thread costs ~10 ms when the event loop is busy.

Templates are compiled once (transformers caches them by their text).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import trio

from .errors import BadRequest, Overloaded, PayloadTooLarge
from .tokenizer import Tokenizer

__all__ = ["ChatTemplate", "Render", "TemplateLimits", "template_keywords"]

T = TypeVar("T")
Render = Callable[[list[dict[str, Any]], bool], str]
"""render(messages, add_generation_prompt) -> text, with the request's tools and kwargs."""

#: Names the router passes itself or that transformers reads as options, never a request.
ROUTER_NAMES: Final = frozenset(
    {
        "messages", "conversation", "tools", "documents", "add_generation_prompt",
        "continue_final_message", "chat_template", "tokenize", "sanitize_control_tokens",
        "padding", "truncation", "max_length", "return_tensors", "return_dict",
        "return_assistant_tokens_mask", "tokenizer_kwargs",
        # globals of transformers' template environment and of Jinja's
        "raise_exception", "strftime_now", "dict", "namespace", "range", "lipsum", "cycler",
        "joiner", "loop", "self", "caller", "varargs", "kwargs",
    }
)  # fmt: skip
#: Accepted whether the template reads it or not (clients send it to every model).
ALWAYS_ALLOWED: Final = frozenset({"enable_thinking"})
INLINE_MAX_MESSAGES: Final = 4
"""Conversations of at most this many messages (and short) render on the trio thread."""
INLINE_MAX_CHARS: Final = 2048
"""... when their messages' strings hold fewer characters than this."""
#: Keyword arguments whose meaning is known: their type is checked too.
BOOLEAN_KEYWORDS: Final = frozenset({"enable_thinking", "clear_thinking"})


def template_keywords(templates: Iterable[str], special: Iterable[str] = ()) -> frozenset[str]:
    """The keyword arguments requests may give ``templates``: the variables a template reads
    and never sets, less the router's own names and the special tokens (``eos_token``...)."""
    import jinja2
    import jinja2.meta
    import jinja2.nodes
    from jinja2.ext import Extension

    class GenerationTag(Extension):  # transformers' {% generation %} blocks
        tags = {"generation"}  # noqa: RUF012 (Jinja's own declaration)

        def parse(self, parser: Any) -> list[jinja2.nodes.Node]:
            next(parser.stream)
            body: list[jinja2.nodes.Node] = parser.parse_statements(
                ("name:endgeneration",), drop_needle=True
            )
            return body

    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols", GenerationTag])
    reserved = ROUTER_NAMES | frozenset(special)
    names: set[str] = set()
    for text in templates:
        try:
            tree = env.parse(text)
        except jinja2.TemplateSyntaxError:
            continue  # rendering says what is wrong with it
        stored = {node.name for node in tree.find_all(jinja2.nodes.Name) if node.ctx == "store"}
        names |= jinja2.meta.find_undeclared_variables(tree) - stored
    return frozenset(
        name
        for name in names | ALWAYS_ALLOWED
        if name not in reserved and not name.endswith(("_token", "_tokens"))
    )


def templates_of(tokenizer: Tokenizer) -> list[str]:
    """The text of the tokenizer's chat templates (a named set, or one, or none)."""
    raw = getattr(tokenizer.hf, "chat_template", None)
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, dict):
        return [text for text in raw.values() if isinstance(text, str)]
    return []


@dataclass(frozen=True, slots=True)
class TemplateLimits:
    max_prompt_chars: int = 8 * 1024 * 1024
    """Characters of a rendered prompt (and of its messages' text before rendering)."""
    max_items: int = 10_000
    """Messages, content parts and tool calls of one request together; also the tools."""
    timeout: float = 10.0
    """Seconds a rendering may take, waiting for a thread included."""


class ChatTemplate:
    """The tokenizer's chat template behind the request-facing checks and bounds."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        limits: TemplateLimits,
        *,
        limiter: trio.CapacityLimiter | int = 2,
    ) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        if not isinstance(limiter, trio.CapacityLimiter):
            limiter = trio.CapacityLimiter(limiter)
        self.limiter = limiter
        special = getattr(tokenizer.hf, "special_tokens_map", {}) or {}
        self.keywords = template_keywords(templates_of(tokenizer), special)

    def keyword_arguments(self, body: dict[str, Any]) -> dict[str, Any]:
        """The request's ``chat_template_kwargs``, checked: only the template's own names,
        each a string, number, boolean or null (null leaves the name unset)."""
        given = body.get("chat_template_kwargs")
        if given is None:
            return {}
        if not isinstance(given, dict):
            raise BadRequest("'chat_template_kwargs' must be an object")
        kwargs = {}
        for name, value in given.items():
            if name not in self.keywords:
                allowed = ", ".join(sorted(self.keywords)) or "none"
                raise BadRequest(
                    f"'chat_template_kwargs.{name}' is not a keyword argument of this "
                    f"model's chat template (allowed: {allowed})"
                )
            if value is None:
                continue
            if name in BOOLEAN_KEYWORDS and not isinstance(value, bool):
                raise BadRequest(f"'chat_template_kwargs.{name}' must be a boolean")
            if not isinstance(value, str | int | float | bool):
                raise BadRequest(
                    f"'chat_template_kwargs.{name}' must be a string, a number, a boolean or null"
                )
            kwargs[name] = value
        return kwargs

    def check_size(self, messages: Sequence[dict[str, Any]]) -> None:
        """A 413 if the messages' text alone is longer than a rendered prompt may be."""
        size = sum(len(m.get("content") or "") for m in messages)
        if size > self.limits.max_prompt_chars:
            raise PayloadTooLarge(
                f"the messages hold {size} characters; a prompt may have "
                f"{self.limits.max_prompt_chars} (--max-prompt-chars)"
            )

    def renderer(self, tools: list[dict[str, Any]] | None, kwargs: dict[str, Any]) -> Render:
        """A blocking render with ``tools`` and ``kwargs`` bound, for ``run`` (a 400 when
        the template fails, a 413 when its prompt is too long)."""
        tokenizer = self.tokenizer
        limit = self.limits.max_prompt_chars

        def render(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
            try:
                text = tokenizer.apply_chat_template(
                    messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs
                )
            except Exception as exc:
                raise BadRequest(f"cannot render the chat template: {exc}") from None
            if len(text) > limit:
                raise PayloadTooLarge(
                    f"the rendered prompt has {len(text)} characters; the limit is {limit} "
                    "(--max-prompt-chars)"
                )
            return text

        return render

    async def run(
        self,
        job: Callable[[], T],
        messages: Sequence[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
    ) -> T:
        """``job()``, which renders ``messages`` (or a part of them) with ``tools``, on a
        worker thread within the timeout (else a 503), or inline when they are tiny."""
        if renders_inline(messages, tools):
            return job()
        with trio.move_on_after(self.limits.timeout):
            return await trio.to_thread.run_sync(job, limiter=self.limiter, abandon_on_cancel=True)
        raise Overloaded(
            f"rendering the chat template took longer than {self.limits.timeout:g} s "
            "(--chat-template-timeout); retry later, or send a shorter conversation"
        )

    async def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        kwargs: dict[str, Any],
    ) -> str:
        """The prompt of ``messages``, ending with the generation prompt."""
        self.check_size(messages)
        render = self.renderer(tools, kwargs)
        return await self.run(lambda: render(messages, True), messages, tools)


def renders_inline(messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None) -> bool:
    """Whether rendering ``messages`` costs so little that a thread would cost more: a few
    messages of short strings only (no tool calls, no other structure), and no tools."""
    if tools or len(messages) > INLINE_MAX_MESSAGES:
        return False
    size = 0
    for message in messages:
        for value in message.values():
            if isinstance(value, str):
                size += len(value)
            elif value is not None:
                return False
    return size < INLINE_MAX_CHARS
