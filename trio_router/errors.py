"""The one exception tree of trio_router, each class carrying its HTTP meaning.

    RouterError                      500 internal_error
    ├── ConfigError                  (start-up only: printed as one line, exit 2)
    ├── BadRequest                   400 invalid_request_error
    │   ├── NotFound                 404 not_found_error
    │   ├── PayloadTooLarge          413 invalid_request_error
    │   └── ConnectionSpoiled        400 (answered, then the connection is closed)
    │       ├── RequestTimeout       408 (the request did not arrive in time)
    │       └── AmbiguousRequest     400 (its length is ambiguous)
    ├── Unauthorized                 401 authentication_error
    ├── Forbidden                    403 permission_error
    ├── NoHealthyWorker              503 service_unavailable
    ├── Overloaded                   503 or 429, with Retry-After
    ├── PluginError                  500 plugin_error
    └── UpstreamError                502 upstream_error
        ├── UpstreamConnectError     502 (never reached the worker: safe to retry)
        ├── UpstreamTimeout          504 upstream_timeout
        └── UpstreamProtocolError    502 (malformed or truncated answer)
            └── UpstreamUnanswered   502 (sent, then the connection broke before any answer)

Foreign exceptions (httpx, JSON, tokenizer) are translated at the boundary that
meets them; the HTTP edge turns any ``RouterError`` into ``error_body()`` JSON.
"""

from __future__ import annotations

import orjson


class RouterError(Exception):
    """Base of every error the router answers with; ``status`` and ``kind`` say how."""

    status = 500
    kind = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Extra response headers (e.g. Retry-After)."""
        return []


class ConfigError(RouterError):
    """Invalid configuration, found before anything starts."""


class BadRequest(RouterError):
    status = 400
    kind = "invalid_request_error"


class NotFound(BadRequest):
    status = 404
    kind = "not_found_error"


class PayloadTooLarge(BadRequest):
    status = 413


class ConnectionSpoiled(BadRequest):
    """A bad request after which the connection cannot carry another: answered, then closed."""

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"connection", b"close")]


class RequestTimeout(ConnectionSpoiled):
    """The client did not send its request in time."""

    status = 408


class AmbiguousRequest(ConnectionSpoiled):
    """The request's length is ambiguous (RFC 9112 §6.1), so where the next one starts is too."""


class Unauthorized(RouterError):
    status = 401
    kind = "authentication_error"


class Forbidden(RouterError):
    status = 403
    kind = "permission_error"


class NoHealthyWorker(RouterError):
    status = 503
    kind = "service_unavailable"


class Overloaded(RouterError):
    status = 503
    kind = "service_unavailable"

    def __init__(self, message: str, *, retry_after: int = 1, status: int = 503) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status
        if status == 429:
            self.kind = "rate_limit_error"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", str(self.retry_after).encode())]


class PluginError(RouterError):
    kind = "plugin_error"


class UpstreamError(RouterError):
    status = 502
    kind = "upstream_error"


class UpstreamConnectError(UpstreamError):
    """The request provably never reached the worker, so another worker may take it."""


class UpstreamTimeout(UpstreamError):
    status = 504
    kind = "upstream_timeout"


class UpstreamProtocolError(UpstreamError):
    pass


class UpstreamUnanswered(UpstreamProtocolError):
    """The worker broke the connection after the request was sent, before answering.

    The request may have run (a crashed worker), but the client has nothing yet, so an
    inference request may go to another worker (``--resend-unanswered``).
    """


def error_body(message: str, kind: str, status: int) -> bytes:
    """The JSON error document every endpoint answers with."""
    return orjson.dumps({"error": {"message": message, "type": kind, "code": status}})
