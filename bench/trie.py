"""How fast is the token cache's radix tree, and how many bytes does it take per stored token?

Pure and in-process: no servers, no trio. For each target size (``--sizes``, default 10k, 100k
and 1M stored tokens; ``--quick`` does 10k and 100k) a deterministic, realistic workload of
multi-turn RL trajectories with the shipped Qwen3 tokenizer's real ids is inserted into a fresh
``RadixTrie`` exactly as the router's ``/generate`` interception does it:

* prompt groups: a shared system prompt (~200 tokens) + a per-group user prompt, rendered with
  the chat template and tokenized by the real tokenizer;
* 8 sampled responses per group (GRPO style) of 100-400 word-level token ids from the vocab
  (the same ids the simulated worker emits), ending with ``<|im_end|>`` (a hidden tail, as
  SGLang leaves it out of ``text``) 85 % of the time, else cut by length; generated tokens carry
  a logprob and the code of weight version ``v0``, prompt tokens code 0;
* half of the samples are continued for 2-4 turns in all: prefix = the previous trajectory +
  the next user turn (tokenized), then a new response; every turn is one ``insert``.

What is measured:

* **insert** -- wall time of the ``insert`` calls only (the workload is generated between
  them, untimed): inserts/s, input tokens/s (all tokens handed to ``insert``, cached prefix
  included) and new tokens/s (tokens actually added to the tree).
* **match** -- ``match(text)`` on a sample of up to ``--queries`` inserted trajectories, each
  repeated for at least ``--min-time`` s: (a) *exact*: the whole visible text of a trajectory
  (the lookup ``/retrieve_from_text`` does; the hidden ``<|im_end|>`` tail comes along), plus
  *exact+traj*, the same followed by ``trajectory()`` (the full retrieval); (b) *mid-node*: a
  prefix cut at a random byte inside the response (so the match ends inside a node, mostly
  inside a token); (c) *miss*: text sharing no first byte with anything cached; and
  (d) *diverge*: the cached system prompt followed by an unseen user turn (the usual
  first-turn lookup: a partial hit). The results are checked (exact returns the inserted ids,
  mid-node ends at the last whole token) and the check is reported.
* **memory** -- a second, identical build with ``tracemalloc`` started before it: the growth
  of traced memory (every Python allocation the tree keeps: nodes, keys, arrays, dicts,
  lists, floats) divided by the stored tokens. It does not include the allocator's own
  rounding and arena slack; the *alloc-rounded* column estimates that (pymalloc rounds blocks
  of <= 512 bytes up to 16, larger ones get a ~16-byte malloc header). For comparison,
  ``statistics()`` key_bytes + payload_bytes (raw key bytes and array items, no object
  overhead) per token, and a per-component breakdown from ``sys.getsizeof`` (keys, ids
  arrays, logps arrays, codes arrays, node objects, children dicts and their lists, the
  ``last_access`` floats) split into payload and per-object overhead.

The project goal is <= 12 bytes per stored token, all included; the report says whether the
tracemalloc figure meets it and which component dominates. The last lines are ``name=value``
pairs (``--json PATH`` writes them too).
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
import tracemalloc
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from _harness import fmt, print_figures, table, write_json

from trio_router.radix import Alignment, Node, RadixTrie
from trio_router.sim.generation import vocab_from_tokenizer
from trio_router.tokenizer import Tokenizer, load_tokenizer

GOAL_BYTES_PER_TOKEN = 12.0
SAMPLES_PER_GROUP = 8
RESPONSE_TOKENS = (100, 400)
EOS_PROBABILITY = 0.85
CONTINUE_PROBABILITY = 0.5
TOTAL_TURNS = (2, 4)  # of a continued sample
SYSTEM_PROMPT_TOKENS = 200
WORKER = "http://127.0.0.1:30001"  # the router records the worker URL: one shared str
VERSION = "v0"
MAX_INSERTS = 2_000_000  # hard bound on one build, whatever the size asked for
MAX_BUILDS = 50  # timing builds of one size (small sizes are rebuilt to time enough inserts)
MAX_QUERY_OPS = 2_000_000  # hard bound on one match measurement
OPENERS = ("Solve", "Explain", "Prove", "Compute", "Describe", "Summarize", "Compare", "Find")


# ---------------------------------------------------------------- workload


@dataclass(slots=True)
class Insert:
    """One ``insert`` call, as the router makes it after a /generate answer."""

    ids: list[int]
    logps: list[float]
    codes: list[int]
    alignment: Alignment | None
    prompt_len: int  # tokens before this turn's response

    @property
    def visible(self) -> int:
        """Tokens that spell the text the client saw (all but a hidden tail)."""
        return self.alignment.plain if self.alignment is not None else len(self.ids)


class Workload:
    """Deterministic multi-turn trajectories built from the Qwen3 tokenizer's real ids."""

    def __init__(self, tokenizer: Tokenizer, seed: int) -> None:
        self.tok = tokenizer
        self.seed = seed
        self.eos = tokenizer.eos_token_id
        self.word_ids = vocab_from_tokenizer(tokenizer).word_ids
        self.words = [tokenizer.decode([i]).strip() for i in self.word_ids]
        rng = random.Random(seed ^ 0x5EED)
        body = "You are a careful assistant for reasoning tasks."
        while len(tokenizer.encode(body)) < SYSTEM_PROMPT_TOKENS - 5:
            body += " " + self.sentence(rng, rng.randint(8, 16))
        self.system = f"<|im_start|>system\n{body}<|im_end|>\n"

    def sentence(self, rng: random.Random, n_words: int) -> str:
        words = rng.choices(self.words, k=n_words)
        return " ".join(words).capitalize() + rng.choice((".", ",", ";", ":", "?"))

    def user_text(self, rng: random.Random, group: int) -> str:
        parts = [f"{rng.choice(OPENERS)} problem {group}:"]
        parts += [self.sentence(rng, rng.randint(6, 14)) for _ in range(rng.randint(2, 5))]
        return " ".join(parts)

    def first_prompt(self, rng: random.Random, group: int) -> str:
        user = self.user_text(rng, group)
        return f"{self.system}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"

    def _turn(
        self,
        rng: random.Random,
        ids: list[int],
        logps: list[float],
        codes: list[int],
        slot: int,
    ) -> Insert:
        """``ids`` (the prompt) followed by a freshly sampled response."""
        n = rng.randint(*RESPONSE_TOKENS)
        eos = rng.random() < EOS_PROBABILITY
        response = rng.choices(self.word_ids, k=n - eos)
        if eos:
            response.append(self.eos)
        all_ids = ids + response
        alignment = Alignment(len(all_ids) - 1, len(all_ids) - 1, b"") if eos else None
        return Insert(
            all_ids,
            logps + [-5.0 * rng.random() ** 2 for _ in range(n)],
            codes + [slot] * n,
            alignment,
            len(ids),
        )

    def inserts(self, slot: int) -> Generator[Insert, None, None]:
        """An endless stream of inserts: groups of 8 samples, some continued for more turns."""
        rng = random.Random(self.seed)
        group = 0
        while True:
            group += 1
            prompt = self.tok.encode(self.first_prompt(rng, group))
            live: list[tuple[Insert, int]] = []
            for _ in range(SAMPLES_PER_GROUP):
                first = self._turn(rng, prompt, [0.0] * len(prompt), [0] * len(prompt), slot)
                yield first
                if rng.random() < CONTINUE_PROBABILITY:
                    live.append((first, rng.randint(*TOTAL_TURNS) - 1))
            while live:
                following: list[tuple[Insert, int]] = []
                for prev, left in live:
                    closer = "" if prev.ids[-1] == self.eos else "<|im_end|>"
                    text = (
                        f"{closer}\n<|im_start|>user\n{self.user_text(rng, group)}<|im_end|>\n"
                        "<|im_start|>assistant\n"
                    )
                    user = self.tok.encode(text)
                    nxt = self._turn(
                        rng,
                        prev.ids + user,
                        prev.logps + [0.0] * len(user),
                        prev.codes + [0] * len(user),
                        slot,
                    )
                    yield nxt
                    if left > 1:
                        following.append((nxt, left - 1))
                live = following


