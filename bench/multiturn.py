"""Multi-turn RL rollouts through the router's token cache: hit rates, speed and exactness.

Starts two simulated SGLang workers with the shipped Qwen3 tokenizer (``bench/_qwen_worker.py``,
which also records the prompt ids each ``/generate`` fed to the engine, by ``rid``) and a
router with ``--radix-tree-max-size 2000000 --policy least_inflight``, as separate processes on
free loopback ports. The workers get different ``--seed``s so that the samples of a group
differ with the worker they land on (the simulator is deterministic per prompt).

After a warm-up (``--concurrency`` short requests in a cache namespace of their own, so that
connections are open and the measured conversations see none of it), it drives
``--conversations`` conversations (GRPO style: groups of 8 share the same first
prompt; all first prompts share one system prompt) for ``--turns`` turns each, in lock-step
rounds (round t = turn t of every conversation that has one), ``--concurrency`` requests at a
time, with ``httpx.AsyncClient``. Each turn is ``POST /generate {"text": conversation so far,
"sampling_params": {"max_new_tokens": 32..64}, "rid": ...}``; the answer's ``text`` is
appended, then the next user turn as chat-template text
(``<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n``; the answer's own
``<|im_end|>``, if generated, is in ``output_ids`` but not in ``text``).

What is measured:

* **per turn** -- the router's ``/metrics`` cache counters before and after each round:
  lookups that found a cached prefix, and prompt tokens served from the cache (*cached*) vs
  tokenized by the router (*fresh*); *token hit rate* = cached / (cached + fresh). Client-side
  latency of each turn (send to full answer), p50/p99, and turns/s over all rounds.
* **exactness** -- for every finished conversation, the engine's truth is the last turn's prompt
  ids as the worker received them + that turn's ``output_ids``. It is compared with:
  ``POST /retrieve_from_text`` on the final text (*retrieved*; the goal is 100 %), with the
  client-side reconstruction ``previous truth + tokenize(new user text) + output_ids``
  (*chunked*), and with ``tokenize(final text)`` (*naive*: what a text-in/text-out pipeline
  would train on). Also checked: each turn's forwarded prompt extends the previous turn's
  prompt + output exactly (*prefix reuse*), the retrieved ``loss_mask`` is 1 exactly on the
  generated tokens (and its count equals the generated-token count), ``rollout_logp`` equals
  the workers' logprobs (to float32 precision) and ``weight_versions`` are the workers'.
  The first mismatching conversation of each kind is shown (first differing position, the
  tokens and text around it).

The last lines of the output are ``name=value`` pairs (``--json PATH`` writes them too).
``--quick`` (16 conversations x 3 turns) takes well under 90 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
from _harness import (
    BenchError,
    Child,
    Children,
    answers_health,
    fmt,
    free_ports,
    percentile,
    print_figures,
    router_sees,
    run_bench,
    table,
    wait_until,
    write_json,
)

from trio_router.sim.generation import vocab_from_tokenizer
from trio_router.tokenizer import Tokenizer, load_tokenizer

WORKER_SCRIPT = Path(__file__).resolve().with_name("_qwen_worker.py")
STARTUP_TIMEOUT = 45.0  # three processes importing transformers on a small machine
REQUEST_TIMEOUT = 30.0
CACHE_TOKENS = 2_000_000
GROUP_SIZE = 8
NAMESPACE = "x-trio-router-namespace"  # the router's default --namespace-header
MAX_NEW_TOKENS = (32, 64)
END = "<|im_end|>"
USER_TURN = END + "\n<|im_start|>user\n{}" + END + "\n<|im_start|>assistant\n"
FOLLOW_UPS = (
    "Now check step {n} again and fix it:",
    "Now check step {n} once more, carefully:",
    "Explain why {n} x {m} = {p} matters here.",
    "Rewrite the answer as code:\n```python\ndef f(x):\n    return x * {n}  # ok?\n```",
    "Translate the key idea to French (déjà vu, naïve) and to Chinese (答案是 {n}).",
    "Summarize in {n} words... or fewer!!",
    'Return JSON: {{"step": {n}, "ok": true, "note": "  spaced  out  "}}',
    "Does the emoji 🙂 or 👍🏽 change the result of {n}+{m}?",
)


# ---------------------------------------------------------------- processes


@dataclass(slots=True)
class Stack:
    workers: list[Child]
    worker_ports: list[int]
    router: Child
    router_port: int


def start_processes(children: Children, latency_ms: float, policy: str) -> Stack:
    """Start two recording Qwen3 workers and the router (readiness is awaited separately)."""
    *worker_ports, router_port = free_ports(3)
    workers = []
    for i, port in enumerate(worker_ports):
        argv = [sys.executable, str(WORKER_SCRIPT), "--port", str(port), "--seed", str(i + 1)]
        argv += ["--latency-per-token-ms", str(latency_ms)]
        workers.append(children.start(f"worker{i}", argv))
    argv = [sys.executable, "-m", "trio_router", "serve", "--host", "127.0.0.1"]
    argv += ["--port", str(router_port), "--log-level", "warning", "--policy", policy]
    argv += ["--radix-tree-max-size", str(CACHE_TOKENS)]
    argv += ["--worker-urls", *(f"http://127.0.0.1:{p}" for p in worker_ports)]
    router = children.start("router", argv)
    return Stack(workers, worker_ports, router, router_port)


async def wait_ready(stack: Stack, children: Children) -> None:
    for worker, port in zip(stack.workers, stack.worker_ports, strict=True):
        await wait_until(
            f"{worker.name} on port {port}",
            partial(answers_health, port),
            children=children,
            within=STARTUP_TIMEOUT,
        )
    await wait_until(
        f"router on port {stack.router_port} with {len(stack.workers)} healthy workers",
        partial(router_sees, stack.router_port, len(stack.workers)),
        children=children,
        within=STARTUP_TIMEOUT,
    )


# ---------------------------------------------------------------- conversations


@dataclass(slots=True)
class Turn:
    """One /generate of a conversation, as the client saw it."""

    rid: str
    appended: str  # text added before sending: the first prompt or the next user turn
    chunk_ids: list[int]  # client-side tokenization of the new prompt part
    output_ids: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    version: str | None = None
    text: str = ""
    latency: float = 0.0
    full_text: str = ""  # the conversation right after this answer


@dataclass(slots=True)
class Conversation:
    index: int
    group: int
    n_turns: int
    first_prompt: str
    rng: random.Random
    text: str = ""
    turns: list[Turn] = field(default_factory=list)
    failed: str | None = None

    @property
    def done(self) -> bool:
        return self.failed is None and len(self.turns) == self.n_turns


class Script:
    """Deterministic prompts: a shared system prompt, group prompts, per-conversation turns."""

    def __init__(self, tokenizer: Tokenizer, seed: int) -> None:
        self.tok = tokenizer
        words = [tokenizer.decode([i]).strip() for i in vocab_from_tokenizer(tokenizer).word_ids]
        self.words = words
        rng = random.Random(seed)
        body = "You are a careful assistant. Think step by step, then answer briefly."
        while len(tokenizer.encode(body)) < 150:
            body += " " + self.sentence(rng, rng.randint(8, 16))
        self.system = f"<|im_start|>system\n{body}{END}\n"

    def sentence(self, rng: random.Random, n: int) -> str:
        return " ".join(rng.choices(self.words, k=n)).capitalize() + rng.choice(".?!;:")

    def first_prompt(self, rng: random.Random, group: int) -> str:
        user = f"Solve problem {group + 1}: " + " ".join(
            self.sentence(rng, rng.randint(6, 12)) for _ in range(rng.randint(2, 4))
        )
        return f"{self.system}<|im_start|>user\n{user}{END}\n<|im_start|>assistant\n"

    def follow_up(self, rng: random.Random) -> str:
        n, m = rng.randint(2, 9), rng.randint(10, 999)
        template = rng.choice(FOLLOW_UPS)
        return template.format(n=n, m=m, p=n * m) + " " + self.sentence(rng, rng.randint(3, 10))


def make_conversations(
    script: Script, count: int, turns: tuple[int, int], seed: int
) -> list[Conversation]:
    rng = random.Random(seed)
    prompts: dict[int, str] = {}
    out = []
    for i in range(count):
        group = i // GROUP_SIZE
        if group not in prompts:
            prompts[group] = script.first_prompt(rng, group)
        n_turns = rng.randint(*turns)
        out.append(Conversation(i, group, n_turns, prompts[group], random.Random(rng.random())))
    return out


def next_turn(conv: Conversation, script: Script, run_id: str) -> Turn:
    """What the client appends and sends next, and its client-side tokenization."""
    t = len(conv.turns)
    rid = f"{run_id}-c{conv.index}-t{t}"
    if t == 0:
        return Turn(rid, conv.first_prompt, script.tok.encode(conv.first_prompt))
    appended = USER_TURN.format(script.follow_up(conv.rng))
    prev = conv.turns[-1]
    hidden_end = bool(prev.output_ids) and prev.output_ids[-1] == script.tok.eos_token_id
    # the engine already has the answer's <|im_end|> when it generated one (a hidden tail)
    chunk = appended.removeprefix(END) if hidden_end else appended
    return Turn(rid, appended, script.tok.encode(chunk))


# ---------------------------------------------------------------- rounds


@dataclass(slots=True)
class Round:
    turn: int
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    cache: dict[str, float] = field(default_factory=dict)  # counter deltas


CACHE_COUNTERS = ("cache_hits", "cache_misses", "cached_prompt_tokens", "fresh_prompt_tokens")


async def cache_counters(client: httpx.AsyncClient) -> dict[str, float]:
    response = await client.get("/metrics")
    response.raise_for_status()
    cache = response.json().get("cache")
    if not isinstance(cache, dict) or not cache.get("enabled"):
        raise BenchError("the router's /metrics has no enabled cache section")
    return {k: float(cache.get(k, 0)) for k in CACHE_COUNTERS}


def parse_answer(answer: Any) -> tuple[str, list[int], list[float], str | None]:
    if not isinstance(answer, dict) or not isinstance(answer.get("text"), str):
        raise ValueError("answer has no text")
    meta = answer.get("meta_info") or {}
    pairs = meta.get("output_token_logprobs")
    ids = answer.get("output_ids")
    if not isinstance(ids, list) or not isinstance(pairs, list) or len(pairs) != len(ids):
        raise ValueError("answer lacks output_ids or matching output_token_logprobs")
    if [p[1] for p in pairs] != ids:
        raise ValueError("output_token_logprobs ids differ from output_ids")
    version = meta.get("weight_version")
    return answer["text"], ids, [float(p[0]) for p in pairs], version


async def run_turn(
    client: httpx.AsyncClient,
    conv: Conversation,
    script: Script,
    run_id: str,
    limiter: trio.CapacityLimiter,
    rnd: Round,
) -> None:
    turn = next_turn(conv, script, run_id)
    prompt = conv.text + turn.appended
    body = {
        "text": prompt,
        "rid": turn.rid,
        "sampling_params": {"max_new_tokens": conv.rng.randint(*MAX_NEW_TOKENS)},
    }
    async with limiter:
        t0 = time.perf_counter()
        try:
            response = await client.post("/generate", json=body)
            turn.latency = time.perf_counter() - t0
            if response.status_code != 200:
                raise ValueError(f"status {response.status_code}: {response.text[:200]}")
            turn.text, turn.output_ids, turn.logps, turn.version = parse_answer(response.json())
        except (httpx.HTTPError, ValueError, TypeError, IndexError) as exc:
            rnd.errors += 1
            conv.failed = f"turn {len(conv.turns) + 1}: {type(exc).__name__}: {exc}"
            return
    rnd.requests += 1
    rnd.latencies.append(turn.latency)
    conv.turns.append(turn)
    conv.text = turn.full_text = prompt + turn.text


async def warm_up(client: httpx.AsyncClient, concurrency: int) -> None:
    """Open the connections (client to router, router to workers) before the measured rounds.

    Sent in a namespace of their own, so the measured conversations never see these entries.
    """
    body = {
        "text": f"<|im_start|>user\nwarm up{END}\n<|im_start|>assistant\n",
        "sampling_params": {"max_new_tokens": 4},
    }

    async def one() -> None:
        response = await client.post("/generate", json=body, headers={NAMESPACE: "bench-warmup"})
        if response.status_code != 200:
            raise BenchError(f"warm-up /generate answered {response.status_code}")

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(one)


async def run_rounds(
    client: httpx.AsyncClient,
    convs: Sequence[Conversation],
    script: Script,
    args: argparse.Namespace,
    log: Callable[[str], None],
) -> list[Round]:
    run_id = f"mt{random.Random().getrandbits(32):08x}"
    limiter = trio.CapacityLimiter(args.concurrency)
    rounds = []
    for t in range(max(c.n_turns for c in convs)):
        active = [c for c in convs if c.failed is None and c.n_turns > t]
        if not active:
            break
        rnd = Round(t + 1)
        before = await cache_counters(client)
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for conv in active:
                nursery.start_soon(run_turn, client, conv, script, run_id, limiter, rnd)
        rnd.seconds = time.perf_counter() - t0
        after = await cache_counters(client)
        rnd.cache = {k: after[k] - before[k] for k in CACHE_COUNTERS}
        lat = sorted(rnd.latencies)
        log(
            f" turn {t + 1}: {rnd.requests} requests, {rnd.errors} errors in {rnd.seconds:.2f} s,"
            f" p50 {percentile(lat, 50) * 1e3:.1f} ms"
        )
        rounds.append(rnd)
    return rounds


# ---------------------------------------------------------------- verification


@dataclass(slots=True)
class Check:
    """The verdicts for one finished conversation."""

    conv: Conversation
    engine: list[int] | None  # None: a prompt record is missing
    chunked: list[int]
    retrieved: list[int]
    naive: list[int]
    prefix_reuse: list[bool]  # per turn >= 2
    prompt_canonical: list[bool]  # per turn: forwarded prompt == previous truth + chunk
    generated: int
    mask_ok: bool
    mask_count_ok: bool
    logp_ok: bool
    versions_ok: bool
    cached_tokens: int
    fresh_tokens: int
    truth_mask: list[int] = field(default_factory=list, repr=False)
    got_mask: list[int] = field(default_factory=list, repr=False)
    truth_versions: list[str | None] = field(default_factory=list, repr=False)
    got_versions: list[str | None] = field(default_factory=list, repr=False)
    turn_exact: list[bool] = field(default_factory=list)  # each turn's text -> its trajectory
    turn_mask_ok: list[bool] = field(default_factory=list)
    first_bad_turn: tuple[int, list[int], list[int]] | None = None  # (turn, retrieved, truth)

    @property
    def exact(self) -> bool:
        return self.engine is not None and self.retrieved == self.engine

    @property
    def naive_exact(self) -> bool:
        return self.engine is not None and self.naive == self.engine

    @property
    def chunked_exact(self) -> bool:
        return self.engine is not None and self.chunked == self.engine


def verify(
    conv: Conversation,
    prompts: dict[str, list[int]],
    retrieved: dict[str, Any],
    per_turn: Sequence[dict[str, Any]],
    tok: Tokenizer,
) -> Check:
    """Compare what the router returns for ``conv`` with the engine's truth.

    ``retrieved`` is the retrieval of the final text, ``per_turn`` that of the text right
    after each turn's answer (the last one is the final text again).
    """
    # client-side reconstruction and the engine's own truth, turn by turn
    chunked: list[int] = []
    mask: list[int] = []
    logps: list[float] = []
    versions: list[str | None] = []
    prefix_reuse, canonical = [], []
    turn_exact: list[bool] = []
    turn_mask_ok: list[bool] = []
    first_bad_turn: tuple[int, list[int], list[int]] | None = None
    engine: list[int] | None = []
    for i, turn in enumerate(conv.turns):
        chunked += turn.chunk_ids
        fed = prompts.get(turn.rid)
        if fed is None:
            engine = None
        elif engine is not None:
            canonical.append(fed == chunked)
            if i:
                prefix_reuse.append(fed[: len(engine)] == engine)
            engine = fed + turn.output_ids
        # the mask layout of the engine's sequence (equal to chunked's when prefix reuse holds)
        base = len(fed) if fed is not None else len(chunked)
        del mask[base:], logps[base:], versions[base:]
        mask += [0] * (base - len(mask))
        logps += [0.0] * (base - len(logps))
        versions += [None] * (base - len(versions))
        mask += [1] * len(turn.output_ids)
        logps += turn.logps
        versions += [turn.version] * len(turn.output_ids)
        chunked += turn.output_ids
        if engine is not None:
            got = per_turn[i]
            turn_exact.append(got.get("tokens") == engine)
            turn_mask_ok.append(got.get("loss_mask") == mask)
            if not turn_exact[-1] and first_bad_turn is None:
                first_bad_turn = (i + 1, list(got.get("tokens") or []), list(engine))
    got_ids = retrieved.get("tokens") or []
    got_mask = retrieved.get("loss_mask") or []
    got_logp = retrieved.get("rollout_logp") or []
    got_versions = retrieved.get("weight_versions") or []
    generated = sum(len(t.output_ids) for t in conv.turns)
    logp_ok = len(got_logp) == len(logps) and all(
        math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)  # float32 in the cache; 0.0 for prompts
        for a, b in zip(got_logp, logps, strict=True)
    )
    return Check(
        conv=conv,
        engine=engine,
        chunked=chunked,
        retrieved=got_ids,
        naive=tok.encode(conv.text),
        prefix_reuse=prefix_reuse,
        prompt_canonical=canonical,
        generated=generated,
        mask_ok=got_mask == mask,
        mask_count_ok=sum(got_mask) == generated,
        logp_ok=logp_ok,
        versions_ok=got_versions == versions,
        cached_tokens=int(retrieved.get("cached_tokens", 0)),
        fresh_tokens=int(retrieved.get("fresh_tokens", 0)),
        truth_mask=mask,
        got_mask=got_mask,
        truth_versions=versions,
        got_versions=got_versions,
        turn_exact=turn_exact,
        turn_mask_ok=turn_mask_ok,
        first_bad_turn=first_bad_turn,
    )


#: Ordinary first questions, sent one after another, whose texts share prefixes that end
#: inside words ("The weather" / "Therefore"): a cache that reused any cached prefix would
#: let an unrelated earlier prompt decide how a new one is split (issue 11).
FRESH_QUESTIONS = [
    "The weather is nice today, isn't it?", "Therefore, what is 15% of 80?",
    "Zebra crossing wor", "Zebra crossing world peace", "What is 2+2?", "Whatever happened?",
    "Where is Paris?", "Wherever you go, go.", "How do I sort a list in Python?",
    "However it ends, tell me.", "Is 17 prime?", "Island nations: name three.",
    "Can you help me?", "Cannot open file: why?", "The the the", "Theorem: state it.",
    "数据是什么？", "数据库是什么？", "Explain recursion.", "Explanations are hard.",
    "Define entropy", "Definitely not", "print(1)", "printf in C", "Thanks!", "Thanksgiving?",
    "Zebra", "Zebras run",
]  # fmt: skip


async def fresh_prompts_canonical(
    client: httpx.AsyncClient, stack: Stack, tok: Tokenizer
) -> tuple[int, int]:
    """Send each fresh question (chat template, one after another) and count those whose
    ids reached the worker exactly as the tokenizer splits the prompt."""
    expected = {}
    for i, question in enumerate(FRESH_QUESTIONS):
        prompt = tok.apply_chat_template([{"role": "user", "content": question}])
        rid = f"fresh-{i}"
        body = {"text": prompt, "rid": rid, "sampling_params": {"max_new_tokens": 4}}
        response = await client.post("/generate", json=body)
        response.raise_for_status()
        expected[rid] = tok.encode(prompt)
    prompts = await fetch_prompts(stack)
    return sum(prompts.get(rid) == ids for rid, ids in expected.items()), len(expected)


async def worker_prefix_reuse(stack: Stack) -> float:
    """Share of prompt tokens the workers' (simulated) prefix caches already held."""
    prompt = cached = 0
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as client:
        for port in stack.worker_ports:
            stats = (await client.get(f"http://127.0.0.1:{port}/sim/stats")).json()
            prompt += stats.get("prompt_tokens", 0)
            cached += stats.get("cached_tokens", 0)
    return cached / prompt if prompt else float("nan")


