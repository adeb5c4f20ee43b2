"""How much memory does one large text cost the router, at its peak and after the answer?

For each kind of text (``english``: words and punctuation, ~4 characters per token;
``cjk``: Chinese characters, ~1.5 bytes per token; ``dense``: emoji, symbols and rare letters,
about one token per byte, the worst case the router accepts) and each size (``--sizes`` MiB),
a fresh ``trio-router serve`` with the token cache on gets one ``POST /retrieve_from_text`` of that
text (nothing cached: every byte is tokenized). Read from ``/proc/<pid>/status`` before and
after (the peak reset just before, so start-up does not count): the peak resident set
(``VmHWM``) growth per MiB of input, and what is still resident
a second after the answer (``VmRSS`` growth). Then a text over ``--max-text-bytes``, and one
with a run of symbols too long to cut into pieces, are sent to show that both are refused
(413) without being tokenized.

Goal (issue 16): peak growth <= 20x the input, nothing of it kept after the answer. A big
text has a fixed cost too (the tokenizer's word cache and thread, ~20-30 MB, bounded), so the
goal is checked on the growth per extra MiB between the two largest sizes.
The last lines are ``name=value`` pairs (``--json PATH`` writes them too).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import httpx
import trio
from _harness import (
    BenchError,
    Children,
    answers_health,
    free_ports,
    print_figures,
    run_bench,
    table,
    wait_until,
    write_json,
)

MiB = 1024 * 1024
KINDS = ("english", "cjk", "dense")
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "42", "say:", "hi,"]


def make_text(kind: str, size: int, seed: int = 0) -> str:
    """About ``size`` bytes of UTF-8 text of ``kind``."""
    rng = random.Random(seed)
    if kind == "english":
        words: list[str] = []
        total = 0
        while total < size:
            word = rng.choice(WORDS)
            words.append(word)
            total += len(word) + 1
        return " ".join(words)
    if kind == "cjk":
        # Chinese characters with a full-width comma or stop every few words
        return "".join(
            chr(rng.randrange(0x4E00, 0x9FA0)) if rng.random() > 0.06 else rng.choice("，。")
            for _ in range(size // 3)
        )
    # rare letters, symbols and emoji mixed: close to one token per byte
    pool = [
        chr(c)
        for c in (
            *range(0x1F300, 0x1F6FF),
            *range(0x2200, 0x22FF),
            *range(0x0400, 0x04FF),
            *range(0x3040, 0x30FF),
        )
    ]
    return "".join(rng.choice(pool) for _ in range(size // 3))


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of ``pid``, in KiB."""
    values = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
    return values


def reset_peak(pid: int) -> None:
    """Start ``VmHWM`` again from the current resident set (Linux ``clear_refs``)."""
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")


async def measure_one(
    children: Children, kind: str, size_mib: float, limit: int
) -> dict[str, float]:
    [port] = free_ports(1)
    child = children.start(
        f"router-{kind}-{size_mib:g}",
        [
            sys.executable, "-m", "trio_router", "serve", "--port", str(port),
            "--radix-tree-max-size", "1000000", "--max-text-bytes", str(limit),
            "--log-level", "warning",
        ],
    )  # fmt: skip
    await wait_until("the router", lambda: answers_health(port), children=children, within=60)
    text = make_text(kind, int(size_mib * MiB))
    payload = len(text.encode())
    async with httpx.AsyncClient(timeout=600) as client:
        # warm up on 256 KiB of the same kind: the tokenizer's word cache and thread pool
        # are a fixed cost, not growth with the input
        warm = make_text(kind, 256 * 1024, seed=1)
        await client.post(f"http://127.0.0.1:{port}/retrieve_from_text", json={"text": warm})
        reset_peak(child.pid)
        before = memory_kib(child.pid)
        started = time.perf_counter()
        reply = await client.post(
            f"http://127.0.0.1:{port}/retrieve_from_text", json={"text": text}
        )
        seconds = time.perf_counter() - started
        if reply.status_code != 200:
            raise BenchError(f"{kind} {size_mib} MiB: {reply.status_code} {reply.text[:200]}")
        tokens = reply.json()["token_length"]
        del reply
        await trio.sleep(1.0)
        after = memory_kib(child.pid)
    children.stop([child])
    peak = (after["VmHWM"] - before["VmRSS"]) / 1024
    kept = (after["VmRSS"] - before["VmRSS"]) / 1024
    return {
        "input_mib": payload / MiB,
        "tokens": tokens,
        "peak_mib": peak,
        "peak_per_input_mib": peak / (payload / MiB),
        "kept_mib": kept,
        "seconds": seconds,
    }