def build(
    workload: Workload,
    trie: RadixTrie,
    *,
    target_tokens: int,
    max_inserts: int,
    keep: int = 0,
    keep_seed: int = 0,
) -> tuple[int, int, float, list[Insert]]:
    """Insert until the tree holds ``target_tokens`` (or ``max_inserts`` calls were made).

    Returns (inserts, input tokens, seconds spent inside ``insert``, a uniform sample of up
    to ``keep`` inserts for the lookups).
    """
    slot = trie.version_slot(VERSION)
    sample: list[Insert] = []
    picker = random.Random(keep_seed)
    inserts = input_tokens = 0
    spent = 0.0
    stream = workload.inserts(slot)
    try:
        for item in stream:
            t0 = time.perf_counter()
            trie.insert(
                item.ids,
                item.logps,
                item.codes,
                alignment=item.alignment,
                worker=WORKER,
                now=float(inserts),
            )
            spent += time.perf_counter() - t0
            inserts += 1
            input_tokens += len(item.ids)
            if keep:  # reservoir sampling
                if len(sample) < keep:
                    sample.append(item)
                elif (j := picker.randrange(inserts)) < keep:
                    sample[j] = item
            if trie.tokens >= target_tokens or inserts >= max_inserts:
                break
    finally:
        stream.close()
    return inserts, input_tokens, spent, sample