async def fetch_prompts(stack: Stack) -> dict[str, list[int]]:
    prompts: dict[str, list[int]] = {}
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as client:
        for port in stack.worker_ports:
            response = await client.get(f"http://127.0.0.1:{port}/bench/prompts")
            response.raise_for_status()
            prompts.update(response.json()["prompts"])
    return prompts


async def retrieve_all(
    client: httpx.AsyncClient, texts: dict[tuple[int, int], str], concurrency: int
) -> dict[tuple[int, int], dict[str, Any]]:
    """``/retrieve_from_text`` for each (conversation, turn) text."""
    out: dict[tuple[int, int], dict[str, Any]] = {}
    limiter = trio.CapacityLimiter(concurrency)

    async def one(key: tuple[int, int], text: str) -> None:
        async with limiter:
            response = await client.post("/retrieve_from_text", json={"text": text})
        if response.status_code != 200:
            raise BenchError(
                f"/retrieve_from_text for conversation {key[0]} turn {key[1]} answered "
                f"{response.status_code}: {response.text[:200]}"
            )
        out[key] = response.json()

    async with trio.open_nursery() as nursery:
        for key, text in texts.items():
            nursery.start_soon(one, key, text)
    return out


# ---------------------------------------------------------------- report


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def explain(
    title: str, name_a: str, a: Sequence[int], name_b: str, b: Sequence[int], tok: Tokenizer
) -> list[str]:
    """Where two token lists first differ, with the tokens and text around it."""
    i = _first_difference(a, b)
    lo = max(0, i - 6)

    def show(ids: Sequence[int]) -> str:
        window = list(ids[lo : i + 6])
        pieces = [repr(tok.decode([t], skip_special_tokens=False)) for t in window]
        marked = [f"[{t}]{p}" for t, p in zip(window, pieces, strict=True)]
        if i - lo < len(marked):
            marked[i - lo] = ">>" + marked[i - lo]
        return " ".join(marked)

    before = tok.decode(list(a[max(0, i - 20) : i]), skip_special_tokens=False)
    return [
        f"  {title}: {name_a} has {len(a)} tokens, {name_b} {len(b)}; first difference at "
        f"token {i}",
        f"    text before it: ...{before[-80:]!r}",
        f"    {name_a:>9}: {show(a)}",
        f"    {name_b:>9}: {show(b)}",
    ]


