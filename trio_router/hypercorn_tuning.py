"""hypercorn's trio connection handler, made safe and lean for a proxy.

``install()`` changes hypercorn's ``TCPServer`` (class-level, idempotent); all
but the first change only on the hypercorn series they were written against
(0.18):

- **One connection's failure must not stop the server.** hypercorn 0.18 lets
  an exception escape a connection's task (for example a ``KeyError`` in its
  HTTP/2 code when a client goes on sending DATA for a stream the app already
  answered). In the trio worker that cancels every other connection and ends
  ``serve``. The runner is wrapped so such an error closes only its own
  connection, and is logged.
- **Bytes go out in one write when the socket takes them.** hypercorn sends
  every piece of a response (head, each streamed chunk) under a ``trio.Lock``
  and through ``send_all``, two passes of the scheduler per piece. When no
  send is pending, a plain TCP socket is written at once; only what it does
  not take (a full buffer, an error) goes the original way, behind the lock.
- **Reads wait, then read once.** On plain TCP with no read timeout, the
  connection's read loop waits for readability and reads the socket once,
  instead of a failed read, a scheduler pass and two context managers per read.
- **One keep-alive timer per connection, started with it.** hypercorn
  cancels its idle task when a request starts and starts a new one, with
  ``nursery.start``, from inside the app's last ``send``. Until that task
  reports started it runs in the app's cancel scope, and an app that cancels
  its own scope once the response is out (quart-trio's disconnect watcher,
  ours) cancels the new timer too: an idle keep-alive connection was never
  timed out, and a shutdown waited ``graceful_timeout`` for it. Here one task
  per connection, started with the connection, waits under a cancel scope
  whose deadline moves: ``keep_alive_timeout`` after the connection went
  idle, never while a request is in progress. A shutdown closes idle
  connections at once, and the timer ends when the client closes (hypercorn
  kept a connection closed before its first request until the timeout).

And the limits of a ``TunedConfig`` (a plain hypercorn ``Config`` has none):

- **A request head has ``header_timeout`` seconds** from its first byte: a client
  sending one a byte at a time gets a 408 and the connection is closed (before its
  first byte, an idle connection has the keep-alive timeout, and closes quietly).
- **A head is at most ``h11_max_incomplete_size`` bytes, request target included.**
  h11 checks the size only while a head is incomplete, after each read; a read is
  sized so that the check sees a head that is too long before it can end (431).
- **At most ``client_connections.limit`` connections** (``connections``): a newcomer
  takes the place of the one that has waited on its client the longest.
- **A request body nobody read is drained before the close** (lingering close): the
  answer (a 413, say) is followed by the end of our side, then what the client still
  sends is read and dropped, up to ``LINGER_BYTES`` and ``LINGER_SECONDS``, so a client
  that writes its whole body before reading gets the answer, not a reset.
- **Closing a connection cannot be cancelled.** hypercorn closes a connection that
  must not be kept (``Connection: close``, a request body left unread) from inside
  the app's last ``send``; an app that cancels its own scope once the response is out
  (quart-trio does, and so does our proxy after an error reply) cancelled the close, so
  the connection stayed open until the keep-alive timeout.
- **What a client can repeat is logged briefly**: a malformed request, a refused or
  evicted connection, a connection's failure are one short line each, at most one a
  second (ten for connections), counting those left out.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from typing import Any

import h11
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.events import Closed, RawData
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer

from .connections import ConnectionTable
from .errors import error_body
from .log_throttle import ThrottledLog

log = logging.getLogger("trio_router.server")

_ATTRIBUTE = "_trio_router_tuned"
TUNED_SERIES = "0.18."
#: a request body nobody read (its answer was a 413, say) is read and dropped, up to this
#: many bytes and seconds, before its connection is closed
LINGER_BYTES = 128 * 1024 * 1024
LINGER_SECONDS = 10.0


class ConnectionNotices:
    """Throttled log lines about client connections (one set per listener)."""

    __slots__ = ("evicted", "failed", "malformed", "refused")

    def __init__(self) -> None:
        self.malformed = ThrottledLog(log, 1.0)
        self.failed = ThrottledLog(log, 1.0)
        self.evicted = ThrottledLog(log, 10.0)
        self.refused = ThrottledLog(log, 10.0)


class TunedConfig(HypercornConfig):
    """hypercorn's configuration plus the connection limits the tuned handler enforces."""

    def __init__(self, *, header_timeout: float = 0.0, max_connections: int = 0) -> None:
        super().__init__()
        self.header_timeout = header_timeout  # 0: no limit
        self.client_connections: ConnectionTable[IdleWatch] | None = (
            ConnectionTable(max_connections) if max_connections > 0 else None
        )
        self.notices = ConnectionNotices()

    def create_sockets(self) -> Sockets:
        """As hypercorn's (plain TCP ``host:port`` binds), but a socket that cannot bind is
        closed, not left to the garbage collector (hypercorn's leaks it)."""
        if self.ssl_enabled or any(b.startswith(("unix:", "fd://")) for b in self.bind):
            return super().create_sockets()
        sockets: list[socket.socket] = []
        try:
            for bind in self.bind:
                sockets.append(listening_socket(bind))
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return Sockets([], sockets, [])


