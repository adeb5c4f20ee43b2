"""hypercorn's trio connection handler, made safe and lean for a proxy.

``install()`` changes four things in hypercorn's ``TCPServer`` (class-level,
idempotent); the last three only on the hypercorn series they were written
against (0.18), the first on any:

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
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from typing import Any

import trio
from hypercorn.events import Closed, RawData
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer

log = logging.getLogger("trio_router.server")

_ATTRIBUTE = "_trio_router_tuned"
TUNED_SERIES = "0.18."


class IdleWatch:
    """hypercorn's idle task (``restart``/``stop``) as one task with a moving deadline."""

    __slots__ = ("_done", "_server", "_started", "idle", "scope")

    def __init__(self, server: Any) -> None:
        self._server = server
        self._started = False
        self._done = trio.CancelScope()  # the whole watch: the connection ended
        self.idle = False
        self.scope = trio.CancelScope()  # the wait for the keep-alive deadline

    async def restart(self, task_group: Any, action: Callable[[], Awaitable[None]]) -> None:
        """The connection is idle (``action`` is hypercorn's own timeout; not needed)."""
        server = self._server
        self.idle = True
        if server.context.terminated.is_set():
            self.scope.deadline = -math.inf  # shutting down: close it now
        else:
            self.scope.deadline = trio.current_time() + server.config.keep_alive_timeout
        if not self._started:
            self._started = True
            task_group._nursery.start_soon(self._watch)

    async def stop(self) -> None:
        """A request is in progress: no timeout."""
        self.idle = False
        self.scope.deadline = math.inf

    def end(self) -> None:
        """The client closed the connection: nothing is left to time out."""
        self._done.cancel()

    async def _watch(self) -> None:
        terminated = self._server.context.terminated
        with self._done:
            with self.scope:
                await terminated.wait()
                while not self.idle:  # hypercorn closes a busy connection after its response
                    await trio.sleep_forever()
            with trio.CancelScope(shield=True):
                await self._server._initiate_server_close()


async def read_socket(server: Any) -> None:
    """hypercorn's read loop for plain TCP with no read timeout: wait, then read once.

    Requests arrive after a pause (the client waits for the previous answer), so
    trying first would cost a failed read; and trio's stream adds a scheduler pass
    and, with hypercorn's ``fail_after``, two context managers to every read.
    """
    socket = server.stream.socket
    while True:
        fd = socket.fileno()  # each time: -1 once closed, never a reused number
        try:
            await trio.lowlevel.wait_readable(fd)
            data = os.read(fd, MAX_RECV)
        except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
            break
        await server.protocol.handle(RawData(data))
        if not data:
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
        if tuned:
            self.idle_task = IdleWatch(self)
        try:
            await original_run(self)
        except Exception:  # not BaseException: cancellation must pass
            log.exception("a client connection failed inside hypercorn; closed it")

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
        await original_send(self, event)

    async def read_data(self: Any) -> None:
        try:
            if type(self.stream) is trio.SocketStream and not self.config.read_timeout:
                await read_socket(self)
            else:
                await original_read(self)
        finally:
            self.idle_task.end()

    TCPServer.run = run  # type: ignore[method-assign]
    if tuned:
        TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
        TCPServer._read_data = read_data  # type: ignore[method-assign]
