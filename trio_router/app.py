"""The ASGI application: the control plane's paths go to Quart, all others to the proxy.

Splitting here keeps the framework off the data plane's hot path, while the
router's own endpoints get Quart's routing, request parsing and test tools.
"""

from __future__ import annotations

from typing import Any, cast

from quart_trio import QuartTrio

from .control import create_control_app
from .errors import error_body
from .hooks import Reply
from .proxy import Proxy, Receive, Scope, Send, send_reply
from .router import Router


def _control_paths(app: QuartTrio) -> tuple[frozenset[str], tuple[str, ...]]:
    """Exact paths and path prefixes (for rules with variables) that Quart serves."""
    exact: set[str] = set()
    prefixes: set[str] = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        text = rule.rule
        if "<" in text:
            prefixes.add(text.split("<", 1)[0])
        else:
            exact.add(text)
    return frozenset(exact), tuple(sorted(prefixes))


class RouterApp:
    """The router's ASGI 3 callable."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.control = create_control_app(router)
        self.proxy = Proxy(router)
        self._exact, self._prefixes = _control_paths(self.control)

    def is_control(self, path: str) -> bool:
        return path in self._exact or (bool(self._prefixes) and path.startswith(self._prefixes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(k) + len(v) + 4 for k, v in scope["headers"])
            if size > self.router.config.max_header_size:
                body = error_body(
                    f"request headers are {size} bytes; the limit is "
                    f"{self.router.config.max_header_size}",
                    "invalid_request_error",
                    431,
                )
                await send_reply(send, Reply(431, body))
                return
        if scope["type"] == "http" and not self.is_control(scope["path"]):
            await self.proxy(scope, receive, send)
        else:
            await self.control(cast(Any, scope), cast(Any, receive), cast(Any, send))


def create_app(router: Router) -> RouterApp:
    return RouterApp(router)
