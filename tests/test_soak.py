"""A bounded soak: thousands of mixed requests through client disconnects and worker faults.

One router with the token cache, two simulated workers on the Qwen3 tokenizer and 16 client
tasks sending a mix of plain and streamed ``/generate`` by text, OpenAI chat (plain and
streamed), agent-session conversations and ``/retrieve_from_text``; about one request in
seven is given up by its client after a few milliseconds, often mid-stream. A quarter of the
way into each round a worker is killed and replaced by a new one registered with
``/add_worker`` (the dead one is then removed), and half way another answers 503 for a while.

The round runs twice. After each: nothing is in flight, no upstream connection is active, no
task serving a request is left, the other tasks are the same as after the first round, and
every trajectory a client received completely is token-exact. Memory allocated during the
second round and still held at its end stays under a bound.
"""

from __future__ import annotations

import gc
import random
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import trio

from trio_router.router import Router
from trio_router.server import RunningRouter
from trio_router.sim import SimWorkerHandle
from trio_router.tokenizer import Tokenizer

from .conftest import start_router, start_worker
from .test_proxy import wait_until

CLIENTS = 16
REQUESTS_PER_CLIENT = 60  # per round
ROUNDS = 2
MAX_TOKENS = 12
LATENCY_MS = 1.0  # per generated token: streams last long enough to be cut
GIVE_UP = 0.15  # share of requests whose client gives up after 2..30 ms
#: memory allocated in round 2 and still held after it (the trie keeps its trajectories)
MEMORY_SLACK = 20 * 2**20
#: tasks that live as long as one request: the router's disconnect watcher, hypercorn's
#: ASGI app task, and a simulated worker's disconnect watcher
REQUEST_TASKS = ("_cancel_on_disconnect", "task_group._handle", "_watch_disconnect")
#: tasks that live as long as one TCP connection to a server
CONNECTION_TASKS = ("_run_handler", "IdleWatch._watch")
#: tasks that live for one health-check round (one probe per worker)
PROBE_TASKS = ("HealthChecker.check", "HealthChecker._round")  # a probe round in flight


@dataclass
class Tally:
    """What happened in one round, by kind of request."""

    sent: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    disconnects: Counter[str] = field(default_factory=Counter)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    faults: list[str] = field(default_factory=list)
    #: HTTP requests the clients sent (a session conversation is several)
    http: int = 0
    #: (prompt text, output ids) of every generation a client received completely
    exact: list[tuple[str, list[int]]] = field(default_factory=list)

    def summary(self) -> str:
        errors = {f"{kind} {what}": n for (kind, what), n in sorted(self.errors.items())}
        return (
            f"HTTP requests {self.http}; operations {sum(self.sent.values())} "
            f"{dict(sorted(self.sent.items()))}\n"
            f"  ok {sum(self.ok.values())} {dict(sorted(self.ok.items()))}\n"
            f"  client disconnects {sum(self.disconnects.values())} "
            f"{dict(sorted(self.disconnects.items()))}\n"
            f"  errors {sum(self.errors.values())} {errors}\n"
            f"  faults {self.faults}\n"
            f"  token-exact trajectories checked {len(self.exact)}"
        )


def prompt(tag: str) -> str:
    # Digits are single tokens in Qwen3, so where a cached neighbour's prefix stops inside
    # the tag, the rest tokenizes as it would whole: the prompt's ids are encode(prompt).
    return f"<|im_start|>user\nSoak {tag}: say something.<|im_end|>\n<|im_start|>assistant\n"


def final_event(lines: list[str]) -> dict[str, Any] | None:
    """The last data event before ``[DONE]``, or None if the stream did not end properly."""
    events = [line[6:] for line in lines if line.startswith("data: ")]
    if len(events) < 2 or events[-1] != "[DONE]":
        return None
    parsed: dict[str, Any] = orjson.loads(events[-2])
    return parsed


