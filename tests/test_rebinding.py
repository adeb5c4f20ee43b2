"""DNS rebinding: a worker name that resolves to an allowed address at registration and to
a forbidden one afterwards gets no byte from the router.

A fake resolver (``trio.socket.set_custom_hostname_resolver``, per trio run, so per test)
answers ``rebind.test``; the forbidden address is 127.0.0.9, where an impostor listens on
the worker's port and answers 200 to everything, so a request that reached it would look
like a success. The allow-list is ``--worker-allow 127.0.0.1``.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import httpx
import pytest
import trio

from trio_router.errors import Forbidden
from trio_router.guarded import AddressRefused, GuardedTransport, open_guarded_tcp
from trio_router.security import address_guard, parse_allow

from .conftest import start_router, start_worker
from .test_proxy import wait_until
from .test_upstream import RawServer, answer_all, serve_raw

NAME = "rebind.test"
ALLOWED = "127.0.0.1"
FORBIDDEN = "127.0.0.9"


class Rebinding(trio.abc.HostnameResolver):
    """Answers ``NAME`` with ``answers`` one after another (the last one for good); other
    names as the system does."""

    def __init__(self, *answers: str | list[str]) -> None:
        self.answers = [[a] if isinstance(a, str) else a for a in answers]
        self.lookups = 0

    def now(self, *answers: str) -> None:
        """From the next lookup on, answer ``answers``."""
        self.answers = [list(answers)]

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[Any]:
        if host != NAME.encode():
            return await trio.to_thread.run_sync(
                socket.getaddrinfo, host, port, family, type, proto, flags
            )
        await trio.lowlevel.checkpoint()
        self.lookups += 1
        addresses = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        number = int(port or 0)
        return [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, number))
            for a in addresses
        ]

    async def getnameinfo(self, sockaddr: Any, flags: int) -> tuple[str, str]:
        raise NotImplementedError


def rebind(*answers: str | list[str]) -> Rebinding:
    resolver = Rebinding(*answers)
    trio.socket.set_custom_hostname_resolver(resolver)
    return resolver


async def impostor(nursery: trio.Nursery, port: int) -> RawServer:
    """A server on the forbidden address, answering 200 to every request."""
    return await serve_raw(nursery, answer_all, host=FORBIDDEN, port=port)


def state(running: Any, url: str) -> tuple[str, str | None]:
    worker = running.router.pool.get(url)
    return worker.state.value, worker.last_error


async def test_a_name_rebound_after_registration_is_never_probed_or_served(nursery, client):
    worker = await start_worker(nursery)
    trap = await impostor(nursery, worker.port)
    url = f"http://{NAME}:{worker.port}"
    resolver = rebind(ALLOWED, FORBIDDEN)  # registration sees the allowed address only
    running = await start_router(nursery, worker_allow=(ALLOWED,))
    with trio.fail_after(10):
        added = await client.post(running.url + "/add_worker", params={"url": url})
        generated = await client.post(running.url + "/generate", json={"text": "x"})
        flushed = await client.post(running.url + "/flush_cache")
        await wait_until(lambda: running.router.health.rounds >= 2)
    assert added.status_code == 200
    assert resolver.lookups >= 3  # registration, then each new connection resolved again
    # the probe went nowhere: the worker is not healthy, and says why
    worker_state, last_error = state(running, url)
    assert worker_state in ("pending", "quarantined")
    assert f"refused to connect to {FORBIDDEN}" in (last_error or "")
    assert "not in the allow-list" in (last_error or "")
    assert generated.status_code == 503  # no healthy worker: nothing was sent
    assert flushed.status_code == 502  # the broadcast could not reach it either
    assert "not in the allow-list" in flushed.json()["results"][url]["error"]
    assert trap.connections == 0


@pytest.mark.parametrize("kind", ["lean", "httpcore"])
async def test_data_plane_connections_check_the_address_they_connect_to(nursery, client, kind):
    worker = await start_worker(nursery)
    trap = await impostor(nursery, worker.port)
    url = f"http://{NAME}:{worker.port}"
    resolver = rebind(ALLOWED)
    running = await start_router(
        nursery,
        worker_urls=(url,),
        worker_allow=(ALLOWED,),
        upstream_client=kind,
        keepalive_expiry=0,  # every request opens (and resolves) a new connection
        health_check_interval=60,  # probes keep their first connection: only requests move
        health_check_failure_threshold=2,
        health_check_success_threshold=3,  # the two probes the failures ask for never do
    )
    with trio.fail_after(10):
        before = await client.post(running.url + "/generate", json={"text": "x"})
        resolver.now(FORBIDDEN)
        after = [
            (await client.post(running.url + "/generate", json={"text": "x"})).status_code
            for _ in range(3)
        ]
    assert before.status_code == 200
    assert after == [502, 502, 503]  # refused twice: quarantined, nothing left to try
    worker_state, last_error = state(running, url)
    assert worker_state == "quarantined"
    assert f"refused to connect to {FORBIDDEN}" in (last_error or "")
    assert trap.connections == 0
    assert worker.app.stats.requests["/generate"] == 1


async def test_only_the_admitted_addresses_of_a_name_are_connected_to(nursery):
    trap = await impostor(nursery, 0)
    port = int(trap.url.rsplit(":", 1)[1])
    honest = await serve_raw(nursery, answer_all, host=ALLOWED, port=port)
    rebind([FORBIDDEN, ALLOWED])
    guard = address_guard(parse_allow([ALLOWED]))
    with trio.fail_after(5):
        stream = await open_guarded_tcp(NAME, port, guard)
        await stream.aclose()
        await wait_until(lambda: honest.connections == 1)
        rebind([FORBIDDEN])
        with pytest.raises(AddressRefused, match="not in the allow-list"):
            await open_guarded_tcp(NAME, port, guard)
    assert trap.connections == 0


async def test_probes_and_broadcasts_connect_through_the_same_check(nursery):
    trap = await impostor(nursery, 0)
    port = int(trap.url.rsplit(":", 1)[1])
    rebind(FORBIDDEN)
    transport = GuardedTransport(
        address_guard(parse_allow([ALLOWED])), limits=httpx.Limits(max_connections=4)
    )
    async with httpx.AsyncClient(transport=transport) as http:
        with trio.fail_after(5), pytest.raises(httpx.ConnectError, match="allow-list"):
            await http.get(f"http://{NAME}:{port}/health")
        # an address literal is checked too, without any lookup
        with trio.fail_after(5), pytest.raises(httpx.ConnectError, match="allow-list"):
            await http.get(f"http://{FORBIDDEN}:{port}/health")
    assert trap.connections == 0


def test_metadata_addresses_are_refused_on_connect_whatever_the_rules():
    guard = address_guard(parse_allow(["any", "*.example"]))
    guard("gpu.example", 80, ipaddress.ip_address("10.0.0.1"))
    with pytest.raises(Forbidden, match="link-local"):
        guard("gpu.example", 80, ipaddress.ip_address("169.254.169.254"))
