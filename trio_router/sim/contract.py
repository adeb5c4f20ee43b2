"""What SGLang 0.5.23 refuses, and the exact documents it refuses with. Pure, no I/O.

SGLang checks a ``/generate`` body in three layers, each with its own answer shape:

1. FastAPI/pydantic parses the body into ``GenerateReqInput`` (not JSON, not an object,
   ``text``/``input_ids`` of the wrong type): 400 ``{"object": "error", "message": "1
   validation error: ...", "type": "Bad Request", "param": null, "code": 400}``.
2. Its JSON contract (``sglang/api/v1/api_types.py``, generated from the proto schema)
   checks every field's type and refuses unknown ``sampling_params`` keys: 400
   ``{"error": "unknown field `bogus`, expected one of ..."}`` -- a plain string.
3. The tokenizer manager and ``SamplingParams.verify`` raise ``ValueError`` (no prompt, a
   prompt longer than the context, ``max_new_tokens`` < 0, ...): 400 ``{"error":
   {"message": ...}}``, or, once a stream has begun, HTTP 200 with one event
   ``{"error": {"message", "type": "invalid_request_error", "code": 400, "retryable":
   false}}`` and then ``[DONE]``.

The OpenAI endpoints answer their refusals as ``{"object": "error", "message", "type":
"BadRequestError", "param": null, "code"}``; unknown routes and methods get FastAPI's
``{"detail": "Not Found"}`` and ``{"detail": "Method Not Allowed"}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Final

__all__ = [
    "Refusal",
    "error_shape",
    "generate_contract_error",
    "method_not_allowed",
    "not_found",
    "openai_error",
    "schema_error",
    "validation_error",
    "value_error",
    "verify_sampling",
]


class Refusal(Exception):
    """A request SGLang refuses: the status and JSON document it answers with.

    ``streamed`` marks the tokenizer manager's ``ValueError``s, which a stream that has
    already begun reports as an error event (see ``event``) instead of a status.
    """

    def __init__(
        self,
        status: int,
        document: dict[str, Any],
        *,
        streamed: bool = False,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(str(document))
        self.status = status
        self.document = document
        self.streamed = streamed
        self.headers = headers

    def event(self) -> dict[str, Any]:
        """The error event SGLang sends in a stream (HTTP 200) for this refusal."""
        error = self.document.get("error")
        message = error.get("message", "") if isinstance(error, dict) else str(error)
        return {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "code": self.status,
                "retryable": False,
            }
        }


def validation_error(errors: list[dict[str, Any]]) -> Refusal:
    """FastAPI's answer to a body pydantic cannot parse (SGLang's own handler)."""
    n = len(errors)
    lines = "\n".join(f"  {e!r}" for e in errors)
    message = f"{n} validation error{'s' if n != 1 else ''}:\n{lines}"
    document = {"object": "error", "message": message, "type": "Bad Request", "param": None}
    return Refusal(400, {**document, "code": 400})


def schema_error(message: str) -> Refusal:
    """The JSON contract's refusal: ``{"error": "<serde message>"}``."""
    return Refusal(400, {"error": message})


def value_error(message: str, status: int = 400) -> Refusal:
    """A ``ValueError`` of the tokenizer manager: ``{"error": {"message": ...}}``."""
    return Refusal(status, {"error": {"message": message}}, streamed=True)


def openai_error(message: str, status: int = 400, kind: str = "BadRequestError") -> Refusal:
    """A refusal of the OpenAI endpoints (``kind``: SGLang's error class, ``BadRequest`` for
    some request checks)."""
    document = {"object": "error", "message": message, "type": kind}
    return Refusal(status, {**document, "param": None, "code": status})


def not_found() -> Refusal:
    """FastAPI's 404 for a path SGLang does not serve."""
    return Refusal(404, {"detail": "Not Found"})


