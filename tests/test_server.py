"""Serving under hypercorn, tuned (``hypercorn_tuning``): keep-alive, shutdown, slow readers.

Raw client sockets, so the test sees exactly when the server closes a connection.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import pytest
import trio

from trio_router.server import serve

from .conftest import router_config, start_router, start_scripted
from .scripted import Script
from .test_proxy import wait_until

GET_HEALTH = b"GET /health HTTP/1.1\r\nhost: router\r\n\r\n"


def connection_tasks() -> int:
    """Tasks that serve one client connection of a hypercorn server in this process."""
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        count += task.name.endswith(("_run_handler", "IdleWatch._watch", "_idle_timeout"))
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[str], Awaitable[trio.SocketStream]]]:
    """Opens raw client connections, closed at the end of the test."""
    opened: list[trio.SocketStream] = []

    async def open_client(url: str) -> trio.SocketStream:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        opened.append(await trio.open_tcp_stream(host, int(port)))
        return opened[-1]

    yield open_client
    for stream in opened:
        await trio.aclose_forcefully(stream)


async def read_answer(stream: trio.SocketStream) -> bytes:
    """One response with a Content-Length (the router's own answers)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        body += await stream.receive_some(65536)
    return head


async def closed_by_server(stream: trio.SocketStream) -> bool:
    return await stream.receive_some(1) == b""


async def test_connections_closed_by_their_clients_while_idle_leave_nothing_behind(
    nursery, connect
):
    running = await start_router(nursery)  # the keep-alive timeout is 75 s
    with trio.fail_after(10):
        baseline = connection_tasks()
        used = await connect(running.url)
        await used.send_all(GET_HEALTH)
        assert (await read_answer(used)).startswith(b"HTTP/1.1 200")
        unused = await connect(running.url)  # never sends a request
        await wait_until(lambda: connection_tasks() > baseline + 2)
        await used.aclose()
        await unused.aclose()
        await wait_until(lambda: connection_tasks() == baseline)


async def test_idle_connections_time_out_busy_ones_do_not(nursery, connect):
    upstream, url = await start_scripted(nursery)
    gate = trio.Event()
    upstream.script = Script(chunks=[b"data: 1\n\n", gate, b"data: 2\n\n"])
    running = await start_router(nursery, worker_urls=(url,), keep_alive_timeout=0.3)
    with trio.fail_after(10):
        idle = await connect(running.url)
        await idle.send_all(GET_HEALTH)
        await read_answer(idle)
        answered = trio.current_time()
        busy = await connect(running.url)
        await busy.send_all(b"POST /generate HTTP/1.1\r\nhost: r\r\ncontent-length: 2\r\n\r\n{}")
        assert await closed_by_server(idle)
        assert trio.current_time() - answered > 0.1  # by the timer, not at once
        await trio.sleep(0.5)  # the busy one outlives the timeout: its request is in progress
        gate.set()
        answer = b""
        while not answer.endswith(b"0\r\n\r\n"):
            answer += await busy.receive_some(65536)
        assert answer.count(b"data: ") == 2
        # and once idle, it times out too
        assert await closed_by_server(busy)


async def test_shutdown_closes_idle_connections_at_once_and_lets_busy_ones_finish(nursery, connect):
    upstream, url = await start_scripted(nursery)
    gate = trio.Event()
    upstream.script = Script(chunks=[b"part 1;", gate, b"part 2"])
    shutdown = trio.Event()
    stopped = trio.Event()

    async def serve_until_stopped(task_status: trio.TaskStatus[str]) -> None:
        async with trio.open_nursery() as inner:
            config = router_config(worker_urls=(url,), graceful_timeout=30)
            running = await inner.start(partial(serve, config, shutdown_trigger=shutdown.wait))
            task_status.started(running.url)
        stopped.set()

    router_url = await nursery.start(serve_until_stopped)
    with trio.fail_after(10):
        idle = await connect(router_url)
        await idle.send_all(GET_HEALTH)
        await read_answer(idle)
        busy = await connect(router_url)
        await busy.send_all(b"POST /generate HTTP/1.1\r\nhost: r\r\ncontent-length: 2\r\n\r\n{}")
        await wait_until(lambda: upstream.sent_chunks == 1)
        shutdown.set()
        assert await closed_by_server(idle)  # at once, not after the 75 s keep-alive
        assert not stopped.is_set()
        gate.set()
        answer = b""
        while chunk := await busy.receive_some(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        assert answer.endswith(b"part 1;\r\n6\r\npart 2\r\n0\r\n\r\n")
        await stopped.wait()


async def test_a_slow_reader_gets_every_byte_of_a_large_answer_in_order(nursery):
    upstream, url = await start_scripted(nursery)
    pieces = [bytes([65 + i % 26]) * 100_000 for i in range(40)]  # 4 MB, 40 chunks
    upstream.script = Script(chunks=list(pieces))
    running = await start_router(nursery, worker_urls=(url,))
    host, port = running.url.removeprefix("http://").rsplit(":", 1)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the router's writes fill up
    with trio.fail_after(20):
        await sock.connect((host, int(port)))
        stream = trio.SocketStream(sock)
        await stream.send_all(b"POST /generate HTTP/1.1\r\nhost: r\r\ncontent-length: 2\r\n\r\n{}")
        data = b""
        while not data.endswith(b"\r\n0\r\n\r\n"):
            data += await stream.receive_some(8192)
            if len(data) < 1_000_000:
                await trio.sleep(0.001)  # slow at first: sends block, then queue behind the lock
        await stream.aclose()
    body = data.partition(b"\r\n\r\n")[2]
    unchunked = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        unchunked += body[:size]
        body = body[size + 2 :]
    assert unchunked == b"".join(pieces)