# ---------------------------------------------------------------- lookups


@dataclass(slots=True)
class Queries:
    """Lookup texts with what a correct answer looks like."""

    exact: list[bytes] = field(default_factory=list)
    exact_ids: list[list[int]] = field(default_factory=list)
    mid: list[bytes] = field(default_factory=list)
    mid_tokens: list[int] = field(default_factory=list)  # whole tokens inside the cut
    miss: list[bytes] = field(default_factory=list)
    diverge: list[bytes] = field(default_factory=list)
    diverge_min_bytes: int = 0  # the system prompt and the user header are cached


def make_queries(workload: Workload, sample: Sequence[Insert], seed: int) -> Queries:
    rng = random.Random(seed)
    token_bytes = workload.tok.token_bytes
    q = Queries()
    for item in sample:
        pieces = [token_bytes(t) for t in item.ids[: item.visible]]
        text = b"".join(pieces)
        q.exact.append(text)
        q.exact_ids.append(item.ids)
        start = sum(len(p) for p in pieces[: item.prompt_len])
        if len(text) - start < 3:
            continue
        cut = rng.randint(start + 1, len(text) - 1)
        q.mid.append(text[:cut])
        offset = whole = 0
        for p in pieces:
            offset += len(p)
            if offset > cut:
                break
            whole += 1
        q.mid_tokens.append(whole)
    n = max(1, len(sample))
    for i in range(n):
        q.miss.append(("Hello " + workload.sentence(rng, rng.randint(20, 60))).encode())
        unseen = workload.user_text(rng, 10_000_000 + i)
        q.diverge.append(f"{workload.system}<|im_start|>user\n{unseen}".encode())
    q.diverge_min_bytes = len(f"{workload.system}<|im_start|>user\n".encode())
    return q


def ops_per_second(
    run: Callable[[bytes], object], texts: Sequence[bytes], min_time: float
) -> tuple[float, int]:
    """Call ``run`` on every text, repeatedly, for at least ``min_time`` s: (ops/s, ops)."""
    if not texts:
        return float("nan"), 0
    ops = 0
    t0 = time.perf_counter()
    while True:
        for text in texts:
            run(text)
        ops += len(texts)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time or ops >= MAX_QUERY_OPS:
            return ops / elapsed, ops


