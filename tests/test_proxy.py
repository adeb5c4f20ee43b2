"""The data plane over real sockets: passthrough, streaming, disconnects, retries."""

from __future__ import annotations

import socket
from collections.abc import Callable

import httpx
import orjson
import trio
import trio.testing

from .conftest import start_router, start_scripted, start_worker
from .scripted import Script


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_until(predicate: Callable[[], bool], limit: float = 5.0) -> None:
    """Poll a condition the router changes just after a response's last byte."""
    with trio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110 - the state lives in another process's view
            await trio.sleep(0.01)


async def test_response_bytes_pass_through_unchanged(nursery, client):
    upstream, url = await start_scripted(nursery)
    # Spacing, escapes and float spelling that any JSON re-serialisation would change.
    payload = (
        b'{"text" :  "caf\\u00e9",\n "x": 1.50, "meta_info": {"routed_experts": "'
        + (b"QUJD" * 250_000)
        + b'", "unknown_field": [1 , 2]}}'
    )
    upstream.script = Script(
        headers=[
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
        ],
        chunks=[payload[:1000], payload[1000:]],
    )
    running = await start_router(nursery, worker_urls=(url,))
    with trio.fail_after(10):
        response = await client.post(running.url + "/generate", content=b'{"text": "hi"}')
    assert response.status_code == 200
    assert response.content == payload
    assert response.headers["content-length"] == str(len(payload))


async def test_chunked_upstream_answer_stays_chunked(nursery, client):
    upstream, url = await start_scripted(nursery)
    upstream.script = Script(chunks=[b'{"a":', b" 1}"])
    running = await start_router(nursery, worker_urls=(url,))
    with trio.fail_after(10):
        response = await client.post(running.url + "/generate", content=b"{}")
    assert response.content == b'{"a": 1}'
    assert response.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.headers


async def test_method_path_query_and_body_reach_the_worker_byte_for_byte(nursery, client):
    upstream, url = await start_scripted(nursery)
    running = await start_router(nursery, worker_urls=(url,), proxy_allow=("/some/",))
    body = b'{"b": 2,  "a": [1,2]}\n'
    with trio.fail_after(10):
        await client.put(
            running.url + "/some/path?x=1&y=%20z&x=2",
            content=body,
            headers={
                "X-SMG-Routing-Key": "k1",
                "Connection": "keep-alive, X-Private",
                "X-Private": "secret",
                "Keep-Alive": "timeout=5",
            },
        )
    seen = upstream.seen[-1]
    assert (seen.method, seen.path, seen.query, seen.body) == (
        "PUT",
        "/some/path",
        b"x=1&y=%20z&x=2",
        body,
    )
    headers = dict(seen.headers)
    assert headers[b"host"] == url.removeprefix("http://").encode()
    assert headers[b"content-length"] == str(len(body)).encode()
    assert headers[b"x-smg-routing-key"] == b"k1"
    for hop in (b"connection", b"keep-alive", b"x-private"):
        assert hop not in headers


async def test_exactly_one_server_and_date_header(nursery, client):
    upstream, url = await start_scripted(nursery)
    upstream.script = Script(
        headers=[
            (b"content-type", b"application/json"),
            (b"server", b"uvicorn"),
            (b"date", b"Thu, 01 Jan 1970 00:00:00 GMT"),
        ]
    )
    running = await start_router(nursery, worker_urls=(url,))
    with trio.fail_after(10):
        response = await client.get(running.url + "/get_model_info")
    assert len(response.headers.get_list("server")) == 1
    assert len(response.headers.get_list("date")) == 1
    assert response.headers["server"] != "uvicorn"


