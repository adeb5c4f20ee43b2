"""Fault injection over real sockets: workers that die, hang, answer slowly, flap or garble.

Each test starts simulated workers (or the scripted upstream) and a router on 127.0.0.1,
breaks a worker with one of its fault knobs, and pins what the client sees and what the
router's state is afterwards: no request stays in flight, no upstream connection stays
active, and the worker's health follows the configured thresholds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
import orjson
import pytest
import trio

from trio_router.pool import Transition
from trio_router.router import Router
from trio_router.sim import SimWorkerHandle
from trio_router.tokenizer import Tokenizer

from .conftest import start_router, start_scripted, start_worker
from .scripted import Script
from .test_proxy import wait_until

PROMPT = "<|im_start|>user\nTell me about faults.<|im_end|>\n<|im_start|>assistant\n"
#: a stream long enough (400 tokens at a few ms each) to break in the middle
LONG_STREAM = {
    "text": "hello",
    "stream": True,
    "sampling_params": {"max_new_tokens": 400, "ignore_eos": True},
}


def state(router: Router, url: str) -> str:
    worker = router.pool.get(url)
    assert worker is not None
    return "draining" if worker.draining else worker.state.value


def quiescent(router: Router) -> bool:
    """Nothing in flight and no upstream connection mid-exchange."""
    return router.pool.statistics().total_inflight == 0 and all(
        c.is_idle() or c.is_closed() for c in router.upstream.pool.connections
    )


def record_transitions(
    router: Router, url: str, probes: list[bool] | None = None
) -> list[tuple[Any, ...]]:
    """Record the health transitions of ``url`` as (old, new, consecutive probe successes),
    followed by the number of ``probes`` so far when given."""
    seen: list[tuple[Any, ...]] = []
    inner = router.health.on_transition

    def record(t: Transition) -> None:
        worker = router.pool.get(t.url)
        if t.url == url and worker is not None:
            entry = (t.old.value, t.new.value, worker.consecutive_successes)
            seen.append(entry if probes is None else (*entry, len(probes)))
        inner(t)

    router.health.on_transition = record
    return seen


def script_health(router: Router, worker: SimWorkerHandle, statuses: Sequence[int]) -> list[bool]:
    """Before each probe of ``worker``, set its /health status to the next scripted one.

    After the script, /health answers 200. Returns the probe results as they happen.
    """
    left = list(statuses)
    results: list[bool] = []
    inner: Callable[[str], Awaitable[str | None]] = router.health.probe

    async def probe(url: str) -> str | None:
        if url != worker.url:
            return await inner(url)
        worker.app.faults.health_status = left.pop(0) if left else 200
        reason = await inner(url)
        results.append(reason is None)
        return reason

    router.health.probe = probe
    return results


async def read_stream(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    after: int | None = None,
    action: Callable[[], None] = lambda: None,
) -> tuple[int, list[str], Exception | None]:
    """POST a streamed request; run ``action`` after ``after`` non-empty lines.

    Returns the status, the non-empty lines and the transport error that ended it, if any.
    """
    lines: list[str] = []
    status = 0
    try:
        async with client.stream("POST", url, json=body) as response:
            status = response.status_code
            async for line in response.aiter_lines():
                if not line:
                    continue
                lines.append(line)
                if len(lines) == after:
                    action()
    except httpx.TransportError as exc:
        return status, lines, exc
    return status, lines, None


def counter(router: Router, sample: str) -> float:
    """The value of one Prometheus sample (name and labels), 0 if not exported yet."""
    for line in router.metrics.render().decode().splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def cut_responses(router: Router, cause: str) -> float:
    return counter(router, f'trio_router_responses_cut_total{{cause="{cause}"}}')


# -- workers that die ---------------------------------------------------------------


async def test_worker_killed_mid_stream_cuts_the_stream_and_is_quarantined(nursery, client):
    w1 = await start_worker(nursery, latency_per_token_ms=5)
    w2 = await start_worker(nursery, latency_per_token_ms=5)
    running = await start_router(
        nursery,
        worker_urls=(w1.url, w2.url),
        health_check_interval=0.2,
        health_check_failure_threshold=2,
    )
    router = running.router
    killed: list[SimWorkerHandle] = []

    def kill_the_busy_worker() -> None:
        victim = w1 if w1.app.stats.active else w2
        victim.kill()
        killed.append(victim)

    with trio.fail_after(10):
        status, lines, error = await read_stream(
            client, running.url + "/generate", LONG_STREAM, after=3, action=kill_the_busy_worker
        )
        [victim] = killed
        other = w2 if victim is w1 else w1
        # The status was already sent: the router cuts the chunked body instead of ending it.
        assert status == 200
        assert isinstance(error, httpx.RemoteProtocolError)
        assert "incomplete chunked read" in str(error)
        assert len(lines) >= 3
        assert "data: [DONE]" not in lines
        await wait_until(lambda: quiescent(router))
        # The broken stream marks it suspect at once; failed probes then quarantine it.
        await wait_until(lambda: state(router, victim.url) == "quarantined")
        before = other.app.stats.completed
        after_kill = await client.post(running.url + "/generate", json={"text": "next"})
        assert after_kill.status_code == 200
        # the worker counts a generation once its handler has returned, just after the answer
        await wait_until(lambda: other.app.stats.completed == before + 1)
    assert cut_responses(router, "upstream") == 1
    assert router.pool.statistics().total_inflight == 0


def retries(router: Router, path: str) -> float:
    return counter(router, f'trio_router_retries_total{{path="{path}"}}')


async def kill_one_of_two_while_answering(
    nursery: trio.Nursery, client: httpx.AsyncClient, **router_options: Any
) -> tuple[list[int], Router, SimWorkerHandle, SimWorkerHandle]:
    """Two workers, round robin; two requests, one per worker; the worker holding its
    request unanswered is SIGKILLed. Returns both statuses and the parts."""
    dying = await start_worker(nursery)
    dying.app.faults.hang = True
    other = await start_worker(nursery)
    running = await start_router(
        nursery, worker_urls=(dying.url, other.url), policy="round_robin", **router_options
    )
    statuses: list[int] = []

    async def ask(text: str) -> None:
        response = await client.post(running.url + "/generate", json={"text": text})
        statuses.append(response.status_code)

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(ask, "a")
            n.start_soon(ask, "b")
            await wait_until(lambda: dying.app.stats.active == 1)
            dying.kill()
        await wait_until(lambda: quiescent(running.router))
    return sorted(statuses), running.router, dying, other


async def test_with_resending_a_worker_killed_before_answering_is_replaced(nursery, client):
    statuses, router, dying, other = await kill_one_of_two_while_answering(
        nursery, client, resend_unanswered=True
    )
    # The client had nothing yet, so its generation went to the live worker.
    assert statuses == [200, 200]
    # the worker counts a generation once its handler has returned, just after the answer
    with trio.fail_after(5):
        await wait_until(lambda: other.app.stats.completed == 2)
    assert retries(router, "/generate") == 1
    assert state(router, dying.url) in ("suspect", "quarantined")


async def test_a_worker_killed_before_answering_gives_a_clean_502_by_default(nursery, client):
    """It may have run the request, so by default it is not sent again."""
    statuses, router, _, other = await kill_one_of_two_while_answering(nursery, client)
    assert statuses == [200, 502]
    with trio.fail_after(5):
        await wait_until(lambda: other.app.stats.completed == 1)
    await trio.sleep(0.05)
    assert other.app.stats.completed == 1
    assert retries(router, "/generate") == 0


async def test_worker_killed_before_answering_with_nowhere_else_to_go_gives_a_502(nursery, client):
    worker = await start_worker(nursery)
    worker.app.faults.hang = True
    running = await start_router(nursery, worker_urls=(worker.url,))
    router = running.router
    results: list[httpx.Response] = []

    async def ask() -> None:
        results.append(await client.post(running.url + "/generate", json={"text": "x"}))

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(ask)
            await wait_until(lambda: worker.app.stats.active == 1)
            worker.kill()
        await wait_until(lambda: quiescent(router))
        # its probes now fail: quarantined after the threshold
        await wait_until(lambda: state(router, worker.url) == "quarantined")
    [response] = results
    assert response.status_code == 502
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("upstream_error", 502)
    assert "broke the connection without answering" in error["message"]


async def serve_dropping_upstream(nursery: trio.Nursery) -> str:
    """A worker whose /health answers 200 and which closes every other request unanswered."""

    async def handle(stream: trio.SocketStream) -> None:
        data = b""
        try:
            with trio.move_on_after(5):
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.lower().split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                while len(body) < length:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    body += chunk
            if data.startswith(b"GET /health "):
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    listeners = await nursery.start(trio.serve_tcp, handle, 0)
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_a_worker_that_drops_requests_before_answering_counts_as_failing(nursery, client):
    url = await serve_dropping_upstream(nursery)
    running = await start_router(nursery, worker_urls=(url,), health_check_failure_threshold=2)
    router = running.router
    with trio.fail_after(10):
        statuses = [
            (await client.post(running.url + "/generate", json={"text": "x"})).status_code
            for _ in range(2)
        ]
        await wait_until(lambda: quiescent(router))
    assert statuses == [502, 502]
    worker = router.pool.get(url)
    assert worker is not None
    assert worker.errors_total == 2
    assert worker.state.value == "quarantined"


async def test_only_inference_and_read_only_paths_are_resent_unanswered(nursery, client):
    """A path opened with --proxy-allow may do anything: dropped unanswered, it is not resent."""
    dropping = await serve_dropping_upstream(nursery)
    live = await start_worker(nursery)
    running = await start_router(
        nursery,
        worker_urls=(dropping, live.url),
        policy="round_robin",
        proxy_allow=("/custom_op",),
        resend_unanswered=True,
    )
    router = running.router
    with trio.fail_after(10):
        custom = [
            (await client.post(running.url + "/custom_op", json={"i": i})).status_code
            for i in range(2)
        ]  # round robin: one of the two went to the dropping worker
        await wait_until(lambda: quiescent(router))
        router.pool.probe_succeeded(dropping, trio.current_time())  # back in rotation
        generated = [
            (await client.post(running.url + "/generate", json={"text": f"q{i}"})).status_code
            for i in range(2)
        ]
    assert 502 in custom
    assert retries(router, "/custom_op") == 0
    assert generated == [200, 200]
    assert retries(router, "/generate") >= 1  # its health probes pass, so it may get both


# -- workers that hang ----------------------------------------------------------------


async def test_hanging_worker_gives_504_at_the_deadline_and_its_work_is_cancelled(nursery, client):
    worker = await start_worker(nursery)
    running = await start_router(nursery, worker_urls=(worker.url,), request_timeout=1)
    router = running.router
    worker.app.faults.hang = True
    with trio.fail_after(10):
        response = await client.post(running.url + "/generate", json={"text": "x"})
        assert response.status_code == 504
        assert response.json() == {
            "error": {
                "message": "request exceeded the router's 1 s deadline",
                "type": "upstream_timeout",
                "code": 504,
            }
        }
        # the router closed the upstream connection: the worker sees its client go away
        await wait_until(lambda: worker.app.stats.active == 0)
        await wait_until(lambda: quiescent(router))
    assert worker.app.stats.cancelled == 1
    assert worker.app.stats.completed == 0
    # the worker had not answered at the deadline: that counts against it
    pool_worker = router.pool.get(worker.url)
    assert pool_worker is not None
    assert pool_worker.request_failures == 1
    assert pool_worker.last_error == f"worker {worker.url} had not answered at the request deadline"


async def test_the_deadline_cuts_a_stream_that_has_started(nursery, client):
    worker = await start_worker(nursery, latency_per_token_ms=20)
    running = await start_router(nursery, worker_urls=(worker.url,), request_timeout=1)
    router = running.router
    with trio.fail_after(10):
        status, lines, error = await read_stream(client, running.url + "/generate", LONG_STREAM)
        await wait_until(lambda: worker.app.stats.active == 0)
        await wait_until(lambda: quiescent(router))
    assert status == 200
    assert isinstance(error, httpx.RemoteProtocolError)
    assert lines  # events arrived before the deadline...
    assert "data: [DONE]" not in lines  # ...but not the end
    assert worker.app.stats.cancelled == 1


# -- slow and flapping health -------------------------------------------------------------


async def test_slow_health_quarantines_and_readmits_after_the_success_threshold(nursery, client):
    slow = await start_worker(nursery)
    other = await start_worker(nursery)
    running = await start_router(
        nursery,
        worker_urls=(slow.url, other.url),
        health_check_interval=0.1,
        health_check_timeout=0.25,
        health_check_failure_threshold=2,
        health_check_success_threshold=3,
    )
    router = running.router
    transitions = record_transitions(router, slow.url)
    with trio.fail_after(10):
        slow.app.faults.health_delay_s = 1.0
        await wait_until(lambda: state(router, slow.url) == "quarantined")
        worker = router.pool.get(slow.url)
        assert worker is not None
        assert worker.last_error == "health probe timed out after 0.25 s"
        # traffic keeps flowing to the other worker meanwhile
        for i in range(4):
            r = await client.post(running.url + "/generate", json={"text": f"q{i}"})
            assert r.status_code == 200
        assert slow.app.stats.requests["/generate"] == 0
        slow.app.faults.health_delay_s = 0.0
        await wait_until(lambda: state(router, slow.url) == "healthy")
    assert transitions == [
        ("healthy", "quarantined", 0),
        ("quarantined", "healthy", 3),  # exactly health_check_success_threshold successes
    ]


async def test_a_flapping_worker_is_quarantined_only_by_consecutive_failures(nursery):
    worker = await start_worker(nursery)
    running = await start_router(
        nursery,
        worker_urls=(worker.url,),
        health_check_interval=0.02,
        health_check_failure_threshold=2,
        health_check_success_threshold=2,
    )
    router = running.router
    assert state(router, worker.url) == "healthy"
    flapping = [503, 200] * 6  # never two failures in a row
    down = [503, 503]  # two in a row: quarantined
    flapping_while_down = [200, 503] * 3  # never two successes in a row
    up = [200, 200]  # two in a row: re-admitted
    script = flapping + down + flapping_while_down + up
    probes = script_health(router, worker, script)
    transitions = record_transitions(router, worker.url, probes)
    with trio.fail_after(10):
        await wait_until(lambda: len(probes) > len(script))
    assert probes[: len(script)] == [status == 200 for status in script]
    quarantined_at = len(flapping) + len(down)
    readmitted_at = quarantined_at + len(flapping_while_down) + len(up)
    assert transitions == [
        ("healthy", "quarantined", 0, quarantined_at),
        ("quarantined", "healthy", 2, readmitted_at),
    ]
    assert state(router, worker.url) == "healthy"


# -- malformed and truncated answers ------------------------------------------------------


def tee_json_results(worker: SimWorkerHandle) -> list[bytes]:
    """Record the body bytes the simulated worker sends for non-streamed generations."""
    sent: list[bytes] = []
    app: Any = worker.app
    original = app.send_json_result

    async def recording(send: Any, job: Any, payload: Any) -> None:
        async def tee(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                sent.append(message["body"])
            await send(message)

        await original(tee, job, payload)

    app.send_json_result = recording
    return sent


async def test_truncated_json_reaches_the_client_exactly_as_the_worker_sent_it(nursery, client):
    worker = await start_worker(nursery)
    running = await start_router(nursery, worker_urls=(worker.url,))
    router = running.router
    sent = tee_json_results(worker)
    worker.app.faults.truncate_json = True
    with trio.fail_after(10):
        response = await client.post(running.url + "/generate", json={"text": "cut me"})
        await wait_until(lambda: quiescent(router))
        worker.app.faults.truncate_json = False
        after = await client.post(running.url + "/generate", json={"text": "whole"})
    # Passed through as a 200 with the worker's own (matching) Content-Length: the router
    # relays bytes, it does not validate them.
    assert response.status_code == 200
    assert response.content == sent[0]
    assert response.headers["content-length"] == str(len(sent[0]))
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(response.content)
    assert after.status_code == 200
    assert orjson.loads(after.content)["text"]
    assert state(router, worker.url) == "healthy"


async def test_truncated_json_with_the_token_cache_is_relayed_and_not_recorded(
    nursery, client, qwen3
):
    worker = await start_worker(nursery, tokenizer=qwen3)
    running = await start_router(
        nursery, tokenizer=qwen3, worker_urls=(worker.url,), radix_tree_max_size=100_000
    )
    router = running.router
    cache = router.token_cache
    assert cache is not None
    sent = tee_json_results(worker)
    worker.app.faults.truncate_json = True
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    with trio.fail_after(10):
        generated = await client.post(running.url + "/generate", json={"text": PROMPT})
        answered = await client.post(running.url + "/v1/chat/completions", json=chat)
        await wait_until(lambda: quiescent(router))
        retrieved = await client.post(running.url + "/retrieve_from_text", json={"text": PROMPT})
    assert generated.status_code == 200
    assert generated.content == sent[0]
    # the OpenAI front end parses the answer itself, so it says what went wrong
    assert answered.status_code == 502
    assert answered.json()["error"]["message"].startswith("worker sent invalid JSON")
    assert (cache.counters.recorded, cache.counters.unrecorded) == (0, 1)
    assert cache.trie.statistics().tokens == 0
    assert retrieved.json()["cached_tokens"] == 0
    assert state(router, worker.url) == "healthy"


async def test_a_stream_dropped_mid_sse_is_cut_and_counts_against_the_worker(
    nursery, client, qwen3
):
    worker = await start_worker(nursery, tokenizer=qwen3)
    running = await start_router(
        nursery, tokenizer=qwen3, worker_urls=(worker.url,), radix_tree_max_size=100_000
    )
    router = running.router
    cache = router.token_cache
    assert cache is not None
    worker.app.faults.drop_after_events = 3
    body = {"text": PROMPT, "stream": True, "sampling_params": {"ignore_eos": True}}
    chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "ignore_eos": True}
    with trio.fail_after(10):
        status, lines, error = await read_stream(client, running.url + "/generate", body)
        await wait_until(lambda: quiescent(router))
        assert (status, len(lines)) == (200, 3)
        assert isinstance(error, httpx.RemoteProtocolError)
        worker_state = router.pool.get(worker.url)
        assert worker_state is not None
        assert worker_state.errors_total == 1
        # The chat front end has already sent its 200 and first chunk when the worker
        # drops: it ends its own stream with an error event and [DONE].
        chat_status, chat_lines, chat_error = await read_stream(
            client, running.url + "/v1/chat/completions", chat
        )
        await wait_until(lambda: quiescent(router))
    assert (chat_status, chat_error) == (200, None)
    assert chat_lines[-1] == "data: [DONE]"
    event = orjson.loads(chat_lines[-2].removeprefix("data: "))
    assert event["error"]["type"] == "upstream_error"
    assert "broke the connection" in event["error"]["message"]
    assert cache.counters.recorded == 0
    assert cache.trie.statistics().tokens == 0
    assert worker_state.errors_total == 2


async def test_a_worker_that_breaks_every_stream_is_quarantined(nursery, client):
    worker = await start_worker(nursery)
    worker.app.faults.drop_after_events = 1
    running = await start_router(
        nursery, worker_urls=(worker.url,), health_check_failure_threshold=3
    )
    router = running.router
    body = {"text": "x", "stream": True, "sampling_params": {"ignore_eos": True}}
    with trio.fail_after(10):
        for _ in range(3):
            _status, lines, error = await read_stream(client, running.url + "/generate", body)
            assert isinstance(error, httpx.RemoteProtocolError)
            assert len(lines) == 1
            await wait_until(lambda: quiescent(router))
    pool_worker = router.pool.get(worker.url)
    assert pool_worker is not None
    assert pool_worker.errors_total == 3
    assert pool_worker.state.value == "quarantined"


@pytest.mark.parametrize(
    ("answer", "unrecorded"),
    [
        (b'{"text": "x", "meta_info": {"output_token_log', 1),
        (b"<html>502 Bad Gateway</html>", 1),
        (b"[1, 2]", 2),  # a batch answer: each item counts
        (b'{"text": "x"}', 1),
        (b'{"text": "x", "meta_info": {"output_token_logprobs": [[-0.1, "not an id"]]}}', 1),
    ],
)
async def test_a_malformed_generate_answer_is_relayed_and_records_nothing(
    nursery, client, qwen3, answer, unrecorded
):
    upstream, url = await start_scripted(nursery)
    upstream.script = Script(chunks=[answer])
    running = await start_router(
        nursery, tokenizer=qwen3, worker_urls=(url,), radix_tree_max_size=100_000
    )
    router = running.router
    cache = router.token_cache
    assert cache is not None
    with trio.fail_after(10):
        response = await client.post(running.url + "/generate", json={"text": PROMPT})
        await wait_until(lambda: quiescent(router))
    assert response.status_code == 200
    assert response.content == answer
    # the request was intercepted (the worker got the router's ids) but nothing recorded
    assert orjson.loads(upstream.seen[-1].body)["input_ids"] == qwen3.encode(PROMPT)
    assert (cache.counters.recorded, cache.counters.unrecorded) == (0, unrecorded)
    assert cache.trie.statistics().tokens == 0
    assert state(router, url) == "healthy"


async def test_a_garbled_sse_generate_is_relayed_and_records_nothing(nursery, client, qwen3):
    upstream, url = await start_scripted(nursery)
    events = b'data: {"text": "a"\n\ndata: not json\n\ndata: [DONE]\n\n'
    upstream.script = Script(headers=[(b"content-type", b"text/event-stream")], chunks=[events])
    running = await start_router(
        nursery, tokenizer=qwen3, worker_urls=(url,), radix_tree_max_size=100_000
    )
    router = running.router
    cache = router.token_cache
    assert cache is not None
    with trio.fail_after(10):
        body = {"text": PROMPT, "stream": True}
        response = await client.post(running.url + "/generate", json=body)
        await wait_until(lambda: quiescent(router))
    assert response.status_code == 200
    assert response.content == events
    assert (cache.counters.recorded, cache.counters.unrecorded) == (0, 1)


async def test_a_malformed_answer_to_the_chat_front_end_is_a_502(nursery, client, qwen3):
    upstream, url = await start_scripted(nursery)
    upstream.script = Script(
        chunks=[b'{"text": "x", "meta_info": {"output_token_logprobs": [[-0.5]]}}']
    )
    running = await start_router(
        nursery, tokenizer=qwen3, worker_urls=(url,), radix_tree_max_size=100_000
    )
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    with trio.fail_after(10):
        response = await client.post(running.url + "/v1/chat/completions", json=chat)
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "upstream_error"


# -- 5xx storms and 4xx bursts with the token cache on ---------------------------------------


async def cached_pair(nursery: trio.Nursery, qwen3: Tokenizer, **overrides: Any):  # type: ignore[no-untyped-def]
    failing = await start_worker(nursery, tokenizer=qwen3)
    other = await start_worker(nursery, tokenizer=qwen3, seed=1)
    running = await start_router(
        nursery,
        tokenizer=qwen3,
        worker_urls=(failing.url, other.url),
        radix_tree_max_size=100_000,
        **overrides,
    )
    return failing, other, running


def generation_requests(n: int) -> list[tuple[str, dict[str, Any]]]:
    """``n`` requests alternating between the intercepted /generate and the OpenAI paths."""
    kinds = [
        ("/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": 8}}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        ),
        ("/v1/completions", {"prompt": "Once upon", "max_tokens": 8}),
    ]
    return [kinds[i % len(kinds)] for i in range(n)]


async def test_a_5xx_storm_through_the_token_cache_paths_quarantines_the_worker(
    nursery, client, qwen3
):
    failing, other, running = await cached_pair(nursery, qwen3, policy="round_robin")
    router = running.router
    failing.app.faults.fail_status = 503
    statuses = []
    with trio.fail_after(10):
        for path, body in generation_requests(12):
            statuses.append((await client.post(running.url + path, json=body)).status_code)
        await wait_until(lambda: quiescent(router))
        await wait_until(lambda: other.app.stats.active == 0)
    # Relayed as is on /generate (503); the OpenAI front ends report it as 502. Not retried:
    # three failed requests quarantine the worker, the rest goes to the other one.
    errors = [s for s in statuses if s != 200]
    assert len(errors) == 3
    assert set(errors) <= {502, 503}
    assert failing.app.stats.requests["/generate"] == 3  # every path reaches /generate
    assert state(router, failing.url) == "quarantined"
    assert other.app.stats.completed == 9


async def test_a_burst_of_4xx_through_the_token_cache_paths_never_counts_against_a_worker(
    nursery, client, qwen3
):
    failing, other, running = await cached_pair(nursery, qwen3)
    router = running.router
    cache = router.token_cache
    assert cache is not None
    for handle in (failing, other):
        handle.app.faults.fail_status = 422
    with trio.fail_after(10):
        for path, body in generation_requests(30):
            r = await client.post(running.url + path, json=body)
            assert r.status_code == 422, (path, r.text)
        await wait_until(lambda: quiescent(router))
        for handle in (failing, other):
            handle.app.faults.fail_status = None
        ok = await client.post(running.url + "/generate", json={"text": PROMPT})
    assert ok.status_code == 200
    for handle in (failing, other):
        worker = router.pool.get(handle.url)
        assert worker is not None
        assert (worker.state.value, worker.request_failures, worker.errors_total) == (
            "healthy",
            0,
            0,
        )
    assert cache.counters.unrecorded == 10  # the refused /generate calls, one each


# -- hung workers whose /health still answers ------------------------------------------


async def test_a_hung_worker_whose_health_answers_leaves_rotation(nursery, client):
    hung = await start_worker(nursery)
    good = await start_worker(nursery)
    running = await start_router(
        nursery,
        worker_urls=(hung.url, good.url),
        policy="round_robin",
        request_timeout=1,
        health_check_failure_threshold=2,
        health_check_success_threshold=3,
        health_check_interval=60,  # only the two probes the failures ask for: no re-admission
    )
    router = running.router
    hung.app.faults.hang = True
    with trio.fail_after(20):
        statuses = [
            (await client.post(running.url + "/generate", json={"text": f"q{i}"})).status_code
            for i in range(10)
        ]
        await wait_until(lambda: quiescent(router))
    # each deadline that passed while the hung worker held a request counted against it:
    # two, and it left the rotation; every later request went to the good worker
    assert sorted(statuses) == [200] * 8 + [504] * 2, statuses
    assert hung.app.stats.requests["/generate"] == 2
    assert state(router, hung.url) == "quarantined"
    assert state(router, good.url) == "healthy"


async def test_a_stalled_stream_counts_against_its_worker_at_the_deadline(nursery, client):
    upstream, url = await start_scripted(nursery)
    upstream.script = Script(
        headers=[(b"content-type", b"text/event-stream")],
        chunks=[b"data: 1\n\n", trio.Event()],  # one event, then nothing ever again
    )
    running = await start_router(nursery, worker_urls=(url,), request_timeout=0.5)
    router = running.router
    with trio.fail_after(10):
        status, lines, error = await read_stream(client, running.url + "/generate", {})
        await wait_until(lambda: quiescent(router))
    assert (status, lines) == (200, ["data: 1"])
    assert error is not None  # the stream was cut at the deadline
    worker = router.pool.get(url)
    assert worker is not None
    assert worker.request_failures == 1


async def test_first_byte_timeout_fails_a_silent_worker_and_counts_against_it(nursery, client):
    hung = await start_worker(nursery)
    running = await start_router(
        nursery,
        worker_urls=(hung.url,),
        first_byte_timeout=0.3,
        health_check_failure_threshold=1,
        health_check_interval=60,
    )
    router = running.router
    hung.app.faults.hang = True
    with trio.fail_after(10):
        response = await client.post(running.url + "/generate", json={"text": "x"})
        await wait_until(lambda: hung.app.stats.active == 0)
    assert response.status_code == 504
    message = f"worker {hung.url} did not begin its answer within 0.3 s"
    assert response.json()["error"]["message"] == message
    assert state(router, hung.url) == "quarantined"
    assert hung.app.stats.cancelled == 1  # its connection was closed: the work stopped


async def test_a_client_that_goes_away_never_counts_against_the_worker(nursery):
    upstream, url = await start_scripted(nursery)
    upstream.script = Script(gate_before_start=trio.Event())
    running = await start_router(nursery, worker_urls=(url,), request_timeout=30)
    router = running.router
    host, port = running.url.removeprefix("http://").split(":")
    with trio.fail_after(10):
        for _ in range(3):
            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(
                b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"
            )
            await wait_until(lambda: upstream.active == 1)
            await stream.aclose()
            await wait_until(lambda: upstream.active == 0)
        await wait_until(lambda: quiescent(router))
    worker = router.pool.get(url)
    assert worker is not None
    assert (worker.state.value, worker.request_failures, worker.errors_total) == ("healthy", 0, 0)