def listening_socket(bind: str) -> socket.socket:
    """A bound, non-blocking TCP socket for ``host:port`` (``[v6]:port``), set up as
    hypercorn sets up its own; closed again if it cannot bind."""
    host, _, port = bind.replace("[", "").replace("]", "").rpartition(":")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.setblocking(False)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def _notices(config: Any) -> ConnectionNotices:
    notices = getattr(config, "notices", None)
    if notices is None:  # a plain hypercorn Config (a test's upstream): its own, once
        notices = config.notices = ConnectionNotices()
    return notices


def _h11(server: Any) -> h11.Connection | None:
    """The connection's h11 state machine (None for HTTP/2 and WebSocket)."""
    protocol = getattr(getattr(server, "protocol", None), "protocol", None)
    if type(protocol) is H11Protocol and type(protocol.connection) is h11.Connection:
        return protocol.connection
    return None


def _still_receiving(watch: IdleWatch) -> bool:
    """Whether the request in progress still waits for its body, with no answer begun
    (or with its answer sent, the rest of the body being dropped before the close)."""
    connection = _h11(watch.server)
    return watch.linger is not None or (
        connection is not None
        and connection.their_state is h11.SEND_BODY
        and connection.our_state is h11.SEND_RESPONSE
    )


def _request_timeout_answer(timeout: float) -> bytes:
    body = error_body(
        f"request head not received within {timeout:g} s", "invalid_request_error", 408
    )
    return (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    )