async def refused_statuses(children: Children, limit: int) -> tuple[int, int]:
    [port] = free_ports(1)
    child = children.start(
        "router-limit",
        [
            sys.executable, "-m", "trio_router", "serve", "--port", str(port),
            "--radix-tree-max-size", "1000000", "--max-text-bytes", str(limit),
        ],
    )  # fmt: skip
    await wait_until("the router", lambda: answers_health(port), children=children, within=60)
    url = f"http://127.0.0.1:{port}/retrieve_from_text"
    async with httpx.AsyncClient(timeout=60) as client:
        too_long = await client.post(url, json={"text": "a " * (limit // 2 + 1)})
        uncuttable = await client.post(url, json={"text": "😀" * (limit // 8)})
    children.stop([child])
    return too_long.status_code, uncuttable.status_code


async def run(args: argparse.Namespace, children: Children) -> int:
    figures: dict[str, object] = {}
    rows = []
    worst = 0.0
    marginal_worst = 0.0
    limit = int(args.max_text_bytes)
    for kind in args.kinds:
        peaks: list[tuple[float, float]] = []
        for size in args.sizes:
            result = await measure_one(children, kind, size, limit)
            peaks.append((result["input_mib"], result["peak_mib"]))
            rows.append(
                [
                    kind,
                    f"{result['input_mib']:.2f}",
                    f"{result['tokens']:.0f}",
                    f"{result['peak_mib']:.0f}",
                    f"{result['peak_per_input_mib']:.1f}",
                    f"{result['kept_mib']:.1f}",
                    f"{result['seconds']:.1f}",
                ]
            )
            key = f"{kind}_{size:g}mib"
            figures[f"{key}_peak_per_input_mib"] = result["peak_per_input_mib"]
            figures[f"{key}_kept_mib"] = result["kept_mib"]
            worst = max(worst, result["peak_per_input_mib"])
        if len(peaks) > 1:  # growth per extra MiB: the fixed cost of any big text left out
            (small_in, small_peak), (large_in, large_peak) = peaks[-2], peaks[-1]
            marginal = (large_peak - small_peak) / (large_in - small_in)
            figures[f"{kind}_marginal_peak_per_input_mib"] = marginal
            marginal_worst = max(marginal_worst, marginal)
    headers = ["text", "MiB in", "tokens", "peak +MiB", "peak/MiB in", "kept MiB", "s"]
    print(table(headers, rows))
    figures["worst_peak_per_input_mib"] = worst
    too_long, uncuttable = await refused_statuses(children, limit)
    figures["over_limit_status"] = too_long
    figures["uncuttable_run_status"] = uncuttable
    figures["worst_marginal_peak_per_input_mib"] = marginal_worst
    figures["goal_met"] = int(marginal_worst <= 20.0)
    print_figures(figures, 2)
    write_json(args.json, figures, args)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--max-text-bytes", type=int, default=8 * MiB)
    parser.add_argument("--quick", action="store_true", help="1 MiB of each kind only")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.sizes = [1.0]
    children = Children()
    return run_bench("memory", run, args, children, children=children, timeout=3600)


if __name__ == "__main__":
    raise SystemExit(main())
