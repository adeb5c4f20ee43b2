"""How long does one chat request keep ``/health`` from being answered? (issue 16)

Starts one simulated worker (the shipped Qwen3 tokenizer) and a router with the token cache
on (so the OpenAI and session front ends are live), as separate processes on free loopback
ports. A prober sends ``GET /health`` on a keep-alive connection every 10 ms; meanwhile one
client sends, in turn:

* **template** -- ``chat_template_kwargs: {"chat_template": ...}``, a 120-byte Jinja
  template of two nested loops of ``--loops`` iterations each (``--loops`` 10000 is the
  1e8-iteration attack of issue 16). Before the fix the router rendered it on its event loop;
  now it answers 400 at once.
* **size** -- ``{{ 'a' * N }}`` with N = ``--size`` (10,000,000): a prompt of N characters
  from 120 bytes before; 400 now.
* **heavy** -- an allowed but heavy chat: ``--messages`` messages (default 10,000, the
  ``--max-chat-messages`` default) holding ``--chars`` characters in all, rendered by the
  router's own template (off the event loop now). With ``--router-args --max-prompt-chars
  100000`` the rendered prompt is refused (413) right after rendering, which measures the
  template alone; without it the prompt is tokenized, generated from and recorded, and the
  figure includes what the token cache does on the event loop with a long prompt.

For each it prints the answer's status, how long the request took, and the longest time a
``/health`` request stayed unanswered while it ran (the figure issue 16 asks to keep below
100 ms). ``name=value`` lines end the output (``--json PATH`` writes them too).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import trio
from _harness import (
    Children,
    HttpConn,
    answers_health,
    encode_request,
    free_ports,
    json_body,
    print_figures,
    router_sees,
    run_bench,
    wait_until,
    write_json,
)

STARTUP_TIMEOUT = 60.0
PROBE_EVERY = 0.01


def attacks(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    user = {"role": "user", "content": "hi"}
    loops = (
        f"{{% for i in range({args.loops}) %}}{{% for j in range({args.loops}) %}}"
        "{% endfor %}{% endfor %}x"
    )
    per_message = args.chars // args.messages
    heavy = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "w" * per_message}
        for i in range(args.messages - 1)
    ] + [user]
    return {
        "template": {
            "messages": [user],
            "max_tokens": 1,
            "chat_template_kwargs": {"chat_template": loops},
        },
        "size": {
            "messages": [user],
            "max_tokens": 1,
            "chat_template_kwargs": {"chat_template": f"{{{{ 'a' * {args.size} }}}}"},
        },
        "heavy": {"messages": heavy, "max_tokens": 1},
    }


async def probe_health(port: int, gaps: list[float], stop: trio.Event) -> None:
    """GET /health back to back (10 ms apart); the latency of each request into ``gaps``."""
    conn = HttpConn(port)
    request = encode_request("GET", port, "/health")
    try:
        while not stop.is_set():
            start = time.perf_counter()
            status, _ = await conn.request(request)
            gaps.append(time.perf_counter() - start)
            if status != 200:
                raise RuntimeError(f"/health answered {status}")
            await trio.sleep(PROBE_EVERY)
    finally:
        await conn.aclose()


async def one_attack(port: int, body: dict[str, object]) -> tuple[int, float, float]:
    """(status, seconds the attack took, longest /health latency meanwhile)."""
    gaps: list[float] = []
    stop = trio.Event()
    conn = HttpConn(port)
    request = encode_request("POST", port, "/v1/chat/completions", json_body(body))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe_health, port, gaps, stop)
        await trio.sleep(0.2)  # the prober is running
        start = time.perf_counter()
        status, _ = await conn.request(request)
        took = time.perf_counter() - start
        await trio.sleep(0.1)
        stop.set()
    await conn.aclose()
    return status, took, max(gaps)


async def run(args: argparse.Namespace, children: Children) -> int:
    worker_port, router_port = free_ports(2)
    worker = children.start(
        "worker", [sys.executable, "-m", "trio_router", "worker", "--port", str(worker_port)]
    )
    await wait_until(
        "worker", partial(answers_health, worker_port), children=children, within=STARTUP_TIMEOUT
    )
    argv = [sys.executable, "-m", "trio_router", "serve", "--port", str(router_port)]
    argv += ["--worker-urls", f"http://127.0.0.1:{worker_port}", "--log-level", "warning"]
    argv += ["--radix-tree-max-size", "1000000", *args.router_args]
    children.start("router", argv)
    await wait_until(
        "router", partial(router_sees, router_port, 1), children=children, within=STARTUP_TIMEOUT
    )
    del worker
    figures: dict[str, object] = {}
    for name, body in attacks(args).items():
        if name not in args.only:
            continue
        status, took, worst = await one_attack(router_port, body)
        print(
            f"{name:>8}: status {status}, took {took * 1000:.0f} ms, "
            f"/health unanswered up to {worst * 1000:.1f} ms"
        )
        figures[f"{name}_status"] = status
        figures[f"{name}_request_ms"] = took * 1000
        figures[f"{name}_health_max_ms"] = worst * 1000
    print_figures(figures, 1)
    write_json(args.json, figures, args)
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loops", type=int, default=3000, help="iterations of each loop")
    parser.add_argument("--messages", type=int, default=10_000, help="messages of the heavy chat")
    parser.add_argument("--chars", type=int, default=50_000, help="their characters in all")
    parser.add_argument(
        "--size", type=int, default=10_000_000, help="characters the size attack asks for"
    )
    parser.add_argument(
        "--only", nargs="+", default=["template", "size", "heavy"], help="attacks to send"
    )
    parser.add_argument("--router-args", nargs=argparse.REMAINDER, default=[])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    children = Children()
    return run_bench("template_attack", run, args, children, children=children, timeout=600)


if __name__ == "__main__":
    sys.exit(main())
