"""Fresh prompt text reaches the worker tokenized exactly as the tokenizer would (issue 11).

The token cache reuses cached ids only where that cannot change the split: after ids the
engine generated, at the end of an earlier prompt, next to an added token, or at a cut
``text_split`` proves safe. An unrelated earlier prompt must never decide how a new one
is split.
"""

from __future__ import annotations

import unicodedata

import trio
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from trio_router.token_cache import CacheSettings, Pending, TokenCache
from trio_router.tokenizer import Tokenizer

FRAGMENTS = [
    "The", "The weather", " is", " nice", "Therefore", ",", " what", " is 15%", " of 80?",
    "Zebra", " crossing", " wor", "ld", " world", " peace", "数据", "中文", "，", "。", "😀",
    "def f(x):\n", "    return x", "\n", "\n\n", " ", "  ", "it's", "123", "4", "e\u0301",
    "<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<think>", "ab", "abc",
    # other template families, as plain text to this tokenizer
    "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>", "[INST] ", " [/INST]",
    "<start_of_turn>user\n", "<end_of_turn>\n", "### Instruction:\n", "USER: ", "ASSISTANT:",
]  # fmt: skip
texts = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=12).map("".join)
#: what the engine may generate here: anything but special tokens, which SGLang's text
#: leaves out (a documented case of its own: a hidden tail, tested elsewhere)
SPOKEN = [f for f in FRAGMENTS if "<" not in f]


def record_prompt_only(cache: TokenCache, pending: Pending) -> None:
    """What a /generate with nothing generated leaves in the cache: the prompt's ids."""
    cache._record_output(pending, [], [], [], "", None)


async def sent_ids(cache: TokenCache, text: str) -> list[int]:
    pending = await cache.prepare_text(text, "")
    cache.finish(pending)
    return pending.prompt.ids


def test_the_issue_examples_are_sent_canonically(qwen3: Tokenizer) -> None:
    async def main() -> None:
        cache = TokenCache(qwen3, CacheSettings(max_tokens=100_000))
        for earlier, later in [
            ("The weather is nice today", "Therefore, what is 15% of 80?"),
            ("Zebra crossing wor", "Zebra crossing world peace"),
        ]:
            record_prompt_only(cache, await cache.prepare_text(earlier, ""))
            assert await sent_ids(cache, later) == qwen3.encode(later)

    trio.run(main)


@given(prompts=st.lists(texts, min_size=1, max_size=8))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_prompt_nobody_generated_is_sent_as_the_tokenizer_splits_it(
    qwen3: Tokenizer, prompts: list[str]
) -> None:
    async def main() -> None:
        cache = TokenCache(qwen3, CacheSettings(max_tokens=100_000))
        for text in prompts:
            pending = await cache.prepare_text(text, "")
            assert pending.prompt.ids == qwen3.encode(text), text
            record_prompt_only(cache, pending)

    trio.run(main)


@given(turns=st.lists(st.tuples(texts, st.lists(st.sampled_from(SPOKEN), max_size=5)), max_size=5))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_conversation_reuses_the_engines_ids_and_splits_only_fresh_text(
    qwen3: Tokenizer, turns: list[tuple[str, list[str]]]
) -> None:
    """Each turn: the whole conversation so far plus fresh text. The ids sent are the
    conversation's cached ids (the engine's own, even when it split words oddly), then
    exactly the tokenizer's ids of the fresh text."""

    async def main() -> None:
        cache = TokenCache(qwen3, CacheSettings(max_tokens=100_000))
        so_far = ""
        so_far_ids: list[int] = []
        for fresh, answer_pieces in turns:
            # text NFC changes is not recorded at all (its ids spell other bytes): a known
            # limit, see docs/token-cache.md; nothing to reuse then
            assume(unicodedata.is_normalized("NFC", so_far + fresh))
            pending = await cache.prepare_text(so_far + fresh, "")
            sent = pending.prompt.ids
            assert sent[: len(so_far_ids)] == so_far_ids
            assert sent[len(so_far_ids) :] == qwen3.encode(fresh), (so_far, fresh)
            # the engine answers piece by piece: ids no tokenizer would produce for the text
            generated = [i for piece in answer_pieces for i in qwen3.encode(piece)]
            answer = qwen3.decode(generated)
            if not generated or qwen3.encode(answer) == generated or "\ufffd" in answer:
                cache.finish(pending)
                break  # keep to answers that are a real test of reuse, and spell their text
            cache._record_output(
                pending, generated, [-1.0] * len(generated), ["v"] * len(generated), answer, None
            )
            cache.finish(pending)
            so_far += fresh + answer
            so_far_ids = sent + generated

    trio.run(main)
