"""``trio-router demo``: two simulated workers and a router in one nursery.

It drives a short multi-turn rollout through the router (concurrent agents
speaking text with the Qwen3 chat template, each pinned to one worker by its
``X-SMG-Routing-Key``, one of them streamed), then asks the router for each
conversation's tokens and checks them against the ids the engine consumed and
produced. It prints what happened, as the router and the workers saw it.
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
from .tokenizer import Tokenizer, load_tokenizer


@dataclass(slots=True)
class AgentLog:
    agent: int
    streamed: bool
    latencies: list[float] = field(default_factory=list)
    first_event_ms: list[float] = field(default_factory=list)
    events: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    conversation: str = ""
    truth: list[int] = field(default_factory=list)  # the ids the engine consumed and produced
    exact: bool | None = None
    naive_exact: bool | None = None


NEXT_TURN = (
    "<|im_end|>\n<|im_start|>user\nWhat is the next step?<|im_end|>\n<|im_start|>assistant\n"
)


async def _agent(
    client: httpx.AsyncClient, log: AgentLog, turns: int, tokenizer: Tokenizer
) -> None:
    log.conversation = (
        f"<|im_start|>system\nYou are agent {log.agent}.<|im_end|>\n"
        "<|im_start|>user\nPlan a trip, step by step.<|im_end|>\n<|im_start|>assistant\n"
    )
    log.truth = tokenizer.encode(log.conversation)
    headers = {"X-SMG-Routing-Key": f"agent-{log.agent}"}
    for turn in range(turns):
        body: dict[str, Any] = {
            "text": log.conversation,
            "sampling_params": {"max_new_tokens": 16, "temperature": 0},
            "stream": log.streamed,
        }
        began = trio.current_time()
        try:
            if log.streamed:
                answer: dict[str, Any] = {}
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
                        answer = orjson.loads(line[6:])
            else:
                response = await client.post("/generate", json=body, headers=headers)
                response.raise_for_status()
                answer = response.json()
            text, output = answer["text"], answer["output_ids"]
        except (httpx.HTTPError, KeyError, orjson.JSONDecodeError) as exc:
            log.errors.append(f"turn {turn}: {type(exc).__name__}: {exc}")
            return
        log.latencies.append((trio.current_time() - began) * 1000)
        log.tokens += len(output)
        log.conversation += text
        log.truth += output
        if turn < turns - 1:
            log.conversation += NEXT_TURN
            ended = bool(output) and output[-1] == tokenizer.eos_token_id
            log.truth += tokenizer.encode(
                NEXT_TURN.removeprefix("<|im_end|>") if ended else NEXT_TURN
            )


async def _check_exactness(client: httpx.AsyncClient, log: AgentLog, tokenizer: Tokenizer) -> None:
    """Compare what the trainer would get with what the engine really saw."""
    if log.errors:
        return
    response = await client.post("/retrieve_from_text", json={"text": log.conversation})
    log.exact = response.status_code == 200 and response.json()["tokens"] == log.truth
    log.naive_exact = tokenizer.encode(log.conversation) == log.truth


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
    exact = sum(bool(log.exact) for log in logs)
    naive = sum(bool(log.naive_exact) for log in logs)
    cache = metrics.get("cache", {})
    lines.append(
        f"  token cache: hit rate {cache.get('hit_rate', 0):.2f}, "
        f"{cache.get('cached_prompt_tokens', 0)} prompt tokens reused, "
        f"{cache.get('fresh_prompt_tokens', 0)} tokenized"
    )
    lines.append(
        f"  /retrieve_from_text gives the engine's exact tokens for {exact}/{len(logs)} "
        f"conversations (re-tokenizing the final text: {naive}/{len(logs)})"
    )
    for e in errors:
        lines.append(f"  error: {e}")
    return "\n".join(lines)


async def run_demo(*, agents: int = 6, turns: int = 3, serve_forever: bool = False) -> int:
    """Run the demo; returns the process exit code."""
    tokenizer = await trio.to_thread.run_sync(load_tokenizer)
    async with trio.open_nursery() as nursery:
        workers = [
            await nursery.start(
                partial(
                    serve_sim_worker,
                    SimWorkerConfig(latency_per_token_ms=1.0, seed=i),
                    tokenizer=tokenizer,
                )
            )
            for i in range(2)
        ]
        config = RouterConfig(
            port=0,
            worker_urls=tuple(w.url for w in workers),
            policy="sticky",
            health_check_interval=2.0,
            radix_tree_max_size=1_000_000,
            seed=0,
        )
        running: RunningRouter = await nursery.start(partial(serve, config, tokenizer=tokenizer))
        began = trio.current_time()
        logs = [AgentLog(agent=i, streamed=i == 0) for i in range(agents)]
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
            async with trio.open_nursery() as rollout:
                for log in logs:
                    rollout.start_soon(_agent, client, log, turns, tokenizer)
            wall = trio.current_time() - began
            for log in logs:
                await _check_exactness(client, log, tokenizer)
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
    return 1 if any(log.errors or not log.exact for log in logs) else 0