class SoakClient:
    """One client task: a seeded sequence of mixed requests."""

    def __init__(self, index: int, round_: int, url: str, qwen3: Tokenizer, tally: Tally) -> None:
        self.index = index
        self.round = round_
        self.url = url
        self.qwen3 = qwen3
        self.tally = tally
        self.rng = random.Random(1000 * round_ + index)
        self.count = 0

    def tag(self) -> str:
        """A fresh tag for each conversation, so every prompt is new to the cache."""
        self.count += 1
        return f"{self.round}-{self.index:02d}-{self.count:05d}"

    async def run(self, client: httpx.AsyncClient, n: int) -> None:
        kinds = {
            "generate": self.generate,
            "generate_stream": self.generate_stream,
            "chat": self.chat,
            "chat_stream": self.chat_stream,
            "session": self.session,
            "retrieve": self.retrieve,
        }
        weights = [4, 4, 2, 2, 2, 1]
        for _ in range(n):
            kind = self.rng.choices(list(kinds), weights)[0]
            self.tally.sent[kind] += 1
            patience = self.rng.uniform(0.002, 0.03) if self.rng.random() < GIVE_UP else 10.0
            with trio.move_on_after(patience) as scope:
                try:
                    await kinds[kind](client)
                except httpx.TransportError as exc:
                    self.tally.errors[kind, type(exc).__name__] += 1
            if scope.cancelled_caught:
                self.tally.disconnects[kind] += 1

    def failed(self, kind: str, response: httpx.Response) -> bool:
        if response.status_code == 200:
            return False
        self.tally.errors[kind, str(response.status_code)] += 1
        return True

    def sampling(self) -> dict[str, Any]:
        return {"max_new_tokens": self.rng.randint(1, MAX_TOKENS)}

    async def generate(self, client: httpx.AsyncClient) -> None:
        text = prompt(self.tag())
        body = {"text": text, "sampling_params": self.sampling()}
        r = await client.post(self.url + "/generate", json=body)
        if not self.failed("generate", r):
            self.tally.ok["generate"] += 1
            self.tally.exact.append((text, r.json()["output_ids"]))

    async def generate_stream(self, client: httpx.AsyncClient) -> None:
        text = prompt(self.tag())
        body = {"text": text, "sampling_params": self.sampling(), "stream": True}
        async with client.stream("POST", self.url + "/generate", json=body) as r:
            lines = [line async for line in r.aiter_lines()]
        if self.failed("generate_stream", r):
            return
        final = final_event(lines)
        if final is None:
            self.tally.errors["generate_stream", "cut"] += 1
            return
        self.tally.ok["generate_stream"] += 1
        self.tally.exact.append((text, final["output_ids"]))

    def chat_request(self, **extra: Any) -> tuple[str, dict[str, Any]]:
        messages = [{"role": "user", "content": f"Chat {self.tag()}: hello"}]
        rendered = self.qwen3.apply_chat_template(messages, add_generation_prompt=True)
        body = {"messages": messages, "max_tokens": self.rng.randint(1, MAX_TOKENS), **extra}
        return rendered, body

    async def chat(self, client: httpx.AsyncClient) -> None:
        rendered, body = self.chat_request()
        r = await client.post(self.url + "/v1/chat/completions", json=body)
        if not self.failed("chat", r):
            self.tally.ok["chat"] += 1
            meta = r.json()["choices"][0]["meta_info"]
            self.tally.exact.append((rendered, meta["output_ids"]))

    async def chat_stream(self, client: httpx.AsyncClient) -> None:
        _, body = self.chat_request(stream=True)
        async with client.stream("POST", self.url + "/v1/chat/completions", json=body) as r:
            lines = [line async for line in r.aiter_lines()]
        if self.failed("chat_stream", r):
            return
        final = final_event(lines)
        if final is None or "error" in final:
            # the front end reports a failed worker as an error event in its stream
            what = "error event" if final is not None else "cut"
            self.tally.errors["chat_stream", what] += 1
            return
        self.tally.ok["chat_stream"] += 1

    async def session(self, client: httpx.AsyncClient) -> None:
        """A short agent conversation: open a session, two or three turns, delete it."""
        created = await client.post(self.url + "/sessions")
        if self.failed("session", created):
            return
        base = f"{self.url}/sessions/{created.json()['session_id']}"
        try:
            messages: list[dict[str, Any]] = []
            for turn in range(self.rng.randint(2, 3)):
                messages.append({"role": "user", "content": f"Turn {turn} of {self.tag()}"})
                body = {"messages": messages, "max_tokens": self.rng.randint(1, MAX_TOKENS)}
                r = await client.post(base + "/v1/chat/completions", json=body)
                if self.failed("session", r):
                    return
                messages.append(r.json()["choices"][0]["message"])
            self.tally.ok["session"] += 1
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await client.delete(base)

    async def retrieve(self, client: httpx.AsyncClient) -> None:
        text = self.tally.exact[-1][0] if self.tally.exact else prompt(self.tag())
        r = await client.post(self.url + "/retrieve_from_text", json={"text": text})
        if not self.failed("retrieve", r):
            self.tally.ok["retrieve"] += 1


