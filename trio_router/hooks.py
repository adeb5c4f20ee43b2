"""Middleware: plugin classes that see each proxied request, its routing and its response.

A middleware subclasses ``Middleware`` and overrides any of five hooks::

    on_request(request)               before routing; may rewrite the request or answer it
    on_route(request, decision)       which worker the policy chose, and why
    on_response_start(request, head)  the worker's status and headers; may change them
    transform_body(request, head, b)  wraps the body iterator; may observe (a ``Tap``) or
                                      rewrite chunks
    on_response_end(request, outcome) after the last byte, or after a failure or disconnect

Only overridden hooks are called, in the order the middleware were listed
(``--middleware-paths``). A hook that raises turns into a 500 for that request
(a ``RouterError`` it raises keeps its own status) and the router stays up.
Built-in features such as the token cache use this same interface.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, PluginError, RouterError

if TYPE_CHECKING:
    from .policies import Decision

log = logging.getLogger("trio_router.hooks")

JSON_HEADERS: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]


@dataclass(slots=True, eq=False)
class ProxyRequest:
    """A request on its way to a worker. Middleware may change any field."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    routing_key: str | None
    request_id: str
    client: str | None = None
    #: a worker that already holds this request's prefix (for cache-aware routing)
    hint: str | None = None
    #: the path as the client sent it (percent-encoding kept), forwarded as is
    raw_path: bytes | None = None
    #: scratch space for middleware to carry state from one hook to the next
    state: dict[str, Any] = field(default_factory=dict)

    def header(self, name: bytes) -> bytes | None:
        """First value of header ``name`` (lower case)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_text(self, name: bytes) -> str | None:
        """First value of header ``name`` (lower case), as text."""
        value = self.header(name)
        return value.decode("latin-1") if value is not None else None

    def set_json_body(self, body: bytes) -> None:
        """Replace the body with JSON the router wrote, labelled as such (SGLang answers
        400 to a body without ``Content-Type: application/json``, e.g. curl's ``-d``)."""
        self.body = body
        self.headers = [
            *(h for h in self.headers if h[0] != b"content-type"),
            (b"content-type", b"application/json"),
        ]

    @property
    def target(self) -> bytes:
        path = self.raw_path if self.raw_path is not None else self.path.encode("utf-8")
        return path + b"?" + self.query if self.query else path


@dataclass(slots=True)
class Reply:
    """An answer given without (or instead of) a worker's.

    ``body`` is bytes, or an async iterator of chunks for a streamed answer
    (sent as it is produced; closed with ``aclose`` if the client goes away).
    """

    status: int
    body: bytes | AsyncIterator[bytes]
    headers: list[tuple[bytes, bytes]] = field(default_factory=lambda: list(JSON_HEADERS))


@dataclass(slots=True, eq=False)
class ResponseHead:
    status: int
    headers: list[tuple[bytes, bytes]]
    worker: str


@dataclass(slots=True)
class Outcome:
    """How a request ended, as ``on_response_end`` sees it."""

    status: int
    worker: str | None
    bytes_sent: int
    duration: float
    completed: bool
    error: RouterError | None = None


class Tap(AsyncIterator[bytes]):
    """A body wrapper that passes every chunk through unchanged (it only watches).

    ``transform_body`` may return one; unlike any other wrapper it keeps the
    response's ``content-length`` and framing. Subclasses override ``seen``.
    """

    def __init__(self, body: AsyncIterator[bytes]) -> None:
        self._body = body

    def __aiter__(self) -> Tap:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._body.__anext__()
        except StopAsyncIteration:
            self.finished()
            raise
        self.seen(chunk)
        return chunk

    def seen(self, chunk: bytes) -> None:
        """Called with each chunk as it passes."""

    def finished(self) -> None:
        """Called once the worker's body has ended, before the client gets its last byte."""


class Middleware:
    """Base class of plugins. ``__init__`` may take a keyword ``router``."""

    async def on_request(self, request: ProxyRequest) -> Reply | None:
        return None

    def on_route(self, request: ProxyRequest, decision: Decision) -> None:
        return None

    async def on_response_start(self, request: ProxyRequest, head: ResponseHead) -> None:
        return None

    def transform_body(
        self, request: ProxyRequest, head: ResponseHead, body: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        return body

    async def on_response_end(self, request: ProxyRequest, outcome: Outcome) -> None:
        return None


def _overrides(plugins: Sequence[Middleware], hook: str) -> list[tuple[str, Any]]:
    base = getattr(Middleware, hook)
    return [
        (type(p).__name__, getattr(p, hook))
        for p in plugins
        if getattr(type(p), hook, base) is not base
    ]


def _fail(name: str, hook: str, exc: Exception) -> RouterError:
    if isinstance(exc, RouterError):
        return exc
    log.error("middleware %s failed in %s", name, hook, exc_info=exc)
    return PluginError(f"middleware {name} failed in {hook}: {type(exc).__name__}: {exc}")


class MiddlewareChain:
    """Calls each hook of each plugin in order; skips hooks nobody overrides."""

    def __init__(self, plugins: Sequence[Middleware] = ()) -> None:
        self.plugins = list(plugins)
        self._on_request = _overrides(self.plugins, "on_request")
        self._on_route = _overrides(self.plugins, "on_route")
        self._on_start = _overrides(self.plugins, "on_response_start")
        self._transform = _overrides(self.plugins, "transform_body")
        self._on_end = _overrides(self.plugins, "on_response_end")
        self.has_end_hooks = bool(self._on_end)
        self.active = bool(
            self._on_request or self._on_route or self._on_start or self._transform or self._on_end
        )

    async def on_request(self, request: ProxyRequest) -> Reply | None:
        for name, hook in self._on_request:
            try:
                reply: Reply | None = await hook(request)
            except Exception as exc:
                raise _fail(name, "on_request", exc) from exc
            if reply is not None:
                return reply
        return None

    def on_route(self, request: ProxyRequest, decision: Decision) -> None:
        for name, hook in self._on_route:
            try:
                hook(request, decision)
            except Exception as exc:
                raise _fail(name, "on_route", exc) from exc

    async def on_response_start(self, request: ProxyRequest, head: ResponseHead) -> None:
        for name, hook in self._on_start:
            try:
                await hook(request, head)
            except Exception as exc:
                raise _fail(name, "on_response_start", exc) from exc

    def transform_body(
        self, request: ProxyRequest, head: ResponseHead, body: AsyncIterator[bytes]
    ) -> tuple[AsyncIterator[bytes], bool]:
        """The wrapped body, and whether any plugin replaced it (length may change)."""
        replaced = False
        for name, hook in self._transform:
            try:
                wrapped = hook(request, head, body)
            except Exception as exc:
                raise _fail(name, "transform_body", exc) from exc
            if wrapped is not body and not isinstance(wrapped, Tap):
                replaced = True
            body = wrapped
        return body, replaced

    async def on_response_end(self, request: ProxyRequest, outcome: Outcome) -> None:
        for name, hook in self._on_end:
            try:
                await hook(request, outcome)
            except Exception:
                log.exception("middleware %s failed in on_response_end", name)


def load_middleware(paths: Sequence[str], router: object) -> list[Middleware]:
    """Import and instantiate ``module.Class`` for each dotted path."""
    plugins = []
    for path in paths:
        module_name, _, class_name = path.rpartition(".")
        if not module_name:
            raise ConfigError(f"middleware path {path!r} must be module.ClassName")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"cannot import middleware module {module_name!r}: {exc}") from None
        cls: Any = getattr(module, class_name, None)
        if not (inspect.isclass(cls) and issubclass(cls, Middleware)):
            raise ConfigError(
                f"middleware {path!r} must name a subclass of trio_router.hooks.Middleware"
            )
        factory: Callable[..., Middleware] = cls
        try:
            params = inspect.signature(cls).parameters
            plugin = factory(router=router) if "router" in params else factory()
        except Exception as exc:
            raise ConfigError(f"middleware {path!r} failed to start: {exc}") from None
        plugins.append(plugin)
    return plugins
