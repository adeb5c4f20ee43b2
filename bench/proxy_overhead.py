"""What does the router add on top of the workers? Measured in one run, on loopback.

Starts two simulated SGLang workers and one router (``python -m trio_router worker|serve``)
as separate processes, then drives them from a lean in-process HTTP/1.1 client:

* **small** -- closed loop: C clients, each sending small non-streaming ``POST /generate``
  requests (4 new tokens) back to back for ``--duration`` seconds, first straight to one
  worker ("direct"), then through the router ("router", which spreads over both workers).
  The two targets alternate for ``--rounds`` rounds; figures are medians over the rounds.
* **stream** -- closed loop of S concurrent ``"stream": true`` requests (64 new tokens) to a
  fresh pair of workers that sleep ``--stream-latency-ms`` per token, direct and via the router.

How to read it:

* ``req/s``, ``p50``/``p99`` -- client-side throughput and latency (send to last body byte).
  ``router_p50_added_ms`` is router p50 minus direct p50 at the same concurrency;
  ``router_rps_ratio`` is router req/s over direct req/s (1.0 = the router costs nothing).
  By default direct uses one worker and the router two: where one worker is the bottleneck
  (high concurrency, many streams) that favours the router, and the router can even look
  faster; ``--direct-to both`` spreads the direct connections over both workers instead, for
  the same worker capacity on both sides.
* ``router us/req`` -- the router process's CPU time (utime + stime from /proc/<pid>/stat)
  during the window, divided by the requests completed in it: the router's cost per request,
  largely independent of how busy the machine was. In the direct rows it is the router's idle
  background (health probes) and should be ~0. ``workers us/req`` is the same for the workers
  (those targeted when direct, both through the router), ``client us/req`` for this process.
  Note that a worker's CPU per request grows when it idles between requests (each wake-up
  costs syscalls), so it is higher through a slower path even if the worker does no more work.
* ``busy%`` -- all CPUs of the machine together. Near 100 % the numbers are CPU-bound: router,
  workers and client share the cores, so req/s is then capped by total CPU per request.
* stream ``ttfe`` -- time from sending the request to receiving the first complete SSE
  ``data:`` event; ``router us/event`` is the router's CPU divided by the events the clients
  received through it (``data: [DONE]`` not counted).

The last lines of the output are ``name=value`` pairs (``--json PATH`` writes them too), meant
for comparing runs with a script. ``--quick`` takes well under a minute, the default ~1.5 min.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio
from _harness import (
    REQUEST_ERRORS,
    BenchError,
    Child,
    Children,
    CpuSnapshot,
    HttpConn,
    answers_health,
    encode_request,
    free_ports,
    json_body,
    percentile,
    router_sees,
    run_bench,
    wait_until,
    write_json,
)

PROMPT = "The capital of France is"
STARTUP_TIMEOUT = 15.0
WARMUP_REQUESTS = 3  # per connection, before the measured window (connections, pools, caches)
WINDOW_SLACK = 30.0  # a window may overrun --duration by this much before it counts as hung
SETTLE = 0.2  # pause between windows so closing connections do not spill into the next one


# ---------------------------------------------------------------- processes


@dataclass(slots=True)
class Stack:
    """Two workers and a router in front of them."""

    workers: list[Child]
    worker_ports: list[int]
    router: Child
    router_port: int

    @property
    def pids(self) -> list[int]:
        return [self.router.pid, *(w.pid for w in self.workers)]


async def start_stack(children: Children, label: str, latency_ms: float) -> Stack:
    """Start two workers, wait for them, then the router, and wait until it sees both."""
    *worker_ports, router_port = free_ports(3)
    workers = []
    for i, port in enumerate(worker_ports):
        argv = [sys.executable, "-m", "trio_router", "worker", "--port", str(port)]
        if latency_ms:
            argv += ["--latency-per-token-ms", str(latency_ms)]
        workers.append(children.start(f"{label}-worker{i}", argv))
    for worker, port in zip(workers, worker_ports, strict=True):
        await wait_until(
            f"{worker.name} on port {port}",
            partial(answers_health, port),
            children=children,
            within=STARTUP_TIMEOUT,
        )
    argv = [sys.executable, "-m", "trio_router", "serve", "--host", "127.0.0.1"]
    argv += ["--port", str(router_port), "--log-level", "warning", "--policy", "least_inflight"]
    argv += ["--worker-urls", *(f"http://127.0.0.1:{p}" for p in worker_ports)]
    router = children.start(f"{label}-router", argv)
    await wait_until(
        f"{router.name} on port {router_port} with {len(workers)} healthy workers",
        partial(router_sees, router_port, len(workers)),
        children=children,
        within=STARTUP_TIMEOUT,
    )
    return Stack(workers, worker_ports, router, router_port)


# ---------------------------------------------------------------- measured windows


@dataclass(slots=True)
class Window:
    """One measured closed-loop run against one target."""

    kind: str  # "small" or "stream"
    target: str  # "direct" or "router"
    concurrency: int
    round: int
    ok: int = 0
    errors: int = 0
    events: int = 0  # stream: SSE data events received
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list, repr=False)  # small: s per request
    ttfe: list[float] = field(default_factory=list, repr=False)  # stream: s to first event
    router_cpu: float = 0.0
    worker_cpu: float = 0.0
    client_cpu: float = 0.0
    machine_busy: float = 0.0

    def units(self) -> int:
        """What CPU is divided by: requests (small) or received events (stream)."""
        return self.events if self.kind == "stream" else self.ok

    def per_unit_us(self, seconds: float) -> float:
        n = self.units()
        return seconds / n * 1e6 if n else float("nan")

    def summary(self) -> dict[str, float]:
        lat = sorted(self.latencies)
        ttfe = sorted(self.ttfe)
        out = {
            "rps": self.ok / self.elapsed if self.elapsed else 0.0,
            "p50_ms": percentile(lat, 50) * 1e3,
            "p99_ms": percentile(lat, 99) * 1e3,
            "errors": float(self.errors),
            "router_cpu_us": self.per_unit_us(self.router_cpu),
            "router_cpu_pct": 100 * self.router_cpu / self.elapsed if self.elapsed else 0.0,
            "worker_cpu_us": self.per_unit_us(self.worker_cpu),
            "client_cpu_us": self.per_unit_us(self.client_cpu),
            "busy_pct": 100 * self.machine_busy,
        }
        if self.kind == "stream":
            out["events_per_s"] = self.events / self.elapsed if self.elapsed else 0.0
            out["ttfe_p50_ms"] = percentile(ttfe, 50) * 1e3
            out["ttfe_p99_ms"] = percentile(ttfe, 99) * 1e3
        return out


Exchange = Callable[[HttpConn, Window], Awaitable[None]]


async def small_exchange(request: bytes, conn: HttpConn, window: Window) -> None:
    """One non-streaming request; records latency or an error."""
    t0 = time.perf_counter()
    status, _ = await conn.request(request)
    if status == 200:
        window.latencies.append(time.perf_counter() - t0)
        window.ok += 1
    else:
        window.errors += 1


async def stream_exchange(request: bytes, conn: HttpConn, window: Window) -> None:
    """One streamed request; records time to first event, events, or an error."""
    t0 = time.perf_counter()
    result = await conn.stream(request)
    window.events += result.events
    if result.status == 200 and result.done and result.first_event is not None:
        window.ttfe.append(result.first_event - t0)
        window.latencies.append(time.perf_counter() - t0)
        window.ok += 1
    else:
        window.errors += 1


async def run_window(
    window: Window,
    targets: Sequence[tuple[int, Exchange]],
    *,
    duration: float,
    max_requests: int,
    stack: Stack,
    worker_pids: Sequence[int],
) -> Window:
    """Warm up ``window.concurrency`` connections, then run the closed loop for ``duration``.

    Connection ``i`` talks to ``targets[i % len(targets)]`` (a port and what to send there).
    """
    spread = [targets[i % len(targets)] for i in range(window.concurrency)]
    conns = [(HttpConn(port), exchange) for port, exchange in spread]
    ports = ", ".join(str(port) for port, _ in targets)
    warm = Window(window.kind, window.target, window.concurrency, window.round)
    started = 0

    async def warm_up(conn: HttpConn, exchange: Exchange) -> None:
        for _ in range(WARMUP_REQUESTS):
            try:
                await exchange(conn, warm)
            except REQUEST_ERRORS as exc:
                raise BenchError(
                    f"warm-up {window.kind} request to {window.target} (port {conn.port}) "
                    f"failed: {type(exc).__name__}: {exc}"
                ) from None

    async def client(conn: HttpConn, exchange: Exchange, end: float) -> None:
        nonlocal started
        while time.perf_counter() < end and started < max_requests:
            started += 1
            try:
                await exchange(conn, window)
            except REQUEST_ERRORS:
                window.errors += 1
                await conn.aclose()
                await trio.sleep(0.01)  # do not spin on a dead target

    try:
        with trio.fail_after(duration + WINDOW_SLACK):
            async with trio.open_nursery() as nursery:
                for conn, exchange in conns:
                    nursery.start_soon(warm_up, conn, exchange)
            if warm.errors:
                raise BenchError(
                    f"warm-up {window.kind} requests to {window.target} (port {ports}) "
                    f"got {warm.errors} error responses"
                )
            before = CpuSnapshot.take(stack.pids)
            client_before = time.process_time()
            end = before.wall + duration
            async with trio.open_nursery() as nursery:
                for conn, exchange in conns:
                    nursery.start_soon(client, conn, exchange, end)
            after = CpuSnapshot.take(stack.pids)
            client_after = time.process_time()
    except trio.TooSlowError:
        raise BenchError(
            f"{window.kind} window to {window.target} (port {ports}) did not finish within "
            f"{duration + WINDOW_SLACK:g} s"
        ) from None
    finally:
        for conn, _ in conns:
            await conn.aclose()
    for child in (stack.router, *stack.workers):
        child.check_alive()
    window.elapsed = after.wall - before.wall
    window.router_cpu = before.delta(after, stack.router.pid)
    window.worker_cpu = sum(before.delta(after, pid) for pid in worker_pids)
    window.client_cpu = client_after - client_before
    window.machine_busy = before.machine_busy(after)
    await trio.sleep(SETTLE)
    return window


# ---------------------------------------------------------------- phases


async def run_pair(
    window: Window,
    stack: Stack,
    body: dict[str, object],
    make: Callable[[bytes], Exchange],
    args: argparse.Namespace,
) -> Window:
    """Run ``window`` against its target: the router, or one/both workers directly."""
    if window.target == "router":
        ports, pids = [stack.router_port], [w.pid for w in stack.workers]
    else:
        n = 1 if args.direct_to == "one" else len(stack.workers)
        ports, pids = stack.worker_ports[:n], [w.pid for w in stack.workers[:n]]
    raw = json_body(body)
    targets = [(port, make(encode_request("POST", port, "/generate", raw))) for port in ports]
    return await run_window(
        window,
        targets,
        duration=args.duration,
        max_requests=args.max_requests,
        stack=stack,
        worker_pids=pids,
    )


async def small_phase(
    children: Children, args: argparse.Namespace, log: Callable[[str], None]
) -> list[Window]:
    """Small non-streaming requests at each concurrency, direct and routed, ``rounds`` times."""
    stack = await start_stack(children, "small", 0.0)
    body: dict[str, object] = {
        "text": PROMPT,
        "sampling_params": {"max_new_tokens": args.max_new_tokens},
    }
    windows = []
    try:
        for conc in args.concurrency:
            for rnd in range(args.rounds):
                for target in ("direct", "router"):
                    window = Window("small", target, conc, rnd)
                    w = await run_pair(window, stack, body, _small, args)
                    s = w.summary()
                    log(
                        f"  small c={conc:<3} round {rnd + 1} {target:<6} {s['rps']:8.1f} req/s"
                        f"  p50 {s['p50_ms']:7.2f} ms  router {s['router_cpu_us']:7.1f} us/req"
                    )
                    windows.append(w)
    finally:
        children.stop([stack.router, *stack.workers])
    return windows


async def stream_phase(
    children: Children, args: argparse.Namespace, log: Callable[[str], None]
) -> list[Window]:
    """Concurrent SSE streams from slow-ish workers, direct and routed, ``rounds`` times."""
    stack = await start_stack(children, "stream", args.stream_latency_ms)
    body: dict[str, object] = {
        "text": PROMPT,
        "stream": True,
        "sampling_params": {"max_new_tokens": args.stream_tokens, "ignore_eos": True},
    }
    windows = []
    try:
        for rnd in range(args.rounds):
            for target in ("direct", "router"):
                window = Window("stream", target, args.stream_concurrency, rnd)
                w = await run_pair(window, stack, body, _stream, args)
                s = w.summary()
                log(
                    f"  stream c={w.concurrency:<3} round {rnd + 1} {target:<6} "
                    f"{s['events_per_s']:8.1f} events/s  ttfe p50 {s['ttfe_p50_ms']:7.2f} ms"
                    f"  router {s['router_cpu_us']:7.1f} us/event"
                )
                windows.append(w)
    finally:
        children.stop([stack.router, *stack.workers])
    return windows


def _small(request: bytes) -> Exchange:
    return partial(small_exchange, request)


def _stream(request: bytes) -> Exchange:
    return partial(stream_exchange, request)


# ---------------------------------------------------------------- report


def medians(windows: Sequence[Window]) -> dict[str, float]:
    """Median over rounds of every summary figure (errors are summed instead)."""
    summaries = [w.summary() for w in windows]
    out = {k: statistics.median(s[k] for s in summaries) for k in summaries[0]}
    out["errors"] = sum(s["errors"] for s in summaries)
    return out


def fmt(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:.{digits}f}"  # nan -> "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def report(
    small: Sequence[Window], stream: Sequence[Window], args: argparse.Namespace
) -> tuple[str, dict[str, float]]:
    """The readable tables and the flat figures."""
    figures: dict[str, float] = {}
    out: list[str] = []
    direct = "direct = " + ("one worker" if args.direct_to == "one" else "both workers")
    out.append(
        f"small POST /generate (max_new_tokens={args.max_new_tokens}), closed loop, "
        f"{args.duration:g} s x {args.rounds} rounds, medians; {direct}"
    )
    rows = []
    for conc in args.concurrency:
        of_conc = [w for w in small if w.concurrency == conc]
        m = {t: medians([w for w in of_conc if w.target == t]) for t in ("direct", "router")}
        for target in ("direct", "router"):
            s = m[target]
            rows.append(
                [
                    str(conc),
                    target,
                    fmt(s["rps"]),
                    fmt(s["p50_ms"], 2),
                    fmt(s["p99_ms"], 2),
                    str(int(s["errors"])),
                    fmt(s["router_cpu_us"]),
                    fmt(s["router_cpu_pct"]),
                    fmt(s["worker_cpu_us"]),
                    fmt(s["client_cpu_us"]),
                    fmt(s["busy_pct"]),
                ]
            )
            p = f"small_c{conc}_{target}"
            figures[f"{p}_rps"] = s["rps"]
            figures[f"{p}_p50_ms"] = s["p50_ms"]
            figures[f"{p}_p99_ms"] = s["p99_ms"]
            figures[f"{p}_errors"] = s["errors"]
            figures[f"{p}_worker_cpu_us_per_req"] = s["worker_cpu_us"]
            figures[f"{p}_client_cpu_us_per_req"] = s["client_cpu_us"]
        figures[f"small_c{conc}_router_cpu_us_per_req"] = m["router"]["router_cpu_us"]
        figures[f"small_c{conc}_router_p50_added_ms"] = (
            m["router"]["p50_ms"] - m["direct"]["p50_ms"]
        )
        figures[f"small_c{conc}_router_p99_added_ms"] = (
            m["router"]["p99_ms"] - m["direct"]["p99_ms"]
        )
        figures[f"small_c{conc}_router_rps_ratio"] = (
            m["router"]["rps"] / m["direct"]["rps"] if m["direct"]["rps"] else float("nan")
        )
    out.append(
        table(
            [
                "conc",
                "target",
                "req/s",
                "p50 ms",
                "p99 ms",
                "errors",
                "router us/req",
                "router cpu%",
                "workers us/req",
                "client us/req",
                "busy%",
            ],
            rows,
        )
    )
    for conc in args.concurrency:
        out.append(
            f"  c={conc}: router adds {fmt(figures[f'small_c{conc}_router_p50_added_ms'], 2)} ms"
            f" at p50, {fmt(figures[f'small_c{conc}_router_p99_added_ms'], 2)} ms at p99;"
            f" router/direct req/s = {fmt(figures[f'small_c{conc}_router_rps_ratio'], 3)}"
        )

    out.append("")
    out.append(
        f"streamed POST /generate (max_new_tokens={args.stream_tokens}, "
        f"{args.stream_latency_ms:g} ms/token), {args.stream_concurrency} concurrent streams, "
        f"{args.duration:g} s x {args.rounds} rounds, medians; {direct}"
    )
    rows = []
    m = {t: medians([w for w in stream if w.target == t]) for t in ("direct", "router")}
    for target in ("direct", "router"):
        s = m[target]
        rows.append(
            [
                target,
                fmt(s["rps"]),
                fmt(s["events_per_s"]),
                fmt(s["ttfe_p50_ms"], 2),
                fmt(s["ttfe_p99_ms"], 2),
                fmt(s["p50_ms"], 1),
                str(int(s["errors"])),
                fmt(s["router_cpu_us"]),
                fmt(s["router_cpu_pct"]),
                fmt(s["worker_cpu_us"]),
                fmt(s["client_cpu_us"]),
                fmt(s["busy_pct"]),
            ]
        )
        figures[f"stream_{target}_streams_per_s"] = s["rps"]
        figures[f"stream_{target}_events_per_s"] = s["events_per_s"]
        figures[f"stream_ttfe_{target}_p50_ms"] = s["ttfe_p50_ms"]
        figures[f"stream_ttfe_{target}_p99_ms"] = s["ttfe_p99_ms"]
        figures[f"stream_{target}_duration_p50_ms"] = s["p50_ms"]
        figures[f"stream_{target}_errors"] = s["errors"]
        figures[f"stream_{target}_worker_cpu_us_per_event"] = s["worker_cpu_us"]
    figures["stream_router_cpu_us_per_event"] = m["router"]["router_cpu_us"]
    figures["stream_ttfe_added_ms"] = m["router"]["ttfe_p50_ms"] - m["direct"]["ttfe_p50_ms"]
    out.append(
        table(
            [
                "target",
                "streams/s",
                "events/s",
                "ttfe p50 ms",
                "ttfe p99 ms",
                "stream p50 ms",
                "errors",
                "router us/event",
                "router cpu%",
                "workers us/event",
                "client us/event",
                "busy%",
            ],
            rows,
        )
    )
    out.append(
        f"  router adds {fmt(figures['stream_ttfe_added_ms'], 2)} ms to the time to first event"
        f" (p50) and costs {fmt(figures['stream_router_cpu_us_per_event'])} us of CPU per"
        " relayed event"
    )
    return "\n".join(out), figures


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure the router's added latency and CPU per request against direct "
        "worker access (simulated workers, loopback only).",
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 32], help="small-request concurrencies"
    )
    parser.add_argument("--duration", type=float, help="seconds per window (default 5; quick 2)")
    parser.add_argument("--rounds", type=int, default=2, help="direct/router rounds (default 2)")
    parser.add_argument("--quick", action="store_true", help="2 s windows (under a minute)")
    parser.add_argument("--max-new-tokens", type=int, default=4, help="small requests' tokens")
    parser.add_argument("--stream-concurrency", type=int, default=16, help="concurrent streams")
    parser.add_argument("--stream-tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument(
        "--stream-latency-ms", type=float, default=5.0, help="stream workers' ms per token"
    )
    parser.add_argument(
        "--max-requests", type=int, default=200_000, help="cap on requests per window"
    )
    parser.add_argument(
        "--direct-to",
        choices=("one", "both"),
        default="one",
        help="direct windows use one worker (default) or spread their connections over both, "
        "like the router does",
    )
    parser.add_argument("--skip-stream", action="store_true", help="small requests only")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write figures as JSON")
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 2.0 if args.quick else 5.0
    if not 0 < args.duration <= 600:
        parser.error("--duration must be in (0, 600]")
    if any(c < 1 or c > 1024 for c in args.concurrency) or not 1 <= args.stream_concurrency <= 1024:
        parser.error("concurrencies must be in 1..1024")
    if args.rounds < 1 or args.max_requests < 1 or args.stream_tokens < 1:
        parser.error("--rounds, --max-requests and --stream-tokens must be >= 1")
    args.concurrency = list(dict.fromkeys(args.concurrency))
    return args


async def run(args: argparse.Namespace, children: Children) -> int:
    began = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - began:5.1f}s]{line}", file=sys.stderr, flush=True)

    log(" small requests: starting 2 workers + router")
    small = await small_phase(children, args, log)
    stream: list[Window] = []
    if not args.skip_stream:
        log(f" streams: starting 2 workers ({args.stream_latency_ms:g} ms/token) + router")
        stream = await stream_phase(children, args, log)
    if not stream:  # report() expects both; keep the figures' shape with nan
        stream = [Window("stream", t, args.stream_concurrency, 0) for t in ("direct", "router")]
    text, figures = report(small, stream, args)
    figures["wall_s"] = time.perf_counter() - began
    print(text)
    print()
    for name, value in figures.items():
        print(f"{name}={value:.3f}")
    write_json(args.json, figures, args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    children = Children()
    return run_bench("proxy_overhead", run, args, children, children=children)


if __name__ == "__main__":
    sys.exit(main())
