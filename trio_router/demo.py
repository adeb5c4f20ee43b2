"""``trio-router demo``: two simulated workers and a router in one nursery.

It drives a short multi-turn rollout through the router (concurrent agents,
each pinned to one worker by its ``X-SMG-Routing-Key``, one of them streamed)
and prints what happened, as the router and the workers saw it.
"""

from __future__ import annotations

import signal
import statistics
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import orjson
import trio

from .config import RouterConfig
from .server import RunningRouter, serve
from .sim.worker import SimWorkerConfig, SimWorkerHandle, serve_sim_worker


@dataclass(slots=True)
class AgentLog:
    agent: int
    streamed: bool
    latencies: list[float] = field(default_factory=list)
    first_event_ms: list[float] = field(default_factory=list)
    events: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)


async def _agent(client: httpx.AsyncClient, log: AgentLog, turns: int) -> None:
    conversation = f"System: you are agent {log.agent}.\nUser: plan a trip, step by step.\n"
    headers = {"X-SMG-Routing-Key": f"agent-{log.agent}"}
    for turn in range(turns):
        body: dict[str, Any] = {
            "text": conversation + "Assistant:",
            "sampling_params": {"max_new_tokens": 16, "temperature": 0},
            "stream": log.streamed,
        }
        began = trio.current_time()
        try:
            if log.streamed:
                text = ""
                tokens = 0
                first: float | None = None
                async with client.stream("POST", "/generate", json=body, headers=headers) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        if first is None:
                            first = (trio.current_time() - began) * 1000
                            log.first_event_ms.append(first)
                        log.events += 1
                        event = orjson.loads(line[6:])
                        text = event["text"]
                        tokens = event["meta_info"]["completion_tokens"]
                log.tokens += tokens
            else:
                response = await client.post("/generate", json=body, headers=headers)
                response.raise_for_status()
                answer = response.json()
                text = answer["text"]
                log.tokens += answer["meta_info"]["completion_tokens"]
        except (httpx.HTTPError, KeyError, orjson.JSONDecodeError) as exc:
            log.errors.append(f"turn {turn}: {type(exc).__name__}: {exc}")
            return
        log.latencies.append((trio.current_time() - began) * 1000)
        conversation += f"Assistant:{text}\nUser: next step?\n"


def _summary(
    running: RunningRouter,
    workers: list[SimWorkerHandle],
    logs: list[AgentLog],
    metrics: dict[str, Any],
    wall: float,
) -> str:
    router = running.router
    latencies = sorted(x for log in logs for x in log.latencies)
    errors = [e for log in logs for e in log.errors]
    streamed = [log for log in logs if log.streamed]
    requests = len(latencies) + len(errors)
    lines = [
        f"trio_router demo: {len(workers)} simulated SGLang workers behind a router at "
        f"{running.url} (policy {router.policy.name})",
        f"rollout: {len(logs)} agents x {requests // max(len(logs), 1)} turns = {requests} "
        f"requests ({len(streamed)} agent streamed), {len(errors)} errors, "
        f"{sum(log.tokens for log in logs)} tokens generated, wall {wall:.2f} s",
    ]
    if latencies:
        p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
        lines.append(
            f"  latency ms: p50 {statistics.median(latencies):.1f}   p95 {p95:.1f}   "
            f"max {latencies[-1]:.1f}"
        )
    for log in streamed:
        firsts = ", ".join(f"{x:.1f}" for x in log.first_event_ms)
        lines.append(
            f"  streamed agent {log.agent}: {log.events} events relayed as generated; "
            f"first event after {firsts} ms per turn"
        )
    pins = getattr(router.policy, "pin_counts", {})
    lines.append("")
    lines.append(f"  {'worker':<26} {'state':<9} {'requests':>8} {'inflight':>8} {'pins':>5}")
    for w in metrics["router"]["workers"]:
        lines.append(
            f"  {w['url']:<26} {w['state']:<9} {w['requests']:>8} {w['inflight']:>8} "
            f"{pins.get(w['url'], 0):>5}"
        )
    decisions = {}
    for family in router.metrics.decisions.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                decisions[sample.labels["branch"]] = int(sample.value)
    lines.append("")
    lines.append(
        f"  router saw: total in flight now {metrics['router']['total_in_flight']}, "
        f"policy decisions {decisions}"
    )
    sticky = decisions.get("pin_hit", 0) == requests - len(logs) and not errors
    lines.append(f"  every agent stayed on one worker: {'yes' if sticky else 'no'}")
    for e in errors:
        lines.append(f"  error: {e}")
    return "\n".join(lines)


async def run_demo(*, agents: int = 6, turns: int = 3, serve_forever: bool = False) -> int:
    """Run the demo; returns the process exit code."""
    async with trio.open_nursery() as nursery:
        workers = [
            await nursery.start(
                partial(serve_sim_worker, SimWorkerConfig(latency_per_token_ms=1.0, seed=i))
            )
            for i in range(2)
        ]
        config = RouterConfig(
            port=0,
            worker_urls=tuple(w.url for w in workers),
            policy="sticky",
            health_check_interval=2.0,
            seed=0,
        )
        running: RunningRouter = await nursery.start(partial(serve, config))
        began = trio.current_time()
        logs = [AgentLog(agent=i, streamed=i == 0) for i in range(agents)]
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
            async with trio.open_nursery() as rollout:
                for log in logs:
                    rollout.start_soon(_agent, client, log, turns)
            wall = trio.current_time() - began
            metrics = (await client.get("/metrics")).json()
        print(_summary(running, workers, logs, metrics, wall), flush=True)
        if serve_forever:
            print(f"\nrouter:  {running.url}   (try: curl {running.url}/workers)")
            for w in workers:
                print(f"worker:  {w.url}")
            print("Ctrl-C to stop.", flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
        nursery.cancel_scope.cancel()
    return 1 if any(log.errors for log in logs) else 0