def method_not_allowed(allowed: frozenset[str]) -> Refusal:
    """FastAPI's 405, with the ``allow`` header naming the route's methods."""
    allow = ", ".join(sorted(allowed)).encode()
    return Refusal(405, {"detail": "Method Not Allowed"}, headers=((b"allow", allow),))


# ---------------------------------------------------------------- the JSON contract


class ContractError(ValueError):
    """A value that violates SGLang's JSON contract (serde's message)."""


Check = Callable[[Any], None]


def _unexpected(v: Any) -> str:
    """serde's ``Unexpected`` display, as SGLang's generated decoder spells it."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean `{'true' if v else 'false'}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v}`"
    if isinstance(v, str):
        return f'string "{v}"'
    if isinstance(v, list):
        return "sequence"
    if isinstance(v, dict):
        return "map"
    return type(v).__name__


def _invalid(v: Any, expected: str) -> ContractError:
    return ContractError(f"invalid type: {_unexpected(v)}, expected {expected}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _scalar(ok: Callable[[Any], bool], expected: str) -> Check:
    def check(v: Any) -> None:
        if not ok(v):
            raise _invalid(v, expected)

    return check


I64: Final = _scalar(_is_int, "i64")
F64: Final = _scalar(_is_number, "f64")
BOOL: Final = _scalar(lambda v: isinstance(v, bool), "a boolean")
STR: Final = _scalar(lambda v: isinstance(v, str), "a string")


def ANY(v: Any) -> None:
    """Fields the contract passes through as any JSON value."""


def U64(v: Any) -> None:
    if not _is_int(v):
        raise _invalid(v, "u64")
    if v < 0:
        raise ContractError(f"invalid value: integer `{v}`, expected u64")


def _seq(item: Check) -> Check:
    def check(v: Any) -> None:
        if not isinstance(v, list):
            raise _invalid(v, "a sequence")
        for e in v:
            item(e)

    return check


def _optional(item: Check) -> Check:
    def check(v: Any) -> None:
        if v is not None:
            item(v)

    return check


def _or_list(name: str, ok: Callable[[Any], bool], item: Check) -> Check:
    """A scalar or a list of them (SGLang's batch forms): ``StringOrList`` etc."""

    def check(v: Any) -> None:
        if isinstance(v, list):
            _seq(item)(v)
        elif not ok(v):
            raise _invalid(v, f"a value or an array of values for {name}")

    return check


def _token_ids_or_list(v: Any) -> None:
    if not isinstance(v, list):
        raise _invalid(v, "a value or an array of values for TokenIdsOrList")
    if not v or _is_number(v[0]):
        _seq(I64)(v)
    else:
        _seq(_seq(I64))(v)


def _map_of(item: Check) -> Check:
    def check(v: Any) -> None:
        if not isinstance(v, dict):
            raise _invalid(v, "a map")
        for e in v.values():
            item(e)

    return check


def _unknown_field(key: str, fields: tuple[str, ...]) -> ContractError:
    listed = ", ".join(f"`{f}`" for f in fields)
    return ContractError(f"unknown field `{key}`, expected one of {listed}")


def _struct(name: str, checks: Mapping[str, Check], *, deny_unknown: bool) -> Check:
    fields = tuple(checks)

    def check(v: Any) -> None:
        if not isinstance(v, dict):
            raise _invalid(v, f"struct {name}")
        for key, value in v.items():
            field_check = checks.get(key)
            if field_check is None:
                if deny_unknown:
                    raise _unknown_field(key, fields)
                continue
            if value is not None:
                field_check(value)

    return check


_STRING_OR_LIST: Final = _or_list("StringOrList", lambda v: isinstance(v, str), STR)
_OPTIONAL_STRING_OR_LIST: Final = _or_list(
    "OptionalStringOrList", lambda v: isinstance(v, str), _optional(STR)
)
_OPTIONAL_INT_OR_LIST: Final = _or_list("OptionalInt64OrList", _is_int, _optional(I64))

#: ``SamplingParams`` in the contract's field order (its unknown-field message lists them)
SAMPLING_FIELDS: Final[dict[str, Check]] = {
    "max_new_tokens": I64,
    "stop": _STRING_OR_LIST,
    "stop_token_ids": _seq(I64),
    "stop_regex": _STRING_OR_LIST,
    "temperature": F64,
    "top_p": F64,
    "top_k": I64,
    "min_p": F64,
    "frequency_penalty": F64,
    "presence_penalty": F64,
    "repetition_penalty": F64,
    "min_new_tokens": I64,
    "n": I64,
    "json_schema": STR,
    "regex": STR,
    "ebnf": STR,
    "structural_tag": STR,
    "ignore_eos": BOOL,
    "skip_special_tokens": BOOL,
    "spaces_between_special_tokens": BOOL,
    "no_stop_trim": BOOL,
    "stream_interval": I64,
    "logit_bias": _map_of(F64),
    "sampling_seed": I64,
    "custom_params": ANY,
    "beam_width": I64,
    "watermark": _struct(
        "WatermarkRequestConfig",
        {"enabled": BOOL, "key": STR, "context_window": I64},
        deny_unknown=True,
    ),
    "choice": _seq(STR),
}
_SAMPLING: Final = _struct("SamplingParams", SAMPLING_FIELDS, deny_unknown=True)


def _sampling_or_list(v: Any) -> None:
    if isinstance(v, list):
        _seq(_SAMPLING)(v)
    elif not isinstance(v, dict):
        raise _invalid(v, "a value or an array of values for SamplingParamsOrList")
    else:
        _SAMPLING(v)


_BOOL_OR_LIST: Final = _or_list("BoolOrList", lambda v: isinstance(v, bool), BOOL)
_INT_OR_LIST: Final = _or_list("Int64OrList", _is_int, I64)

#: ``GenerateRequest``'s typed fields (unknown top-level keys are ignored)
GENERATE_FIELDS: Final[dict[str, Check]] = {
    "rid": _STRING_OR_LIST,
    "text": _STRING_OR_LIST,
    "input_ids": _token_ids_or_list,
    "stream": BOOL,
    "sampling_params": _sampling_or_list,
    "return_logprob": _BOOL_OR_LIST,
    "logprob_start_len": _INT_OR_LIST,
    "top_logprobs_num": _INT_OR_LIST,
    "token_ids_logprob": _token_ids_or_list,
    "return_hidden_states": _BOOL_OR_LIST,
    "return_text_in_logprobs": BOOL,
    "bootstrap_host": _OPTIONAL_STRING_OR_LIST,
    "bootstrap_port": _OPTIONAL_INT_OR_LIST,
    "bootstrap_room": _OPTIONAL_INT_OR_LIST,
    "bootstrap_pair_key": _OPTIONAL_STRING_OR_LIST,
    "decode_tp_size": _OPTIONAL_INT_OR_LIST,
    "routed_dp_rank": I64,
    "disagg_prefill_dp_rank": I64,
    "extra_key": _STRING_OR_LIST,
    "priority": I64,
    "cache_salt": _STRING_OR_LIST,
    "require_reasoning": BOOL,
    "lora_path": _OPTIONAL_STRING_OR_LIST,
    "routing_key": STR,
    "max_thinking_tokens": U64,
    "session_id": STR,
    "custom_logit_processor": _OPTIONAL_STRING_OR_LIST,
    "custom_labels": _map_of(STR),
}
#: fields whose ``null`` the contract refuses too
NOT_NULL: Final = {"return_prompt_token_ids": BOOL, "routed_experts_start_len": I64}
_GENERATE: Final = _struct("GenerateRequest", GENERATE_FIELDS, deny_unknown=False)


def generate_contract_error(body: dict[str, Any]) -> str | None:
    """The contract violation in a parsed ``/generate`` body (serde's text), or None."""
    try:
        _GENERATE(body)
        for key, check in NOT_NULL.items():
            if key in body:
                check(body[key])
    except ContractError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------- SamplingParams.verify


def verify_sampling(sp: Mapping[str, Any], vocab_size: int) -> None:
    """SGLang's ``SamplingParams.verify``: the first bad value, as its ``ValueError``."""

    def get(key: str, default: Any) -> Any:
        value = sp.get(key)
        return default if value is None else value

    temperature, top_k = get("temperature", 1.0), get("top_k", -1)
    if 0 <= temperature < 1e-6:  # greedy: SGLang samples with top_k 1
        temperature, top_k = 1.0, 1
    beam_width = sp.get("beam_width")
    top_p, min_p = get("top_p", 1.0), get("min_p", 0.0)
    frequency, presence = get("frequency_penalty", 0.0), get("presence_penalty", 0.0)
    repetition, min_new = get("repetition_penalty", 1.0), get("min_new_tokens", 0)
    max_new = sp.get("max_new_tokens", 128)
    checks = [
        (
            beam_width is not None and beam_width < 1,
            f"beam_width must be at least 1, got {beam_width}.",
        ),
        (
            not math.isfinite(temperature) or temperature < 0,
            f"temperature must be a non-negative finite number, got {temperature}.",
        ),
        (not 0.0 < top_p <= 1.0, f"top_p must be in (0, 1], got {top_p}."),
        (not 0.0 <= min_p <= 1.0, f"min_p must be in [0, 1], got {min_p}."),
        (top_k < 1 and top_k != -1, f"top_k must be -1 (disable) or at least 1, got {top_k}."),
        (
            not -2.0 <= frequency <= 2.0,
            f"frequency_penalty must be in [-2, 2], got {frequency}.",
        ),
        (not -2.0 <= presence <= 2.0, f"presence_penalty must be in [-2, 2], got {presence}."),
        (
            not 0.0 < repetition <= 2.0,
            f"repetition_penalty must be in (0, 2] (1.0 = no penalty), got {repetition}.",
        ),
        (min_new < 0, f"min_new_tokens must be in [0, max_new_tokens], got {min_new}."),
        (
            max_new is not None and max_new < 0,
            f"max_new_tokens must be at least 0, got {max_new}.",
        ),
        (
            max_new is not None and max_new >= 0 and min_new > max_new,
            f"min_new_tokens must be in [0, max_new_tokens({max_new})], got {min_new}.",
        ),
    ]
    for wrong, message in checks:
        if wrong:
            raise value_error(message)
    for token_id in get("logit_bias", {}):
        if not token_id.lstrip("-").isdigit() or not 0 <= int(token_id) < vocab_size:
            raise value_error(f"logit_bias must has keys in [0, {vocab_size - 1}], got {token_id}.")
    grammars = [sp.get(k) for k in ("json_schema", "regex", "ebnf", "structural_tag")]
    if sum(g is not None for g in grammars) > 1:
        raise value_error("Only one of json_schema, regex, ebnf, or structural_tag can be set.")


def error_shape(document: Any, status: int) -> str | None:
    """Which of SGLang's refusal documents ``document`` is (None: none of them).

    ``schema`` ``{"error": "..."}``, ``value`` ``{"error": {"message"}}``, ``validation``
    and ``openai`` ``{"object": "error", ...}``, ``fastapi`` ``{"detail": "..."}``.
    """
    if not isinstance(document, dict):
        return None
    keys = set(document)
    if keys == {"error"}:
        error = document["error"]
        if isinstance(error, str):
            return "schema"
        if isinstance(error, dict) and set(error) == {"message"}:
            return "value" if isinstance(error["message"], str) else None
        return None
    if keys == {"detail"}:
        return "fastapi" if isinstance(document["detail"], str) else None
    if keys == {"object", "message", "type", "param", "code"} and document["code"] == status:
        if document["object"] != "error" or not isinstance(document["message"], str):
            return None
        kinds = {"Bad Request": "validation", "BadRequestError": "openai", "BadRequest": "openai"}
        return kinds.get(document["type"])
    return None
