"""A lean HTTP/1.1 client to workers: hand-built requests, a small pool, raw socket I/O.

httpcore's pool re-examines every idle connection on every request (a readability
poll each, plus list juggling), which cost about a third of the router's CPU per
small request. Here each origin keeps a deque of idle connections: a request pops
the most recently used one, checks only that one (a zero-timeout poll: did the
worker close it or send stray bytes?) and pushes it back once its response was
read to the end. Expired connections are dropped from the deque's old end.

The request head is built by hand (the proxy already holds validated bytes) and
``http1.ResponseReader`` parses the response. Plain TCP is read and written on the
socket's descriptor (see ``Connection.receive``), TLS through trio's stream. A
request that fails on a reused connection before any byte of an answer arrived is
sent once more on a fresh connection: the worker closed the idle connection as we
reused it (the race every keep-alive client has).
"""

from __future__ import annotations

import os
import select
import ssl
from collections import deque
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from urllib.parse import urlsplit

import trio

from .errors import (
    NoHealthyWorker,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnanswered,
)
from .guarded import AddressGuard, open_guarded_tcp
from .http1 import ProtocolError, ResponseReader, is_token
from .upstream import UpstreamLimits

RECEIVE_SIZE = 65536
COALESCE = 65536  # a body up to this size goes out in one send with the head
NO_BODY_METHODS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS"})
BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ProtocolError)


class _Origin:
    """Where connections go (scheme, host, port) and its idle ones, oldest first."""

    __slots__ = ("host", "host_header", "idle", "port", "tls")

    def __init__(self, tls: bool, host: str, port: int) -> None:
        self.tls = tls
        self.host = host
        self.port = port
        name = f"[{host}]" if ":" in host else host
        default = 443 if tls else 80
        header = name if port == default else f"{name}:{port}"
        self.host_header = header.encode("ascii" if header.isascii() else "idna")
        self.idle: deque[Connection] = deque()


class Connection:
    """One connection to a worker; ``reader`` parses the responses it carries."""

    __slots__ = (
        "_closed",
        "_fd",
        "_idle",
        "_pool",
        "_ready",
        "idle_since",
        "origin",
        "poller",
        "reader",
        "stream",
    )

    def __init__(self, pool: ConnectionPool, origin: _Origin, stream: trio.abc.Stream) -> None:
        self._pool = pool
        self.origin = origin
        self.stream = stream
        self.reader = ResponseReader()
        self.idle_since = 0.0
        self._closed = False
        self._idle = False
        self._ready = False  # the last read filled the buffer: more is likely waiting
        # Plain TCP is read and written on its descriptor (see ``receive``); TLS goes
        # through trio's stream, and may deliver records (session tickets) on an idle
        # connection, so only plain TCP is polled for stray bytes.
        self._fd = -1
        self.poller: select.poll | None = None
        if isinstance(stream, trio.SocketStream):
            self._fd = stream.socket.fileno()
            self.poller = select.poll()
            self.poller.register(self._fd, select.POLLIN)

    async def receive(self) -> bytes:
        """The next bytes from the worker (``b""`` at its end of stream).

        On plain TCP this waits for readability first and then reads once:
        answers arrive after a pause (the worker computes), so trying first
        would cost a failed read and an extra pass of the scheduler each time.
        After a read that filled the buffer it reads first, yielding once.
        """
        fd = self._fd
        if fd < 0:
            return bytes(await self.stream.receive_some(RECEIVE_SIZE))
        while True:
            if self._ready:
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.wait_readable(fd)
            try:
                data = os.read(fd, RECEIVE_SIZE)
            except BlockingIOError:
                self._ready = False
                continue
            self._ready = len(data) == RECEIVE_SIZE
            return data

    async def send(self, data: bytes) -> None:
        """Send all of ``data``: on plain TCP one write when the socket takes it all
        (a small request always fits), else through trio's stream."""
        if self._fd >= 0:
            await trio.lowlevel.checkpoint_if_cancelled()  # as send_all would: no yield
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return
            await self.stream.send_all(memoryview(data)[sent:])
            return
        await self.stream.send_all(data)

    def is_idle(self) -> bool:
        return self._idle

    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close at once (no TLS goodbye) and free its slot; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._idle = False
        self._fd = -1  # the number may soon belong to another socket
        stream = self.stream
        while isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        if isinstance(stream, trio.SocketStream):
            stream.socket.close()
        self._pool.forget(self)


