"""Serving under hypercorn, tuned (``hypercorn_tuning``): keep-alive, shutdown, slow readers,
slow and numerous clients (slow-loris), ``Connection: close``, malformed and ambiguous heads.

Raw client sockets, so the test sees exactly when the server closes a connection. A
slow-loris client opens many connections and sends each a byte now and then so that every
one stays open; those tests play it against a router with small limits and check that the
router answers 408 and closes, or makes room for newcomers, while ``/health`` is answered.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import pytest
import trio

from trio_router import hypercorn_tuning
from trio_router.server import serve

from .conftest import router_config, start_router, start_scripted
from .scripted import Script, ScriptedUpstream
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


def relayed(upstream: ScriptedUpstream) -> list[str]:
    """The paths the worker was sent, its health probes left out."""
    return [seen.path for seen in upstream.seen if seen.path != "/health"]


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


SLOW_HEAD = b"GET /health HTTP/1.1\r\nhost: router\r\nx-padding: "
SLOW_BODY = b"POST /generate HTTP/1.1\r\nhost: router\r\ncontent-length: 1000\r\n\r\n{"


async def dribble(stream: trio.SocketStream, data: bytes, pause: float = 0.05) -> None:
    """Send ``data``, then one more byte every ``pause`` seconds until the server closes."""
    try:
        await stream.send_all(data)
        while True:
            await trio.sleep(pause)
            await stream.send_all(b"a")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def everything_until_closed(stream: trio.SocketStream) -> bytes:
    answer = b""
    try:
        while chunk := await stream.receive_some(65536):
            answer += chunk
    except trio.BrokenResourceError:  # the server reset: it closed with our bytes unread
        pass
    return answer


async def answer_to_dribble(stream: trio.SocketStream, data: bytes, pause: float = 0.05) -> bytes:
    """What the server answers a client that sends ``data`` and then a byte per ``pause``."""
    async with trio.open_nursery() as inner:
        inner.start_soon(dribble, stream, data, pause)
        answer = await everything_until_closed(stream)
        inner.cancel_scope.cancel()
    return answer


async def test_a_request_head_that_never_ends_gets_408_and_the_connection_closed(nursery, connect):
    running = await start_router(nursery, header_timeout=0.3)  # the keep-alive stays 75 s
    with trio.fail_after(10):
        slow = await connect(running.url)
        answer = await answer_to_dribble(slow, SLOW_HEAD)
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"connection: close" in answer.lower()


async def test_an_idle_keep_alive_connection_is_closed_quietly_not_with_a_408(nursery, connect):
    running = await start_router(nursery, header_timeout=0.2, keep_alive_timeout=0.4)
    with trio.fail_after(10):
        idle = await connect(running.url)
        await idle.send_all(GET_HEALTH)
        assert (await read_answer(idle)).startswith(b"HTTP/1.1 200")
        assert await everything_until_closed(idle) == b""  # only the keep-alive timed out


async def test_a_request_body_that_never_ends_gets_408_and_the_connection_closed(nursery, connect):
    upstream, url = await start_scripted(nursery)
    running = await start_router(nursery, worker_urls=(url,), body_timeout=0.3)
    with trio.fail_after(10):
        slow = await connect(running.url)
        answer = await answer_to_dribble(slow, SLOW_BODY)
    assert answer.startswith(b"HTTP/1.1 408")
    assert b'"code":408' in answer
    assert relayed(upstream) == []  # nothing reached the worker
    assert running.router.pool.statistics().total_inflight == 0


async def test_a_slow_body_to_a_control_endpoint_gets_408_too(nursery, connect):
    running = await start_router(nursery, body_timeout=0.3)
    with trio.fail_after(10):
        slow = await connect(running.url)
        head = b"POST /add_worker HTTP/1.1\r\nhost: router\r\ncontent-length: 500\r\n\r\n{"
        answer = await answer_to_dribble(slow, head)
    assert answer.startswith(b"HTTP/1.1 408")
    assert len(running.router.pool) == 0


async def test_a_body_that_arrives_in_time_is_relayed_whole(nursery, client):
    upstream, url = await start_scripted(nursery)
    running = await start_router(nursery, worker_urls=(url,), body_timeout=5)
    body = b"[" + b"1," * 4_000_000 + b"1]"  # 8 MB
    with trio.fail_after(20):
        response = await client.post(running.url + "/generate", content=body)
    assert response.status_code == 200
    assert upstream.seen[-1].body == body


async def test_beyond_the_connection_limit_the_connection_idle_longest_makes_room(nursery, connect):
    running = await start_router(nursery, max_client_connections=4)
    with trio.fail_after(10):
        idle = [await connect(running.url) for _ in range(4)]
        for stream in idle:  # each becomes idle after one answer, oldest first
            await stream.send_all(GET_HEALTH)
            await read_answer(stream)
        newcomer = await connect(running.url)
        await newcomer.send_all(GET_HEALTH)
        assert (await read_answer(newcomer)).startswith(b"HTTP/1.1 200")
        assert await closed_by_server(idle[0])
        await idle[1].send_all(GET_HEALTH)  # the others stay usable
        assert (await read_answer(idle[1])).startswith(b"HTTP/1.1 200")


async def test_slow_loris_connections_at_the_limit_do_not_lock_out_health_checks(nursery, connect):
    upstream, url = await start_scripted(nursery)
    running = await start_router(nursery, worker_urls=(url,), max_client_connections=8)
    with trio.fail_after(20):
        async with trio.open_nursery() as attackers:
            for index in range(24):  # three times the limit: heads and bodies, never ending
                stream = await connect(running.url)
                attackers.start_soon(dribble, stream, SLOW_BODY if index % 2 else SLOW_HEAD, 0.2)
            for _ in range(5):
                probe = await connect(running.url)
                await probe.send_all(GET_HEALTH)
                assert (await read_answer(probe)).startswith(b"HTTP/1.1 200")
                await probe.aclose()
            attackers.cancel_scope.cancel()
    assert relayed(upstream) == []


async def test_when_every_connection_is_busy_a_newcomer_is_refused(nursery, connect):
    upstream, url = await start_scripted(nursery)
    gate = trio.Event()
    upstream.script = Script(chunks=[b"data: 1\n\n", gate, b"data: 2\n\n"])
    running = await start_router(nursery, worker_urls=(url,), max_client_connections=2)
    request = b"POST /generate HTTP/1.1\r\nhost: r\r\ncontent-length: 2\r\n\r\n{}"
    with trio.fail_after(10):
        busy = [await connect(running.url) for _ in range(2)]
        for stream in busy:
            await stream.send_all(request)
        await wait_until(lambda: upstream.sent_chunks == 2)
        refused = await connect(running.url)
        assert await everything_until_closed(refused) == b""
        gate.set()
        for stream in busy:  # the busy ones were left alone
            answer = b""
            while not answer.endswith(b"0\r\n\r\n"):
                answer += await stream.receive_some(65536)
            assert answer.count(b"data: ") == 2


CLOSE = b"connection: close\r\n"
#: a request of each kind of reply, asking to close: Quart's answers and errors, the
#: proxy's own errors (403, 503, 413) and a relayed worker answer
ASKING_TO_CLOSE = {
    "health": b"GET /health HTTP/1.1\r\nhost: r\r\n" + CLOSE + b"\r\n",
    "metrics": b"GET /metrics HTTP/1.1\r\nhost: r\r\n" + CLOSE + b"\r\n",
    "control 400": b"POST /add_worker HTTP/1.1\r\nhost: r\r\ncontent-length: 2\r\n"
    + CLOSE
    + b"\r\n{}",
    "proxy 403": b"GET /not_relayed HTTP/1.1\r\nhost: r\r\n" + CLOSE + b"\r\n",
    "proxy 413": b"POST /generate HTTP/1.1\r\nhost: r\r\ncontent-length: 999999999\r\n"
    + CLOSE
    + b"\r\n",
    "relayed 200": b"POST /generate HTTP/1.1\r\nhost: r\r\ncontent-length: 2\r\n"
    + CLOSE
    + b"\r\n{}",
}


@pytest.mark.parametrize("kind", ASKING_TO_CLOSE)
async def test_the_server_closes_the_connection_when_the_client_asks_for_it(nursery, connect, kind):
    _, url = await start_scripted(nursery)
    running = await start_router(nursery, worker_urls=(url,))  # the keep-alive timeout is 75 s
    with trio.fail_after(10):
        await wait_until(lambda: running.router.pool.statistics().routable == 1)
        for _ in range(10):  # it used to depend on the order tasks ran in
            stream = await connect(running.url)
            await stream.send_all(ASKING_TO_CLOSE[kind])
            answer = await everything_until_closed(stream)
            assert answer.startswith(b"HTTP/1.1 "), answer
            assert b"connection: close" in answer.lower()


async def test_a_router_built_503_closes_when_asked_too(nursery, connect):
    running = await start_router(nursery)  # no worker: the proxy answers 503 itself
    with trio.fail_after(10):
        for _ in range(10):
            stream = await connect(running.url)
            await stream.send_all(ASKING_TO_CLOSE["relayed 200"])
            assert (await everything_until_closed(stream)).startswith(b"HTTP/1.1 503")


MALFORMED = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello
    b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
    b"GET /\xff HTTP/1.1\r\nhost: r\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # no Host
    b"POST /generate HTTP/1.1\r\nhost: r\r\ncontent-length: x\r\n\r\n",
]


async def test_malformed_requests_are_refused_with_a_few_short_log_lines(nursery, connect, caplog):
    running = await start_router(nursery)
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(20):
        for _ in range(20):
            for request in MALFORMED:
                stream = await connect(running.url)
                await stream.send_all(request)
                assert (await everything_until_closed(stream)).startswith(b"HTTP/1.1 400")
                await stream.aclose()
        stream = await connect(running.url)  # and the server is fine
        await stream.send_all(GET_HEALTH)
        assert (await read_answer(stream)).startswith(b"HTTP/1.1 200")
    records = [r for r in caplog.records if r.name.startswith(("trio_router", "hypercorn"))]
    assert all(r.levelno <= logging.INFO and r.exc_info is None for r in records), [
        r.getMessage()[:200] for r in records if r.levelno > logging.INFO or r.exc_info
    ]
    malformed = [r for r in records if "malformed" in r.getMessage()]
    assert 1 <= len(malformed) < 10  # at most one a second, counting the rest
    assert all("\n" not in r.getMessage() and len(r.getMessage()) < 200 for r in malformed)


async def test_a_request_with_both_transfer_encoding_and_content_length_is_refused(
    nursery, connect
):
    upstream, url = await start_scripted(nursery)
    running = await start_router(nursery, worker_urls=(url,))
    smuggling = (
        b"POST /generate HTTP/1.1\r\nhost: r\r\ncontent-length: 4\r\n"
        b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
        b"POST /generate HTTP/1.1\r\nhost: r\r\ncontent-length: 2\r\n\r\n{}"
    )
    with trio.fail_after(10):
        await wait_until(lambda: running.router.pool.statistics().routable == 1)
        stream = await connect(running.url)
        await stream.send_all(smuggling)
        answer = await everything_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 400")
    assert answer.count(b"HTTP/1.1") == 1  # closed: the request behind it was not read
    assert b"transfer-encoding" in answer.lower()
    assert relayed(upstream) == []


@pytest.mark.parametrize("where", ["target", "header"])
async def test_a_request_head_beyond_the_header_limit_is_refused_whatever_holds_it(
    nursery, connect, where
):
    upstream, url = await start_scripted(nursery)
    running = await start_router(nursery, worker_urls=(url,))  # --max-header-size 64 KiB
    big = b"a" * 130_000
    if where == "target":
        request = b"GET /v1/models?q=" + big + b" HTTP/1.1\r\nhost: r\r\n\r\n"
    else:
        request = b"GET /v1/models HTTP/1.1\r\nhost: r\r\nx-big: " + big + b"\r\n\r\n"
    with trio.fail_after(10):
        await wait_until(lambda: running.router.pool.statistics().routable == 1)
        stream = await connect(running.url)
        answer = await answer_to_dribble(stream, request, 1.0)
    assert answer.startswith((b"HTTP/1.1 431", b"HTTP/1.1 414")), answer[:100]
    assert relayed(upstream) == []


async def read_to_the_end(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


def upload_head(path: str, size: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nhost: router\r\ncontent-type: application/json\r\n"
        f"content-length: {size}\r\n\r\n"
    ).encode()


#: far beyond what the kernel buffers between client and router hold (a few MB)
WHOLE_BODY = 32 * 1024 * 1024


@pytest.mark.parametrize("path", ["/generate", "/add_worker"])
async def test_a_client_that_sends_its_whole_body_before_reading_gets_the_413(
    nursery, connect, path
):
    # Python's urllib writes the whole body, then reads: the router answers 413 at the
    # head, so it must drop the rest of the body before it closes, else the client's
    # writes meet a reset ("Broken pipe") and it never sees the answer
    running = await start_router(nursery, max_body_size=1024 * 1024)
    with trio.fail_after(30):
        client = await connect(running.url)
        await client.send_all(upload_head(path, WHOLE_BODY) + b"x" * WHOLE_BODY)
        answer = await read_to_the_end(client)
    assert answer.startswith(b"HTTP/1.1 413")
    assert answer.endswith(b'"code":413}}')


async def test_the_dropped_body_is_bounded_in_bytes(nursery, connect, monkeypatch):
    monkeypatch.setattr(hypercorn_tuning, "LINGER_BYTES", 256 * 1024)
    running = await start_router(nursery, max_body_size=1024 * 1024)
    with trio.fail_after(30):
        client = await connect(running.url)
        with pytest.raises(trio.BrokenResourceError):  # closed after 256 KiB more
            await client.send_all(upload_head("/generate", WHOLE_BODY) + b"x" * WHOLE_BODY)


async def test_the_dropped_body_is_bounded_in_time(nursery, connect, monkeypatch):
    monkeypatch.setattr(hypercorn_tuning, "LINGER_SECONDS", 0.2)
    running = await start_router(nursery, max_body_size=1024 * 1024)
    with trio.fail_after(10):  # a client that stops sending is not waited for
        client = await connect(running.url)
        await client.send_all(upload_head("/generate", WHOLE_BODY) + b"x" * 65536)
        answer = await read_to_the_end(client)
    assert answer.startswith(b"HTTP/1.1 413")