def check_queries(trie: RadixTrie, q: Queries) -> dict[str, float]:
    """Fraction of lookups that return what they should."""
    exact_ok = sum(
        trie.trajectory(trie.match(text)).ids == ids
        for text, ids in zip(q.exact, q.exact_ids, strict=True)
    )
    mid_ok = sum(
        trie.match(text).token_count == whole
        for text, whole in zip(q.mid, q.mid_tokens, strict=True)
    )
    miss_ok = sum(not trie.match(text).path for text in q.miss)
    diverge_ok = sum(trie.match(text).matched_bytes >= q.diverge_min_bytes for text in q.diverge)
    return {
        "exact_ok": exact_ok / max(1, len(q.exact)),
        "mid_ok": mid_ok / max(1, len(q.mid)),
        "miss_ok": miss_ok / max(1, len(q.miss)),
        "diverge_ok": diverge_ok / max(1, len(q.diverge)),
    }


def lookup_rates(trie: RadixTrie, q: Queries, min_time: float) -> dict[str, float]:
    """Lookups per second of each kind (``now`` advances by one per lookup, as time would)."""
    clock = iter(range(10**12))

    def match(text: bytes) -> object:
        return trie.match(text, "", float(next(clock)))

    def retrieve(text: bytes) -> object:
        return trie.trajectory(trie.match(text, "", float(next(clock))))

    rates = {}
    for name, run, texts in (
        ("exact", match, q.exact),
        ("exact_traj", retrieve, q.exact),
        ("mid", match, q.mid),
        ("miss", match, q.miss),
        ("diverge", match, q.diverge),
    ):
        rates[name], _ = ops_per_second(run, texts, min_time)
    return rates


# ---------------------------------------------------------------- memory


COMPONENTS = ("keys", "ids", "logps", "codes", "nodes", "children", "floats")


def _rounded(size: int) -> int:
    """What an allocation of ``size`` bytes takes from pymalloc (<= 512) or malloc (larger)."""
    return -(-size // 16) * 16 if size <= 512 else -(-(size + 16) // 16) * 16


@dataclass(slots=True)
class Breakdown:
    """Bytes per component: the payload (key bytes, array items) and the object overhead."""

    payload: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMPONENTS, 0))
    overhead: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMPONENTS, 0))
    rounded: int = 0  # everything, with allocator rounding

    def add(self, component: str, obj: object, payload: int) -> None:
        size = sys.getsizeof(obj)
        self.payload[component] += payload
        self.overhead[component] += size - payload
        self.rounded += _rounded(size)

    def total(self, component: str | None = None) -> int:
        names = COMPONENTS if component is None else (component,)
        return sum(self.payload[c] + self.overhead[c] for c in names)


def breakdown(trie: RadixTrie) -> Breakdown:
    """Walk every node (roots included) and size what it holds with ``sys.getsizeof``."""
    out = Breakdown()
    floats: dict[int, float] = {}
    stack: list[Node] = list(trie.roots.values())
    while stack:
        node = stack.pop()
        out.add("nodes", node, 0)
        if node.opaque_key is not None:
            out.add("keys", node.opaque_key, len(node.opaque_key))
        out.add("ids", node.ids, node.ids.itemsize * len(node.ids))
        if node.logps is not None:
            out.add("logps", node.logps, node.logps.itemsize * len(node.logps))
        if node.codes is not None:
            out.add("codes", node.codes, node.codes.itemsize * len(node.codes))
        if node.children is not None:
            out.add("children", node.children, 0)
            stack.extend(node.children)
        floats[id(node.last_access)] = node.last_access
    for value in floats.values():
        out.add("floats", value, 0)
    return out


# ---------------------------------------------------------------- one size