class ConnectionPool:
    """Idle connections per origin, and a bound on open connections to all of them."""

    def __init__(
        self,
        limits: UpstreamLimits,
        ssl_context: ssl.SSLContext | None = None,
        guard: AddressGuard | None = None,
    ) -> None:
        self.limits = limits
        self._guard = guard
        self._expiry = limits.keepalive_expiry
        self._origins: dict[tuple[bool, str, int], _Origin] = {}
        self._by_url: dict[str, _Origin] = {}
        self._slots = trio.Semaphore(limits.max_connections)
        self._waiting = 0
        self._open: set[Connection] = set()
        self._next_sweep = 0.0
        self._closed = False
        self._ssl = ssl_context

    @property
    def connections(self) -> list[Connection]:
        """Every open connection, idle or in use."""
        return list(self._open)

    def origin(self, base_url: str) -> _Origin:
        origin = self._by_url.get(base_url)
        if origin is None:
            parts = urlsplit(base_url)
            tls = parts.scheme == "https"
            key = (tls, parts.hostname or "", parts.port or (443 if tls else 80))
            origin = self._origins.get(key)
            if origin is None:
                origin = self._origins[key] = _Origin(*key)
            if len(self._by_url) > 4096:
                self._by_url.clear()
            self._by_url[base_url] = origin
        return origin

    def checkout(self, origin: _Origin) -> Connection | None:
        """The most recently used live idle connection to ``origin``, if any."""
        now = trio.current_time()
        if now >= self._next_sweep:
            self._sweep(now)
        idle = origin.idle
        while idle:
            conn = idle.pop()
            conn._idle = False
            if now - conn.idle_since < self._expiry and (
                conn.poller is None or not conn.poller.poll(0)
            ):
                return conn
            conn.close()  # expired, closed by the worker, or stray bytes
        return None

    def release(self, conn: Connection) -> None:
        """Keep ``conn`` for the next request if its exchange ended cleanly, else close it."""
        if conn.reader.reusable and not self._waiting and not self._closed and self._expiry > 0:
            conn.idle_since = trio.current_time()
            conn._idle = True
            conn.origin.idle.append(conn)
        else:
            conn.close()  # with tasks waiting for a slot, hand them this one

    def forget(self, conn: Connection) -> None:
        """``conn`` was closed: free its slot."""
        self._open.discard(conn)
        self._slots.release()

    async def connect(self, origin: _Origin, url: str) -> Connection:
        """A new connection to ``origin``, once a slot is free (``NoHealthyWorker`` if none
        frees up within the pool timeout)."""
        await self._acquire_slot()
        limits = self.limits
        stream: trio.abc.Stream | None = None
        try:
            with trio.move_on_after(limits.connect_timeout) as scope:
                if self._guard is None:
                    stream = tcp = await trio.open_tcp_stream(origin.host, origin.port)
                else:
                    stream = tcp = await open_guarded_tcp(origin.host, origin.port, self._guard)
                if origin.tls:
                    stream = trio.SSLStream(tcp, self._ssl_context(), server_hostname=origin.host)
                    await stream.do_handshake()
        except BaseException as exc:
            self._slots.release()
            if stream is not None:
                await trio.aclose_forcefully(stream)
            if isinstance(exc, (OSError, trio.BrokenResourceError)):
                raise UpstreamConnectError(
                    f"cannot connect to worker {url}: {exc or 'refused'}"
                ) from exc
            raise
        if scope.cancelled_caught or stream is None:
            self._slots.release()
            if stream is not None:
                await trio.aclose_forcefully(stream)
            raise UpstreamConnectError(
                f"cannot connect to worker {url}: timed out after {limits.connect_timeout:g} s"
            )
        conn = Connection(self, origin, stream)
        self._open.add(conn)
        return conn

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def _acquire_slot(self) -> None:
        try:
            self._slots.acquire_nowait()
            return
        except trio.WouldBlock:
            pass
        while self._evict_one():  # an idle connection elsewhere may give up its slot
            try:
                self._slots.acquire_nowait()
                return
            except trio.WouldBlock:
                pass
        self._waiting += 1
        try:
            with trio.move_on_after(self.limits.pool_timeout):
                await self._slots.acquire()
                return
        finally:
            self._waiting -= 1
        raise NoHealthyWorker("all upstream connections are busy; try again")

    def _evict_one(self) -> bool:
        """Close the oldest idle connection of any origin; False if there is none."""
        oldest: _Origin | None = None
        for origin in self._origins.values():
            if origin.idle and (
                oldest is None or origin.idle[0].idle_since < oldest.idle[0].idle_since
            ):
                oldest = origin
        if oldest is None:
            return False
        oldest.idle.popleft().close()
        return True

    def _sweep(self, now: float) -> None:
        """Close expired idle connections of every origin (at most once per expiry period)."""
        self._next_sweep = now + max(self._expiry, 0.5)
        for origin in self._origins.values():
            idle = origin.idle
            while idle and now - idle[0].idle_since >= self._expiry:
                idle.popleft().close()

    def close(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.close()
        for origin in self._origins.values():
            origin.idle.clear()


class LeanResponse:
    """A worker's response: status, headers (lower-case names) and the body as chunks,
    yielded as they arrive. Read to the end, its connection goes back to the pool;
    closed early (or on any error or cancellation), the connection is closed."""

    __slots__ = ("_conn", "_pool", "_state", "headers", "status", "url")

    def __init__(
        self,
        head: tuple[int, list[tuple[bytes, bytes]]],
        url: str,
        conn: Connection,
        pool: ConnectionPool,
    ) -> None:
        self.status, self.headers = head
        self.url = url
        self._conn: Connection | None = conn
        self._pool = pool
        self._state = 0  # 0 reading, 1 complete, 2 closed early

    @property
    def finished(self) -> bool:
        """The body was read to its end."""
        return self._state == 1

    def __aiter__(self) -> LeanResponse:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            if self._state == 1:
                raise StopAsyncIteration
            raise UpstreamProtocolError(f"response from worker {self.url} was closed")
        reader = conn.reader
        try:
            while (piece := reader.body()) is None:
                reader.feed(await conn.receive())
        except BaseException as exc:
            self._conn = None
            self._state = 2
            conn.close()
            if isinstance(exc, BROKEN):
                raise UpstreamProtocolError(
                    f"worker {self.url} broke the connection: {exc}"
                ) from exc
            raise
        if piece:
            return piece
        self._conn = None
        self._state = 1
        self._pool.release(conn)
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Close the response; an unfinished one closes its connection."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            self._state = 2
            conn.close()


class _Unanswered(Exception):
    """The connection failed before any byte of a response arrived."""


class _Exchange(AbstractAsyncContextManager[LeanResponse]):
    __slots__ = ("_args", "_client", "_response")

    def __init__(
        self,
        client: LeanUpstream,
        args: tuple[str, bytes, bytes, list[tuple[bytes, bytes]], bytes],
    ) -> None:
        self._client = client
        self._args = args
        self._response: LeanResponse | None = None

    async def __aenter__(self) -> LeanResponse:
        self._response = await self._client.open(*self._args)
        return self._response

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._response is not None:
            await self._response.aclose()


class LeanUpstream:
    """Sends requests to workers over pooled HTTP/1.1 connections (see the module doc)."""

    def __init__(
        self,
        limits: UpstreamLimits,
        ssl_context: ssl.SSLContext | None = None,
        guard: AddressGuard | None = None,
    ) -> None:
        """``ssl_context`` verifies https workers (default: the system's CAs); ``guard``
        checks the address of every new connection (``guarded``)."""
        self.limits = limits
        self.pool = ConnectionPool(limits, ssl_context, guard)

    def stream(
        self,
        base_url: str,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> AbstractAsyncContextManager[LeanResponse]:
        """Open a response from ``base_url``; it is closed when the block exits.

        ``target`` is the path plus query; ``headers`` must not carry host or
        content-length, which are set here.
        """
        return _Exchange(self, (base_url, method, target, headers, body))

    async def open(
        self,
        base_url: str,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> LeanResponse:
        """Send the request and read the response head; the caller must ``aclose`` it."""
        pool = self.pool
        origin = pool.origin(base_url)
        parts = [method, b" ", target, b" HTTP/1.1\r\nhost: ", origin.host_header, b"\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        lines = len(headers) + 3
        if body or method not in NO_BODY_METHODS:
            parts += (b"content-length: ", b"%d" % len(body), b"\r\n")
            lines += 1
        parts.append(b"\r\n")
        rest = body
        if len(body) <= COALESCE:
            parts.append(body)
            rest = b""
        payload = b"".join(parts)
        end = len(payload) - len(body) + len(rest)
        if (
            payload.count(b"\n", 0, end) != lines
            or payload.count(b"\r", 0, end) != lines
            or not target
            or b" " in target
            or not target.isascii()
        ):
            raise UpstreamError(f"invalid request line or header for worker {base_url}")
        if not is_token(method):
            raise UpstreamError(f"invalid request method for worker {base_url}")
        conn = pool.checkout(origin)
        reused = conn is not None
        if conn is None:
            conn = await pool.connect(origin, base_url)
        while True:
            try:
                head = await self._roundtrip(conn, method, payload, rest)
            except _Unanswered as exc:
                broke = UpstreamUnanswered(
                    f"worker {base_url} broke the connection without answering: "
                    f"{exc.__cause__ or 'closed'}"
                )
                if not reused:
                    raise broke from exc.__cause__
                reused = False  # it was closed while idle: once more, on a new connection
                try:
                    conn = await pool.connect(origin, base_url)
                except UpstreamConnectError as refused:
                    raise broke from refused  # the first attempt may have reached the worker
                continue
            except BROKEN as exc:
                raise UpstreamProtocolError(
                    f"worker {base_url} broke the connection: {exc}"
                ) from exc
            return LeanResponse(head, base_url, conn, pool)

    async def _roundtrip(
        self, conn: Connection, method: bytes, payload: bytes, rest: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Send the request on ``conn`` and read the response head; on failure ``conn``
        is closed (``_Unanswered`` if no byte of an answer came)."""
        reader = conn.reader
        stream = conn.stream
        answered = False
        try:
            reader.start(method)
            try:
                if rest:  # a large body may fill the socket buffer: bound the wait
                    with trio.move_on_after(self.limits.write_timeout) as scope:
                        await stream.send_all(payload)
                        await stream.send_all(rest)
                    if scope.cancelled_caught:
                        raise UpstreamTimeout(
                            f"sending the request to {conn.origin.host} timed out"
                        )
                else:
                    await conn.send(payload)
            except (trio.BrokenResourceError, OSError):
                pass  # the worker may have answered early (or closed): read what it sent
            while (head := reader.head()) is None:
                data = await conn.receive()
                answered = answered or bool(data)
                reader.feed(data)
            return head
        except BaseException as exc:
            conn.close()
            if not answered and isinstance(exc, BROKEN):
                raise _Unanswered from exc
            raise

    async def aclose(self) -> None:
        self.pool.close()
        await trio.lowlevel.checkpoint()
