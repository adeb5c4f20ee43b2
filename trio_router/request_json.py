"""Request bodies as JSON, with a bound on how deeply they nest (pure).

orjson reads up to 1,024 levels but writes only 254, and the router writes what it read
again: to a worker (``/generate`` with the cached ids, the OpenAI front ends), into a session's
records. So a body nested deeper than ``MAX_DEPTH`` levels is refused with a 400 where it is
read, before anything else happens; the margin up to 254 covers the levels the router adds
around a client's values when it writes them.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from .errors import BadRequest

__all__ = ["MAX_DEPTH", "check_depth", "loads_object"]

MAX_DEPTH: Final = 128
"""Arrays and objects nested in a request body, at most (the body itself is level 1)."""
_ORJSON_MAX_DEPTH: Final = 254  # what orjson.dumps writes; it raises beyond


def check_depth(value: Any, raw: bytes) -> None:
    """``BadRequest`` if ``value`` (parsed from ``raw``) nests deeper than ``MAX_DEPTH``."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return  # not enough brackets to nest that deep: no need to look closer
    wrapped = value
    for _ in range(_ORJSON_MAX_DEPTH - MAX_DEPTH):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)  # C speed, and it stops at the first level too many
    except orjson.JSONEncodeError:
        raise BadRequest(
            f"request body nests arrays and objects deeper than {MAX_DEPTH} levels"
        ) from None


def loads_object(raw: bytes) -> dict[str, Any]:
    """The JSON object in ``raw``: ``BadRequest`` if it is not JSON, not an object, or
    nested too deep."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    check_depth(body, raw)
    return body
