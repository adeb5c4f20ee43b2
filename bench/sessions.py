"""Agent sessions through the router: turn latency by turn index, router cost and exactness.

Starts two simulated SGLang workers with the shipped Qwen3 tokenizer and a router with
``--radix-tree-max-size 2000000`` (which turns on the OpenAI API and the agent sessions of
``trio_router/session_api.py``), as separate processes on free loopback ports. By default the
workers are ``bench/_qwen_worker.py``: the same ``SimWorker`` app as ``trio-router worker``
plus a thin layer that records the prompt ids each ``/generate`` fed to the engine (by
``rid``), so the engine's side of every turn can be checked. ``--plain-workers`` starts
``python -m trio_router worker`` instead (then the engine-side checks are skipped).

After a warm-up (2 throw-away sessions, deleted again), ``--sessions`` agent sessions are
opened (``POST /sessions``) and run concurrently with ``httpx.AsyncClient``, each for
``--turns`` turns in a realistic agent loop: turn 1 sends a shared system prompt of ~300
tokens and a short user message; every later turn sends the whole conversation so far, i.e.
the previous request's messages + the assistant message the router returned + one new
message. The new message is a ``tool`` message (a short JSON tool result) on every
``--tool-every``-th turn (default 3; 0 = never) and a short user message otherwise. Each turn
is ``POST /sessions/{id}/v1/chat/completions`` with ``max_tokens`` ``--max-tokens``, not
streamed; the sessions run free (no lock-step), as agents do.

What is measured (the *run* is the window from just before the sessions are opened to the
last answer):

* **turn latency** -- client-side, request sent to full answer; p50/p99 overall and by turn
  index (turn k of every session), with the mean prompt and completion length of that turn.
  *worker p50* is the worker's own ``meta_info.e2e_latency`` (mostly the simulated
  ``completion tokens x ms/token``); *outside p50* is the rest of each turn: the router, HTTP
  and waiting for a core. Later turns carry longer conversations, so an *outside* time that
  climbs with the turn index is cost the router pays per message or per token of history
  (rendering the chat template, tokenizing the delta). With ``--sessions`` 32 the p99 of one
  turn index is close to its maximum.
* **turns/s** -- completed turns / wall time of the run.
* **router CPU per turn** -- utime+stime of the router process (all threads, from
  ``/proc/<pid>/stat``) over the run / completed turns (clock ticks are 10 ms: with
  ``--quick`` the run is short and this is coarse). The workers' and the client's CPU per turn
  and how busy the whole machine was are shown too: on a 2-core machine the router, two
  workers and the client share the CPUs, so latency includes waiting for a core. CPU used by
  *other programs* during the run is shown as well; when it is above 10 % the latency and
  turns/s figures are disturbed (run again on a quiet machine). The client's CPU per turn
  grows with ``--sessions`` (httpx's connection pool): far above 64 sessions the figures
  measure the client more than the router.
* **router memory per session** -- router ``VmRSS`` (``/proc/<pid>/status``) at the end of the
  run minus before the sessions were opened, / sessions. This is a lower bound: RSS moves in
  pages and allocator arenas, and the router's heap keeps free space from its start-up
  (loading the tokenizer) that sessions fill before RSS grows -- a session of ~640 tokens holds
  ~50 kB of Python objects (ids, logprobs, mask, versions, messages) but adds only ~5 kB of
  RSS here. ``metrics.sessions.tokens`` / sessions (the token ids the router holds per
  session) is exact. RSS after deleting the sessions is shown too.
* **errors** -- failed requests (non-200 answers, transport errors, malformed answers). A
  session stops at its first failed turn; the first failures are shown with their request.
* **exactness** -- for every session (``GET /sessions/{id}`` after the run):
  the accumulated token ids have length == last turn's ``usage.prompt_tokens +
  usage.completion_tokens``; the prompt grows across turns (turn k's prompt is longer than turn
  k-1's prompt + completion); each turn's generated ids (``meta_info.output_ids``) sit in the
  accumulated ids exactly at ``[prompt_tokens, prompt_tokens + completion_tokens)`` and the
  loss mask is 1 exactly there; the router's records agree with the usage the client got;
  and (recording workers) the prompt ids the engine received for turn k are exactly the
  first ``prompt_tokens`` accumulated ids, and all turns of a session went to one worker
  (sticky). A session is *append-only* when all of these hold (stickiness is reported
  apart); ``sessions_append_only_fraction`` is over the sessions with at least one turn.
  The first violation is shown: the request and answer of the turn, and the tokens around
  the first differing position.

Prints a table (overall + one row per turn index), saves a plot of p50/p99 latency (and the
worker's own p50) by turn index to ``bench/results/sessions_latency.png`` (``--plot PATH``,
``--no-plot``; skipped with a message when matplotlib is not installed) and ends with
``name=value`` lines (``--json PATH`` writes them too). Exits 1 if there was an error or a
violation. ``--quick`` (8 sessions x 4 turns) takes about 10 s on a 2-core machine, most of it
starting the processes (which are started again, once, on new ports if another program took
one of the chosen free ports meanwhile).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import tokenizers
import trio
from _harness import (
    BenchError,
    Child,
    Children,
    CpuSnapshot,
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

from trio_router.tokenizer import DEFAULT_TOKENIZER_DIR

BENCH_DIR = Path(__file__).resolve().parent
RECORDING_WORKER = BENCH_DIR / "_qwen_worker.py"
DEFAULT_PLOT = BENCH_DIR / "results" / "sessions_latency.png"
STARTUP_TIMEOUT = 45.0  # three processes importing transformers on a small machine
REQUEST_TIMEOUT = 30.0
CACHE_TOKENS = 2_000_000
SYSTEM_TOKENS = 300
WARMUP_SESSIONS = 2
WARMUP_TURNS = 3
SHOWN_PROBLEMS = 3
CHECK_CONCURRENCY = 8

RULES = (
    "You are a coding agent working inside a sandboxed repository on behalf of a developer.",
    "Read the relevant files before you change anything, and keep every change minimal.",
    "When a tool returns an error, explain what went wrong before you try again.",
    "Prefer small, verifiable steps: run the tests after each edit and report the result.",
    "Never invent file contents, command output or test results you have not seen.",
    "Use the shell tool for commands, the editor tool for edits and the search tool to look up "
    "symbols; do not call tools that are not listed.",
    "Keep answers short: one paragraph of reasoning, then the action you take next.",
    "If the task is ambiguous, state the assumption you make and continue with it.",
    "Do not touch files outside the repository and never print secrets or credentials.",
    "Format code in fenced blocks with the language named, and quote file paths exactly.",
    "When you are done, summarize the change, the tests you ran and anything left open.",
    "Budget: at most 20 tool calls per task; stop and report if you run out.",
)
VERBS = ("Check", "Fix", "Explain", "Refactor", "Test", "Document", "Profile", "Review")
THINGS = (
    "the parser",
    "the retry loop",
    "the config loader",
    "the cache eviction",
    "the CLI flags",
    "the error messages",
    "the unit tests",
    "the logging setup",
)
FILES = ("src/app.py", "src/cache.py", "src/cli.py", "tests/test_app.py", "docs/usage.md")
TOOLS = ("run_tests", "shell", "search", "read_file")


# ---------------------------------------------------------------- conversation script


class Script:
    """Deterministic message texts: one shared system prompt, short user and tool turns."""

    def __init__(self, tok: tokenizers.Tokenizer, seed: int) -> None:
        rng = random.Random(seed)
        rules = list(RULES)
        parts: list[str] = []
        n = 0
        while len(tok.encode("\n".join(parts)).ids) < SYSTEM_TOKENS:
            if n % len(rules) == 0:
                rng.shuffle(rules)
            parts.append(f"{n + 1}. {rules[n % len(rules)]}")
            n += 1
        self.system = "\n".join(parts)
        self.system_tokens = len(tok.encode(self.system).ids)

    def user(self, rng: random.Random, session: int, turn: int) -> str:
        return (
            f"Task {session}.{turn}: {rng.choice(VERBS)} {rng.choice(THINGS)} in "
            f"{rng.choice(FILES)} and tell me what you changed."
        )

    def tool(self, rng: random.Random, session: int, turn: int) -> str:
        failed = rng.randint(0, 3)
        return json.dumps(
            {
                "tool": rng.choice(TOOLS),
                "exit_code": int(failed > 0),
                "stdout": f"{rng.randint(5, 60)} passed, {failed} failed",
                "note": f"run {session}.{turn}",
            }
        )


def new_message(script: Script, rng: random.Random, session: int, turn: int, every: int) -> Any:
    """The message turn ``turn`` (1-based, >= 2) appends after the previous answer."""
    if every and turn % every == 0:
        return {
            "role": "tool",
            "tool_call_id": f"call_{session}_{turn}",
            "content": script.tool(rng, session, turn),
        }
    return {"role": "user", "content": script.user(rng, session, turn)}


# ---------------------------------------------------------------- processes


@dataclass(slots=True)
class Stack:
    workers: list[Child]
    worker_ports: list[int]
    router: Child
    router_port: int
    recording: bool


def start_processes(children: Children, args: argparse.Namespace) -> Stack:
    """Start two Qwen3 workers and the router (readiness is awaited separately)."""
    *worker_ports, router_port = free_ports(3)
    workers = []
    for i, port in enumerate(worker_ports):
        if args.plain_workers:
            argv = [sys.executable, "-m", "trio_router", "worker", "--host", "127.0.0.1"]
        else:
            argv = [sys.executable, str(RECORDING_WORKER)]
        argv += ["--port", str(port), "--seed", str(i + 1)]
        argv += ["--latency-per-token-ms", str(args.latency_per_token_ms)]
        workers.append(children.start(f"worker{i}", argv))
    argv = [sys.executable, "-m", "trio_router", "serve", "--host", "127.0.0.1"]
    argv += ["--port", str(router_port), "--log-level", "warning"]
    argv += ["--radix-tree-max-size", str(CACHE_TOKENS)]
    argv += ["--worker-urls", *(f"http://127.0.0.1:{p}" for p in worker_ports)]
    router = children.start("router", argv)
    return Stack(workers, worker_ports, router, router_port, not args.plain_workers)


async def wait_ready(stack: Stack, children: Children) -> None:
    """Wait until both workers and the router (seeing both healthy) answer ``/health``."""
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


def _lost_port(child: Child) -> bool:
    """Whether ``child`` exited because its port was taken after ``free_ports`` chose it."""
    if child.proc.poll() is None:
        return False
    try:
        return "address already in use" in child.log_path.read_text(errors="replace").lower()
    except OSError:
        return False


async def ready_stack(
    stack: Stack, children: Children, args: argparse.Namespace, log: Callable[[str], None]
) -> Stack:
    """``wait_ready``; if a port was taken meanwhile (by another program), start again once."""
    try:
        await wait_ready(stack, children)
        return stack
    except BenchError:
        started = [*stack.workers, stack.router]
        if not any(_lost_port(c) for c in started):
            raise
    children.stop(started)
    log("a chosen port was taken by another program meanwhile; starting again on new ports")
    stack = start_processes(children, args)
    await wait_ready(stack, children)
    return stack


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in kB (``VmRSS`` of /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status", "rb") as fh:
        for line in fh:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


# ---------------------------------------------------------------- sessions


@dataclass(slots=True)
class TurnResult:
    """One answered turn, as the client saw it."""

    index: int  # 1-based turn number
    role: str  # role of the message this turn added ("user" or "tool")
    latency: float
    worker_latency: float  # the worker's own meta_info.e2e_latency (nan if absent)
    prompt_tokens: int
    completion_tokens: int
    output_ids: list[int]
    finish: str
    rid: str | None
    added: list[dict[str, Any]]  # the messages this turn added to the conversation
    reply: dict[str, Any]  # the assistant message returned


@dataclass(slots=True)
class Failure:
    """A request that failed: what was asked and what came back."""

    session: int
    turn: int  # 0 = opening the session, -1 = reading it back
    what: str
    added: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class Agent:
    """One agent session of the run."""

    index: int
    rng: random.Random
    session_id: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    turns: list[TurnResult] = field(default_factory=list)
    failure: Failure | None = None
    state: dict[str, Any] | None = None  # GET /sessions/{id} after the run


def _short(text: str, limit: int = 400) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def parse_turn_answer(answer: Any) -> tuple[dict[str, Any], int, int, list[int], str, float]:
    """(message, prompt_tokens, completion_tokens, output_ids, finish, worker e2e s)."""
    choice = answer["choices"][0]
    message = choice["message"]
    usage = answer["usage"]
    meta = choice.get("meta_info") or {}
    ids = meta.get("output_ids")
    e2e = meta.get("e2e_latency")
    if not isinstance(message, dict) or message.get("role") != "assistant":
        raise ValueError(f"choices[0].message is not an assistant message: {message!r:.200}")
    if not isinstance(ids, list):
        raise ValueError("choices[0].meta_info.output_ids is missing")
    prompt, completion = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    finish = str(choice.get("finish_reason"))
    e2e = float(e2e) if isinstance(e2e, int | float) else math.nan
    return message, prompt, completion, [int(i) for i in ids], finish, e2e


async def run_agent(
    client: httpx.AsyncClient,
    agent: Agent,
    script: Script,
    args: argparse.Namespace,
    run_id: str | None,
    turns: int,
) -> None:
    """Open the session (unless open) and run ``turns`` turns; stop at the first failure."""
    if agent.session_id is None:
        try:
            response = await client.post("/sessions")
            response.raise_for_status()
            agent.session_id = str(response.json()["session_id"])
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            agent.failure = Failure(agent.index, 0, f"POST /sessions: {type(exc).__name__}: {exc}")
            return
    path = f"/sessions/{agent.session_id}/v1/chat/completions"
    for k in range(1, turns + 1):
        if k == 1:
            added = [
                {"role": "system", "content": script.system},
                {"role": "user", "content": script.user(agent.rng, agent.index, 1)},
            ]
        else:
            added = [new_message(script, agent.rng, agent.index, k, args.tool_every)]
        agent.messages.extend(added)
        body: dict[str, Any] = {"messages": agent.messages, "max_tokens": args.max_tokens}
        rid = f"{run_id}-{agent.index}-{k}" if run_id else None
        if rid:
            body["rid"] = rid  # passed through to the worker's /generate: its record key
        began = time.perf_counter()
        try:
            response = await client.post(path, json=body)
            latency = time.perf_counter() - began
            if response.status_code != 200:
                what = f"HTTP {response.status_code}: {_short(response.text)}"
                agent.failure = Failure(agent.index, k, what, added)
                return
            message, prompt, completion, ids, finish, e2e = parse_turn_answer(response.json())
        except httpx.HTTPError as exc:
            agent.failure = Failure(agent.index, k, f"{type(exc).__name__}: {exc}", added)
            return
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            what = f"malformed answer ({type(exc).__name__}: {exc}): {_short(response.text)}"
            agent.failure = Failure(agent.index, k, what, added)
            return
        role = added[-1]["role"]
        agent.turns.append(
            TurnResult(k, role, latency, e2e, prompt, completion, ids, finish, rid, added, message)
        )
        agent.messages.append(message)  # the assistant message as the router returned it


async def read_back(client: httpx.AsyncClient, agents: Sequence[Agent]) -> list[Failure]:
    """``GET /sessions/{id}`` of every agent with turns (a few at a time)."""
    failures: list[Failure] = []
    limiter = trio.CapacityLimiter(CHECK_CONCURRENCY)

    async def one(agent: Agent) -> None:
        async with limiter:
            try:
                response = await client.get(f"/sessions/{agent.session_id}")
                response.raise_for_status()
                agent.state = response.json()
            except (httpx.HTTPError, ValueError) as exc:
                failures.append(
                    Failure(agent.index, -1, f"GET /sessions/{{id}}: {type(exc).__name__}: {exc}")
                )

    async with trio.open_nursery() as nursery:
        for agent in agents:
            if agent.turns and agent.session_id:
                nursery.start_soon(one, agent)
    return failures


async def delete_all(client: httpx.AsyncClient, agents: Sequence[Agent]) -> int:
    """``DELETE`` every opened session; returns how many did not answer 204."""
    failed = 0
    limiter = trio.CapacityLimiter(CHECK_CONCURRENCY)

    async def one(session_id: str) -> None:
        nonlocal failed
        async with limiter:
            try:
                response = await client.delete(f"/sessions/{session_id}")
                failed += response.status_code != 204
            except httpx.HTTPError:
                failed += 1

    async with trio.open_nursery() as nursery:
        for agent in agents:
            if agent.session_id:
                nursery.start_soon(one, agent.session_id)
    return failed


async def engine_prompts(
    client: httpx.AsyncClient, stack: Stack
) -> tuple[dict[str, list[int]], dict[str, int]]:
    """From the recording workers: prompt ids by rid, and which worker (0, 1) got each rid."""
    prompts: dict[str, list[int]] = {}
    where: dict[str, int] = {}
    for i, port in enumerate(stack.worker_ports):
        response = await client.get(f"http://127.0.0.1:{port}/bench/prompts")
        response.raise_for_status()
        for rid, ids in response.json()["prompts"].items():
            prompts[rid] = ids
            where[rid] = i
    return prompts, where


# ---------------------------------------------------------------- exactness


@dataclass(slots=True)
class Verdict:
    """The checks of one session; ``None`` = not checked."""

    agent: Agent
    length: bool = True
    growing: bool = True
    outputs: bool = True
    mask: bool = True
    records: bool = True
    engine: bool | None = None
    sticky: bool | None = None
    workers: set[int] = field(default_factory=set)
    problems: list[list[str]] = field(default_factory=list)

    @property
    def append_only(self) -> bool:
        checks = (self.length, self.growing, self.outputs, self.mask, self.records)
        return all(checks) and self.engine is not False


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def _around(tok: tokenizers.Tokenizer, ids: Sequence[int], at: int, width: int = 6) -> str:
    lo, hi = max(0, at - width), min(len(ids), at + width)
    shown = list(ids[lo:hi])
    text = tok.decode(shown, skip_special_tokens=False)
    return f"[{lo}:{hi}] {shown} = {text!r}"


def describe_turn(turn: TurnResult) -> list[str]:
    """The request and answer of ``turn``, for a report."""
    added = ", ".join(
        f"{m['role']}: {_short(str(m.get('content', '')), 120)!r}" for m in turn.added
    )
    return [
        f"    request: turn {turn.index}, the whole conversation so far + [{added}]"
        + (f", rid {turn.rid}" if turn.rid else ""),
        f"    answer: usage prompt {turn.prompt_tokens} + completion {turn.completion_tokens}, "
        f"finish {turn.finish}, content {_short(str(turn.reply.get('content', '')), 120)!r}, "
        f"output_ids {turn.output_ids[:8]}{' ...' if len(turn.output_ids) > 8 else ''}",
    ]


def verify(
    agent: Agent,
    tok: tokenizers.Tokenizer,
    prompts: dict[str, list[int]] | None,
    where: dict[str, int] | None,
) -> Verdict:
    """Check one session's accumulated ids against what the client (and engine) saw."""
    v = Verdict(agent)
    state = agent.state or {}
    meta = state.get("metadata") or {}
    ids: list[int] = meta.get("accumulated_token_ids") or []
    mask: list[int] = meta.get("loss_mask") or []
    records = state.get("records") or []
    turns = agent.turns
    last = turns[-1]

    def problem(turn: TurnResult | None, *lines: str) -> None:
        v.problems.append([*lines, *(describe_turn(turn) if turn else [])])

    if len(ids) != last.prompt_tokens + last.completion_tokens:
        v.length = False
        problem(
            last,
            f"  accumulated ids: {len(ids)}, but the last turn's usage says "
            f"{last.prompt_tokens} + {last.completion_tokens} = "
            f"{last.prompt_tokens + last.completion_tokens}",
        )
    expected_mask = [0] * len(ids)
    end = 0
    for turn in turns:
        if turn.prompt_tokens <= end:
            v.growing = False
            problem(
                turn,
                f"  turn {turn.index}: prompt {turn.prompt_tokens} tokens does not extend the "
                f"previous turn's prompt + completion ({end} tokens)",
            )
        span = ids[turn.prompt_tokens : turn.prompt_tokens + turn.completion_tokens]
        if span != turn.output_ids or len(turn.output_ids) != turn.completion_tokens:
            v.outputs = False
            at = turn.prompt_tokens + _first_difference(span, turn.output_ids)
            problem(
                turn,
                f"  turn {turn.index}: its output_ids are not at accumulated ids "
                f"[{turn.prompt_tokens}:{turn.prompt_tokens + turn.completion_tokens}]",
                f"    accumulated {_around(tok, ids, at)}",
                f"    output_ids  {_around(tok, turn.output_ids, at - turn.prompt_tokens)}",
            )
        for i in range(turn.prompt_tokens, min(len(ids), turn.prompt_tokens + len(span))):
            expected_mask[i] = 1
        end = turn.prompt_tokens + turn.completion_tokens
    if mask != expected_mask:
        v.mask = False
        at = _first_difference(mask, expected_mask)
        problem(None, f"  loss mask differs from 1-on-generated-tokens first at position {at}")
    seen = [(r.get("prompt_tokens"), r.get("completion_tokens")) for r in records]
    if seen != [(t.prompt_tokens, t.completion_tokens) for t in turns]:
        v.records = False
        problem(None, f"  the router's records {seen} disagree with the usage the client got")
    if prompts is not None and where is not None:
        v.engine = True
        for turn in turns:
            fed = prompts.get(turn.rid or "")
            if fed is None:
                v.engine = False
                problem(turn, f"  turn {turn.index}: no worker recorded rid {turn.rid}")
                continue
            v.workers.add(where[turn.rid or ""])
            if fed != ids[: turn.prompt_tokens]:
                v.engine = False
                at = _first_difference(fed, ids)
                problem(
                    turn,
                    f"  turn {turn.index}: the engine was fed {len(fed)} prompt ids that are not "
                    f"the first {turn.prompt_tokens} accumulated ids (first difference at {at})",
                    f"    engine      {_around(tok, fed, at)}",
                    f"    accumulated {_around(tok, ids, at)}",
                )
        v.sticky = len(v.workers) <= 1
    return v


