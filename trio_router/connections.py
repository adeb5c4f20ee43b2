"""Client connections: how many the file limit allows, and which one makes room.

Pure bookkeeping for the connection handler (``hypercorn_tuning``): no trio, no sockets.
A connection is *waiting* on its client (idle between requests, or its request head not
complete), *receiving* (its request started; its body may still be arriving) or
*responding*. At the limit, a newcomer takes the place of the connection that has waited
on its client the longest: a slow-loris client can fill the table, but not keep others out.
Only when every connection is responding is a newcomer refused.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

#: descriptors kept for everything but client and upstream connections: listeners, the
#: event loop, logs, tokenizer and config files, the Prometheus listener and its clients
FILE_RESERVE = 96
#: the default limit of client connections where the file limit allows more
MAX_AUTO_CONNECTIONS = 10_000

K = TypeVar("K")


def client_connection_budget(file_limit: int, upstream_connections: int, requested: int) -> int:
    """How many client connections may be open at once under ``file_limit`` descriptors.

    Upstream connections get up to half the descriptors; ``requested`` (0 = as many as
    fit, at most ``MAX_AUTO_CONNECTIONS``) is lowered to what fits.
    """
    upstream = min(upstream_connections, file_limit // 2)
    fits = max(1, file_limit - FILE_RESERVE - upstream)
    if requested <= 0:
        return min(fits, MAX_AUTO_CONNECTIONS)
    return min(requested, fits)


class ConnectionTable(Generic[K]):
    """The open client connections, in the order they began waiting on their clients."""

    __slots__ = ("_open", "_receiving", "_waiting", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: set[K] = set()
        self._waiting: OrderedDict[K, float] = OrderedDict()  # idle, or head incomplete
        self._receiving: OrderedDict[K, float] = OrderedDict()  # request started

    def __len__(self) -> int:
        return len(self._open)

    @property
    def full(self) -> bool:
        return len(self._open) >= self.limit

    def admit(self, key: K, now: float) -> None:
        """A new connection: it waits for its first request."""
        self._open.add(key)
        self._waiting[key] = now

    def waiting(self, key: K, now: float) -> None:
        """``key`` went idle: it waits for its client's next request."""
        if key in self._open:
            self._receiving.pop(key, None)
            self._waiting.pop(key, None)
            self._waiting[key] = now

    def receiving(self, key: K, now: float) -> None:
        """``key`` has a request head: its body may still be arriving."""
        if self._waiting.pop(key, None) is not None:
            self._receiving[key] = now

    def remove(self, key: K) -> None:
        """``key`` is closed (or about to be)."""
        self._open.discard(key)
        self._waiting.pop(key, None)
        self._receiving.pop(key, None)

    def make_room(self, still_receiving: Callable[[K], bool]) -> K | None:
        """The connection that has waited on its client longest, taken out of the table.

        ``still_receiving`` tells whether a connection whose request started still
        waits for its body (one that does not is responding: skipped until it is idle
        again). None when every connection is responding.
        """
        while self._receiving:
            oldest = next(iter(self._receiving))
            if still_receiving(oldest):
                break
            del self._receiving[oldest]
        heads = [next(iter(q.items())) for q in (self._waiting, self._receiving) if q]
        if not heads:
            return None
        victim = min(heads, key=lambda item: item[1])[0]
        self.remove(victim)
        return victim
