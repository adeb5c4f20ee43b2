"""The data-plane client to workers: what the proxy needs of it, and the httpcore one.

``UpstreamClient`` and ``UpstreamResponse`` are all the proxy relies on. Two
clients provide them: ``lean_upstream.LeanUpstream`` (the default, a lean pool of
its own) and ``Upstream`` here, over httpcore's pool (``--upstream-client
httpcore``). httpx is a convenience layer over httpcore; the proxy needs none of
it (no redirects, cookies or URL parsing per request), so ``Upstream`` talks to
httpcore's pool directly and gets bytes in, bytes out. Errors are translated at
this boundary into the router's own tree.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Protocol, cast
from urllib.parse import urlsplit

import httpcore
import trio

from .errors import (
    NoHealthyWorker,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnanswered,
)
from .guarded import AddressGuard, GuardedBackend


@dataclass(frozen=True, slots=True)
class UpstreamLimits:
    max_connections: int = 1024
    keepalive_expiry: float = 4.0
    connect_timeout: float = 5.0
    pool_timeout: float = 30.0
    write_timeout: float = 60.0


class UpstreamResponse(Protocol):
    """A worker's response: status, headers, and the body as chunks as they arrive.

    Iterated to the end, its connection may be reused; ``aclose`` before that
    closes the connection (the worker sees the disconnect).
    """

    status: int
    headers: list[tuple[bytes, bytes]]
    url: str

    @property
    def finished(self) -> bool:
        """The body was read to its end."""
        ...

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def __anext__(self) -> bytes: ...

    async def aclose(self) -> None: ...


class UpstreamClient(Protocol):
    """Sends requests to workers; errors come as the router's ``UpstreamError`` tree."""

    def stream(
        self,
        base_url: str,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> AbstractAsyncContextManager[UpstreamResponse]: ...

    async def aclose(self) -> None: ...


#: httpcore's words for a connection closed before any byte of an answer
NO_ANSWER = "without sending a response"


@contextmanager
def upstream_errors(url: str, *, head: bool = False) -> Iterator[None]:
    """Translate httpcore failures talking to ``url`` into router errors.

    ``head``: the request is being sent and its answer awaited, so a connection
    broken before any byte came is ``UpstreamUnanswered``.
    """
    try:
        yield
    except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
        raise UpstreamConnectError(f"cannot connect to worker {url}: {exc or 'refused'}") from exc
    except httpcore.PoolTimeout as exc:
        raise NoHealthyWorker("all upstream connections are busy; try again") from exc
    except httpcore.TimeoutException as exc:
        raise UpstreamTimeout(f"worker {url} timed out") from exc
    except (httpcore.NetworkError, httpcore.RemoteProtocolError) as exc:
        if head and (isinstance(exc, httpcore.NetworkError) or NO_ANSWER in str(exc)):
            raise UpstreamUnanswered(
                f"worker {url} broke the connection without answering: {exc}"
            ) from exc
        raise UpstreamProtocolError(f"worker {url} broke the connection: {exc}") from exc
    except httpcore.ProtocolError as exc:
        raise UpstreamError(f"protocol error talking to worker {url}: {exc}") from exc


class Upstream:
    """Sends requests to workers over one shared connection pool."""

    def __init__(self, limits: UpstreamLimits, guard: AddressGuard | None = None) -> None:
        """``guard`` checks the address of every new connection (``guarded``)."""
        self.limits = limits
        self.pool = httpcore.AsyncConnectionPool(
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_connections,
            keepalive_expiry=limits.keepalive_expiry,
            retries=0,
            network_backend=None if guard is None else GuardedBackend(guard),
        )
        self._timeouts = {
            "connect": limits.connect_timeout,
            "read": None,  # the request's own deadline bounds it
            "write": limits.write_timeout,
            "pool": limits.pool_timeout,
        }
        self._origins: dict[str, tuple[bytes, bytes, int]] = {}

    def _origin(self, base_url: str) -> tuple[bytes, bytes, int]:
        origin = self._origins.get(base_url)
        if origin is None:
            parts = urlsplit(base_url)
            scheme = parts.scheme.encode()
            host = (parts.hostname or "").encode()
            port = parts.port or (443 if scheme == b"https" else 80)
            origin = (scheme, host, port)
            if len(self._origins) > 4096:
                self._origins.clear()
            self._origins[base_url] = origin
        return origin

    @asynccontextmanager
    async def stream(
        self,
        base_url: str,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> AsyncIterator[HttpcoreResponse]:
        """Open a response from ``base_url``; it is closed when the block exits.

        ``target`` is the path plus query; ``headers`` must not carry host or
        content-length, which are set here.
        """
        scheme, host, port = self._origin(base_url)
        name = b"[%s]" % host if b":" in host else host
        default = 443 if scheme == b"https" else 80
        host_header = name if port == default else b"%s:%d" % (name, port)
        all_headers = [(b"host", host_header), *headers]
        if body or method not in (b"GET", b"HEAD", b"DELETE", b"OPTIONS"):
            all_headers.append((b"content-length", str(len(body)).encode()))
        request = httpcore.Request(
            method,
            httpcore.URL(scheme=scheme, host=host, port=port, target=target),
            headers=all_headers,
            content=body,
            extensions={"timeout": self._timeouts},
        )
        with upstream_errors(base_url, head=True):
            response = await self.pool.handle_async_request(request)
        wrapped = HttpcoreResponse(response, base_url)
        try:
            yield wrapped
        finally:
            with trio.CancelScope(shield=True), upstream_errors(base_url):
                await wrapped.aclose()

    async def aclose(self) -> None:
        await self.pool.aclose()


class HttpcoreResponse:
    """A worker's response: status, headers and the body as an async iterator of chunks."""

    __slots__ = ("_chunks", "_response", "finished", "headers", "status", "url")

    def __init__(self, response: httpcore.Response, url: str) -> None:
        self._response = response
        self.url = url
        self.status = response.status
        self.headers: list[tuple[bytes, bytes]] = response.headers
        self.finished = False
        # httpcore's body is an async generator: keep it so it can be closed explicitly
        self._chunks = cast(AsyncIterable[bytes], response.stream).__aiter__()

    def __aiter__(self) -> HttpcoreResponse:
        return self

    async def __anext__(self) -> bytes:
        try:
            with upstream_errors(self.url):
                chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self.finished = True
            raise
        return chunk

    async def aclose(self) -> None:
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()
        await self._response.aclose()