# ---------------------------------------------------------------- report


@dataclass(slots=True)
class Run:
    """Figures of the measured window."""

    wall: float
    router_cpu: float
    workers_cpu: float
    client_cpu: float
    machine_busy: float  # fraction of all cores busy (any program)
    rss_before: int
    rss_after: int
    rss_deleted: int
    session_tokens: int
    worker_requests: list[int]


def _ms(values: Iterator[float]) -> list[float]:
    """Sorted milliseconds of the (non-nan) seconds in ``values``."""
    return sorted(v * 1000 for v in values if v == v)


def latency_row(label: str, role: str, turns: Sequence[TurnResult], errors: int) -> list[str]:
    ms = _ms(t.latency for t in turns)
    worker = _ms(t.worker_latency for t in turns)
    outside = _ms(t.latency - t.worker_latency for t in turns)
    prompt = sum(t.prompt_tokens for t in turns) / len(turns) if turns else math.nan
    completion = sum(t.completion_tokens for t in turns) / len(turns) if turns else math.nan
    return [
        label,
        role,
        str(len(turns)),
        str(errors),
        fmt(prompt, 0),
        fmt(completion, 1),
        fmt(percentile(ms, 50)),
        fmt(percentile(ms, 99)),
        fmt(ms[-1] if ms else math.nan),
        fmt(percentile(worker, 50)),
        fmt(percentile(outside, 50)),
    ]