@dataclass(slots=True)
class SizeResult:
    label: str
    target: int
    tokens: int = 0
    nodes: int = 0
    inserts: int = 0  # per build
    input_tokens: int = 0  # per build
    builds: int = 0  # timing builds made
    insert_seconds: float = 0.0  # inside insert, all timing builds together
    rates: dict[str, float] = field(default_factory=dict)
    checks: dict[str, float] = field(default_factory=dict)
    traced_bytes: int = 0
    stats_bytes: int = 0
    key_bytes: int = 0
    parts: Breakdown = field(default_factory=Breakdown)

    def per_token(self, value: float) -> float:
        return value / self.tokens if self.tokens else float("nan")

    @property
    def bytes_per_token(self) -> float:
        return self.per_token(self.traced_bytes)

    def insert_rate(self, per_build: int) -> float:
        """``per_build`` (inserts or tokens of one build) per second of insert time."""
        s = self.insert_seconds
        return per_build * self.builds / s if s else float("nan")


def measure_size(
    workload: Workload,
    label: str,
    target: int,
    args: argparse.Namespace,
    log: Callable[[str], None],
) -> SizeResult:
    result = SizeResult(label, target)
    budget = max(10 * target, 1_000_000)  # never evict during the build

    # 1. timing builds (no tracemalloc; repeated while the inserts took under --min-time),
    #    then the lookups on the last one
    while True:
        trie = RadixTrie(workload.tok.bytes_table().__getitem__, max_tokens=budget)
        inserts, input_tokens, spent, sample = build(
            workload,
            trie,
            target_tokens=target,
            max_inserts=MAX_INSERTS,
            keep=args.queries,
            keep_seed=args.seed + 1,
        )
        result.builds += 1
        result.insert_seconds += spent
        if result.insert_seconds >= args.min_time or result.builds >= MAX_BUILDS:
            break
        del trie, sample
    result.inserts, result.input_tokens = inserts, input_tokens
    result.tokens, result.nodes = trie.tokens, trie.node_count
    log(
        f" {label}: {inserts} inserts, {trie.tokens} tokens, {trie.node_count} nodes; "
        f"{result.builds} build(s), {result.insert_seconds:.2f} s inside insert; lookups"
    )
    q = make_queries(workload, sample, args.seed + 2)
    result.checks = check_queries(trie, q)
    result.rates = lookup_rates(trie, q, args.min_time)
    del trie, sample, q
    gc.collect()

    # 2. memory build: the same inserts under tracemalloc
    log(f" {label}: memory build under tracemalloc")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        trie = RadixTrie(workload.tok.bytes_table().__getitem__, max_tokens=budget)
        build(workload, trie, target_tokens=target, max_inserts=inserts)
        gc.collect()
        result.traced_bytes = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    if trie.tokens != result.tokens:
        log(f" {label}: warning: memory build holds {trie.tokens} tokens, not {result.tokens}")
        result.tokens = trie.tokens
    stats = trie.statistics()
    result.stats_bytes = stats.key_bytes + stats.payload_bytes
    result.key_bytes = stats.key_bytes
    result.parts = breakdown(trie)
    del trie
    gc.collect()
    return result


# ---------------------------------------------------------------- report


