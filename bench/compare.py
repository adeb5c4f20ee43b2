"""trio_router next to SMG (SGLang Model Gateway, ``sglang-router==0.3.2``) on the same workers.

Three targets share the same simulated SGLang workers, the same load and the same machine, on
loopback. The workers are trio_router's ``SimWorker`` with the bytes tokenizer and the same
hypercorn settings as ``python -m trio_router worker --tokenizer bytes``, started as
``compare.py --sim-worker`` because they must speak HTTP/1.1 only: SMG probes each worker with
gRPC (h2c) health checks when it registers it, and hypercorn's HTTP/2 path can then raise out
of a connection handler and end the whole worker process (see ``_http1_only``). Targets:

* ``direct`` -- the client talks to the workers itself (connections spread over both): the limit;
* ``trio``   -- ``python -m trio_router serve`` (least_inflight; ``--policy sticky`` in 4.);
* ``smg``    -- ``python -m sglang_router.launch_router`` from its own venv ``bench/.venv-smg``
  (round_robin; ``--policy manual`` in 4.), created by ``--setup`` or on the first run.

Targets alternate inside every round and the order rotates from round to round; figures are
medians over ``--rounds`` rounds (default 3, ``--quick`` 2). Scenarios:

1. **small** -- closed loop of C clients sending ``POST /generate`` (max_new_tokens 4) back to
   back: req/s, p50/p99, and the router's CPU per request (utime+stime of the router process
   from /proc/<pid>/stat over the window, divided by the requests completed).
2. **stream** -- S concurrent ``"stream": true`` requests (64 tokens, workers sleep 5 ms per
   token): time to first event, gap between consecutive events as the client sees them (and
   the share of events that came in the same read as the previous one, ``coalesced %``), and
   router CPU per relayed event.
3. **r3** -- one non-streaming ``/generate`` at a time whose ``meta_info.routed_experts`` (R3:
   int32 [tokens x 4 layers x 2 experts], base64) is 1/10/100 MB: a long ``input_ids`` prompt
   (ids < 256, valid for the bytes tokenizer) of ``ceil(size * 3 / 128)`` tokens minus one,
   plus one new token. Latency, router peak RSS growth (``VmHWM`` after ``echo 5 >
   /proc/<pid>/clear_refs``, minus ``VmRSS`` before) and body integrity (``routed_experts``
   identical to the direct answer's, bytes compared via a digest). SMG 0.3.2 parses the
   ``/generate`` request into a fixed struct and drops ``return_routed_experts`` (see
   /work/shared/research/anchor-smg.md section 0 item 3), so its answers would carry no R3 at
   all. To still measure how each router relays a large body, the workers of this scenario
   have a thin ASGI layer (``--sim-worker --count-r3``) that counts whether the flag arrived
   and sets it when it did not; the ``flag fwd`` column says which router forwarded it.
4. **sticky** -- 1,000 session keys (``X-SMG-Routing-Key``), each sent ``--sticky-reps`` times
   in shuffled order by 32 clients; the two workers report different ``weight_version`` (v-a /
   v-b), read from ``meta_info.weight_version``. Balance = share of requests (and of keys) per
   worker; stickiness = fraction of keys whose requests all went to one worker.
5. **kill** -- closed loop of 8 clients for ~8 s (workers sleep 1 ms per token); one worker is
   SIGKILLed at ~2 s. Client errors, requests slower than 10x the pre-kill median, and how long
   the dead worker kept being tried: the later of the last failed client request and the last
   increase of the router's own failed-attempt counter (SMG
   ``smg_worker_cb_outcomes_total{outcome="failure"}`` for that worker; trio_router
   ``trio_router_retries_total``), polled every 50 ms from its metrics endpoint. ``out ms`` is
   when the router's metrics first show the worker out of rotation (SMG circuit breaker open or
   health 0; trio_router suspect or quarantined). Fresh workers and router for every run.

SMG runs with its defaults (retries 5 attempts, circuit breaker after 10 consecutive failures)
except ``--health-check-interval-secs 10`` (trio_router's default interval) and
``--log-level warn``; its process gets ``HTTPS_PROXY`` pointing at a closed loopback port so
that its attempt to download a tokenizer from HuggingFace for the workers' model fails locally.
If SMG cannot be installed the SMG columns show ``n/a``.

Output: one table per scenario, PNG plots ``bench/results/compare_*.png`` (if matplotlib is
installed), and ``name=value`` lines for every key figure (``--json PATH`` writes them too);
``n/a`` (JSON null) where a figure does not exist. ``--profile SECONDS`` also samples the
trio_router process with py-spy during an extra c=32 small-request window and prints its top
frames; it samples with ``--gil`` (only while the GIL is held, i.e. Python CPU): without it, on
a busy 2-vCPU machine about a third of the samples sit inside ``send()``, mostly the kernel
delivering to the woken peer and the router being preempted, which /proc does not count as
the router's CPU. ``--quick`` runs the same comparison, smaller, in under 5 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson
import trio
from _harness import (
    CLK_TCK,
    PROBE_ERRORS,
    BenchError,
    Child,
    Children,
    CpuSnapshot,
    HttpConn,
    cpu_seconds,
    encode_request,
    fmt,
    free_ports,
    get_json,
    json_body,
    percentile,
    table,
    wait_until,
    write_json,
)

SCRIPT = Path(__file__).resolve()
BENCH_DIR = SCRIPT.parent
RESULTS_DIR = BENCH_DIR / "results"
SMG_VENV = BENCH_DIR / ".venv-smg"
SMG_REQUIREMENT = "sglang-router==0.3.2"
SMG_VERSION = "0.3.2"
SMG_MODULE = "sglang_router.launch_router"
INSTALL_TIMEOUT = 900.0

TARGETS = ("direct", "trio", "smg")
ROUTERS = ("trio", "smg")
LABEL = {"direct": "direct", "trio": "trio_router", "smg": f"SMG {SMG_VERSION}"}
VERSIONS = ("v-a", "v-b")  # weight_version of worker 0 and 1: tells who served a request
PROMPT = "The capital of France is"
ROUTING_HEADER = "X-SMG-Routing-Key"

STARTUP_TIMEOUT = 20.0
WARMUP_REQUESTS = 2  # per connection, before a measured window
SETTLE = 0.2  # pause between windows
ERROR_PAUSE = 0.01  # a client pauses after a failed request (do not spin on a dead target)
REQUEST_TIMEOUT = 30.0  # per small/stream request
R3_TIMEOUT = 300.0  # per large request
WINDOW_SLACK = 60.0
METRICS_POLL = 0.05
SLOW_FACTOR = 10.0
MB = 1_000_000  # sizes and RSS are in decimal MB
COALESCED = 1e-4  # stream events arriving < 0.1 ms after the previous one came in the same read

Log = Callable[[str], None]


# ---------------------------------------------------------------- SMG installation


def smg_python() -> Path:
    return SMG_VENV / "bin" / "python"


def smg_installed() -> bool:
    """``bench/.venv-smg`` exists and has ``sglang-router`` at the pinned version."""
    py = smg_python()
    if not py.exists():
        return False
    probe = "import importlib.metadata as m; print(m.version('sglang-router'))"
    try:
        out = subprocess.run(
            [str(py), "-c", probe], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip() == SMG_VERSION


def setup_smg(log: Log) -> str | None:
    """Create ``bench/.venv-smg`` and install SMG into it; None on success, else why not."""
    if smg_installed():
        return None
    try:
        if not smg_python().exists():
            log(f" setup: creating {SMG_VENV}")
            subprocess.run(
                [sys.executable, "-m", "venv", str(SMG_VENV)],
                check=True,
                timeout=300,
                capture_output=True,
            )
        ignore = SMG_VENV / ".gitignore"
        if not ignore.exists():  # like virtualenv does: the venv ignores itself
            ignore.write_text("# created by bench/compare.py: keep this venv out of git\n*\n")
        log(f" setup: pip install {SMG_REQUIREMENT} into {SMG_VENV}")
        argv = [str(smg_python()), "-m", "pip", "install", "--disable-pip-version-check"]
        out = subprocess.run(
            [*argv, "--no-input", SMG_REQUIREMENT],
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if out.returncode != 0:
        return (out.stderr or out.stdout).strip()[-1500:] or f"pip exited {out.returncode}"
    return None if smg_installed() else "pip succeeded but sglang-router is not importable"


# ---------------------------------------------------------------- /proc helpers


def proc_status_kb(pid: int, key: str) -> int:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of /proc/<pid>/status."""
    with open(f"/proc/{pid}/status", "rb") as fh:
        for line in fh:
            if line.startswith(key.encode() + b":"):
                return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