class IdleWatch:
    """hypercorn's idle task (``restart``/``stop``) as one task with a moving deadline.

    The deadline is the keep-alive timeout while the connection is idle, the header
    timeout once a request head has begun, none while a request is in progress.
    """

    __slots__ = (
        "_done",
        "_started",
        "evicted",
        "head_bytes",
        "idle",
        "linger",
        "scope",
        "server",
    )

    def __init__(self, server: Any) -> None:
        self.server = server
        self._started = False
        self._done = trio.CancelScope()  # the whole watch: the connection ended
        self.idle = False
        self.head_bytes = 0  # bytes received since the connection went idle
        self.evicted = False
        self.scope = trio.CancelScope()  # the wait for the deadline
        self.linger: Linger | None = None  # closing: the rest of a request body is dropped

    def _table(self) -> ConnectionTable[IdleWatch] | None:
        return getattr(self.server.config, "client_connections", None)

    async def restart(self, task_group: Any, action: Callable[[], Awaitable[None]]) -> None:
        """The connection is idle (``action`` is hypercorn's own timeout; not needed)."""
        server = self.server
        self.idle = True
        self.head_bytes = 0
        now = trio.current_time()
        if server.context.terminated.is_set():
            self.scope.deadline = -math.inf  # shutting down: close it now
        else:
            self.scope.deadline = now + server.config.keep_alive_timeout
        table = self._table()
        if table is not None:
            table.waiting(self, now)
        if not self._started:
            self._started = True
            task_group._nursery.start_soon(self._watch)

    async def stop(self) -> None:
        """A request is in progress: no timeout."""
        self.idle = False
        self.scope.deadline = math.inf
        table = self._table()
        if table is not None:
            table.receiving(self, trio.current_time())

    def read_size(self) -> int:
        """How much to read: while a head is incomplete, one byte past its limit at most."""
        if self.linger is not None:
            return max(1, min(MAX_RECV, self.linger.left))
        if not self.idle or _h11(self.server) is None:  # HTTP/2 frames are not a head
            return MAX_RECV
        room: int = self.server.config.h11_max_incomplete_size + 1 - self.head_bytes
        return max(1, min(MAX_RECV, room))

    def received(self, size: int) -> None:
        """``size`` bytes arrived; while idle they begin a request head."""
        if not self.idle or not size or _h11(self.server) is None:
            return
        if not self.head_bytes:
            timeout = getattr(self.server.config, "header_timeout", 0)
            if timeout > 0 and not self.server.context.terminated.is_set():
                self.scope.deadline = trio.current_time() + timeout
        self.head_bytes += size

    def evict(self) -> None:
        """Close the connection to make room for another."""
        self.evicted = True
        self.scope.cancel()

    def end(self) -> None:
        """The client closed the connection: nothing is left to time out."""
        self._done.cancel()

    async def _watch(self) -> None:
        server = self.server
        terminated = server.context.terminated
        with self._done:
            with self.scope:
                await terminated.wait()
                while not self.idle:  # hypercorn closes a busy connection after its response
                    await trio.sleep_forever()
            with trio.CancelScope(shield=True):
                if self.idle and self.head_bytes and not self.evicted:
                    self._answer_head_timeout()
                await server._initiate_server_close()

    def _answer_head_timeout(self) -> None:
        """A 408, if the socket takes it at once (a client that does not read gets none)."""
        stream = self.server.stream
        connection = _h11(self.server)
        if type(stream) is not trio.SocketStream or connection is None:
            return
        if connection.our_state is not h11.IDLE:
            return
        with contextlib.suppress(OSError):
            os.write(
                stream.socket.fileno(),
                _request_timeout_answer(self.server.config.header_timeout),
            )


class Linger:
    """A connection being closed while its client still sends a request body nobody read:
    the reader drops up to ``left`` more bytes, then sets ``done``."""

    __slots__ = ("done", "left")

    def __init__(self, budget: int) -> None:
        self.left = budget
        self.done = trio.Event()


async def linger_before_close(server: Any) -> None:
    """Before closing a connection whose client is still sending a request body (the app
    answered without reading it all, as with a 413): end our side, so the client sees the
    whole answer, and drop what it sends until it is done, up to ``LINGER_BYTES`` and
    ``LINGER_SECONDS``. Closing at once would reset the connection under a client that
    writes its whole body before it reads (Python's urllib), which then sees "Broken pipe"
    instead of the answer (RFC 9112 §9.6)."""
    watch = server.idle_task
    connection = _h11(server)
    stream = server.stream
    if (
        type(watch) is not IdleWatch
        or watch.linger is not None
        or type(stream) is not trio.SocketStream
        or connection is None
        or connection.their_state is not h11.SEND_BODY
    ):
        return
    watch.linger = linger = Linger(LINGER_BYTES)
    try:
        stream.socket.shutdown(socket.SHUT_WR)
    except OSError:  # the client is gone
        return
    with trio.move_on_after(LINGER_SECONDS):
        await linger.done.wait()


def make_room(server: Any, table: ConnectionTable[IdleWatch]) -> bool:
    """At the connection limit: close the connection that waited longest (False: none)."""
    notices = _notices(server.config)
    now = trio.current_time()
    victim = table.make_room(_still_receiving)
    if victim is None:
        notices.refused.log(
            now,
            logging.WARNING,
            "%d client connections, all busy: refused a new one from %s",
            table.limit,
            _peer(server),
        )
        return False
    victim.evict()
    notices.evicted.log(
        now,
        logging.INFO,
        "%d client connections: closed the one waiting longest on its client, for a new one",
        table.limit,
    )
    return True


def _peer(server: Any) -> str:
    """The client's address (known to the protocol even once the socket is closed)."""
    client = getattr(getattr(getattr(server, "protocol", None), "protocol", None), "client", None)
    if client:
        return str(client[0])
    try:
        return str(server.stream.socket.getpeername()[0])
    except (AttributeError, OSError, IndexError):
        return "?"


