"""Cache-aware routing and the token cache's GC loop."""

from __future__ import annotations

import random
from typing import Any

import trio

from trio_router.policies import CacheAware
from trio_router.pool import WorkerPool
from trio_router.radix import PROMPT
from trio_router.token_cache import CacheSettings, TokenCache

from .conftest import start_router, start_worker
from .test_proxy import wait_until
from .test_token_cache import generate


def pool_of(n: int) -> WorkerPool:
    pool = WorkerPool()
    for i in range(n):
        pool.add(f"http://10.0.0.{i}:8000", 0.0)
        pool.probe_succeeded(f"http://10.0.0.{i}:8000", 0.0)
    return pool


def test_cache_aware_follows_the_hint_until_loads_are_imbalanced():
    pool = pool_of(2)
    policy = CacheAware(random.Random(0), balance_abs=4, balance_rel=1.5)
    home = "http://10.0.0.1:8000"
    assert policy.choose(pool, None, 0.0, hint=home).worker.url == home
    leases = [pool.acquire(pool.get(home)) for _ in range(5)]  # type: ignore[arg-type]
    decision = policy.choose(pool, None, 0.0, hint=home)
    assert (decision.worker.url, decision.branch) == ("http://10.0.0.0:8000", "imbalanced")
    for lease in leases:
        lease.release()
    assert policy.choose(pool, None, 0.0, hint=None).branch == "cache_miss"
    assert policy.choose(pool, None, 0.0, hint="http://gone:1").branch == "cache_miss"


async def test_grpo_groups_and_later_turns_stay_on_the_worker_holding_their_prefix(
    nursery, client, qwen3
):
    workers = [await start_worker(nursery, tokenizer=qwen3) for _ in range(2)]
    running = await start_router(
        nursery,
        tokenizer=qwen3,
        worker_urls=tuple(w.url for w in workers),
        radix_tree_max_size=1_000_000,
        policy="cache_aware",
    )
    cache = running.router.token_cache
    assert cache is not None
    served: dict[str, list[int]] = {}

    async def send(prompt: str, text: str, seed: int) -> dict[str, Any]:
        before = [w.app.stats.requests.get("/generate", 0) for w in workers]
        recorded = cache.counters.recorded
        answer: dict[str, Any] = await generate(
            client, running.url, text, sampling_params={"max_new_tokens": 8, "sampling_seed": seed}
        )
        after = [w.app.stats.requests.get("/generate", 0) for w in workers]
        served.setdefault(prompt, []).append(next(i for i in range(2) if after[i] > before[i]))
        await wait_until(lambda: cache.counters.recorded > recorded)
        return answer

    with trio.fail_after(30):
        for group in range(4):
            prompt = (
                f"<|im_start|>user\nProblem {group}: prove it.<|im_end|>\n<|im_start|>assistant\n"
            )
            first = await send(prompt, prompt, 0)
            for sample in range(1, 4):
                await send(prompt, prompt, sample)
            later = prompt + first["text"] + "<|im_end|>\n<|im_start|>user\nAnd then?"
            await send(prompt, later, 9)
    # every later sample of a group, and its next turn, went where the first one did
    for prompt, where in served.items():
        assert len(set(where)) == 1, (prompt, where)
    assert len({where[0] for where in served.values()}) == 2  # groups spread over both workers


async def test_the_gc_loop_keeps_the_newest_k_versions(autojump_clock):
    table = [bytes([i]) for i in range(256)]
    tokenizer: Any = type(
        "Toy",
        (),
        {"token_bytes": staticmethod(table.__getitem__), "bytes_table": lambda self: table},
    )()
    cache = TokenCache(
        tokenizer, CacheSettings(max_tokens=10_000, gc_threshold_k=2, gc_interval=30)
    )
    for i, version in enumerate(["v1", "v2", "v3", "v4"]):
        slot = cache.trie.version_slot(version)
        ids = list(f"p{i}:gen".encode())
        cache.trie.insert(ids, [0.0] * 6, [PROMPT] * 3 + [slot] * 3, now=0.0)
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.gc_loop)
            await trio.sleep(29)
            assert cache.trie.versions == ["v1", "v2", "v3", "v4"]
            await trio.sleep(2)
            assert cache.trie.versions == ["v3", "v4"]
            nursery.cancel_scope.cancel()
    # the shared "p", the prompts "0:" and "1:" of the dropped ones, and two whole trajectories
    assert cache.trie.tokens == 1 + 2 * 2 + 2 * 5


def test_the_simulated_prefix_cache_counts_whole_cached_blocks():
    from trio_router.sim.kvcache import PrefixCache

    cache = PrefixCache(block=4, capacity_blocks=3)
    assert cache.lookup(list(range(10))) == 0
    cache.insert(list(range(10)))  # blocks 0-3 and 4-7
    assert cache.lookup(list(range(10))) == 8
    assert cache.lookup([*range(6), 99, 99, 99]) == 4
    assert cache.lookup(list(range(8))) == 7  # the last token is always computed
    cache.insert([50, 51, 52, 53, 54, 55, 56, 57])  # two more blocks evict the oldest
    assert cache.lookup(list(range(10))) == 0


async def reuse_with(nursery, client, qwen3, policy: str) -> float:  # type: ignore[no-untyped-def]
    workers = [await start_worker(nursery, tokenizer=qwen3, seed=i) for i in range(2)]
    running = await start_router(
        nursery,
        tokenizer=qwen3,
        worker_urls=tuple(w.url for w in workers),
        radix_tree_max_size=1_000_000,
        policy=policy,
    )
    system = "<|im_start|>system\n" + "You are a careful assistant. " * 20 + "<|im_end|>\n"
    for group in range(4):
        prompt = system + f"<|im_start|>user\nProblem {group}?<|im_end|>\n<|im_start|>assistant\n"
        for sample in range(4):
            await generate(
                client,
                running.url,
                prompt,
                sampling_params={"max_new_tokens": 8, "sampling_seed": sample},
            )
    prompt_tokens = sum(w.app.stats.prompt_tokens for w in workers)
    cached = sum(w.app.stats.cached_tokens for w in workers)
    return cached / prompt_tokens


async def test_cache_aware_routing_buys_worker_side_prefix_reuse(nursery, client, qwen3):
    with trio.fail_after(60):
        aware = await reuse_with(nursery, client, qwen3, "cache_aware")
        blind = await reuse_with(nursery, client, qwen3, "round_robin")
    assert aware > blind
