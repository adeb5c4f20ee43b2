"""Connections to workers go only to addresses the allow-list admits, checked on each one.

``--worker-allow`` is checked when a worker registers, but its name may resolve elsewhere
later (DNS rebinding: 127.0.0.1 at registration, a forbidden address afterwards). So
every new connection to a worker resolves the host here, checks each address it got
(``AddressGuard``, from ``security.address_guard``) and connects to a checked address
*as an address*: nothing resolves the name again behind the check. Every client to
workers goes through here: the lean data-plane pool (``open_guarded_tcp``), httpcore's
(``GuardedBackend``) and the httpx client of health probes and broadcasts
(``GuardedTransport``). A refused address is a failed connection that says why.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Iterable

import httpcore
import httpx
import trio

from .errors import Forbidden
from .security import IPAddress

#: raises ``Forbidden`` (saying why) when ``host`` must not be reached at ``address``
AddressGuard = Callable[[str, int, IPAddress], None]


class AddressRefused(OSError):
    """A worker's host resolved to no address the allow-list admits (or to none at all)."""


async def allowed_addresses(host: str, port: int, guard: AddressGuard) -> list[str]:
    """The addresses ``host`` resolves to that ``guard`` admits, in the resolver's order."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise AddressRefused(f"{host} does not resolve: {exc}") from None
    allowed: list[str] = []
    refusal = f"{host} resolves to no address"
    for info in infos:
        literal = str(info[4][0])
        if literal in allowed:
            continue
        try:
            guard(host, port, ipaddress.ip_address(literal.split("%", 1)[0]))
        except Forbidden as exc:
            refusal = f"refused to connect to {literal}: {exc.message}"
            continue
        allowed.append(literal)
    if not allowed:
        raise AddressRefused(refusal)
    return allowed


async def open_guarded_tcp(host: str, port: int, guard: AddressGuard) -> trio.SocketStream:
    """A TCP connection to the first admitted address of ``host`` that accepts one."""
    *others, last = await allowed_addresses(host, port, guard)
    for address in others:
        try:
            return await trio.open_tcp_stream(address, port)
        except OSError:
            continue
    return await trio.open_tcp_stream(last, port)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's trio backend, connecting only to addresses ``guard`` admits."""

    def __init__(self, guard: AddressGuard) -> None:
        self._guard = guard
        self._trio = httpcore.TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        with trio.move_on_after(math.inf if timeout is None else timeout):
            try:
                addresses = await allowed_addresses(host, port, self._guard)
            except AddressRefused as exc:
                raise httpcore.ConnectError(str(exc)) from exc
            failure: httpcore.ConnectError | None = None
            for address in addresses:
                try:
                    return await self._trio.connect_tcp(
                        address,
                        port,
                        timeout=timeout,
                        local_address=local_address,
                        socket_options=socket_options,
                    )
                except httpcore.ConnectError as exc:
                    failure = exc
            assert failure is not None
            raise failure
        raise httpcore.ConnectTimeout(f"connecting to {host}:{port} timed out")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("workers are reached over TCP only")

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over a pool that connects through ``GuardedBackend``.

    httpx has no parameter for a network backend, so the pool it built is replaced by
    one built alike (no proxies from the environment: workers are reached directly).
    """

    def __init__(self, guard: AddressGuard, *, limits: httpx.Limits) -> None:
        super().__init__(limits=limits, trust_env=False)
        built = self._pool
        assert isinstance(built, httpcore.AsyncConnectionPool)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=built._ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(guard),
        )
