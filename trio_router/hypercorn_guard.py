"""One connection's failure must not stop the server.

hypercorn 0.18 lets an exception escape a connection's task: for example a
``KeyError`` in its HTTP/2 code when a client goes on sending DATA frames for a
stream the app has already answered (an early 4xx to a large upload over h2c
prior knowledge). In the trio worker that exception cancels every other
connection and ends ``serve``: one request could take the router down.
``install()`` wraps hypercorn's per-connection runner so such an error closes
only its own connection, and is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.trio.tcp_server import TCPServer

log = logging.getLogger("trio_router.server")

_ATTRIBUTE = "_trio_router_guarded"


def install() -> None:
    """Guard hypercorn's trio connection handler (idempotent)."""
    if getattr(TCPServer, _ATTRIBUTE, False):
        return
    original: Callable[[Any], Awaitable[None]] = TCPServer.run

    async def run(self: Any) -> None:
        try:
            await original(self)
        except Exception:  # not BaseException: cancellation must pass
            log.exception("a client connection failed inside hypercorn; closed it")

    TCPServer.run = run  # type: ignore[method-assign]
    setattr(TCPServer, _ATTRIBUTE, True)