async def read_socket(server: Any, watch: IdleWatch) -> None:
    """hypercorn's read loop for plain TCP with no read timeout: wait, then read once.

    Requests arrive after a pause (the client waits for the previous answer), so
    trying first would cost a failed read; and trio's stream adds a scheduler pass
    and, with hypercorn's ``fail_after``, two context managers to every read.
    """
    sock = server.stream.socket
    while True:
        fd = sock.fileno()  # each time: -1 once closed, never a reused number
        if fd < 0:  # hypercorn closed it (an answer with Connection: close, an error)
            break
        try:
            await trio.lowlevel.wait_readable(fd)
            data = os.read(fd, watch.read_size())
        except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
            break
        linger = watch.linger
        if linger is not None:  # answered and closing: the rest of the body is dropped
            linger.left -= len(data)
            if not data or linger.left <= 0:
                break
            continue
        watch.received(len(data))
        await server.protocol.handle(RawData(data))
        if not data:
            break
        connection = _h11(server)
        if connection is not None and connection.their_state is h11.ERROR:
            _notices(server.config).malformed.log(
                trio.current_time(),
                logging.INFO,
                "refused a malformed HTTP request from %s",
                _peer(server),
            )
            break
    await server.protocol.handle(Closed())


def install() -> None:
    """Tune hypercorn's trio connection handler (see the module doc; idempotent)."""
    if getattr(TCPServer, _ATTRIBUTE, False):
        return
    setattr(TCPServer, _ATTRIBUTE, True)
    tuned = version("hypercorn").startswith(TUNED_SERIES)
    if not tuned:
        log.warning(
            "hypercorn %s: its send path and idle timer are left as they are (tuned for %sx)",
            version("hypercorn"),
            TUNED_SERIES,
        )
    original_run: Callable[[Any], Awaitable[None]] = TCPServer.run
    original_send: Callable[[Any, Any], Awaitable[None]] = TCPServer.protocol_send
    original_read: Callable[[Any], Awaitable[None]] = TCPServer._read_data

    async def run(self: Any) -> None:
        table: ConnectionTable[IdleWatch] | None = None
        if tuned:
            self.idle_task = watch = IdleWatch(self)
            table = getattr(self.config, "client_connections", None)
            if table is not None:
                if table.full and not make_room(self, table):
                    return  # the stream is closed by trio's handler
                table.admit(watch, trio.current_time())
        try:
            await original_run(self)
        except Exception as exc:  # not BaseException: cancellation must pass
            _notices(self.config).failed.log(
                trio.current_time(),
                logging.WARNING,
                "a client connection failed inside hypercorn (%s: %s); closed it",
                type(exc).__name__,
                str(exc)[:200],
            )
            log.debug("the failure in full", exc_info=True)
        finally:
            if table is not None:
                table.remove(self.idle_task)

    async def protocol_send(self: Any, event: Any) -> None:
        if type(event) is RawData and not self.send_lock.locked():
            stream = self.stream
            if type(stream) is trio.SocketStream:
                await trio.lowlevel.checkpoint_if_cancelled()  # as the lock would: no yield
                data = event.data
                try:
                    sent = os.write(stream.socket.fileno(), data)
                except OSError:  # a full buffer, or a broken connection: the original way
                    sent = 0
                if sent == len(data):
                    return
                if sent:
                    event = RawData(data=data[sent:])
        elif type(event) is Closed:  # as the original, but the close itself is shielded
            with trio.CancelScope(shield=True):
                await linger_before_close(self)
                await self._close()
            await self.protocol.handle(event)
            return
        await original_send(self, event)

    async def read_data(self: Any) -> None:
        try:
            if type(self.stream) is trio.SocketStream and not self.config.read_timeout:
                await read_socket(self, self.idle_task)
            else:
                await original_read(self)
        finally:
            self.idle_task.end()
            linger = getattr(self.idle_task, "linger", None)
            if linger is not None:
                linger.done.set()

    TCPServer.run = run  # type: ignore[method-assign]
    if tuned:
        TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
        TCPServer._read_data = read_data  # type: ignore[method-assign]
