"""The fields of an OpenAI request, checked and mapped to SGLang's (pure).

Every field the router reads has one JSON type; any other type is a 400 naming the field.
``null`` means "not given" (the official client sends it for some unset fields), and a
boolean is never taken for a number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from .errors import BadRequest

__all__ = [
    "CHAT_FIELDS",
    "MAX_N",
    "ROLES",
    "SAMPLING_EXTRAS",
    "Call",
    "parse_call",
    "parse_messages",
    "parse_tools",
]

ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
#: OpenAI fields the router maps or checks itself; any other field goes to the worker as is.
CHAT_FIELDS: Final = frozenset(
    {
        "messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p",
        "stop", "seed", "presence_penalty", "frequency_penalty", "n", "stream",
        "stream_options", "logprobs", "top_logprobs", "user", "tools", "tool_choice",
        "parallel_tool_calls", "chat_template_kwargs", "response_format", "logit_bias",
        "metadata", "store", "service_tier", "prompt", "echo", "suffix", "best_of",
    }
)  # fmt: skip
#: SGLang sampling parameters accepted as top-level extension fields, with their types.
SAMPLING_EXTRAS: Final = {
    "top_k": "integer",
    "min_p": "number",
    "repetition_penalty": "number",
    "min_new_tokens": "integer",
    "ignore_eos": "boolean",
    "stop_token_ids": "list of integers",
    "skip_special_tokens": "boolean",
    "spaces_between_special_tokens": "boolean",
    "no_stop_trim": "boolean",
    "regex": "string",
    "json_schema": "string",
}
#: Fields the router does not send to /generate, checked for their type all the same.
IGNORED_FIELDS: Final = {
    "user": "string",
    "tool_choice": "string or object",
    "parallel_tool_calls": "boolean",
    "response_format": "object",
    "logit_bias": "object",
    "metadata": "object",
    "store": "boolean",
    "service_tier": "string",
    "best_of": "integer",
    "echo": "boolean",
    "suffix": "string",
}
#: Message fields that reach the template and must be strings when given.
MESSAGE_STRINGS: Final = ("name", "tool_call_id", "reasoning_content")
MAX_N: Final = 64
MAX_TOKENS: Final = 10_000_000


def is_kind(value: Any, kind: str) -> bool:
    """Whether ``value`` (not ``None``) is of JSON ``kind`` (the names of the messages)."""
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "string or object":
        return isinstance(value, str | dict)
    if kind == "list of integers":
        return isinstance(value, list) and all(is_kind(v, "integer") for v in value)
    if kind == "list of strings":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    raise AssertionError(kind)


def typed(body: dict[str, Any], name: str, kind: str, where: str = "") -> Any:
    """``body[name]`` if it is of ``kind``, ``None`` when absent or null; else a 400."""
    value = body.get(name)
    if value is not None and not is_kind(value, kind):
        raise BadRequest(f"'{where}{name}' must be {_article(kind)}")
    return value


def _article(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _number(body: dict[str, Any], name: str, *, low: float, high: float) -> float | None:
    value = typed(body, name, "number")
    if value is not None and not low <= value <= high:
        raise BadRequest(f"'{name}' must be within [{low:g}, {high:g}]")
    return value  # type: ignore[no-any-return]


def _integer(body: dict[str, Any], name: str, *, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not is_kind(value, "integer") or not low <= value <= high:
        raise BadRequest(f"'{name}' must be an integer within [{low}, {high}]")
    return value  # type: ignore[no-any-return]


@dataclass(slots=True)
class Call:
    """One validated request to generate."""

    stream: bool
    n: int
    sampling: dict[str, Any]
    extras: dict[str, Any]
    logprobs: bool
    top_logprobs: int
    include_usage: bool
    model: str
    body: dict[str, Any] = field(default_factory=dict)


def parse_call(
    body: dict[str, Any], default_model: str, *, default_max: int | None, completions: bool = False
) -> Call:
    """Validate the shared OpenAI parameters and map them to SGLang's.

    ``logprobs`` is a boolean for chat, an integer 0..5 for ``completions``.
    """
    stream = typed(body, "stream", "boolean") or False
    n = _integer(body, "n", low=1, high=MAX_N) or 1
    if n > 1 and stream:
        raise BadRequest("'n' > 1 cannot be streamed; send n requests instead")
    sampling: dict[str, Any] = {}
    max_tokens = _integer(body, "max_completion_tokens", low=1, high=MAX_TOKENS)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", low=1, high=MAX_TOKENS)
    if max_tokens is None:
        max_tokens = default_max
    if max_tokens is not None:
        sampling["max_new_tokens"] = max_tokens
    for name, low, high in (
        ("temperature", 0, 2),
        ("top_p", 0, 1),
        ("presence_penalty", -2, 2),
        ("frequency_penalty", -2, 2),
    ):
        value = _number(body, name, low=low, high=high)
        if value is not None:
            sampling[name] = value
    seed = typed(body, "seed", "integer")
    if seed is not None:
        sampling["sampling_seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        if not (isinstance(stop, str) or is_kind(stop, "list of strings")):
            raise BadRequest("'stop' must be a string or a list of strings")
        sampling["stop"] = [stop] if isinstance(stop, str) else stop
    for name, kind in IGNORED_FIELDS.items():
        typed(body, name, kind)
    typed(body, "chat_template_kwargs", "object")  # its keys: chat_template.py
    extras: dict[str, Any] = {}
    for key, value in body.items():
        if key in SAMPLING_EXTRAS:
            if typed(body, key, SAMPLING_EXTRAS[key]) is not None:
                sampling[key] = value
        elif key not in CHAT_FIELDS and value is not None:
            extras[key] = value  # a null extension field means unset: SGLang misreads nulls
    _check_rid(extras.get("rid"), n)
    top = _integer(body, "top_logprobs", low=0, high=20) or 0
    if completions:  # the legacy API: "logprobs": N asks for the N best alternatives
        top = _integer(body, "logprobs", low=0, high=5) or 0
    options = typed(body, "stream_options", "object") or {}
    include_usage = typed(options, "include_usage", "boolean", "stream_options.") or False
    model = typed(body, "model", "string") or default_model
    return Call(
        stream=stream,
        n=n,
        sampling=sampling,
        extras=extras,
        logprobs=_logprobs(body, completions),
        top_logprobs=top,
        include_usage=include_usage,
        model=model,
        body=body,
    )


def _logprobs(body: dict[str, Any], completions: bool) -> bool:
    if completions:
        return _integer(body, "logprobs", low=0, high=5) is not None
    return bool(typed(body, "logprobs", "boolean"))


def _check_rid(rid: Any, n: int) -> None:
    if rid is None:
        return
    if n == 1:
        if not isinstance(rid, str):
            raise BadRequest("'rid' must be a string")
        return
    if not (is_kind(rid, "list of strings") and len(rid) == n and len(set(rid)) == n):
        raise BadRequest(f"'rid' with n = {n} must be a list of {n} distinct request ids")


def parse_messages(body: dict[str, Any], *, max_items: int) -> list[dict[str, Any]]:
    """Validated chat messages (content parts of type text are joined).

    ``max_items`` bounds the messages, their content parts and tool calls counted together.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    items = _count(0, len(messages), max_items)
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{index}] must be an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise BadRequest(f"messages[{index}] has no 'role'")
        if role not in ROLES:
            raise BadRequest(f"messages[{index}].role {role!r} is not one of {sorted(ROLES)}")
        for name in MESSAGE_STRINGS:
            value = message.get(name)
            if value is not None and not isinstance(value, str):
                raise BadRequest(f"'messages[{index}].{name}' must be a string")
        calls = message.get("tool_calls")
        if calls is not None:
            items = _count(items, len(calls) if isinstance(calls, list) else 0, max_items)
            _check_tool_calls(calls, f"messages[{index}]")
        content = message.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            items = _count(items, len(content), max_items)
            content = _text_of(content, f"messages[{index}]")
        elif not isinstance(content, str):
            raise BadRequest(f"messages[{index}].content must be a string, a list or null")
        clean.append({**message, "content": content})
    return clean