async def test_sse_events_arrive_while_the_worker_is_still_generating(nursery, client):
    upstream, url = await start_scripted(nursery)
    gate = trio.Event()
    upstream.script = Script(
        headers=[(b"content-type", b"text/event-stream")],
        chunks=[b'data: {"n": 1}\n\n', gate, b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"],
    )
    running = await start_router(nursery, worker_urls=(url,))
    with trio.fail_after(10):
        async with client.stream("POST", running.url + "/generate", json={"stream": True}) as r:
            lines = r.aiter_lines()
            first = await anext(lines)
            # The worker is parked at the gate: the first event came through before the rest.
            assert first == 'data: {"n": 1}'
            assert upstream.active == 1
            assert upstream.sent_chunks == 1
            assert running.router.pool.statistics().total_inflight == 1
            gate.set()
            rest = [line async for line in lines if line]
    assert rest == ['data: {"n": 2}', "data: [DONE]"]
    await wait_until(lambda: running.router.pool.statistics().total_inflight == 0)


async def test_client_disconnect_mid_stream_cancels_the_worker_and_leaks_nothing(nursery, client):
    upstream, url = await start_scripted(nursery)
    gate = trio.Event()
    upstream.script = Script(
        headers=[(b"content-type", b"text/event-stream")],
        chunks=[b"data: 1\n\n", gate, b"data: 2\n\n"],
    )
    running = await start_router(nursery, worker_urls=(url,))
    router = running.router
    with trio.fail_after(10):
        async with client.stream("POST", running.url + "/generate", json={}) as r:
            await anext(r.aiter_lines())
        # closing the client's stream drops its connection
        await wait_until(lambda: upstream.cancelled == 1)
        await wait_until(lambda: router.pool.statistics().total_inflight == 0)
    assert upstream.active == 0
    assert all(c.is_closed() or c.is_idle() for c in router.upstream.pool.connections)


async def test_client_disconnect_before_the_response_starts_leaks_nothing(nursery):
    upstream, url = await start_scripted(nursery)
    upstream.script = Script(gate_before_start=trio.Event())
    running = await start_router(nursery, worker_urls=(url,))
    router = running.router
    host, port = running.url.removeprefix("http://").split(":")
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
        await wait_until(lambda: upstream.active == 1)
        await stream.aclose()
        await wait_until(lambda: upstream.cancelled == 1)
        await wait_until(lambda: router.pool.statistics().total_inflight == 0)
    assert all(c.is_closed() or c.is_idle() for c in router.upstream.pool.connections)


async def test_inflight_returns_to_zero_after_success_error_and_worker_failure(nursery, client):
    worker = await start_worker(nursery)
    running = await start_router(nursery, worker_urls=(worker.url,))
    router = running.router
    with trio.fail_after(10):
        ok = await client.post(running.url + "/generate", json={"text": "a"})
        bad = await client.post(running.url + "/generate", content=b"not json")
        worker.app.faults.fail_status = 500
        failed = await client.post(running.url + "/generate", json={"text": "a"})
        assert (ok.status_code, bad.status_code, failed.status_code) == (200, 400, 500)
        # in flight until the upstream exchange is fully closed, just after the last byte
        await wait_until(lambda: router.pool.statistics().total_inflight == 0)


async def test_no_workers_gives_503_at_once(nursery, client):
    running = await start_router(nursery)
    with trio.fail_after(5):
        response = await client.post(running.url + "/generate", json={"text": "a"})
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "service_unavailable"
    assert "no workers" in response.json()["error"]["message"]


async def test_no_healthy_worker_gives_503(nursery, client):
    worker = await start_worker(nursery)
    worker.app.faults.health_status = 503
    running = await start_router(nursery, worker_urls=(worker.url,))
    with trio.fail_after(5):
        response = await client.post(running.url + "/generate", json={"text": "a"})
    assert response.status_code == 503
    assert "no healthy worker" in response.json()["error"]["message"]


async def test_request_that_never_reached_a_worker_is_retried_on_another(nursery, client):
    live = await start_worker(nursery)
    dead = f"http://127.0.0.1:{free_port()}"
    running = await start_router(nursery, worker_urls=(live.url,), policy="round_robin")
    router = running.router
    # Register the dead one as if it had been healthy a moment ago.
    worker, _ = router.pool.add(dead, trio.current_time())
    router.pool.probe_succeeded(dead, trio.current_time())
    with trio.fail_after(10):
        responses = [
            await client.post(running.url + "/generate", json={"text": f"q{i}"}) for i in range(6)
        ]
    assert [r.status_code for r in responses] == [200] * 6
    assert worker.state.value in ("suspect", "quarantined")
    assert b"trio_router_retries_total" in router.metrics.render()


async def test_5xx_storm_is_passed_through_not_retried_and_quarantines_the_worker(nursery, client):
    failing = await start_worker(nursery)
    other = await start_worker(nursery)
    running = await start_router(
        nursery, worker_urls=(failing.url, other.url), policy="round_robin"
    )
    failing.app.faults.fail_status = 503
    with trio.fail_after(10):
        statuses = [
            (await client.post(running.url + "/generate", json={"text": "x"})).status_code
            for _ in range(12)
        ]
    # Each 503 reached the failing worker, so it went back to the client, not to a retry;
    # its /health still answers 200, yet 3 failed requests in a row quarantine it.
    assert statuses.count(503) == 3
    assert failing.app.stats.requests["/generate"] == 3
    worker = running.router.pool.get(failing.url)
    assert worker is not None
    assert worker.state.value == "quarantined"


async def test_a_burst_of_4xx_never_marks_a_worker_unhealthy(nursery, client):
    worker = await start_worker(nursery)
    running = await start_router(nursery, worker_urls=(worker.url,))
    with trio.fail_after(10):
        for _ in range(20):
            r = await client.post(running.url + "/generate", content=b"{bad json")
            assert r.status_code == 400
        ok = await client.post(running.url + "/generate", json={"text": "fine"})
    assert ok.status_code == 200
    assert running.router.pool.get(worker.url).state.value == "healthy"  # type: ignore[union-attr]


async def test_worker_killed_under_load_is_quarantined_without_errors_for_new_requests(
    nursery, client
):
    w1 = await start_worker(nursery)
    w2 = await start_worker(nursery)
    running = await start_router(
        nursery,
        worker_urls=(w1.url, w2.url),
        health_check_interval=0.2,
        health_check_failure_threshold=2,
    )
    router = running.router
    errors_after_kill: list[int] = []
    killed = trio.Event()

    async def load(n: int) -> None:
        for i in range(n):
            was_killed = killed.is_set()
            try:
                r = await client.post(running.url + "/generate", json={"text": f"load {i}"})
            except httpx.TransportError:
                # a request the dead worker was answering when it died is cut off;
                # only those that started after the kill must all succeed
                if was_killed:
                    errors_after_kill.append(0)
                continue
            if was_killed and r.status_code != 200:
                errors_after_kill.append(r.status_code)

    with trio.fail_after(20):
        async with trio.open_nursery() as clients:
            for _ in range(4):
                clients.start_soon(load, 40)
            await wait_until(lambda: w2.app.stats.completed >= 10)
            w2.kill()
            killed.set()
        await wait_until(lambda: router.pool.get(w2.url).state.value == "quarantined")  # type: ignore[union-attr]
        await wait_until(lambda: router.pool.statistics().total_inflight == 0)
    assert errors_after_kill == []
    assert w1.app.stats.completed >= 80


async def test_removing_a_busy_worker_drains_it(nursery, client):
    upstream, url = await start_scripted(nursery)
    gate = trio.Event()
    upstream.script = Script(chunks=[b"{", gate, b"}"])
    other = await start_worker(nursery)
    running = await start_router(nursery, worker_urls=(url,))
    router = running.router
    results: list[httpx.Response] = []

    async def slow_request() -> None:
        results.append(await client.post(running.url + "/generate", json={}))

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(slow_request)
            await wait_until(lambda: upstream.active == 1)
            add = await client.post(running.url + "/add_worker", params={"url": other.url})
            assert add.status_code == 200
            removed = await client.post(running.url + "/remove_worker", params={"url": url})
            assert removed.json()["draining"] is True
            listed = (await client.get(running.url + "/list_workers")).json()["urls"]
            assert listed == [other.url]
            states = {
                w["url"]: w["state"]
                for w in (await client.get(running.url + "/workers")).json()["workers"]
            }
            assert states[url] == "draining"
            # new traffic avoids the draining worker
            r = await client.post(running.url + "/generate", json={"text": "new"})
            assert r.status_code == 200
            assert other.app.stats.requests["/generate"] == 1
            gate.set()
        await wait_until(lambda: router.pool.get(url) is None)
    assert results[0].content == b"{}"
    assert router.pool.statistics().total_inflight == 0


async def test_oversized_body_is_refused_with_413(nursery, client):
    worker = await start_worker(nursery)
    running = await start_router(nursery, worker_urls=(worker.url,), max_body_size=1000)
    with trio.fail_after(10):
        r = await client.post(running.url + "/generate", content=b"x" * 5000)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == 413
    assert worker.app.stats.requests.get("/generate", 0) == 0


async def test_large_routed_experts_payload_survives_the_proxy(nursery, client):
    worker = await start_worker(nursery)
    running = await start_router(nursery, worker_urls=(worker.url,))
    body = {
        "input_ids": [i % 250 for i in range(2000)],
        "rid": "fixed",
        "return_routed_experts": True,
        "return_logprob": True,
        "sampling_params": {"max_new_tokens": 64},
    }
    with trio.fail_after(10):
        direct = orjson.loads((await client.post(worker.url + "/generate", json=body)).content)
        proxied = orjson.loads((await client.post(running.url + "/generate", json=body)).content)
    for answer in (direct, proxied):  # times, and the worker's prefix cache saw it once before
        for volatile in ("e2e_latency", "response_sent_to_client_ts", "cached_tokens"):
            answer["meta_info"].pop(volatile)
        answer["meta_info"].pop("cached_tokens_details")
    assert proxied == direct
    assert len(proxied["meta_info"]["routed_experts"]) > 10_000


async def test_percent_encoded_paths_reach_the_worker_as_sent(nursery, client):
    upstream, url = await start_scripted(nursery)
    running = await start_router(nursery, worker_urls=(url,), proxy_allow=("/files/",))
    with trio.fail_after(10):
        response = await client.get(running.url + "/files/a%2Fb%20c")
    assert response.status_code == 200
    assert upstream.seen[-1].path == "/files/a/b c"  # the server decodes; the bytes went as sent


async def test_when_every_worker_refuses_the_client_gets_the_connect_error(nursery, client):
    running = await start_router(nursery)
    router = running.router
    dead = f"http://127.0.0.1:{free_port()}"
    router.pool.add(dead, 0.0)
    router.pool.probe_succeeded(dead, 0.0)
    with trio.fail_after(10):
        response = await client.post(running.url + "/generate", json={"text": "x"})
    assert response.status_code == 502
    assert "cannot connect to worker" in response.json()["error"]["message"]