def mask_differences(check: Check) -> list[int]:
    """Positions where the retrieved (mask, version) differs from the truth."""
    truth = list(zip(check.truth_mask, check.truth_versions, strict=False))
    got = list(zip(check.got_mask, check.got_versions, strict=False))
    extra = abs(len(truth) - len(got))
    return [k for k, (a, b) in enumerate(zip(truth, got, strict=False)) if a != b] + (
        [min(len(truth), len(got))] if extra else []
    )


def sibling_explaining(check: Check, k: int, checks: Sequence[Check]) -> Check | None:
    """Another conversation with the same token prefix whose true mask at ``k`` is what was
    retrieved here: the tree keeps one (mask, logprob, version) per token path, so two
    conversations that reach the same tokens by different means share it."""
    if check.engine is None or k >= len(check.got_mask):
        return None
    prefix = check.engine[: k + 1]
    for other in checks:
        if (
            other is not check
            and other.engine is not None
            and len(other.truth_mask) > k
            and other.engine[: k + 1] == prefix
            and other.truth_mask[k] == check.got_mask[k]
        ):
            return other
    return None


def explain_mask(check: Check, checks: Sequence[Check], tok: Tokenizer) -> list[str]:
    """Where the retrieved loss mask / versions first differ from the truth, and the turns."""
    truth = list(zip(check.truth_mask, check.truth_versions, strict=False))
    got = list(zip(check.got_mask, check.got_versions, strict=False))
    i = next((k for k, (a, b) in enumerate(zip(truth, got, strict=False)) if a != b), None)
    if i is None:
        i = min(len(truth), len(got))
    bounds, pos = [], 0
    for n, turn in enumerate(check.conv.turns, 1):
        pos += len(turn.chunk_ids)
        bounds.append(f"turn {n}: prompt ..{pos}, generated {pos}..{pos + len(turn.output_ids)}")
        pos += len(turn.output_ids)
        if turn.output_ids:
            bounds[-1] += f" (last id {turn.output_ids[-1]})"
    wrong = sum(a != b for a, b in zip(truth, got, strict=False))
    ids = check.retrieved
    lines = [
        f"  loss_mask/weight_versions vs truth, conversation {check.conv.index}: "
        f"{len(got)} retrieved, {len(truth)} true, {wrong} positions differ, the first at {i}",
        "    " + "; ".join(bounds),
    ]
    for k in range(max(0, i - 3), min(len(ids), i + 4)):
        piece = tok.decode([ids[k]], skip_special_tokens=False)
        t = truth[k] if k < len(truth) else None
        g = got[k] if k < len(got) else None
        flag = "  <<" if t != g else ""
        lines.append(f"    {k:>5} [{ids[k]}]{piece!r:<14} truth {t}  retrieved {g}{flag}")
    sibling = sibling_explaining(check, i, checks)
    if sibling is not None:
        ends = ", ".join(ending(t, tok) for t in check.conv.turns)
        sibling_ends = ", ".join(ending(t, tok) for t in sibling.conv.turns)
        here, there = (
            ("a prompt token", "generated")
            if check.truth_mask[i] == 0
            else (
                "generated",
                "a prompt token",
            )
        )
        lines.append(
            f"    cause: conversation {sibling.conv.index} (group {sibling.conv.group}) has the "
            f"same first {i + 1} tokens, and token {i} was {there} there but is {here} here; "
            "the tree keeps one mask/logprob/version per token path, so the two share it"
        )
        lines.append(
            f"    turns ended by: this one {ends}; conversation {sibling.conv.index} {sibling_ends}"
        )
    return lines