def report(results: Sequence[SizeResult]) -> tuple[str, dict[str, float]]:
    out: list[str] = []
    figures: dict[str, float] = {}
    rows = []
    for r in results:
        rows.append(
            [
                r.label,
                str(r.tokens),
                str(r.nodes),
                str(r.inserts),
                str(r.builds),
                fmt(r.insert_rate(r.inserts), 0),
                fmt(r.insert_rate(r.input_tokens) / 1e6, 2),
                fmt(r.insert_rate(r.tokens) / 1e6, 2),
                fmt(r.rates["exact"], 0),
                fmt(r.rates["exact_traj"], 0),
                fmt(r.rates["mid"], 0),
                fmt(r.rates["diverge"], 0),
                fmt(r.rates["miss"], 0),
            ]
        )
    out.append("insert and match throughput (single thread, wall time of the trie calls only)")
    out.append(
        table(
            [
                "size",
                "tokens",
                "nodes",
                "inserts",
                "builds",
                "inserts/s",
                "in Mtok/s",
                "new Mtok/s",
                "exact/s",
                "exact+traj/s",
                "mid-node/s",
                "diverge/s",
                "miss/s",
            ],
            rows,
        )
    )
    out.append(
        "  in Mtok/s: every token handed to insert (cached prefix included); new: tokens stored"
    )
    out.append("")
    out.append(f"memory, bytes per stored token (goal <= {GOAL_BYTES_PER_TOKEN:g}, all included)")
    rows = []
    for r in results:
        rows.append(
            [
                r.label,
                fmt(r.bytes_per_token, 2),
                fmt(r.per_token(r.parts.rounded), 2),
                fmt(r.per_token(r.parts.total()), 2),
                fmt(r.per_token(r.stats_bytes), 2),
                fmt(r.per_token(r.key_bytes), 2),
                fmt(r.tokens / r.nodes if r.nodes else float("nan"), 1),
                fmt(100 * r.per_token(r.parts.payload["codes"])),
                "yes" if r.bytes_per_token <= GOAL_BYTES_PER_TOKEN else "NO",
            ]
        )
    out.append(
        table(
            [
                "size",
                "tracemalloc",
                "alloc-rounded",
                "getsizeof sum",
                "stats key+payload",
                "key bytes",
                "tokens/node",
                "with logps %",
                "goal met",
            ],
            rows,
        )
    )
    out.append(
        "  with logps %: tokens in nodes that hold logps and codes (nodes with any generated"
        " token; a new node's user-turn prefix pays for them too)"
    )
    out.append("")
    out.append("breakdown (sys.getsizeof), bytes per stored token: payload + object overhead")
    rows = []
    for r in results:
        total = r.parts.total()
        for c in COMPONENTS:
            part = r.parts.total(c)
            rows.append(
                [
                    r.label,
                    c,
                    fmt(r.per_token(r.parts.payload[c]), 2),
                    fmt(r.per_token(r.parts.overhead[c]), 2),
                    fmt(r.per_token(part), 2),
                    fmt(100 * part / total if total else float("nan"), 1),
                ]
            )
        other = r.traced_bytes - total
        rows.append([r.label, "rest", "", "", fmt(r.per_token(other), 2), "traced - sum"])
    out.append(table(["size", "component", "payload", "overhead", "total", "% of sum"], rows))
    out.append(
        "  rest < 0: getsizeof counts shared objects once per node (a one-token key is the"
        " tokenizer's own bytes object)"
    )
    for r in results:
        top = max(COMPONENTS, key=r.parts.total)
        verdict = "meets" if r.bytes_per_token <= GOAL_BYTES_PER_TOKEN else "misses"
        out.append(
            f"  {r.label}: {fmt(r.bytes_per_token, 2)} B/token {verdict} the "
            f"{GOAL_BYTES_PER_TOKEN:g} B goal; largest part: {top} "
            f"({fmt(r.per_token(r.parts.total(top)), 2)} B/token, of which "
            f"{fmt(r.per_token(r.parts.payload[top]), 2)} payload)"
        )
        if r.per_token(r.stats_bytes) > GOAL_BYTES_PER_TOKEN:
            out.append(
                f"    the payload alone (key bytes + ids + logps + codes) is "
                f"{fmt(r.per_token(r.stats_bytes), 2)} B/token: no overhead trimming reaches the"
                " goal; object overhead adds "
                f"{fmt(r.bytes_per_token - r.per_token(r.stats_bytes), 2)} B/token"
            )
    bad = [
        f"{r.label} {name}={fmt(100 * v, 1)}%"
        for r in results
        for name, v in r.checks.items()
        if v < 1.0
    ]
    out.append(
        "  lookup checks: "
        + ("all lookups returned what they should" if not bad else "FAILED: " + ", ".join(bad))
    )

    for r in results:
        p = f"trie_{r.label}"
        figures[f"{p}_tokens"] = r.tokens
        figures[f"{p}_nodes"] = r.nodes
        figures[f"{p}_bytes_per_token"] = r.bytes_per_token
        figures[f"{p}_bytes_per_token_alloc_rounded"] = r.per_token(r.parts.rounded)
        figures[f"{p}_stats_bytes_per_token"] = r.per_token(r.stats_bytes)
        figures[f"{p}_key_bytes_per_token"] = r.per_token(r.key_bytes)
        for c in COMPONENTS:
            figures[f"{p}_{c}_bytes_per_token"] = r.per_token(r.parts.total(c))
        figures[f"{p}_logp_token_fraction"] = r.per_token(r.parts.payload["codes"])
        figures[f"{p}_builds"] = r.builds
        figures[f"{p}_goal_met"] = float(r.bytes_per_token <= GOAL_BYTES_PER_TOKEN)
        figures[f"{p}_inserts_per_s"] = r.insert_rate(r.inserts)
        figures[f"{p}_insert_tokens_per_s"] = r.insert_rate(r.input_tokens)
        figures[f"{p}_insert_new_tokens_per_s"] = r.insert_rate(r.tokens)
        figures[f"{p}_match_exact_per_s"] = r.rates["exact"]
        figures[f"{p}_retrieve_exact_per_s"] = r.rates["exact_traj"]
        figures[f"{p}_match_mid_node_per_s"] = r.rates["mid"]
        figures[f"{p}_match_diverge_per_s"] = r.rates["diverge"]
        figures[f"{p}_match_miss_per_s"] = r.rates["miss"]
        for name, v in r.checks.items():
            figures[f"{p}_check_{name}"] = v
    return "\n".join(out), figures


