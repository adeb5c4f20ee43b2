"""The examples in the docs say what the router does: their commands work, their output is
what the router answers (the simulated worker is deterministic), the advice they give is
still needed."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from trio_router.cli import main

from .test_token_cache import cached_router

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_curl_examples_name_their_method_before_their_headers(doc: Path):
    # `curl -X -H '...' POST url` sends the method "-H" to the host "content-type: ..."
    assert not re.search(r"curl [^\n]*-X -H", doc.read_text())


def documented_abort_answer() -> dict[str, Any]:
    """The answer docs/token-cache.md shows for its abort-stitching example."""
    text = (ROOT / "docs" / "token-cache.md").read_text()
    section = text[text.index("abort_after_tokens") :]
    answer: dict[str, Any] = orjson.loads(section.split("```json\n", 1)[1].split("\n```", 1)[0])
    return answer


async def test_the_abort_stitching_example_matches_a_run(nursery, client, qwen3):
    documented = documented_abort_answer()
    worker, running = await cached_router(
        nursery, qwen3, radix_tree_max_size=100_000, abort_retries=2, abort_retry_backoff=0.1
    )
    worker.app.faults.abort_after_tokens = 3  # as the example's /sim/faults call
    prompt = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    body = {"text": prompt, "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}}
    with trio.fail_after(20):
        answer = (await client.post(running.url + "/generate", json=body)).json()
    assert answer["output_ids"] == documented["output_ids"]
    assert answer["text"] == documented["text"]
    for key in (
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "output_token_weight_versions",
        "continued_aborts",
    ):
        assert answer["meta_info"][key] == documented["meta_info"][key], key


def test_an_hf_checkpoint_without_the_token_cache_is_said_to_be_unused(caplog):
    with caplog.at_level(logging.WARNING, logger="trio_router.router"):
        # an address not of this host: the router stops once past its start-up checks
        assert main(["serve", "--port", "0", "--host", "192.0.2.1", "--hf-checkpoint", "/x"]) == 2
    assert [r.getMessage() for r in caplog.records if r.name == "trio_router.router"] == [
        "--hf-checkpoint /x is not used: the token cache is off (turn it on with "
        "--radix-tree-max-size)"
    ]