def ending(turn: Turn, tok: Tokenizer) -> str:
    """How a turn's answer ended: ``EOS`` (a generated <|im_end|>) or ``length``."""
    return "EOS" if turn.output_ids[-1:] == [tok.eos_token_id] else "length"


def naive_reason(check: Check, tok: Tokenizer) -> str:
    engine = check.engine or []
    if check.naive == engine:
        return "equal"
    if engine and engine[-1] == tok.eos_token_id and check.naive == engine[:-1]:
        return "final <|im_end|> missing"
    return "other difference"


def frac(part: int, whole: int) -> float:
    return part / whole if whole else float("nan")


def report(
    rounds: Sequence[Round],
    checks: Sequence[Check],
    convs: Sequence[Conversation],
    tok: Tokenizer,
    args: argparse.Namespace,
) -> tuple[str, dict[str, float]]:
    out: list[str] = []
    figures: dict[str, float] = {}
    rows = []
    all_lat: list[float] = []
    total_cached = total_fresh = 0.0
    for r in rounds:
        c = r.cache
        lookups = c["cache_hits"] + c["cache_misses"]
        prompt_tokens = c["cached_prompt_tokens"] + c["fresh_prompt_tokens"]
        total_cached += c["cached_prompt_tokens"]
        total_fresh += c["fresh_prompt_tokens"]
        lat = sorted(r.latencies)
        all_lat += r.latencies
        hit = frac(int(c["cached_prompt_tokens"]), int(prompt_tokens))
        rows.append(
            [
                str(r.turn),
                str(r.requests),
                str(r.errors),
                fmt(100 * frac(int(c["cache_hits"]), int(lookups))),
                str(int(c["cached_prompt_tokens"])),
                str(int(c["fresh_prompt_tokens"])),
                fmt(100 * hit),
                fmt(percentile(lat, 50) * 1e3),
                fmt(percentile(lat, 99) * 1e3),
                fmt(r.requests / r.seconds if r.seconds else float("nan")),
            ]
        )
        figures[f"multiturn_hit_rate_turn{r.turn}"] = hit
        figures[f"multiturn_lookup_hit_rate_turn{r.turn}"] = frac(
            int(c["cache_hits"]), int(lookups)
        )
        figures[f"multiturn_p50_ms_turn{r.turn}"] = percentile(lat, 50) * 1e3
    out.append(
        f"{len(convs)} conversations (groups of {GROUP_SIZE}), turns {args.turns[0]}-"
        f"{args.turns[1]}, concurrency {args.concurrency}, {args.latency_ms:g} ms/token, "
        f"max_new_tokens {MAX_NEW_TOKENS[0]}-{MAX_NEW_TOKENS[1]}; per turn round"
    )
    out.append(
        table(
            [
                "turn",
                "requests",
                "errors",
                "lookup hit%",
                "cached tok",
                "fresh tok",
                "token hit%",
                "p50 ms",
                "p99 ms",
                "turns/s",
            ],
            rows,
        )
    )
    turns = sum(r.requests for r in rounds)
    seconds = sum(r.seconds for r in rounds)
    all_lat.sort()
    figures["multiturn_turns"] = turns
    figures["multiturn_errors"] = sum(r.errors for r in rounds)
    figures["multiturn_turns_per_s"] = turns / seconds if seconds else float("nan")
    figures["multiturn_p50_ms"] = percentile(all_lat, 50) * 1e3
    figures["multiturn_p99_ms"] = percentile(all_lat, 99) * 1e3
    figures["multiturn_cached_prompt_tokens"] = total_cached
    figures["multiturn_fresh_prompt_tokens"] = total_fresh
    figures["multiturn_tokenization_saved_fraction"] = frac(
        int(total_cached), int(total_cached + total_fresh)
    )
    out.append(
        f"  all turns: {turns} in {seconds:.2f} s = {fmt(figures['multiturn_turns_per_s'])} "
        f"turns/s, p50 {fmt(figures['multiturn_p50_ms'])} ms, p99 "
        f"{fmt(figures['multiturn_p99_ms'])} ms; the router tokenized {int(total_fresh)} of "
        f"{int(total_cached + total_fresh)} prompt tokens, "
        f"{fmt(100 * figures['multiturn_tokenization_saved_fraction'])} % came from the cache"
    )

    n = len(checks)
    complete = [c for c in checks if c.engine is not None]
    reuse = [ok for c in checks for ok in c.prefix_reuse]
    canonical = [ok for c in checks for ok in c.prompt_canonical]
    reasons: dict[str, int] = {}
    for check in complete:
        reason = naive_reason(check, tok)
        reasons[reason] = reasons.get(reason, 0) + 1
    verdicts = [
        ("retrieved == engine truth", sum(c.exact for c in checks), n, "multiturn_exact_fraction"),
        (
            "naive tokenize(final text) == engine truth",
            sum(c.naive_exact for c in checks),
            n,
            "multiturn_naive_exact_fraction",
        ),
        (
            "chunked client reconstruction == engine truth",
            sum(c.chunked_exact for c in checks),
            n,
            "multiturn_chunked_exact_fraction",
        ),
        (
            "each turn's text retrieves that turn exactly",
            sum(ok for c in checks for ok in c.turn_exact),
            sum(len(c.turn_exact) for c in checks),
            "multiturn_turn_exact_fraction",
        ),
        (
            "... and its loss_mask exactly",
            sum(ok for c in checks for ok in c.turn_mask_ok),
            sum(len(c.turn_mask_ok) for c in checks),
            "multiturn_turn_mask_exact_fraction",
        ),
        (
            "turn prompt extends previous prompt + output",
            sum(reuse),
            len(reuse),
            "multiturn_prefix_reuse_fraction",
        ),
        (
            "forwarded prompt == client chunked tokenization",
            sum(canonical),
            len(canonical),
            "multiturn_prompt_canonical_fraction",
        ),
        (
            "loss_mask is 1 exactly on generated tokens",
            sum(c.mask_ok for c in checks),
            n,
            "multiturn_mask_exact_fraction",
        ),
        (
            "count(loss_mask == 1) == generated tokens",
            sum(c.mask_count_ok for c in checks),
            n,
            "multiturn_mask_count_fraction",
        ),
        (
            "rollout_logp == worker logprobs",
            sum(c.logp_ok for c in checks),
            n,
            "multiturn_logp_exact_fraction",
        ),
        (
            "weight_versions == worker versions",
            sum(c.versions_ok for c in checks),
            n,
            "multiturn_versions_exact_fraction",
        ),
        (
            "engine truth known (all prompts recorded)",
            len(complete),
            n,
            "multiturn_truth_known_fraction",
        ),
    ]
    out.append("")
    out.append(f"exactness over {n} finished conversations")
    rows = []
    for label, good, whole, key in verdicts:
        figures[key] = frac(good, whole)
        rows.append([label, f"{good}/{whole}", fmt(100 * frac(good, whole))])
    out.append(table(["check", "count", "%"], rows))
    out.append(
        "  naive mismatches by cause: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()) if k != "equal")
    )
    figures["multiturn_naive_missing_final_eos"] = reasons.get("final <|im_end|> missing", 0)
    figures["multiturn_naive_other_mismatches"] = reasons.get("other difference", 0)
    retrieve_fresh = sum(c.fresh_tokens for c in checks)
    figures["multiturn_retrieve_fresh_tokens"] = retrieve_fresh
    out.append(
        f"  /retrieve_from_text on the final texts: {sum(c.cached_tokens for c in checks)} "
        f"tokens from the cache, {retrieve_fresh} tokenized fresh"
    )
    figures["multiturn_failed_conversations"] = sum(c.failed is not None for c in convs)
    positions = [(c, k) for c in checks for k in mask_differences(c)]
    explained = sum(sibling_explaining(c, k, checks) is not None for c, k in positions)
    figures["multiturn_mask_mismatch_positions"] = len(positions)
    figures["multiturn_mask_mismatch_explained_by_sibling"] = explained
    if positions:
        out.append(
            f"  loss_mask/version differences: {len(positions)} positions in "
            f"{len({c.conv.index for c, _ in positions})} conversations; {explained} of them are"
            " tokens another conversation reached after the same token prefix by the other means"
            " (generated there, prompt here, or vice versa)"
        )
    distinct = [
        len({tuple(c.turns[0].output_ids) for c in convs if c.group == g and c.turns})
        for g in sorted({c.group for c in convs})
    ]
    figures["multiturn_distinct_first_answers_per_group"] = sum(distinct) / max(1, len(distinct))
    out.append(
        f"  distinct first answers per group of {GROUP_SIZE}: "
        f"{fmt(figures['multiturn_distinct_first_answers_per_group'], 2)} (the simulated worker "
        "is deterministic per prompt and seed; samples differ by worker seed and max_new_tokens)"
    )

    # one example of each kind of mismatch
    shown = 0
    picks: list[tuple[str, Callable[[Check], bool]]] = [
        ("retrieved vs engine", lambda c: c.engine is not None and not c.exact),
        ("chunked vs engine", lambda c: c.engine is not None and not c.chunked_exact),
        ("naive vs engine (other)", lambda c: naive_reason(c, tok) == "other difference"),
    ]
    for label, pick in picks:
        bad = next((c for c in checks if pick(c)), None)
        if bad is None:
            continue
        assert bad.engine is not None
        other = {
            "retrieved vs engine": bad.retrieved,
            "chunked vs engine": bad.chunked,
            "naive vs engine (other)": bad.naive,
        }[label]
        out.append("")
        out += explain(
            f"{label}, conversation {bad.conv.index}",
            label.split()[0],
            other,
            "engine",
            bad.engine,
            tok,
        )
        shown += 1
    bad_turn = next((c for c in checks if c.first_bad_turn is not None), None)
    if bad_turn is not None and bad_turn.first_bad_turn is not None:
        number, got, truth = bad_turn.first_bad_turn
        out.append("")
        out += explain(
            f"turn {number} of conversation {bad_turn.conv.index} retrieved by its own text",
            "retrieved",
            got,
            "engine",
            truth,
            tok,
        )
        turn = bad_turn.conv.turns[number - 1]
        line = f"    that turn ended by {ending(turn, tok)}"
        twin = next(
            (
                (o.conv.index, twin_number)
                for o in checks
                if o is not bad_turn
                for twin_number, t in enumerate(o.conv.turns, 1)
                if t.full_text == turn.full_text and ending(t, tok) != ending(turn, tok)
            ),
            None,
        )
        if twin is not None:
            other_end = "length" if ending(turn, tok) == "EOS" else "EOS (a hidden <|im_end|>)"
            line += (
                f"; turn {twin[1]} of conversation {twin[0]} has the very same text but ended by"
                f" {other_end}: one text, two trajectories"
            )
        out.append(line)
    bad_mask = next((c for c in checks if not (c.mask_ok and c.versions_ok)), None)
    if bad_mask is not None:
        out.append("")
        out += explain_mask(bad_mask, checks, tok)
    naive_eos = next(
        (c for c in checks if naive_reason(c, tok) == "final <|im_end|> missing"), None
    )
    if naive_eos is not None and naive_eos.engine is not None:
        out.append("")
        out += explain(
            f"typical naive mismatch, conversation {naive_eos.conv.index}",
            "naive",
            naive_eos.naive,
            "engine",
            naive_eos.engine,
            tok,
        )
    failed = [c for c in convs if c.failed is not None]
    for conv in failed[:3]:
        out.append(f"  conversation {conv.index} failed at {conv.failed}")
    return "\n".join(out), figures