class Chaos:
    """Worker faults, injected while the clients run."""

    def __init__(
        self,
        running: RunningRouter,
        workers: list[SimWorkerHandle],
        spare: SimWorkerHandle,
        tally: Tally,
    ) -> None:
        self.running = running
        self.router: Router = running.router
        self.workers = workers
        self.spare = spare
        self.tally = tally

    def sent(self) -> int:
        return sum(self.tally.sent.values())

    def state(self, url: str) -> str | None:
        worker = self.router.pool.get(url)
        return worker.state.value if worker is not None else None

    async def run(self, client: httpx.AsyncClient, total: int) -> None:
        admin = self.running.url
        # A quarter of the way in: kill a worker, register a new one, remove the dead one.
        await wait_until(lambda: self.sent() >= total // 4, limit=60)
        victim = self.workers.pop(0)
        victim.kill()
        added = await client.post(admin + "/add_worker", params={"url": self.spare.url})
        assert added.status_code == 200, added.text
        self.workers.append(self.spare)
        await wait_until(lambda: self.state(victim.url) == "quarantined")
        removed = await client.post(admin + "/remove_worker", params={"url": victim.url})
        assert removed.status_code == 200, removed.text
        await wait_until(lambda: self.state(victim.url) is None)  # drained, if it had to
        self.tally.faults.append(f"killed {victim.port}, added {self.spare.port}, removed")
        # Half way: the other worker answers 503 for a while.
        await wait_until(lambda: self.sent() >= total // 2, limit=60)
        failing = self.workers[0]
        failing.app.faults.fail_status = 503
        await trio.sleep(0.3)
        failing.app.faults.fail_status = None
        self.tally.faults.append(f"503 from {failing.port} for 0.3 s")


def tasks_by_name(under: str | None = None) -> Counter[str]:
    """Names of the live tasks (only those under the first task named ``under``, if given)."""
    names: Counter[str] = Counter()
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if under is not None and task.name == under:
            names.clear()
            stack = [task]
            under = None
            continue
        names[task.name] += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return names


def request_tasks() -> list[str]:
    """Tasks serving one request, in the router or a worker."""
    return [name for name in tasks_by_name() if any(m in name for m in REQUEST_TASKS)]


def connection_tasks() -> int:
    return sum(n for name, n in tasks_by_name().items() if any(m in name for m in CONNECTION_TASKS))


def router_tasks() -> Counter[str]:
    """The router's tasks, except those serving one request, one connection or one probe."""
    return Counter(
        {
            name: n
            for name, n in tasks_by_name(under="trio_router.server.serve").items()
            if not any(m in name for m in REQUEST_TASKS + CONNECTION_TASKS + PROBE_TASKS)
        }
    )


async def inexact_trajectories(
    client: httpx.AsyncClient, url: str, qwen3: Tokenizer, exact: list[tuple[str, list[int]]]
) -> list[str]:
    """Retrieve every completed trajectory; describe those that are not token-exact."""
    wrong: list[str] = []

    async def check(items: list[tuple[str, list[int]]]) -> None:
        for text, output_ids in items:
            visible = qwen3.decode(output_ids)
            r = await client.post(url + "/retrieve_from_text", json={"text": text + visible})
            got = r.json()
            prompt_ids = qwen3.encode(text)
            expected = (prompt_ids + output_ids, [0] * len(prompt_ids) + [1] * len(output_ids))
            if (got["tokens"], got["loss_mask"]) != expected:
                wrong.append(f"{text!r} + {output_ids}: got {got['tokens']}")

    async with trio.open_nursery() as nursery:
        for i in range(CLIENTS):
            nursery.start_soon(check, exact[i::CLIENTS])
    return wrong


async def run_round(
    round_: int,
    running: RunningRouter,
    workers: list[SimWorkerHandle],
    spare: SimWorkerHandle,
    qwen3: Tokenizer,
) -> Tally:
    tally = Tally()
    limits = httpx.Limits(max_connections=CLIENTS * 2)

    async def count(request: httpx.Request) -> None:
        tally.http += 1

    async with (
        httpx.AsyncClient(timeout=10, limits=limits, event_hooks={"request": [count]}) as client,
        trio.open_nursery() as clients,
    ):
        chaos = Chaos(running, workers, spare, tally)
        clients.start_soon(chaos.run, client, CLIENTS * REQUESTS_PER_CLIENT)
        for i in range(CLIENTS):
            soak = SoakClient(i, round_, running.url, qwen3, tally)
            clients.start_soon(soak.run, client, REQUESTS_PER_CLIENT)
    router = running.router
    await wait_until(lambda: router.pool.statistics().total_inflight == 0)
    await wait_until(lambda: request_tasks() == [])
    return tally


async def test_soak(nursery, qwen3):
    def worker(seed: int) -> Any:
        return start_worker(nursery, tokenizer=qwen3, seed=seed, latency_per_token_ms=LATENCY_MS)

    workers = [await worker(0), await worker(1)]
    # the replacements are started (not registered) up front, so that their start-up does not
    # count in the memory figures
    spares = [await worker(2), await worker(3)]
    running = await start_router(
        nursery,
        tokenizer=qwen3,
        worker_urls=tuple(w.url for w in workers),
        radix_tree_max_size=5_000_000,
        health_check_interval=0.1,
        health_check_failure_threshold=2,
    )
    router = running.router
    cache = router.token_cache
    assert cache is not None
    figures: list[str] = []
    tallies: list[Tally] = []
    long_lived: list[Counter[str]] = []
    with trio.fail_after(120):  # a hang guard, not a performance bound
        for round_ in range(ROUNDS):
            started = trio.current_time()
            if round_ == ROUNDS - 1:
                # Trace the last round only: what it allocated and still holds at its end is
                # an upper bound of its growth over the round before (traced memory after
                # round 2 minus after round 1, less what round 2 freed of round 1's), and
                # tracing slows everything about 3x.
                gc.collect()
                tracemalloc.start()
            try:
                tally = await run_round(round_, running, workers, spares[round_], qwen3)
                gc.collect()
                held = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
            tallies.append(tally)
            long_lived.append(router_tasks())
            assert router.pool.statistics().total_inflight == 0
            assert all(c.is_idle() or c.is_closed() for c in router.upstream.pool.connections)
            async with httpx.AsyncClient(timeout=10) as client:
                wrong = await inexact_trajectories(client, running.url, qwen3, tally.exact)
            assert wrong == [], wrong[:3]
            figures.append(
                f"round {round_}: {trio.current_time() - started:.1f} s, {tally.summary()}\n"
                f"  memory held from this round {held / 2**20:.1f} MiB (traced in the last)\n"
                f"  tasks {sum(tasks_by_name().values())}, of which per connection "
                f"{connection_tasks()}; sessions left "
                f"{len(router.sessions.table)}"  # type: ignore[union-attr]
            )
    print("\n" + "\n".join(figures))
    assert held < MEMORY_SLACK, figures[-1]
    assert long_lived[0] == long_lived[-1]
    assert cache.counters.alignment_failures == 0
    for tally in tallies:
        # 5xx from the faults, cut streams from the kill: fine; a router bug (500): not
        assert all(what != "500" for _, what in tally.errors), tally.summary()
        assert sum(tally.ok.values()) > 0.7 * sum(tally.sent.values()), tally.summary()
