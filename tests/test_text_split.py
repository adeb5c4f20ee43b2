"""Long texts are tokenized in pieces that give exactly the tokens of the whole."""

from __future__ import annotations

import json
from array import array

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_router.errors import PayloadTooLarge
from trio_router.radix import Trajectory
from trio_router.text_split import MAX_RUN, can_split, chunks
from trio_router.token_cache import retrieval_json
from trio_router.tokenizer import Tokenizer

FRAGMENTS = [
    "the", "The", "quick", " ", "  ", "\n", "\n\n", " \n", "\t", "it's", "I'LL", "don't",
    "123", "4", "3.14", "数据", "中文字符", "😀", "👩‍💻", "e\u0301", "\u0301", "café",
    "<|im_end|>", "<|im_start|>", "<think>", "def f(x):", "    return x", "!!", "...", "?",
    "Zebra", "wor", "ld", "%", "’s", "ﬁ", "\r\n", "'", "a", "b",
]  # fmt: skip

texts = st.lists(st.sampled_from(FRAGMENTS), max_size=60).map("".join)


@given(text=texts, size=st.integers(min_value=1, max_value=12))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_pieces_tokenize_like_the_whole(qwen3: Tokenizer, text: str, size: int) -> None:
    pieces = chunks(text, size, guard=qwen3._added_texts)
    assert "".join(pieces) == text
    ids = [i for piece in pieces for i in qwen3.encode(piece)]
    assert ids == qwen3.encode(text)
    reference = qwen3.backend.encode_batch([text], add_special_tokens=False)[0].ids
    assert ids == reference


def test_a_text_is_cut_only_where_a_letter_or_digit_run_ends() -> None:
    assert chunks("abc def ghi", 2) == ["abc", " def", " ghi"]
    assert chunks("a, b 1 c", 1) == ["a", ", b", " 1", " c"]
    assert chunks("数据，数据。", 1) == ["数据", "，数据", "。"]
    assert chunks("xe\u0301", 1) == ["xe\u0301"]  # never before a combining mark
    assert chunks("😀😀😀", 1) == ["😀😀😀"]  # no safe cut: stays whole


def test_a_text_is_never_cut_inside_an_added_token() -> None:
    assert chunks("ab<|im_end|>cd", 1, guard=["<|im_end|>"]) == ["ab", "<|im_end|>cd"]


def test_a_run_too_long_to_cut_is_refused() -> None:
    with pytest.raises(PayloadTooLarge, match="no word boundary"):
        chunks("😀" * (MAX_RUN + 1), 1000)


def test_long_texts_are_encoded_in_pieces_with_the_same_ids(qwen3: Tokenizer) -> None:
    text = "The quick brown fox, 42 times. 数据 😀\n" * 5000  # ~190 k characters: 3 pieces
    assert len(chunks(text)) > 1
    whole = qwen3.backend.encode_batch([text], add_special_tokens=False)[0].ids
    assert qwen3.encode(text) == whole


def test_the_shipped_tokenizer_may_be_split(qwen3: Tokenizer) -> None:
    assert qwen3.splittable


@pytest.mark.parametrize(
    "change",
    [
        lambda spec: spec.update(normalizer={"type": "NFKC"}),
        lambda spec: spec["added_tokens"].append({"content": "a b", "lstrip": False}),
        lambda spec: spec["added_tokens"].append({"content": "<x>", "lstrip": True}),
        lambda spec: spec["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\S+"),
        lambda spec: spec.update(pre_tokenizer={"type": "Metaspace"}),
    ],
)
def test_unknown_tokenizers_are_never_split(qwen3: Tokenizer, change: object) -> None:
    spec = json.loads(qwen3.backend.to_str())
    assert callable(change)
    change(spec)
    assert not can_split(json.dumps(spec))


@given(
    cached=st.lists(
        st.tuples(
            st.integers(0, 151_000),
            st.floats(-30, 0),
            st.sampled_from([0, 1]),
            st.sampled_from([None, "v1", "v2"]),
        ),
        max_size=20,
    ),
    fresh=st.lists(st.integers(0, 151_000), max_size=40),
    text=st.text(max_size=20),
)
@settings(max_examples=200)
def test_the_retrieval_document_is_the_json_of_cached_then_fresh_tokens(
    cached: list[tuple[int, float, int, str | None]], fresh: list[int], text: str
) -> None:
    ids = [c[0] for c in cached]
    logps = [c[1] for c in cached]
    mask = [c[2] for c in cached]
    versions = [c[3] for c in cached]
    pieces = retrieval_json(
        text, Trajectory(ids, logps, mask, versions), array("i", fresh), piece_tokens=7
    )
    document = orjson.loads(b"".join(pieces))
    n = len(fresh)
    assert document == {
        "tokens": ids + fresh,
        "response": text,
        "loss_mask": mask + [0] * n,
        "rollout_logp": logps + [0.0] * n,
        "weight_versions": versions + [None] * n,
        "token_length": len(ids) + n,
        "loss_mask_length": len(ids) + n,
        "cached_tokens": len(ids),
        "fresh_tokens": n,
    }
