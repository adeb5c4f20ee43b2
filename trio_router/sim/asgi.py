"""ASGI plumbing of the simulated worker: bodies, JSON answers, SSE streams, refusals."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import orjson

from .contract import Refusal, validation_error

if TYPE_CHECKING:
    from .job import Job

__all__ = [
    "SSE",
    "Dropped",
    "is_json",
    "not_json",
    "parse_body",
    "read_body",
    "send_bytes",
    "send_refusal",
    "send_stream_refusal",
]

Message = Mapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

MAX_BODY_BYTES: Final = 64 * 1024 * 1024
CT_JSON: Final = (b"content-type", b"application/json")
SSE_START: Final[dict[str, Any]] = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
}
DONE: Final = b"data: [DONE]\n\n"


def sim_error(status: int, message: str, kind: str = "invalid_request_error") -> Refusal:
    """An error of the simulator itself (faults, its own endpoints): the router's shape."""
    return Refusal(status, {"error": {"message": message, "type": kind, "code": status}})


class Dropped(Exception):
    """Raised inside a stream to simulate a dropped connection."""


class SSE:
    """Sends SSE events, honouring ``drop_after_events``."""

    __slots__ = ("left", "send")

    def __init__(self, send: Send, drop_after: int | None) -> None:
        self.send = send
        self.left = drop_after

    async def start(self) -> None:
        await self.send(SSE_START)

    async def event(self, data: bytes) -> None:
        if self.left is not None:
            if self.left <= 0:
                raise Dropped
            self.left -= 1
        await self.send(
            {"type": "http.response.body", "body": b"data: " + data + b"\n\n", "more_body": True}
        )

    async def done(self, job: Job) -> None:
        if self.left is not None and self.left <= 0:
            raise Dropped
        job.responded = True
        await self.send({"type": "http.response.body", "body": DONE, "more_body": False})


def not_json() -> Refusal:
    """SGLang 0.5.23's answer to a body not labelled ``application/json`` (curl's ``-d``)."""
    msg = "Input should be a dictionary or an instance of GenerateReqInput"
    return validation_error([{"type": "dataclass_type", "loc": ("body",), "msg": msg}])


def parse_body(raw: bytes, model: str) -> dict[str, Any]:
    """The JSON object of a request body, or FastAPI's validation error for ``model``."""
    if not raw.strip():
        raise validation_error([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        error = {"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error"}
        raise validation_error([{**error, "ctx": {"error": str(exc)}}]) from None
    if not isinstance(body, dict):
        msg = f"Input should be a dictionary or an instance of {model}"
        raise validation_error([{"type": "dataclass_type", "loc": ("body",), "msg": msg}])
    return body


def is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the request says its body is JSON (``application/json``, parameters allowed)."""
    for name, value in headers:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


async def read_body(receive: Receive) -> bytes | None:
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
            raise sim_error(413, "request body too large")
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    headers: tuple[tuple[bytes, bytes], ...] = (CT_JSON,),
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_refusal(send: Send, refusal: Refusal) -> None:
    headers = (CT_JSON, *refusal.headers)
    await send_bytes(send, refusal.status, orjson.dumps(refusal.document), headers)


async def send_stream_refusal(send: Send, refusal: Refusal) -> None:
    """How SGLang refuses a streamed request it has answered 200: an error event, [DONE]."""
    await send(SSE_START)
    event = b"data: " + orjson.dumps(refusal.event()) + b"\n\n"
    await send({"type": "http.response.body", "body": event + DONE, "more_body": False})