def cpu_user_sys(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        raw = fh.read()
    fields = raw[raw.rindex(b")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds_fine(pid: int) -> float:
    """CPU seconds of ``pid``'s live threads in ns resolution (/proc/<pid>/task/*/schedstat).

    /proc/<pid>/stat counts in clock ticks (10 ms here), too coarse for a few requests;
    time of threads that exited in between is lost, so this is for short intervals only.
    """
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return cpu_seconds(pid)
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as fh:
                total += int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def reset_peak_rss(pid: int) -> bool:
    """Reset ``VmHWM`` to the current RSS (``echo 5 > /proc/<pid>/clear_refs``)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


# ---------------------------------------------------------------- processes


@dataclass(slots=True)
class Worker:
    child: Child
    port: int
    version: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(slots=True)
class Router:
    target: str  # "trio" or "smg"
    child: Child
    port: int
    metrics_port: int
    metrics_path: str
    argv: list[str]

    @property
    def pid(self) -> int:
        return self.child.pid


async def _worker_healthy(port: int) -> bool:
    status, _ = await get_json(port, "/health")
    return status == 200


async def _trio_ready(port: int, n: int) -> bool:
    status, body = await get_json(port, "/health")
    return status == 200 and isinstance(body, dict) and body.get("healthy_workers") == n


async def _smg_ready(port: int, n: int) -> bool:
    status, body = await get_json(port, "/readiness")
    return status == 200 and isinstance(body, dict) and body.get("healthy_workers") == n


async def start_workers(
    children: Children, label: str, *, latency_ms: float, r3: bool = False
) -> list[Worker]:
    """Two simulated workers (weight versions v-a and v-b), started together, then awaited."""
    ports = free_ports(len(VERSIONS))
    workers = []
    for i, (port, version) in enumerate(zip(ports, VERSIONS, strict=True)):
        argv = [sys.executable, str(SCRIPT), "--sim-worker", *(["--count-r3"] if r3 else [])]
        argv += ["--port", str(port), "--weight-version", version]
        argv += ["--latency-per-token-ms", str(latency_ms)]
        workers.append(Worker(children.start(f"{label}-worker{i}", argv), port, version))
    for w in workers:
        await wait_until(
            f"{w.child.name} on port {w.port}",
            partial(_worker_healthy, w.port),
            children=children,
            within=STARTUP_TIMEOUT,
        )
    return workers


async def start_router(
    children: Children, target: str, label: str, workers: Sequence[Worker], policy: str
) -> Router:
    """trio_router or SMG in front of ``workers``; returns once it routes to all of them."""
    port, metrics_port, dead_port = free_ports(3)
    urls = [w.url for w in workers]
    if target == "trio":
        argv = [sys.executable, "-m", "trio_router", "serve", "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--log-level", "warning", "--policy", policy]
        argv += ["--worker-urls", *urls]
        ready = partial(_trio_ready, port, len(workers))
        metrics_port, metrics_path = port, "/prometheus"
    else:
        # SMG asks huggingface.co for the workers' tokenizer; send that to a closed loopback port
        env = [f"HTTPS_PROXY=http://127.0.0.1:{dead_port}", "NO_PROXY=127.0.0.1,localhost"]
        argv = ["env", *env, str(smg_python()), "-m", SMG_MODULE, "--worker-urls", *urls]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--policy", policy]
        argv += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
        argv += ["--log-level", "warn", "--health-check-interval-secs", "10"]
        ready = partial(_smg_ready, port, len(workers))
        metrics_path = "/metrics"
    child = children.start(f"{label}-{target}", argv)
    await wait_until(
        f"{LABEL[target]} on port {port} with {len(workers)} healthy workers",
        ready,
        children=children,
        within=STARTUP_TIMEOUT,
    )
    return Router(target, child, port, metrics_port, metrics_path, argv)


def rotated(targets: Sequence[str], k: int) -> list[str]:
    """``targets`` rotated by ``k``: every target goes first in turn, round after round."""
    k %= len(targets)
    return [*targets[k:], *targets[:k]]


def with_headers(request: bytes, headers: Mapping[str, str]) -> bytes:
    """``request`` (from ``encode_request``) with extra header lines after the request line."""
    line, rest = request.split(b"\r\n", 1)
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
    return line + b"\r\n" + extra + rest


# ---------------------------------------------------------------- the load client


class TimedConn(HttpConn):
    """``HttpConn`` that also records when each SSE ``data:`` event arrived."""

    __slots__ = ()

    async def stream_timed(self, request: bytes) -> tuple[int, bool, list[float]]:
        """(status, ``[DONE]`` seen, perf_counter() of every data event but ``[DONE]``)."""
        await self._send(request)
        status, length, chunked, keep_alive = await self._head()
        if status != 200 or not chunked:
            await self._body(length, chunked, keep_alive)
            return status, False, []
        times: list[float] = []
        done = False
        pending = bytearray()

        def on_data(data: bytes) -> None:
            nonlocal done
            now = time.perf_counter()
            pending.extend(data)
            while (end := pending.find(b"\n\n")) >= 0:
                event = bytes(pending[:end])
                del pending[: end + 2]
                if not event.startswith(b"data:"):
                    continue
                if event[5:].strip() == b"[DONE]":
                    done = True
                else:
                    times.append(now)

        await self._chunks(on_data)
        if not keep_alive:
            await self.aclose()
        return status, done, times


Exchange = Callable[[TimedConn, bytes], Awaitable[bool]]


@dataclass(slots=True)
class Window:
    """One closed-loop run against one target."""

    records: list[tuple[float, float, bool]] = field(default_factory=list)  # (t0, dt, ok)
    elapsed: float = 0.0
    start: float = 0.0
    cpu: dict[int, float] = field(default_factory=dict)  # CPU seconds per watched pid
    sys_share: dict[int, float] = field(default_factory=dict)  # of that, kernel time (0..1)
    busy: float = 0.0  # whole machine, 0..1

    @property
    def ok(self) -> int:
        return sum(1 for r in self.records if r[2])

    @property
    def errors(self) -> int:
        return sum(1 for r in self.records if not r[2])

    def latencies(self) -> list[float]:
        return sorted(r[1] for r in self.records if r[2])


async def small_exchange(conn: TimedConn, request: bytes) -> bool:
    status, _ = await conn.request(request)
    return status == 200


@dataclass(slots=True)
class StreamTally:
    events: int = 0
    ttfe: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)


async def stream_exchange(tally: StreamTally, conn: TimedConn, request: bytes) -> bool:
    t0 = time.perf_counter()
    status, done, times = await conn.stream_timed(request)
    tally.events += len(times)
    if status != 200 or not done or not times:
        return False
    tally.ttfe.append(times[0] - t0)
    tally.gaps.extend(b - a for a, b in pairwise(times))
    return True


async def run_load(
    targets: Sequence[tuple[int, bytes]],
    concurrency: int,
    exchange: Exchange,
    *,
    duration: float,
    pids: Sequence[int],
    warm_exchange: Exchange | None = None,
    warmup: int = WARMUP_REQUESTS,
    during: Callable[[float], Awaitable[None]] | None = None,
    max_requests: int = 1_000_000,
) -> Window:
    """Closed loop: connection ``i`` sends ``targets[i % n]``'s request to its port.

    Each connection first makes ``warmup`` requests (``BenchError`` if one fails), then all of
    them run for ``duration`` s while the CPU of ``pids`` is measured. ``during(start)`` runs
    alongside the measured clients (for the kill scenario).
    """
    slots = [targets[i % len(targets)] for i in range(concurrency)]
    conns = [(TimedConn(port), request) for port, request in slots]
    window = Window()
    warm_with = warm_exchange or exchange

    async def warm(conn: TimedConn, request: bytes) -> None:
        for _ in range(warmup):
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    ok = await warm_with(conn, request)
            except PROBE_ERRORS as exc:
                raise BenchError(
                    f"warm-up request to port {conn.port} failed: {type(exc).__name__}: {exc}"
                ) from None
            if not ok:
                raise BenchError(f"warm-up request to port {conn.port} got an error response")

    async def client(conn: TimedConn, request: bytes, end: float) -> None:
        records = window.records
        while (t0 := time.perf_counter()) < end and len(records) < max_requests:
            ok = False
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    ok = await exchange(conn, request)
            except PROBE_ERRORS:
                await conn.aclose()
            records.append((t0, time.perf_counter() - t0, ok))
            if not ok:
                await trio.sleep(ERROR_PAUSE)

    try:
        with trio.fail_after(duration + WINDOW_SLACK):
            async with trio.open_nursery() as nursery:
                for conn, request in conns:
                    nursery.start_soon(warm, conn, request)
            split0 = {pid: cpu_user_sys(pid) for pid in pids}
            before = CpuSnapshot.take(pids)
            end = before.wall + duration
            async with trio.open_nursery() as nursery:
                for conn, request in conns:
                    nursery.start_soon(client, conn, request, end)
                if during is not None:
                    nursery.start_soon(during, before.wall)
            after = CpuSnapshot.take(pids)
            split1 = {pid: cpu_user_sys(pid) for pid in pids}
    except trio.TooSlowError:
        raise BenchError(f"a window did not finish within {duration + WINDOW_SLACK:g} s") from None
    finally:
        for conn, _ in conns:
            await conn.aclose()
    window.start = before.wall
    window.elapsed = after.wall - before.wall
    window.cpu = {pid: before.delta(after, pid) for pid in pids}
    for pid in pids:
        user = split1[pid][0] - split0[pid][0]
        kernel = split1[pid][1] - split0[pid][1]
        window.sys_share[pid] = kernel / (user + kernel) if user + kernel > 0 else float("nan")
    window.busy = before.machine_busy(after)
    await trio.sleep(SETTLE)
    return window


# ---------------------------------------------------------------- results


@dataclass(slots=True)
class Bench:
    """Everything the scenarios share: options, processes, figures, report and plot data."""

    args: argparse.Namespace
    children: Children
    log: Log
    targets: tuple[str, ...]  # without "smg" when it is not installed
    figures: dict[str, float | None] = field(default_factory=dict)
    report: list[str] = field(default_factory=list)
    plots: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def routers(self) -> tuple[str, ...]:
        return tuple(t for t in self.targets if t != "direct")

    def fig(self, name: str, value: float | None) -> None:
        self.figures[name] = None if value is None or value != value else float(value)


def cols(spec: str) -> list[str]:
    """Table column headers written as ``"a|b|c"``."""
    return spec.split("|")


def med(values: Sequence[float]) -> float:
    vals = [v for v in values if v == v]
    return statistics.median(vals) if vals else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b and a == a and b == b else float("nan")


def na(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or value != value else fmt(value, digits)


def times(value: float | None) -> str:
    """A ratio as ``x1.23`` (``n/a`` if missing)."""
    return "n/a" if value is None or value != value else f"x{value:.2f}"


def cell(target: str, bench: Bench, value: float, digits: int = 1) -> str:
    return "n/a" if target not in bench.targets else fmt(value, digits)


# ---------------------------------------------------------------- 1. small requests


def target_requests(
    target: str, workers: Sequence[Worker], routers: Mapping[str, Router], raw: bytes
) -> tuple[list[tuple[int, bytes]], list[int]]:
    """(port, request) per connection slot, and the pids whose CPU to watch."""
    if target == "direct":
        ports = [w.port for w in workers]
        return [(p, encode_request("POST", p, "/generate", raw)) for p in ports], []
    r = routers[target]
    return [(r.port, encode_request("POST", r.port, "/generate", raw))], [r.pid]


async def small_scenario(bench: Bench) -> None:
    args = bench.args
    bench.log(" 1. small requests: starting 2 workers + routers")
    workers = await start_workers(bench.children, "small", latency_ms=0.0)
    routers: dict[str, Router] = {
        t: await start_router(bench.children, t, "small", workers, policy)
        for t, policy in (("trio", "least_inflight"), ("smg", "round_robin"))
        if t in bench.targets
    }
    raw = json_body({"text": PROMPT, "sampling_params": {"max_new_tokens": 4}})
    worker_pids = [w.child.pid for w in workers]
    results: dict[tuple[int, str], list[Window]] = {}
    try:
        for ci, conc in enumerate(args.concurrency):
            for rnd in range(args.rounds):
                for target in rotated(bench.targets, rnd + ci):
                    reqs, pids = target_requests(target, workers, routers, raw)
                    w = await run_load(
                        reqs,
                        conc,
                        small_exchange,
                        duration=args.duration,
                        pids=pids + worker_pids,
                    )
                    results.setdefault((conc, target), []).append(w)
                    cpu = w.cpu[pids[0]] / w.ok * 1e6 if pids and w.ok else float("nan")
                    bench.log(
                        f"  small c={conc:<3} round {rnd + 1} {target:<6} "
                        f"{w.ok / w.elapsed:8.1f} req/s  "
                        f"p50 {percentile(w.latencies(), 50) * 1e3:7.2f} ms  "
                        f"router {fmt(cpu)} us/req  busy {w.busy * 100:.0f}%"
                    )
        if args.profile and "trio" in routers:
            await profile_trio(bench, routers["trio"], workers, raw)
    finally:
        bench.children.stop([*(r.child for r in routers.values()), *(w.child for w in workers)])
    small_report(bench, results)


def small_report(bench: Bench, results: Mapping[tuple[int, str], list[Window]]) -> None:
    args = bench.args
    rows = []
    plot: dict[str, dict[str, list[float]]] = {"rps": {}, "cpu": {}, "p50": {}}
    for conc in args.concurrency:
        stats: dict[str, dict[str, float]] = {}
        for target in TARGETS:
            ws = results.get((conc, target), [])
            per = []
            for w in ws:
                lat = w.latencies()
                router_pid = next(iter(w.cpu)) if target != "direct" else None
                cpu_s = w.cpu[router_pid] if router_pid is not None else float("nan")
                per.append(
                    {
                        "rps": w.ok / w.elapsed if w.elapsed else float("nan"),
                        "p50": percentile(lat, 50) * 1e3,
                        "p99": percentile(lat, 99) * 1e3,
                        "errors": float(w.errors),
                        "cpu_us": cpu_s / w.ok * 1e6 if w.ok else float("nan"),
                        "cpu_pct": 100 * cpu_s / w.elapsed if w.elapsed else float("nan"),
                        "sys_pct": 100 * w.sys_share.get(router_pid, float("nan"))
                        if router_pid is not None
                        else float("nan"),
                        "busy": 100 * w.busy,
                    }
                )
            keys = ("rps", "p50", "p99", "errors", "cpu_us", "cpu_pct", "sys_pct", "busy")
            s = {k: med([p[k] for p in per]) if per else float("nan") for k in keys}
            s["errors"] = sum(p["errors"] for p in per) if per else float("nan")
            stats[target] = s
            rows.append(
                [
                    str(conc),
                    LABEL[target],
                    cell(target, bench, s["rps"]),
                    cell(target, bench, s["p50"], 2),
                    cell(target, bench, s["p99"], 2),
                    cell(target, bench, s["errors"], 0),
                    "-" if target == "direct" else cell(target, bench, s["cpu_us"]),
                    "-" if target == "direct" else cell(target, bench, s["cpu_pct"]),
                    "-" if target == "direct" else cell(target, bench, s["sys_pct"], 0),
                    cell(target, bench, s["busy"], 0),
                ]
            )
            p = f"small_c{conc}"
            bench.fig(f"{p}_rps_{target}", s["rps"])
            bench.fig(f"{p}_p50_ms_{target}", s["p50"])
            bench.fig(f"{p}_p99_ms_{target}", s["p99"])
            bench.fig(f"{p}_errors_{target}", s["errors"])
            if target != "direct":
                bench.fig(f"{p}_cpu_us_{target}", s["cpu_us"])
                bench.fig(f"{p}_p50_added_ms_{target}", s["p50"] - stats["direct"]["p50"])
            plot["rps"].setdefault(target, []).append(s["rps"])
            plot["cpu"].setdefault(target, []).append(s["cpu_us"])
            plot["p50"].setdefault(target, []).append(s["p50"])
        t, m = stats["trio"], stats["smg"]
        bench.fig(f"small_c{conc}_cpu_ratio_trio_over_smg", ratio(t["cpu_us"], m["cpu_us"]))
        bench.fig(f"small_c{conc}_rps_ratio_trio_over_smg", ratio(t["rps"], m["rps"]))
        bench.fig(f"small_c{conc}_p50_ratio_trio_over_smg", ratio(t["p50"], m["p50"]))
        bench.fig(f"small_c{conc}_p99_ratio_trio_over_smg", ratio(t["p99"], m["p99"]))
    bench.plots["small"] = plot
    head = (
        f"1. small POST /generate (max_new_tokens 4), closed loop, {args.duration:g} s x "
        f"{args.rounds} rounds (medians; errors summed); direct = connections over both workers"
    )
    out = [
        head,
        table(
            cols(
                "conc|target|req/s|p50 ms|p99 ms|errors|router us/req|router cpu%|router sys%|busy%"
            ),
            rows,
        ),
    ]
    for conc in args.concurrency:
        f = bench.figures
        p = f"small_c{conc}"
        out.append(
            f"  c={conc}: trio/SMG  CPU per request {times(f[f'{p}_cpu_ratio_trio_over_smg'])}"
            f", req/s {times(f[f'{p}_rps_ratio_trio_over_smg'])}"
            f", p50 {times(f[f'{p}_p50_ratio_trio_over_smg'])}"
            f", p99 {times(f[f'{p}_p99_ratio_trio_over_smg'])}"
        )
    bench.report.append("\n".join(out))


# ---------------------------------------------------------------- profile (optional)


def py_spy_path() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


async def profile_trio(bench: Bench, router: Router, workers: Sequence[Worker], raw: bytes) -> None:
    """Sample trio_router with py-spy during a c=32 small-request window; report top frames."""
    exe = py_spy_path()
    if exe is None:
        bench.notes.append("profile: py-spy not found (pip install py-spy into .venv)")
        return
    seconds = bench.args.profile
    out = bench.children.tmpdir / "py-spy.txt"
    argv = [exe, "record", "--pid", str(router.pid), "-d", str(int(seconds)), "-f", "raw"]
    argv += ["-o", str(out), "--rate", "250", "--gil"]
    bench.log(f"  profile: py-spy on trio_router (pid {router.pid}) for {seconds:g} s at c=32")
    spy: Child | None = None

    async def record(_start: float) -> None:
        nonlocal spy
        spy = bench.children.start("py-spy", argv)

    reqs, pids = target_requests("trio", workers, {"trio": router}, raw)
    try:
        await run_load(reqs, 32, small_exchange, duration=seconds + 1.5, pids=pids, during=record)
        if spy is not None:
            proc = spy.proc
            with trio.move_on_after(30):
                await trio.to_thread.run_sync(proc.wait, abandon_on_cancel=True)
    finally:
        if spy is not None:
            bench.children.stop([spy])
    if not out.exists():
        tail = spy.tail() if spy is not None else ""
        bench.notes.append(f"profile: py-spy wrote nothing ({tail.strip()[-300:]})")
        return
    raw_profile = out.read_text(errors="replace")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    kept = RESULTS_DIR / "compare_trio_profile.txt"
    kept.write_text(raw_profile)
    bench.report.append(summarise_profile(raw_profile) + f"\n  (collapsed stacks: {kept})")


def summarise_profile(raw: str, top: int = 14) -> str:
    """Top self and inclusive frames of py-spy ``-f raw`` (collapsed stacks) output."""
    self_count: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        n = int(count_s)
        frames = [re.sub(r":\d+\)$", ")", f.strip()) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        self_count[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return "profile: no samples"
    lines = [
        f"trio_router profile (py-spy --gil: {total} samples holding the GIL, i.e. Python CPU;"
        " c=32 small requests)"
    ]
    lines.append("  self (where the CPU was):")
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in self_count.most_common(top)]
    lines.append("  inclusive (below 95%):")
    lines += [
        f"    {100 * n / total:5.1f}%  {f}"
        for f, n in [x for x in incl.most_common() if x[1] < 0.95 * total][:top]
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- 2. streams


async def stream_scenario(bench: Bench) -> None:
    args = bench.args
    bench.log(f" 2. streams: starting 2 workers ({args.stream_latency_ms:g} ms/token) + routers")
    workers = await start_workers(bench.children, "stream", latency_ms=args.stream_latency_ms)
    routers: dict[str, Router] = {
        t: await start_router(bench.children, t, "stream", workers, policy)
        for t, policy in (("trio", "least_inflight"), ("smg", "round_robin"))
        if t in bench.targets
    }
    body = {
        "text": PROMPT,
        "stream": True,
        "sampling_params": {"max_new_tokens": args.stream_tokens, "ignore_eos": True},
    }
    raw = json_body(body)
    worker_pids = [w.child.pid for w in workers]
    per: dict[str, list[dict[str, float]]] = {t: [] for t in TARGETS}
    gaps: dict[str, list[float]] = {t: [] for t in TARGETS}
    try:
        for rnd in range(args.rounds):
            for target in rotated(bench.targets, rnd):
                reqs, pids = target_requests(target, workers, routers, raw)
                tally = StreamTally()
                w = await run_load(
                    reqs,
                    args.stream_concurrency,
                    partial(stream_exchange, tally),
                    warm_exchange=partial(stream_exchange, StreamTally()),
                    warmup=1,
                    duration=args.stream_duration,
                    pids=pids + worker_pids,
                )
                g = sorted(tally.gaps)
                cpu_s = w.cpu[pids[0]] if pids else float("nan")
                s = {
                    "streams_s": w.ok / w.elapsed,
                    "events_s": tally.events / w.elapsed,
                    "ttfe_p50": percentile(sorted(tally.ttfe), 50) * 1e3,
                    "ttfe_p99": percentile(sorted(tally.ttfe), 99) * 1e3,
                    "gap_p50": percentile(g, 50) * 1e3,
                    "gap_p99": percentile(g, 99) * 1e3,
                    "coalesced": 100 * sum(1 for x in g if x < COALESCED) / len(g)
                    if g
                    else float("nan"),
                    "errors": float(w.errors),
                    "cpu_us": cpu_s / tally.events * 1e6 if tally.events else float("nan"),
                    "busy": 100 * w.busy,
                }
                per[target].append(s)
                gaps[target].extend(tally.gaps)
                bench.log(
                    f"  stream round {rnd + 1} {target:<6} {s['events_s']:8.1f} events/s  "
                    f"ttfe p50 {s['ttfe_p50']:6.2f} ms  gap p50/p99 {s['gap_p50']:.2f}/"
                    f"{s['gap_p99']:.2f} ms  router {fmt(s['cpu_us'])} us/event"
                )
    finally:
        bench.children.stop([*(r.child for r in routers.values()), *(w.child for w in workers)])
    rows = []
    stats: dict[str, dict[str, float]] = {}
    for target in TARGETS:
        keys = (
            "streams_s",
            "events_s",
            "ttfe_p50",
            "ttfe_p99",
            "gap_p50",
            "gap_p99",
            "coalesced",
            "cpu_us",
        )
        s = {k: med([p[k] for p in per[target]]) for k in keys}
        s["errors"] = sum(p["errors"] for p in per[target]) if per[target] else float("nan")
        s["busy"] = med([p["busy"] for p in per[target]])
        stats[target] = s
        rows.append(
            [
                LABEL[target],
                cell(target, bench, s["streams_s"]),
                cell(target, bench, s["events_s"], 0),
                cell(target, bench, s["ttfe_p50"], 2),
                cell(target, bench, s["ttfe_p99"], 2),
                cell(target, bench, s["gap_p50"], 2),
                cell(target, bench, s["gap_p99"], 2),
                cell(target, bench, s["coalesced"]),
                cell(target, bench, s["errors"], 0),
                "-" if target == "direct" else cell(target, bench, s["cpu_us"]),
                cell(target, bench, s["busy"], 0),
            ]
        )
        bench.fig(f"stream_ttfe_p50_ms_{target}", s["ttfe_p50"])
        bench.fig(f"stream_gap_p50_ms_{target}", s["gap_p50"])
        bench.fig(f"stream_gap_p99_ms_{target}", s["gap_p99"])
        bench.fig(f"stream_coalesced_pct_{target}", s["coalesced"])
        bench.fig(f"stream_events_per_s_{target}", s["events_s"])
        bench.fig(f"stream_errors_{target}", s["errors"])
        if target != "direct":
            bench.fig(f"stream_cpu_us_per_event_{target}", s["cpu_us"])
            bench.fig(f"stream_ttfe_added_ms_{target}", s["ttfe_p50"] - stats["direct"]["ttfe_p50"])
    t, m = stats["trio"], stats["smg"]
    bench.fig("stream_cpu_us_per_event_ratio", ratio(t["cpu_us"], m["cpu_us"]))
    bench.fig("stream_gap_p99_ratio_trio_over_smg", ratio(t["gap_p99"], m["gap_p99"]))
    bench.fig("stream_ttfe_p50_ratio_trio_over_smg", ratio(t["ttfe_p50"], m["ttfe_p50"]))
    bench.plots["stream"] = {"gaps": gaps, "cpu": {k: v["cpu_us"] for k, v in stats.items()}}
    head = (
        f"2. streamed POST /generate: {args.stream_concurrency} concurrent streams x "
        f"{args.stream_tokens} tokens at {args.stream_latency_ms:g} ms/token, "
        f"{args.stream_duration:g} s x {args.rounds} rounds (medians)"
    )
    f = bench.figures
    tail = (
        f"  trio/SMG: CPU per event {times(f['stream_cpu_us_per_event_ratio'])}, "
        f"gap p99 {times(f['stream_gap_p99_ratio_trio_over_smg'])}, "
        f"ttfe p50 {times(f['stream_ttfe_p50_ratio_trio_over_smg'])}"
    )
    headers = cols(
        "target|streams/s|events/s|ttfe p50 ms|ttfe p99 ms|gap p50 ms|gap p99 ms|"
        "coalesced %|errors|router us/event|busy%"
    )
    bench.report.append("\n".join([head, table(headers, rows), tail]))


# ---------------------------------------------------------------- 3. large R3 responses


def r3_prompt(size: int, new_tokens: int) -> tuple[list[int], int]:
    """Prompt ids whose R3 payload is >= ``size`` base64 bytes, and that payload's length.

    One token's routed experts are 4 layers x 2 experts x int32 = 32 bytes, i.e. 128/3 base64
    characters, for every token but the last (as SGLang); ids 1..250 are plain byte tokens of
    the bytes tokenizer.
    """
    tokens = -(-size * 3 // 128) + 1
    n = max(1, tokens - new_tokens)
    expected = 4 * -(-(32 * (n + new_tokens - 1)) // 3)
    return [(i * 37 + 11) % 250 + 1 for i in range(n)], expected


@dataclass(slots=True)
class R3Cell:
    latencies: list[float] = field(default_factory=list)
    body_bytes: list[int] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    bad: int = 0
    cpu_s: float = 0.0
    rss_before_mb: float = float("nan")
    growth_mb: float = float("nan")


def _r3_digest(body: bytes) -> tuple[str, int]:
    """(digest, length) of ``meta_info.routed_experts`` in an answer (``""``, 0 if none)."""
    try:
        meta = orjson.loads(body).get("meta_info") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return "", 0
    experts = meta.get("routed_experts")
    if not isinstance(experts, str):
        return "", 0
    return hashlib.blake2b(experts.encode(), digest_size=16).hexdigest(), len(experts)


async def r3_cell(port: int, raw: bytes, n: int, pid: int | None, expected: int) -> R3Cell:
    """``n`` sequential large requests on one connection (peak RSS and CPU of ``pid``)."""
    cell_ = R3Cell()
    request = encode_request("POST", port, "/generate", raw)
    conn = HttpConn(port)
    reset = False
    cpu0 = 0.0
    if pid is not None:
        reset = reset_peak_rss(pid)
        cell_.rss_before_mb = proc_status_kb(pid, "VmRSS") * 1024 / MB
        cpu0 = cpu_seconds_fine(pid)
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                with trio.fail_after(R3_TIMEOUT):
                    status, body = await conn.request(request)
            except PROBE_ERRORS:
                await conn.aclose()
                cell_.bad += 1
                continue
            cell_.latencies.append(time.perf_counter() - t0)
            digest, length = _r3_digest(body) if status == 200 else ("", 0)
            if length != expected:
                cell_.bad += 1
            cell_.body_bytes.append(len(body))
            cell_.digests.append(digest)
    finally:
        await conn.aclose()
    if pid is not None:
        cell_.cpu_s = cpu_seconds_fine(pid) - cpu0
        peak = proc_status_kb(pid, "VmHWM") * 1024 / MB
        cell_.growth_mb = peak - cell_.rss_before_mb if reset else float("nan")
    return cell_


async def r3_flags(workers: Sequence[Worker]) -> tuple[int, int]:
    """(requests that arrived with return_routed_experts, requests it was added to)."""
    seen = injected = 0
    for w in workers:
        status, body = await get_json(w.port, "/bench/r3")
        if status == 200 and isinstance(body, dict):
            seen += int(body.get("seen", 0))
            injected += int(body.get("injected", 0))
    return seen, injected


async def r3_scenario(bench: Bench) -> None:
    args = bench.args
    bench.log(f" 3. R3 payloads {args.r3_sizes} MB: starting 2 workers (flag-counting) + routers")
    workers = await start_workers(bench.children, "r3", latency_ms=0.0, r3=True)
    routers: dict[str, Router] = {
        t: await start_router(bench.children, t, "r3", workers, "round_robin")
        for t in ("trio", "smg")
        if t in bench.targets
    }
    cells: dict[tuple[int, str], list[R3Cell]] = {}
    flags: dict[str, tuple[int, int]] = {}
    expected_len: dict[int, int] = {}
    try:
        for size in args.r3_sizes:
            ids, expected = r3_prompt(size * MB, 1)
            expected_len[size] = expected
            body = {
                "input_ids": ids,
                "sampling_params": {"max_new_tokens": 1, "temperature": 0},
                "return_routed_experts": True,
            }
            raw = json_body(body)
            n = args.r3_requests if size < 100 else max(1, args.r3_requests - 1)
            for target in bench.targets:  # warm-up: one request each (pools, allocator)
                port = workers[0].port if target == "direct" else routers[target].port
                pid = None if target == "direct" else routers[target].pid
                before = await r3_flags(workers)
                await r3_cell(port, raw, 1, pid, expected)
                after = await r3_flags(workers)
                if target != "direct":
                    s, i = flags.get(target, (0, 0))
                    flags[target] = (s + after[0] - before[0], i + after[1] - before[1])
            for rnd in range(args.rounds):
                for target in rotated(bench.targets, rnd):
                    if target == "direct":
                        port, pid = workers[rnd % 2].port, None
                    else:
                        port, pid = routers[target].port, routers[target].pid
                    before = await r3_flags(workers)
                    c = await r3_cell(port, raw, n, pid, expected)
                    after = await r3_flags(workers)
                    if target != "direct":
                        s, i = flags.get(target, (0, 0))
                        flags[target] = (s + after[0] - before[0], i + after[1] - before[1])
                    cells.setdefault((size, target), []).append(c)
                    bench.log(
                        f"  r3 {size:>3} MB round {rnd + 1} {target:<6} p50 "
                        f"{percentile(sorted(c.latencies), 50) * 1e3:8.1f} ms  RSS growth "
                        f"{fmt(c.growth_mb)} MB  bad {c.bad}"
                    )
            bench.children.check_alive()
    finally:
        bench.children.stop([*(r.child for r in routers.values()), *(w.child for w in workers)])
    r3_report(bench, cells, flags, expected_len)


def r3_report(
    bench: Bench,
    cells: Mapping[tuple[int, str], list[R3Cell]],
    flags: Mapping[str, tuple[int, int]],
    expected_len: Mapping[int, int],
) -> None:
    args = bench.args
    rows = []
    plot: dict[str, dict[str, list[float]]] = {"lat": {}, "rss": {}}
    for target in bench.routers:
        seen, injected = flags.get(target, (0, 0))
        bench.fig(f"r3_flag_forwarded_{target}", ratio(seen, seen + injected))
    for size in args.r3_sizes:
        direct_cells = cells.get((size, "direct"), [])
        ref = next((d for c in direct_cells for d in c.digests if d), "")
        stats: dict[str, dict[str, float]] = {}
        for target in TARGETS:
            cs = cells.get((size, target), [])
            lat = med([percentile(sorted(c.latencies), 50) * 1e3 for c in cs])
            s = {
                "lat": lat,
                "bytes": med([float(b) for c in cs for b in c.body_bytes]),
                "growth": med([c.growth_mb for c in cs]),
                "growth_max": max((c.growth_mb for c in cs), default=float("nan")),
                "rss_before": med([c.rss_before_mb for c in cs]),
                "cpu_ms": med([c.cpu_s / max(1, len(c.latencies)) * 1e3 for c in cs]),
                "bad": float(sum(c.bad for c in cs)),
            }
            intact = (
                bool(cs) and s["bad"] == 0 and all(d == ref and d for c in cs for d in c.digests)
            )
            stats[target] = s
            seen, injected = flags.get(target, (0, 0))
            flag = "-" if target == "direct" else f"{seen}/{seen + injected}"
            body_delta = s["bytes"] - stats["direct"]["bytes"] if target != "direct" else 0.0
            rows.append(
                [
                    f"{size} MB",
                    LABEL[target],
                    cell(target, bench, s["bytes"], 0),
                    "-" if target == "direct" else cell(target, bench, body_delta, 0),
                    cell(target, bench, s["lat"]),
                    "-"
                    if target == "direct"
                    else cell(target, bench, s["lat"] - stats["direct"]["lat"]),
                    "-" if target == "direct" else cell(target, bench, s["cpu_ms"]),
                    "-" if target == "direct" else cell(target, bench, s["rss_before"]),
                    "-" if target == "direct" else cell(target, bench, s["growth"]),
                    "-" if target == "direct" else cell(target, bench, s["growth_max"]),
                    "n/a" if target not in bench.targets else ("ok" if intact else "FAIL"),
                    flag if target in bench.targets else "n/a",
                ]
            )
            p = f"r3_{size}mb"
            bench.fig(f"{p}_latency_p50_ms_{target}", s["lat"])
            bench.fig(f"{p}_body_bytes_{target}", s["bytes"])
            if target != "direct":
                bench.fig(f"{p}_added_latency_ms_{target}", s["lat"] - stats["direct"]["lat"])
                bench.fig(f"{p}_rss_growth_mb_{target}", s["growth"])
                bench.fig(f"{p}_cpu_ms_per_req_{target}", s["cpu_ms"])
                bench.fig(
                    f"{p}_integrity_ok_{target}",
                    float(intact) if target in bench.targets else None,
                )
            plot["lat"].setdefault(target, []).append(s["lat"])
            plot["rss"].setdefault(target, []).append(s["growth"])
        t, m = stats["trio"], stats["smg"]
        bench.fig(f"r3_{size}mb_latency_ratio_trio_over_smg", ratio(t["lat"], m["lat"]))
        bench.fig(f"r3_{size}mb_rss_growth_ratio_trio_over_smg", ratio(t["growth"], m["growth"]))
        bench.fig(f"r3_{size}mb_cpu_ratio_trio_over_smg", ratio(t["cpu_ms"], m["cpu_ms"]))
    bench.plots["r3"] = {"sizes": list(args.r3_sizes), **plot}
    head = (
        f"3. large /generate answers with meta_info.routed_experts (R3), one request at a time, "
        f"{args.r3_requests} per cell (100 MB: one fewer) x {args.rounds} rounds (medians); "
        "growth = VmHWM - VmRSS before (MB = 1e6 B)"
    )
    headers = cols(
        "size|target|body bytes|vs direct|p50 ms|added ms|router cpu ms/req|RSS before MB|"
        "growth MB|growth max|R3 intact|flag fwd"
    )
    note = (
        "  flag fwd = requests whose return_routed_experts reached the worker / requests; "
        "where it did not, the worker layer set it (see the module docstring)."
    )
    bench.report.append("\n".join([head, table(headers, rows), note]))


# ---------------------------------------------------------------- 4. sticky routing


async def sticky_run(
    port: int, keys: Sequence[str], reps: int, conc: int, seed: int
) -> tuple[dict[str, Counter[str]], int, float]:
    """Each key ``reps`` times in shuffled rounds; (versions seen per key, errors, seconds)."""
    order: list[str] = []
    rng = random.Random(seed)
    for _ in range(reps):
        batch = list(keys)
        rng.shuffle(batch)
        order += batch
    jobs = iter(order)
    raw = json_body({"text": PROMPT, "sampling_params": {"max_new_tokens": 4}})
    base = encode_request("POST", port, "/generate", raw)
    served: dict[str, Counter[str]] = {k: Counter() for k in keys}
    errors = 0

    async def client() -> None:
        nonlocal errors
        conn = HttpConn(port)
        try:
            for key in jobs:
                try:
                    with trio.fail_after(REQUEST_TIMEOUT):
                        status, body = await conn.request(with_headers(base, {ROUTING_HEADER: key}))
                except PROBE_ERRORS:
                    await conn.aclose()
                    errors += 1
                    continue
                if status != 200:
                    errors += 1
                    continue
                try:
                    version = orjson.loads(body)["meta_info"]["weight_version"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    errors += 1
                    continue
                served[key][str(version)] += 1
        finally:
            await conn.aclose()

    t0 = time.perf_counter()
    with trio.fail_after(len(order) * 0.1 + WINDOW_SLACK):
        async with trio.open_nursery() as nursery:
            for _ in range(conc):
                nursery.start_soon(client)
    return served, errors, time.perf_counter() - t0


async def sticky_scenario(bench: Bench) -> None:
    args = bench.args
    bench.log(f" 4. sticky: {args.sticky_keys} keys x {args.sticky_reps}: 2 workers + routers")
    workers = await start_workers(bench.children, "sticky", latency_ms=0.0)
    routers: dict[str, Router] = {
        t: await start_router(bench.children, t, "sticky", workers, policy)
        for t, policy in (("trio", "sticky"), ("smg", "manual"))
        if t in bench.targets
    }
    per: dict[str, list[dict[str, float]]] = {t: [] for t in ROUTERS}
    try:
        for rnd in range(args.rounds):
            for target in rotated(bench.routers, rnd):
                keys = [f"r{rnd}-{target}-session-{i:04d}" for i in range(args.sticky_keys)]
                cpu0 = cpu_seconds(routers[target].pid)
                served, errors, secs = await sticky_run(
                    routers[target].port, keys, args.sticky_reps, 32, seed=rnd
                )
                cpu_s = cpu_seconds(routers[target].pid) - cpu0
                total = sum(sum(c.values()) for c in served.values())
                by_req = Counter[str]()
                by_key = Counter[str]()
                for c in served.values():
                    by_req.update(c)
                    if c:
                        by_key[c.most_common(1)[0][0]] += 1
                complete = [c for c in served.values() if sum(c.values()) == args.sticky_reps]
                sticky = sum(1 for c in complete if len(c) == 1)
                n_keys = sum(by_key.values()) or 1
                s = {
                    "requests": float(total),
                    "errors": float(errors),
                    "req_share_a": by_req[VERSIONS[0]] / total if total else float("nan"),
                    "key_share_a": by_key[VERSIONS[0]] / n_keys,
                    "stickiness": sticky / len(complete) if complete else float("nan"),
                    "split_keys": float(len(complete) - sticky),
                    "rps": total / secs,
                    "cpu_us": cpu_s / total * 1e6 if total else float("nan"),
                }
                per[target].append(s)
                bench.log(
                    f"  sticky round {rnd + 1} {target:<5} stickiness {s['stickiness']:.4f}  "
                    f"requests v-a {s['req_share_a']:.3f}  keys v-a {s['key_share_a']:.3f}  "
                    f"errors {errors}"
                )
    finally:
        bench.children.stop([*(r.child for r in routers.values()), *(w.child for w in workers)])
    rows = []
    for target in TARGETS:
        if target == "direct":
            rows.append([LABEL[target], *(["n/a (no routing)"] + ["-"] * 7)])
            continue
        ps = per[target]
        s = {
            k: med([p[k] for p in ps])
            for k in (
                "requests",
                "req_share_a",
                "key_share_a",
                "stickiness",
                "split_keys",
                "rps",
                "cpu_us",
            )
        }
        s["errors"] = sum(p["errors"] for p in ps) if ps else float("nan")
        req_a, key_a = s["req_share_a"], s["key_share_a"]
        rows.append(
            [
                LABEL[target],
                cell(target, bench, s["requests"], 0),
                cell(target, bench, s["errors"], 0),
                "n/a" if target not in bench.targets else f"{req_a:.3f} / {1 - req_a:.3f}",
                "n/a" if target not in bench.targets else f"{key_a:.3f} / {1 - key_a:.3f}",
                cell(target, bench, s["stickiness"], 4),
                cell(target, bench, s["split_keys"], 0),
                cell(target, bench, s["rps"], 0),
                cell(target, bench, s["cpu_us"]),
            ]
        )
        bench.fig(f"sticky_stickiness_{target}", s["stickiness"])
        bench.fig(f"sticky_request_share_max_{target}", max(req_a, 1 - req_a))
        bench.fig(f"sticky_key_share_max_{target}", max(key_a, 1 - key_a))
        bench.fig(f"sticky_errors_{target}", s["errors"])
        bench.fig(f"sticky_cpu_us_{target}", s["cpu_us"])
        bench.plots.setdefault("sticky", {})[target] = (req_a, key_a, s["stickiness"])
    head = (
        f"4. sticky routing: {args.sticky_keys} keys ({ROUTING_HEADER}) x {args.sticky_reps} "
        f"requests each, shuffled, 32 clients, {args.rounds} rounds with fresh keys (medians); "
        "trio_router --policy sticky, SMG --policy manual"
    )
    headers = cols(
        "target|requests|errors|requests v-a / v-b|keys v-a / v-b|stickiness|split keys|req/s|"
        "router us/req"
    )
    bench.report.append("\n".join([head, table(headers, rows)]))


# ---------------------------------------------------------------- 5. worker killed under load


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of each sample line of a Prometheus text exposition."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_:][\w:]*)(\{(.*)\})?\s+(\S+)", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        try:
            out.append((m.group(1), labels, float(m.group(4))))
        except ValueError:
            continue
    return out


def failure_signals(
    target: str, samples: Sequence[tuple[str, dict[str, str], float]], dead: str
) -> tuple[float, bool]:
    """(failed attempts counted by the router, dead worker out of rotation?) from its metrics."""
    failed = 0.0
    out = False
    for name, labels, value in samples:
        worker = labels.get("worker", "").rstrip("/")
        if target == "smg":
            if name == "smg_worker_cb_outcomes_total" and worker == dead:
                failed += value if labels.get("outcome") == "failure" else 0.0
            elif worker == dead and (
                (name == "smg_worker_cb_state" and value != 0)
                or (name == "smg_worker_health" and value == 0)
            ):
                out = True
        else:
            if name == "trio_router_retries_total":
                failed += value
            elif (
                name == "trio_router_worker_transitions_total"
                and worker == dead
                and labels.get("to_state") in ("suspect", "quarantined")
                and value > 0
            ):
                out = True
    return failed, out


@dataclass(slots=True)
class KillRun:
    requests: int = 0
    errors: int = 0
    slow: int = 0
    median_ms: float = float("nan")
    max_ms: float = float("nan")
    last_client_ms: float = float("nan")  # after the kill: end of the last failed request
    last_router_ms: float = float("nan")  # last increase of the router's failure counter
    out_ms: float = float("nan")  # router metrics first show the worker out of rotation
    router_failed: float = float("nan")
    timeline: list[tuple[float, float, bool]] = field(default_factory=list)

    @property
    def last_failure_ms(self) -> float:
        vals = [v for v in (self.last_client_ms, self.last_router_ms) if v == v]
        return max(vals) if vals else 0.0


async def kill_once(bench: Bench, target: str, rnd: int) -> KillRun:
    args = bench.args
    label = f"kill{rnd}"
    workers = await start_workers(bench.children, label, latency_ms=args.kill_latency_ms)
    started: list[Child] = [w.child for w in workers]
    run = KillRun()
    try:
        routers: dict[str, Router] = {}
        if target != "direct":
            policy = "least_inflight" if target == "trio" else "round_robin"
            routers[target] = await start_router(bench.children, target, label, workers, policy)
            started.append(routers[target].child)
        raw = json_body({"text": PROMPT, "sampling_params": {"max_new_tokens": 4}})
        reqs, _pids = target_requests(target, workers, routers, raw)
        victim = workers[1]
        kill_at: list[float] = []
        polls: list[tuple[float, float, bool]] = []  # (t, failed attempts, out of rotation)

        async def poll_metrics(router: Router, until: float) -> None:
            while time.perf_counter() < until:
                conn = HttpConn(router.metrics_port)
                try:
                    with trio.fail_after(2):
                        status, body = await conn.request(
                            encode_request("GET", router.metrics_port, router.metrics_path)
                        )
                    if status == 200:
                        samples = parse_prometheus(body.decode("utf-8", "replace"))
                        failed, out = failure_signals(target, samples, victim.url)
                        polls.append((time.perf_counter(), failed, out))
                except PROBE_ERRORS:
                    pass
                finally:
                    await conn.aclose()
                await trio.sleep(METRICS_POLL)

        async def during(start: float) -> None:
            async with trio.open_nursery() as nursery:
                if routers:
                    nursery.start_soon(poll_metrics, routers[target], start + args.kill_duration)
                await trio.sleep_until(trio.current_time() + args.kill_at)
                os.kill(victim.child.pid, signal.SIGKILL)
                kill_at.append(time.perf_counter())

        w = await run_load(
            reqs,
            args.kill_clients,
            small_exchange,
            duration=args.kill_duration,
            pids=[],
            during=during,
        )
    finally:
        bench.children.stop(started)
    t_kill = kill_at[0]
    before = sorted(r[1] for r in w.records if r[2] and r[0] + r[1] < t_kill)
    median = statistics.median(before) if before else float("nan")
    run.requests = len(w.records)
    run.errors = w.errors
    run.median_ms = median * 1e3
    run.max_ms = max((r[1] for r in w.records), default=float("nan")) * 1e3
    bad_ends = []
    for t0, dt, ok in w.records:
        slow = ok and dt > SLOW_FACTOR * median
        run.slow += int(slow)
        if not ok and t0 + dt >= t_kill:
            bad_ends.append(t0 + dt)
    run.last_client_ms = (max(bad_ends) - t_kill) * 1e3 if bad_ends else float("nan")
    if polls:
        before_kill = [p for p in polls if p[0] <= t_kill]
        base = before_kill[-1][1] if before_kill else 0.0
        run.router_failed = polls[-1][1] - base
        rises = [b[0] for a, b in pairwise(polls) if b[1] > a[1] and b[0] >= t_kill]
        run.last_router_ms = (max(rises) - t_kill) * 1e3 if rises else float("nan")
        outs = [p[0] for p in polls if p[2] and p[0] >= t_kill]
        run.out_ms = (min(outs) - t_kill) * 1e3 if outs else float("nan")
    run.timeline = [(t0 - t_kill, dt, ok) for t0, dt, ok in w.records]
    return run


async def kill_scenario(bench: Bench) -> None:
    args = bench.args
    bench.log(
        f" 5. kill: {args.kill_clients} clients, {args.kill_duration:g} s, SIGKILL at "
        f"{args.kill_at:g} s (fresh workers and router per run)"
    )
    runs: dict[str, list[KillRun]] = {t: [] for t in TARGETS}
    for rnd in range(args.rounds):
        for target in rotated(bench.targets, rnd):
            r = await kill_once(bench, target, rnd)
            runs[target].append(r)
            bench.log(
                f"  kill round {rnd + 1} {target:<6} {r.requests} requests, {r.errors} errors, "
                f"{r.slow} slow, last failure +{r.last_failure_ms:.0f} ms, out +{fmt(r.out_ms, 0)}"
                f" ms, router-counted failures {fmt(r.router_failed, 0)}"
            )
    rows = []
    for target in TARGETS:
        rs = runs[target]
        for i, r in enumerate(rs):
            rows.append(
                [
                    LABEL[target],
                    str(i + 1),
                    str(r.requests),
                    str(r.errors),
                    str(r.slow),
                    fmt(r.median_ms, 2),
                    fmt(r.max_ms, 0),
                    fmt(r.last_client_ms, 0),
                    "-" if target == "direct" else fmt(r.last_router_ms, 0),
                    fmt(r.last_failure_ms, 0),
                    "-" if target == "direct" else fmt(r.out_ms, 0),
                    "-" if target == "direct" else fmt(r.router_failed, 0),
                ]
            )
        if not rs:
            rows.append([LABEL[target], "n/a", *(["n/a"] * 10)])
        p = "kill"
        bench.fig(f"{p}_client_errors_{target}", med([r.errors for r in rs]))
        bench.fig(f"{p}_slow_requests_{target}", med([r.slow for r in rs]))
        bench.fig(f"{p}_requests_{target}", med([r.requests for r in rs]))
        bench.fig(f"{p}_last_failure_ms_{target}", med([r.last_failure_ms for r in rs]))
        bench.fig(f"{p}_max_latency_ms_{target}", med([r.max_ms for r in rs]))
        if target != "direct":
            bench.fig(f"{p}_out_of_rotation_ms_{target}", med([r.out_ms for r in rs]))
            bench.fig(f"{p}_router_failed_attempts_{target}", med([r.router_failed for r in rs]))
    bench.plots["kill"] = {t: rs[-1].timeline for t, rs in runs.items() if rs}
    head = (
        f"5. one of 2 workers SIGKILLed at {args.kill_at:g} s: {args.kill_clients} clients, closed "
        f"loop, {args.kill_duration:g} s, workers {args.kill_latency_ms:g} ms/token x 4 tokens; "
        f"times in ms after the kill; slow = > {SLOW_FACTOR:g}x pre-kill median"
    )
    headers = cols(
        "target|round|requests|errors|slow|median ms|max ms|last client error|"
        "last router-seen|last failure|out ms|router failures"
    )
    note = (
        "  last client error = end of the last failed request; last router-seen = last rise of"
        f" the router's failure counter (polled every {METRICS_POLL * 1e3:.0f} ms); last failure"
        " = the later of the two; slow requests include ones delayed by CPU contention, not only"
        " by retries; direct clients stay pinned to the dead worker."
    )
    bench.report.append("\n".join([head, table(headers, rows), note]))


# ---------------------------------------------------------------- plots


def write_plots(bench: Bench) -> list[str]:
    """PNG files in bench/results (matplotlib, Agg); returns what was written or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["plots skipped: matplotlib is not installed (.venv/bin/pip install matplotlib)"]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    colors = {"direct": "tab:gray", "trio": "tab:blue", "smg": "tab:orange"}
    written = []

    def save(fig: Any, name: str) -> None:
        path = RESULTS_DIR / f"compare_{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))

    def bars(ax: Any, groups: Sequence[str], series: Mapping[str, Sequence[float]]) -> None:
        names = [t for t in TARGETS if t in series]
        width = 0.8 / max(1, len(names))
        for i, t in enumerate(names):
            xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
            vals = [0.0 if v != v else v for v in series[t]]
            ax.bar(xs, vals, width, label=LABEL[t], color=colors[t])
        ax.set_xticks(range(len(groups)), groups)
        ax.legend(fontsize=8)

    if small := bench.plots.get("small"):
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        groups = [f"c={c}" for c in bench.args.concurrency]
        bars(axes[0], groups, small["rps"])
        axes[0].set_title("small /generate: req/s")
        bars(axes[1], groups, small["p50"])
        axes[1].set_title("p50 latency (ms)")
        bars(axes[2], groups, {k: v for k, v in small["cpu"].items() if k != "direct"})
        axes[2].set_title("router CPU per request (us)")
        save(fig, "small")
    if stream := bench.plots.get("stream"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for t, gaps in stream["gaps"].items():
            if gaps:
                g = sorted(x * 1e3 for x in gaps)
                ys = [(i + 1) / len(g) for i in range(len(g))]
                axes[0].plot(g, ys, label=LABEL[t], color=colors[t])
        axes[0].set_xscale("symlog", linthresh=1.0)
        axes[0].set_xlabel("gap between consecutive events (ms)")
        axes[0].set_ylabel("CDF")
        axes[0].legend(fontsize=8)
        axes[0].set_title("streamed /generate: inter-event gaps")
        cpu = {t: [v] for t, v in stream["cpu"].items() if t != "direct"}
        bars(axes[1], ["per relayed event"], cpu)
        axes[1].set_title("router CPU (us)")
        save(fig, "stream")
    if r3 := bench.plots.get("r3"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        groups = [f"{s} MB" for s in r3["sizes"]]
        bars(axes[0], groups, r3["lat"])
        axes[0].set_yscale("log")
        axes[0].set_title("R3 answer: p50 latency (ms)")
        bars(axes[1], groups, {k: v for k, v in r3["rss"].items() if k != "direct"})
        axes[1].set_title("router peak RSS growth (MB)")
        save(fig, "r3")
    if sticky := bench.plots.get("sticky"):
        fig, ax = plt.subplots(figsize=(7, 4))
        names = list(sticky)
        xs = range(len(names))
        a = [sticky[t][0] for t in names]
        ax.bar(xs, a, color="tab:green", label="requests to v-a")
        ax.bar(xs, [1 - v for v in a], bottom=a, color="tab:olive", label="requests to v-b")
        for x, t in zip(xs, names, strict=True):
            ax.text(x, 1.02, f"sticky {sticky[t][2]:.3f}", ha="center", fontsize=9)
        ax.set_xticks(list(xs), [LABEL[t] for t in names])
        ax.set_ylim(0, 1.12)
        ax.legend(fontsize=8, loc="lower right")
        ax.set_title("sticky routing: share per worker, stickiness")
        save(fig, "sticky")
    if kill := bench.plots.get("kill"):
        fig, axes = plt.subplots(len(kill), 1, figsize=(10, 2.6 * len(kill)), sharex=True)
        for ax, (t, timeline) in zip(
            list(axes) if len(kill) > 1 else [axes], kill.items(), strict=True
        ):
            ok = [(x, dt * 1e3) for x, dt, good in timeline if good]
            bad = [(x, dt * 1e3) for x, dt, good in timeline if not good]
            if ok:
                ax.scatter(*zip(*ok, strict=True), s=3, color=colors[t], label="ok")
            if bad:
                ax.scatter(*zip(*bad, strict=True), s=12, color="red", marker="x", label="error")
            ax.axvline(0, color="black", linestyle="--", linewidth=1)
            ax.set_yscale("log")
            ax.set_ylabel("latency ms")
            ax.set_title(f"{LABEL[t]}: requests by start time (s after SIGKILL)", fontsize=9)
            ax.legend(fontsize=7, loc="upper right")
        save(fig, "kill")
    return written


# ---------------------------------------------------------------- the worker process


class FlagCounter:
    """ASGI layer: counts ``return_routed_experts`` on ``/generate`` and sets it if missing."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen = 0
        self.injected = 0

    async def __call__(self, scope: Mapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/bench/r3":
            counts = orjson.dumps({"seen": self.seen, "injected": self.injected})
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": counts})
            return
        if scope["type"] != "http" or scope["path"] != "/generate":
            await self.app(scope, receive, send)
            return
        raw = await _read_all(receive)
        if raw is None:
            return
        body: Any = None
        with contextlib.suppress(orjson.JSONDecodeError):
            body = orjson.loads(raw)
        if isinstance(body, dict):
            if body.get("return_routed_experts") is True:
                self.seen += 1
            else:
                self.injected += 1
                body["return_routed_experts"] = True
                raw = orjson.dumps(body)
        await self.app(scope, _replay(raw, receive), send)


async def _read_all(receive: Any) -> bytes | None:
    """The whole ASGI request body (None if the client went away first)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(raw: bytes, receive: Any) -> Callable[[], Awaitable[Mapping[str, Any]]]:
    """An ASGI ``receive`` that gives ``raw`` as the body, then defers to ``receive``."""
    replayed = False

    async def replay() -> Mapping[str, Any]:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": raw, "more_body": False}
        message: Mapping[str, Any] = await receive()
        return message

    return replay


def _http1_only() -> None:
    """Make hypercorn (in this process) close connections that start speaking HTTP/2.

    SMG 0.3.2 probes every worker port with two gRPC (h2c) health checks when it registers
    it. hypercorn 0.18 on trio answers them with HTTP/2 and, racing with the probe closing,
    can raise out of a connection handler (``KeyError`` for a DATA frame on a stream it
    already closed, ``BusyResourceError`` from two concurrent sends), which ends the whole
    server: the worker dies while SMG registers it. Real SGLang workers (uvicorn) speak
    HTTP/1.1 only, so this process does the same: an HTTP/2 preface or an h2c upgrade closes
    the connection. Nothing else changes; all the measured traffic is HTTP/1.1.
    """
    from hypercorn.events import Closed
    from hypercorn.protocol import ProtocolWrapper
    from hypercorn.protocol.h11 import H2CProtocolRequiredError, H2ProtocolAssumedError

    async def handle(self: Any, event: Any) -> None:
        try:
            await self.protocol.handle(event)
        except (H2ProtocolAssumedError, H2CProtocolRequiredError):
            await self.send(Closed())

    ProtocolWrapper.handle = handle  # type: ignore[method-assign]


def sim_worker_main(argv: Sequence[str]) -> int:
    """``compare.py --sim-worker --port P ...``: trio_router's SimWorker (bytes tokenizer).

    The same app and hypercorn settings as ``python -m trio_router worker``, HTTP/1.1 only
    (see ``_http1_only``) and, with ``--count-r3``, behind ``FlagCounter``.
    """
    import hypercorn.config
    import hypercorn.trio

    from trio_router.sim.tokenizer import ByteTokenizer
    from trio_router.sim.worker import SimWorker, SimWorkerConfig

    parser = argparse.ArgumentParser(prog="compare.py --sim-worker")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--weight-version", default="v0")
    parser.add_argument("--latency-per-token-ms", type=float, default=0.0)
    parser.add_argument("--count-r3", action="store_true")
    args = parser.parse_args(argv)
    config = SimWorkerConfig(
        host="127.0.0.1",
        port=args.port,
        weight_version=args.weight_version,
        latency_per_token_ms=args.latency_per_token_ms,
        tokenizer="bytes",
        context_length=1 << 26,  # the R3 prompts are millions of byte tokens
    )
    sim = SimWorker(config, ByteTokenizer())
    app: Any = FlagCounter(sim) if args.count_r3 else sim
    _http1_only()
    hc = hypercorn.config.Config()
    hc.bind = [f"127.0.0.1:{args.port}"]
    hc.accesslog = None
    hc.graceful_timeout = 0.1
    hc.keep_alive_timeout = 75

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(hypercorn.trio.serve, app, hc)
            print(f"simulated SGLang worker listening on 127.0.0.1:{args.port}", flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()

    trio.run(serve)
    return 0


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare trio_router with SMG (sglang-router 0.3.2) and direct worker "
        "access on simulated workers (loopback only).",
    )
    parser.add_argument("--quick", action="store_true", help="smaller comparison, under 5 min")
    parser.add_argument("--setup", action="store_true", help="install SMG into bench/.venv-smg")
    parser.add_argument("--no-smg", action="store_true", help="leave SMG out (columns n/a)")
    parser.add_argument("--rounds", type=int, help="rounds per scenario (default 3; quick 2)")
    parser.add_argument("--concurrency", type=int, nargs="+", help="small: (default 1 32 256)")
    parser.add_argument("--duration", type=float, help="small: s per window (default 5; quick 2)")
    parser.add_argument("--stream-concurrency", type=int, default=32)
    parser.add_argument("--stream-tokens", type=int, default=64)
    parser.add_argument("--stream-latency-ms", type=float, default=5.0)
    parser.add_argument("--stream-duration", type=float, help="s per window (default 5; quick 3)")
    parser.add_argument("--r3-sizes", type=int, nargs="+", help="MB (default 1 10 100; quick 1 10)")
    parser.add_argument("--r3-requests", type=int, help="per cell (default 4; quick 3)")
    parser.add_argument("--sticky-keys", type=int, default=1000)
    parser.add_argument("--sticky-reps", type=int, help="requests per key (default 4; quick 3)")
    parser.add_argument("--kill-clients", type=int, default=8)
    parser.add_argument("--kill-duration", type=float, default=8.0)
    parser.add_argument("--kill-at", type=float, default=2.0)
    parser.add_argument("--kill-latency-ms", type=float, default=1.0, help="workers' ms/token")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=("small", "stream", "r3", "sticky", "kill"),
        default=["small", "stream", "r3", "sticky", "kill"],
    )
    parser.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="py-spy trio_router for this long at c=32 after scenario 1",
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write figures as JSON")
    args = parser.parse_args(argv)
    q = args.quick
    args.rounds = args.rounds or (2 if q else 3)
    args.concurrency = list(dict.fromkeys(args.concurrency or ([1, 32] if q else [1, 32, 256])))
    args.duration = args.duration or (2.0 if q else 5.0)
    args.stream_duration = args.stream_duration or (3.0 if q else 5.0)
    args.r3_sizes = list(dict.fromkeys(args.r3_sizes or ([1, 10] if q else [1, 10, 100])))
    args.r3_requests = args.r3_requests or (3 if q else 4)
    args.sticky_reps = args.sticky_reps or (3 if q else 4)
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be in 1..20")
    if any(not 1 <= c <= 1024 for c in (*args.concurrency, args.stream_concurrency)):
        parser.error("concurrencies must be in 1..1024")
    if not 0 < args.duration <= 600 or not 0 < args.stream_duration <= 600:
        parser.error("durations must be in (0, 600]")
    if any(not 1 <= s <= 200 for s in args.r3_sizes) or not 1 <= args.r3_requests <= 50:
        parser.error("--r3-sizes must be in 1..200 MB and --r3-requests in 1..50")
    if not 1 <= args.sticky_keys <= 100_000 or not 2 <= args.sticky_reps <= 50:
        parser.error("--sticky-keys must be in 1..100000 and --sticky-reps in 2..50")
    if not 0 < args.kill_at < args.kill_duration <= 120 or not 1 <= args.kill_clients <= 256:
        parser.error("need 0 < --kill-at < --kill-duration <= 120 and 1..256 --kill-clients")
    if not 0 <= args.profile <= 60:
        parser.error("--profile must be in 0..60 s")
    return args


def git_state() -> str:
    """Commit of the project and whether trio_router/ has uncommitted changes (what ran)."""
    repo = BENCH_DIR.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "trio_router"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "git state unknown"
    changed = len(dirty.splitlines())
    return f"trio_router at {head or '?'}" + (f" + {changed} uncommitted files" if changed else "")


def print_figures(figures: Mapping[str, float | None]) -> None:
    for name, value in figures.items():
        print(f"{name}={'n/a' if value is None else f'{value:.3f}'}")


async def run(bench: Bench) -> None:
    scenarios: dict[str, Callable[[Bench], Awaitable[None]]] = {
        "small": small_scenario,
        "stream": stream_scenario,
        "r3": r3_scenario,
        "sticky": sticky_scenario,
        "kill": kill_scenario,
    }
    for name in bench.args.scenarios:
        await scenarios[name](bench)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--sim-worker"]:
        return sim_worker_main(argv[1:])
    args = parse_args(argv)
    began = time.perf_counter()
    state = git_state()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f}s]{line}", file=sys.stderr, flush=True)

    targets: tuple[str, ...] = TARGETS
    smg_note = ""
    if args.setup or not args.no_smg:
        problem = setup_smg(log)
        if args.setup:
            print(
                f"SMG setup failed: {problem}"
                if problem
                else f"SMG {SMG_VERSION} ready in {SMG_VENV}"
            )
            return 1 if problem else 0
        if problem:
            smg_note = (
                f"SMG could not be installed ({SMG_REQUIREMENT} into {SMG_VENV}); SMG columns "
                f"are n/a. pip said:\n{problem}"
            )
            print(f"compare: {smg_note}", file=sys.stderr)
    if args.no_smg or smg_note:
        targets = ("direct", "trio")
    children = Children()
    bench = Bench(args, children, log, targets)
    if smg_note:
        bench.notes.append(smg_note)
    try:
        trio.run(run, bench)
    except BaseException as exc:
        leaves = list(_leaves(exc))
        if any(isinstance(e, KeyboardInterrupt) for e in leaves):
            print("compare: interrupted", file=sys.stderr)
            return 130
        if leaves and all(isinstance(e, BenchError) for e in leaves):
            for e in dict.fromkeys(str(e) for e in leaves):
                print(f"compare: error: {e}", file=sys.stderr)
            return 1
        raise
    finally:
        children.stop_all()
    bench.figures["wall_s"] = time.perf_counter() - began
    plots = [] if args.no_plots else write_plots(bench)
    print(
        f"trio_router vs {LABEL['smg']} vs direct; {os.cpu_count()} CPUs; Python "
        f"{sys.version.split()[0]}; rounds {args.rounds}{' (quick)' if args.quick else ''}; "
        f"{state}"
    )
    print()
    print("\n\n".join(bench.report))
    for note in bench.notes:
        print(f"\nnote: {note}")
    for line in plots:
        print(line if line.startswith("plots skipped") else f"plot: {line}")
    print()
    print_figures(bench.figures)
    write_json(args.json, bench.figures, args)
    return 0


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


if __name__ == "__main__":
    sys.exit(main())