# ---------------------------------------------------------------- main


def parse_turns(text: str) -> tuple[int, int]:
    """``3`` or ``3-5``."""
    lo, _, hi = text.partition("-")
    try:
        pair = (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a turn count or range: {text!r}") from None
    if not 1 <= pair[0] <= pair[1] <= 50:
        raise argparse.ArgumentTypeError(f"turns must be within 1..50 and lo <= hi: {text!r}")
    return pair


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Multi-turn rollouts through the router's token cache (simulated Qwen3 "
        "workers, loopback only): hit rates, turns/s and token exactness.",
    )
    parser.add_argument("--conversations", type=int, help="conversations (default 64; quick 16)")
    parser.add_argument(
        "--turns", type=parse_turns, help="turns per conversation, N or LO-HI (default 3-5)"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument(
        "--policy",
        default="cache_aware",
        help="router policy (compare cache_aware with least_inflight for worker prefix reuse)",
    )
    parser.add_argument("--latency-ms", type=float, default=1.0, help="workers' ms per token")
    parser.add_argument("--quick", action="store_true", help="16 conversations x 3 turns")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    parser.add_argument(
        "--timeout", type=float, help="bound on the whole run in s (default 300; quick 80)"
    )
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write figures as JSON")
    args = parser.parse_args(argv)
    if args.conversations is None:
        args.conversations = 16 if args.quick else 64
    if args.turns is None:
        args.turns = (3, 3) if args.quick else (3, 5)
    if args.timeout is None:
        args.timeout = 80.0 if args.quick else 300.0
    if not 1 <= args.conversations <= 10_000:
        parser.error("--conversations must be in 1..10000")
    if not 1 <= args.concurrency <= 1024:
        parser.error("--concurrency must be in 1..1024")
    if not 0 <= args.latency_ms <= 1000:
        parser.error("--latency-ms must be in 0..1000")
    if not 0 < args.timeout <= 3600:
        parser.error("--timeout must be in (0, 3600]")
    return args


async def run(args: argparse.Namespace, children: Children) -> int:
    began = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - began:5.1f}s]{line}", file=sys.stderr, flush=True)

    log(" starting 2 Qwen3 workers + router; loading the tokenizer meanwhile")
    stack = start_processes(children, args.latency_ms, args.policy)
    tok = load_tokenizer()
    script = Script(tok, args.seed)
    convs = make_conversations(script, args.conversations, args.turns, args.seed)
    await wait_ready(stack, children)
    log(" ready")
    base = f"http://127.0.0.1:{stack.router_port}"
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT, limits=limits) as client:
        await warm_up(client, args.concurrency)
        fresh_ok, fresh_all = await fresh_prompts_canonical(client, stack, tok)
        rounds = await run_rounds(client, convs, script, args, log)
        children.check_alive()
        finished = [c for c in convs if c.done]
        log(f" {len(finished)} conversations finished; retrieving and verifying")
        texts = {(c.index, n): t.full_text for c in finished for n, t in enumerate(c.turns, 1)}
        retrieved = await retrieve_all(client, texts, args.concurrency)
    prompts = await fetch_prompts(stack)
    reuse = await worker_prefix_reuse(stack)
    checks = [
        verify(
            c,
            prompts,
            retrieved[(c.index, c.n_turns)],
            [retrieved[(c.index, n)] for n in range(1, c.n_turns + 1)],
            tok,
        )
        for c in finished
    ]
    text, figures = report(rounds, checks, convs, tok, args)
    figures["multiturn_worker_prefix_reuse"] = reuse
    figures["canonical_prompt_rate"] = fresh_ok / fresh_all
    text += (
        f"\n  fresh questions sent in turn: {fresh_ok}/{fresh_all} reached the worker "
        "tokenized exactly as the tokenizer splits them"
    )
    text += (
        f"\n  workers' simulated KV prefix cache: {100 * reuse:.1f} % of prompt tokens were "
        f"already cached on the worker that got them (policy {args.policy})"
    )
    figures["wall_s"] = time.perf_counter() - began
    print(text)
    print()
    print_figures(figures, places=4)
    write_json(args.json, figures, args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    children = Children()
    return run_bench(
        "multiturn",
        run,
        args,
        children,
        children=children,
        expected=(BenchError, httpx.HTTPError),
        timeout=args.timeout,
    )


if __name__ == "__main__":
    sys.exit(main())