def _count(items: int, more: int, max_items: int) -> int:
    items += more
    if items > max_items:
        raise BadRequest(
            f"'messages' holds more than {max_items} messages, content parts and tool calls"
        )
    return items


def _text_of(parts: list[Any], where: str) -> str:
    texts = []
    for i, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise BadRequest(f"{where}.content: only text parts are supported")
        text = part.get("text")
        if not isinstance(text, str):
            raise BadRequest(f"'{where}.content[{i}].text' must be a string")
        texts.append(text)
    return "".join(texts)


def _check_tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list):
        raise BadRequest(f"{where}.tool_calls must be a list of objects with a 'function' object")
    for i, call in enumerate(calls):
        at = f"{where}.tool_calls[{i}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise BadRequest(
                f"{where}.tool_calls must be a list of objects with a 'function' object"
            )
        typed(call, "id", "string", f"{at}.")
        typed(call, "type", "string", f"{at}.")
        function = call["function"]
        if not isinstance(function.get("name"), str):
            raise BadRequest(f"'{at}.function.name' must be a string")
        typed(function, "arguments", "string or object", f"{at}.function.")


def parse_tools(body: dict[str, Any], *, max_items: int) -> list[dict[str, Any]] | None:
    """The request's ``tools`` (``None`` when there are none), each a function."""
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be a list")
    if len(tools) > max_items:
        raise BadRequest(f"'tools' has {len(tools)} tools; the limit is {max_items}")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type", "function") != "function":
            raise BadRequest(f"'tools[{i}]' must be an object of type 'function' with a 'function'")
        if not isinstance(function.get("name"), str):
            raise BadRequest(f"'tools[{i}].function.name' must be a string")
        typed(function, "description", "string", f"tools[{i}].function.")
        typed(function, "parameters", "object", f"tools[{i}].function.")
    return tools or None
