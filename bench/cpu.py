"""The router's CPU per request and per streamed event, measured in one process.

Everything runs in this process on one trio loop: a canned upstream (raw sockets,
fixed answers), the router (``trio_router.server.serve``, default settings) and raw
clients. The same load runs straight to the upstream ("direct") and through the
router; the router's cost is the difference of the process's CPU time
(``time.process_time``), divided by the requests or events. Both sides share one
core and one scheduler, so the figures move far less between runs (a few %) than
CPU read off a separate router process on a busy machine (``compare.py``,
``proxy_overhead.py``): this is the bench for judging a change to the hot path.
They are not the router's CPU in production (its own process, epoll shared with
nothing else), which ``compare.py`` measures.

* **small** -- C clients, each sending ``POST /generate`` back to back on one
  keep-alive connection; the upstream answers 120 bytes of JSON at once.
* **stream** -- C clients, each sending ``POST /generate`` streams one after
  another; the upstream sends 64 chunked SSE events, 2 ms apart.

Usage: ``.venv/bin/python bench/cpu.py [--quick] [--rounds N] [--json PATH]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import trio
from _harness import (
    BenchError,
    Children,
    print_figures,
    router_sees,
    run_bench,
    table,
    wait_until,
    write_json,
)

from trio_router.config import RouterConfig
from trio_router.server import serve

BODY = b'{"text": "' + b"x" * 100 + b'", "meta_info": {"id": "r"}}'
SMALL_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
SMALL_ANSWER = SMALL_HEAD % len(BODY) + BODY
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)
EVENTS = 64
EVENT_GAP = 0.002
REQUEST = b"POST /generate HTTP/1.1\r\nhost: w\r\ncontent-type: application/json\r\n"


async def read_head(stream: trio.SocketStream, buffer: bytearray) -> bytes | None:
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    head = bytes(buffer[:end])
    del buffer[: end + 4]
    return head


async def upstream(stream: trio.SocketStream) -> None:
    """Answer every request on the connection: small JSON, or a stream if asked."""
    buffer = bytearray()
    async with stream:
        while (head := await read_head(stream, buffer)) is not None:
            length = 0
            for line in head.lower().split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            while len(buffer) < length:
                buffer += await stream.receive_some(65536)
            body = bytes(buffer[:length])
            del buffer[:length]
            if b'"stream": true' not in body:
                await stream.send_all(SMALL_ANSWER)
                continue
            await stream.send_all(STREAM_HEAD)
            for i in range(EVENTS):
                event = b'data: {"text": "t%d", "meta_info": {"id": "r"}}\n\n' % i
                await stream.send_all(b"%x\r\n%s\r\n" % (len(event), event))
                await trio.sleep(EVENT_GAP)
            await stream.send_all(b"0\r\n\r\n")


async def small_client(stream: trio.SocketStream, requests: int) -> None:
    body = b'{"text": "hi", "sampling_params": {"max_new_tokens": 4}}'
    request = REQUEST + b"content-length: %d\r\n\r\n%s" % (len(body), body)
    buffer = bytearray()
    for _ in range(requests):
        await stream.send_all(request)
        head = await read_head(stream, buffer)
        if head is None or not head.startswith(b"HTTP/1.1 200"):
            raise BenchError(f"unexpected answer: {head!r}")
        while len(buffer) < len(BODY):
            buffer += await stream.receive_some(65536)
        del buffer[: len(BODY)]


async def stream_client(stream: trio.SocketStream, streams: int) -> None:
    body = b'{"text": "hi", "stream": true}'
    request = REQUEST + b"content-length: %d\r\n\r\n%s" % (len(body), body)
    for _ in range(streams):
        await stream.send_all(request)
        answer = bytearray()
        while not answer.endswith(b"\r\n0\r\n\r\n"):
            data = await stream.receive_some(65536)
            if not data:
                raise BenchError("the stream ended early")
            answer += data
        if answer.count(b"data: ") != EVENTS:
            raise BenchError(f"{answer.count(b'data: ')} events instead of {EVENTS}")


async def cpu_of(
    client: Callable[[trio.SocketStream, int], Awaitable[None]],
    connections: list[trio.SocketStream],
    each: int,
) -> float:
    """CPU seconds of this process while a client per connection runs ``each`` exchanges."""
    started = time.process_time()
    async with trio.open_nursery() as nursery:
        for stream in connections:
            nursery.start_soon(client, stream, each)
    return time.process_time() - started


async def run(args: argparse.Namespace, children: Children) -> dict[str, float]:
    rows: dict[str, list[float]] = {"small": [], "stream": []}
    n = args.clients
    async with trio.open_nursery() as nursery:
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        upstream_port = listener.socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, upstream, [listener])
        config = RouterConfig(
            port=0, worker_urls=(f"http://127.0.0.1:{upstream_port}",), health_check_interval=1
        )
        running = await nursery.start(partial(serve, config))
        router_port = int(running.url.rsplit(":", 1)[1])
        sees = partial(router_sees, router_port, 1)
        await wait_until("the router with its upstream", sees, children=children, within=10)
        # keep-alive connections, opened once: the figures are per request, not per connection
        direct_to = [await trio.open_tcp_stream("127.0.0.1", upstream_port) for _ in range(n)]
        routed_to = [await trio.open_tcp_stream("127.0.0.1", router_port) for _ in range(n)]
        await cpu_of(small_client, routed_to, 20)  # warm up both paths
        await cpu_of(small_client, direct_to, 20)
        small, streams = args.requests // n, args.streams
        for round_ in range(args.rounds):
            direct = await cpu_of(small_client, direct_to, small)
            routed = await cpu_of(small_client, routed_to, small)
            rows["small"].append((routed - direct) / (small * n) * 1e6)
            direct = await cpu_of(stream_client, direct_to, streams)
            routed = await cpu_of(stream_client, routed_to, streams)
            rows["stream"].append((routed - direct) / (streams * n * EVENTS) * 1e6)
            print(
                f"round {round_ + 1}: router {rows['small'][-1]:.1f} us/request, "
                f"{rows['stream'][-1]:.1f} us/event",
                flush=True,
            )
        for stream in direct_to + routed_to:
            await stream.aclose()
        nursery.cancel_scope.cancel()
    figures = {
        "cpu_us_per_request": statistics.median(rows["small"]),
        "cpu_us_per_event": statistics.median(rows["stream"]),
    }
    print()
    print(
        table(
            ["figure", "median", "min", "max"],
            [
                [name, f"{statistics.median(v):.1f}", f"{min(v):.1f}", f"{max(v):.1f}"]
                for name, v in (
                    ("router us/request", rows["small"]),
                    ("router us/event", rows["stream"]),
                )
            ],
        )
    )
    print()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and requests")
    parser.add_argument("--rounds", type=int, help="rounds (default 5; quick 3)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument(
        "--requests", type=int, help="small requests per round (default 9600; quick 6400)"
    )
    parser.add_argument(
        "--streams", type=int, help="streams per client per round (default 4; quick 2)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write figures as JSON")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.requests = args.requests or (6400 if args.quick else 9600)
    args.streams = args.streams or (2 if args.quick else 4)
    if not 1 <= args.rounds <= 50 or not 1 <= args.clients <= 512:
        parser.error("--rounds must be in 1..50 and --clients in 1..512")
    result: dict[str, float] = {}
    children = Children()  # none are started: everything runs in this process

    async def measure() -> None:
        result.update(await run(args, children))

    code = run_bench("cpu", measure, children=children, timeout=600)
    if code == 0:
        print_figures(result, 1)
        write_json(args.json, result, args)
    return code


if __name__ == "__main__":
    sys.exit(main())