# ---------------------------------------------------------------- main


def parse_size(text: str) -> int:
    """``10k``, ``100K``, ``1M`` or a plain number of tokens."""
    t = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if scale > 1 else t) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if not 1_000 <= value <= 20_000_000:
        raise argparse.ArgumentTypeError(f"size must be in 1k..20M, not {text!r}")
    return value


def size_label(value: int) -> str:
    if value % 1_000_000 == 0:
        return f"{value // 1_000_000}m"
    if value % 1_000 == 0:
        return f"{value // 1_000}k"
    return str(value)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Radix tree insert/match throughput and bytes per stored token "
        "(in-process, Qwen3 ids, multi-turn RL trajectories).",
    )
    parser.add_argument(
        "--sizes",
        type=parse_size,
        nargs="+",
        help="stored-token targets (default 10k 100k 1M; --quick: 10k 100k)",
    )
    parser.add_argument("--quick", action="store_true", help="10k and 100k only, shorter timing")
    parser.add_argument(
        "--queries", type=int, default=1000, help="inserted trajectories looked up (default 1000)"
    )
    parser.add_argument(
        "--min-time", type=float, help="seconds per match measurement (default 1; quick 0.3)"
    )
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write figures as JSON")
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    if args.min_time is None:
        args.min_time = 0.3 if args.quick else 1.0
    if not 0 < args.min_time <= 60:
        parser.error("--min-time must be in (0, 60]")
    if not 1 <= args.queries <= 100_000:
        parser.error("--queries must be in 1..100000")
    args.sizes = sorted(dict.fromkeys(args.sizes))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - began:5.1f}s]{line}", file=sys.stderr, flush=True)

    log(" loading the Qwen3 tokenizer")
    tokenizer = load_tokenizer()
    tokenizer.token_bytes(0)  # build the bytes table now, outside every measurement
    workload = Workload(tokenizer, args.seed)
    results = [measure_size(workload, size_label(s), s, args, log) for s in args.sizes]
    text, figures = report(results)
    figures["wall_s"] = time.perf_counter() - began
    print(text)
    print()
    print_figures(figures, places=3)
    write_json(args.json, figures, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