def by_turn(agents: Sequence[Agent], n_turns: int) -> list[list[TurnResult]]:
    rows: list[list[TurnResult]] = [[] for _ in range(n_turns)]
    for agent in agents:
        for turn in agent.turns:
            rows[turn.index - 1].append(turn)
    return rows


def save_plot(
    path: Path, rows: Sequence[Sequence[TurnResult]], args: argparse.Namespace
) -> str | None:
    """Plot p50/p99 latency by turn index; returns None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    index = [k for k, row in enumerate(rows, 1) if row]
    p50 = [percentile(sorted(t.latency * 1000 for t in rows[k - 1]), 50) for k in index]
    p99 = [percentile(sorted(t.latency * 1000 for t in rows[k - 1]), 99) for k in index]
    worker = [percentile(_ms(t.worker_latency for t in rows[k - 1]), 50) for k in index]
    tokens = [sum(t.prompt_tokens for t in rows[k - 1]) / len(rows[k - 1]) for k in index]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(index, p50, "o-", label="p50")
    ax.plot(index, p99, "s--", label="p99")
    ax.plot(index, worker, ":", color="grey", label="p50 of the worker's own time")
    ax.set_xticks(index, [f"{k}\n{t:.0f} tok" for k, t in zip(index, tokens, strict=True)])
    ax.set_xlabel("turn index (mean prompt tokens)")
    ax.set_ylabel("turn latency (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(
        f"trio_router agent sessions: {args.sessions} sessions x {args.turns} turns, "
        f"{args.max_tokens} tokens/turn at {args.latency_per_token_ms:g} ms/token",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def report(
    agents: Sequence[Agent],
    verdicts: Sequence[Verdict],
    failures: Sequence[Failure],
    run: Run,
    script: Script,
    args: argparse.Namespace,
    recording: bool,
) -> tuple[str, dict[str, float | int]]:
    n = len(agents)
    turns = [t for a in agents for t in a.turns]
    rows = by_turn(agents, args.turns)
    errors_at = [0] * (args.turns + 1)
    for failure in failures:
        if failure.turn >= 1:
            errors_at[failure.turn] += 1
    roles = ["user"] + [
        new_message(script, random.Random(0), 0, k, args.tool_every)["role"]
        for k in range(2, args.turns + 1)
    ]
    headers = ["turn", "adds", "turns", "errors", "prompt tok", "compl tok"]
    headers += ["p50 ms", "p99 ms", "max ms", "worker p50", "outside p50"]
    body = [latency_row("all", "", turns, len(failures))]
    body += [latency_row(str(k), roles[k - 1], row, errors_at[k]) for k, row in enumerate(rows, 1)]
    done = len(turns)
    per_turn = 1000 / done if done else math.nan
    cores = os.cpu_count() or 1
    ours = run.router_cpu + run.workers_cpu + run.client_cpu
    other = max(0.0, run.machine_busy * cores * run.wall - ours) / (cores * run.wall)
    lines = [
        f"agent sessions: {n} x {args.turns} turns through the router, 2 simulated Qwen3 workers "
        f"({'recording' if recording else 'plain'}) at {args.latency_per_token_ms:g} ms/token, "
        f"max_tokens {args.max_tokens}; system prompt {script.system_tokens} tokens; "
        + (
            f"a tool message on turns divisible by {args.tool_every}"
            if args.tool_every
            else "user messages only"
        ),
        "",
        table(headers, body),
        "(worker = the worker's own e2e_latency of the turn; outside = the rest of the turn's "
        "latency: router, HTTP, waiting for a core)",
        "",
        f"throughput: {done} turns in {run.wall:.2f} s = {done / run.wall:.1f} turns/s",
        f"router CPU: {run.router_cpu * per_turn:.2f} ms/turn ({run.router_cpu:.2f} s, "
        f"{100 * run.router_cpu / run.wall:.0f} % of one core); workers "
        f"{run.workers_cpu * per_turn:.2f} ms/turn; client {run.client_cpu * per_turn:.2f} "
        f"ms/turn; all {cores} cores {100 * run.machine_busy:.0f} % busy, "
        f"{100 * other:.0f} % by other programs"
        + (" -- the machine was shared: latency and turns/s are disturbed" if other > 0.1 else ""),
        f"router RSS: {run.rss_before} kB before opening the sessions, {run.rss_after} kB after "
        f"all turns: {(run.rss_after - run.rss_before) / n:.1f} kB/session; "
        f"{run.rss_deleted} kB after deleting them",
        f"session tokens (metrics.sessions.tokens): {run.session_tokens} = "
        f"{run.session_tokens / n:.1f} tokens/session",
        f"worker requests in the run: {' / '.join(map(str, run.worker_requests))}",
    ]
    checked = len(verdicts)
    good = sum(v.append_only for v in verdicts)

    def count(name: str) -> str:
        values = [getattr(v, name) for v in verdicts if getattr(v, name) is not None]
        return f"{sum(values)}/{len(values)}" if values else "not checked"

    lines.append(
        f"exactness: append-only {good}/{checked} sessions (length {count('length')}, prompt "
        f"grows {count('growing')}, outputs in place {count('outputs')}, loss mask "
        f"{count('mask')}, records {count('records')}, engine prefix {count('engine')}); "
        f"sticky {count('sticky')}"
    )
    if recording:
        spread = [sum(1 for v in verdicts if w in v.workers) for w in range(2)]
        lines.append(f"sessions per worker: {spread[0]} / {spread[1]}")
    for failure in failures[:SHOWN_PROBLEMS]:
        lines.append(f"ERROR session {failure.session} turn {failure.turn}: {failure.what}")
        for m in failure.added:
            lines.append(f"    it added {m['role']}: {_short(str(m.get('content', '')), 200)!r}")
    if len(failures) > SHOWN_PROBLEMS:
        lines.append(f"... and {len(failures) - SHOWN_PROBLEMS} more errors")
    bad = [v for v in verdicts if not v.append_only or v.sticky is False]
    for v in bad[:SHOWN_PROBLEMS]:
        lines.append(f"VIOLATION session {v.agent.index} ({v.agent.session_id}):")
        for block in v.problems[:2]:
            lines.extend(block)
        if v.sticky is False:
            lines.append(f"  its turns went to workers {sorted(v.workers)}")
    all_ms = sorted(t.latency * 1000 for t in turns)
    figures: dict[str, float | int] = {
        "sessions_turns_per_s": done / run.wall,
        "sessions_p50_ms": percentile(all_ms, 50),
        "sessions_p99_ms": percentile(all_ms, 99),
        "sessions_router_cpu_ms_per_turn": run.router_cpu * per_turn,
        "sessions_router_rss_kb_per_session": (run.rss_after - run.rss_before) / n,
        "sessions_tokens_per_session": run.session_tokens / n,
        "sessions_errors": len(failures),
        "sessions_append_only_fraction": good / checked if checked else math.nan,
    }
    for k, row in enumerate(rows, 1):
        ms = sorted(t.latency * 1000 for t in row)
        figures[f"sessions_turn{k}_p50_ms"] = percentile(ms, 50)
    for k, row in enumerate(rows, 1):
        figures[f"sessions_turn{k}_p99_ms"] = percentile(sorted(t.latency * 1000 for t in row), 99)
    figures["sessions_sticky_fraction"] = (
        sum(bool(v.sticky) for v in verdicts) / checked if recording and checked else math.nan
    )
    figures["sessions_worker_p50_ms"] = percentile(_ms(t.worker_latency for t in turns), 50)
    figures["sessions_outside_worker_p50_ms"] = percentile(
        _ms(t.latency - t.worker_latency for t in turns), 50
    )
    figures["sessions_client_cpu_ms_per_turn"] = run.client_cpu * per_turn
    figures["sessions_other_load_fraction"] = other
    figures["sessions_router_rss_kb_after_delete"] = run.rss_deleted - run.rss_before
    return "\n".join(lines), figures


# ---------------------------------------------------------------- main


async def warm_up(client: httpx.AsyncClient, script: Script, args: argparse.Namespace) -> None:
    """A few throw-away sessions (connections, template, tokenizer), deleted again."""
    agents = [Agent(-1 - i, random.Random(-1 - i)) for i in range(WARMUP_SESSIONS)]
    async with trio.open_nursery() as nursery:
        for agent in agents:
            nursery.start_soon(
                run_agent, client, agent, script, args, None, min(WARMUP_TURNS, args.turns)
            )
    for agent in agents:
        if agent.failure is not None:
            raise BenchError(f"warm-up failed: {agent.failure.what}")
    await delete_all(client, agents)


async def metrics(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/metrics")
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def worker_requests(snapshot: dict[str, Any]) -> list[int]:
    workers = snapshot.get("router", {}).get("workers", [])
    return [int(w.get("requests", 0)) for w in workers]


async def run(args: argparse.Namespace, children: Children) -> int:
    began = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - began:5.1f}s] {line}", file=sys.stderr, flush=True)

    log("starting 2 Qwen3 workers + router; loading the tokenizer meanwhile")
    stack = start_processes(children, args)
    tok = tokenizers.Tokenizer.from_file(str(DEFAULT_TOKENIZER_DIR / "tokenizer.json"))
    script = Script(tok, args.seed)
    stack = await ready_stack(stack, children, args, log)
    log("ready; warming up")
    base = f"http://127.0.0.1:{stack.router_port}"
    limits = httpx.Limits(max_connections=args.sessions + 4)
    run_id = uuid.uuid4().hex[:8] if stack.recording else None
    agents = [Agent(i, random.Random(args.seed * 100_003 + i)) for i in range(args.sessions)]
    pid = stack.router.pid
    watched = [pid, *(w.pid for w in stack.workers)]
    async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT, limits=limits) as client:
        await warm_up(client, script, args)
        await trio.sleep(0.3)
        requests_before = worker_requests(await metrics(client))
        log(f"running {args.sessions} sessions x {args.turns} turns")
        rss_before = rss_kb(pid)
        client_cpu0 = time.process_time()
        cpu0 = CpuSnapshot.take(watched)
        async with trio.open_nursery() as nursery:
            for agent in agents:
                nursery.start_soon(run_agent, client, agent, script, args, run_id, args.turns)
        cpu1 = CpuSnapshot.take(watched)
        client_cpu = time.process_time() - client_cpu0
        rss_after = rss_kb(pid)
        children.check_alive()
        after = await metrics(client)
        log("checking the sessions")
        failures = [a.failure for a in agents if a.failure is not None]
        failures += await read_back(client, agents)
        prompts, where = await engine_prompts(client, stack) if stack.recording else (None, None)
        verdicts = [verify(a, tok, prompts, where) for a in agents if a.turns and a.state]
        deletes_failed = await delete_all(client, agents)
        await trio.sleep(0.3)
        rss_deleted = rss_kb(pid)
    if deletes_failed:
        failures.append(Failure(-1, -1, f"{deletes_failed} DELETE /sessions/{{id}} failed"))
    requests_after = worker_requests(after)
    run_figures = Run(
        wall=cpu1.wall - cpu0.wall,
        router_cpu=cpu0.delta(cpu1, pid),
        workers_cpu=sum(cpu0.delta(cpu1, w.pid) for w in stack.workers),
        client_cpu=client_cpu,
        machine_busy=cpu0.machine_busy(cpu1),
        rss_before=rss_before,
        rss_after=rss_after,
        rss_deleted=rss_deleted,
        session_tokens=int(after.get("sessions", {}).get("tokens", 0)),
        worker_requests=[b - a for a, b in zip(requests_before, requests_after, strict=False)],
    )
    text, figures = report(agents, verdicts, failures, run_figures, script, args, stack.recording)
    print(text)
    if args.plot is not None:
        saved = save_plot(args.plot, by_turn(agents, args.turns), args)
        if saved is None:
            print(
                "plot: matplotlib is not installed, skipping the plot "
                "(.venv/bin/pip install matplotlib to get it)"
            )
        else:
            print(f"plot: {saved}")
    figures["sessions_wall_s"] = time.perf_counter() - began
    print()
    print_figures(figures, places=4)
    write_json(args.json, figures, args)
    bad = figures["sessions_errors"] or any(
        not v.append_only or v.sticky is False for v in verdicts
    )
    return 1 if bad else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Concurrent agent sessions through the router (simulated Qwen3 workers, "
        "loopback only): turn latency by turn index, router CPU and memory, exactness.",
    )
    parser.add_argument("--sessions", type=int, help="concurrent sessions (default 32; quick 8)")
    parser.add_argument("--turns", type=int, help="turns per session (default 6; quick 4)")
    parser.add_argument(
        "--latency-per-token-ms", type=float, default=2.0, help="workers' ms per token (2)"
    )
    parser.add_argument("--max-tokens", type=int, default=24, help="max_tokens per turn (24)")
    parser.add_argument(
        "--tool-every",
        type=int,
        default=3,
        help="every Kth turn adds a tool message instead of a user message (3; 0 = never)",
    )
    parser.add_argument(
        "--plain-workers",
        action="store_true",
        help="use `trio-router worker` (no engine-side prompt record, fewer checks)",
    )
    parser.add_argument("--quick", action="store_true", help="8 sessions x 4 turns")
    parser.add_argument("--seed", type=int, default=0, help="seed of the message texts")
    parser.add_argument(
        "--timeout", type=float, help="bound on the whole run in s (default 600; quick 90)"
    )
    parser.add_argument(
        "--plot", type=Path, default=DEFAULT_PLOT, help=f"PNG to write (default {DEFAULT_PLOT})"
    )
    parser.add_argument("--no-plot", dest="plot", action="store_const", const=None)
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write figures as JSON")
    args = parser.parse_args(argv)
    if args.sessions is None:
        args.sessions = 8 if args.quick else 32
    if args.turns is None:
        args.turns = 4 if args.quick else 6
    if args.timeout is None:
        args.timeout = 90.0 if args.quick else 600.0
    if not 1 <= args.sessions <= 1000:
        parser.error("--sessions must be in 1..1000")
    if not 1 <= args.turns <= 100:
        parser.error("--turns must be in 1..100")
    if not 1 <= args.max_tokens <= 4096:
        parser.error("--max-tokens must be in 1..4096")
    if not 0 <= args.latency_per_token_ms <= 1000:
        parser.error("--latency-per-token-ms must be in 0..1000")
    if args.tool_every < 0:
        parser.error("--tool-every must be >= 0")
    if not 0 < args.timeout <= 3600:
        parser.error("--timeout must be in (0, 3600]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    children = Children()
    return run_bench(
        "sessions",
        run,
        args,
        children,
        children=children,
        expected=(BenchError, httpx.HTTPError),
        timeout=args.timeout,
    )


if __name__ == "__main__":
    sys.exit(main())
