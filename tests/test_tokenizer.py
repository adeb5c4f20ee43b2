"""The router's tokenizer: packaged Qwen3 data, exact token bytes, async calls, chat template."""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_router.errors import ConfigError
from trio_router.sim import SimWorker
from trio_router.sim.tokenizer import TokenizerLike
from trio_router.tokenizer import (
    DEFAULT_TOKENIZER_DIR,
    INLINE_MAX_CHARS,
    INLINE_MAX_IDS,
    Tokenizer,
    load_tokenizer,
)

ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645
TOOL_CALL, THINK, END_THINK = 151657, 151667, 151668
MELT = [9284, 104, 254]  # "🫠" (F0 9F AB A0) as three byte-level tokens


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    t = load_tokenizer()
    t.token_bytes(0)  # build the table once, outside hypothesis' deadline
    return t


# ---------------------------------------------------------------- packaged files


def test_shipped_files_match_sha256sums() -> None:
    lines = (DEFAULT_TOKENIZER_DIR / "SHA256SUMS").read_text(encoding="utf-8").splitlines()
    sums = {name: digest for digest, name in (line.split("  ", 1) for line in lines)}
    assert set(sums) == {"tokenizer.json", "tokenizer_config.json"}
    for name, digest in sums.items():
        assert hashlib.sha256((DEFAULT_TOKENIZER_DIR / name).read_bytes()).hexdigest() == digest
    assert (DEFAULT_TOKENIZER_DIR / "NOTICE").is_file()


def test_loads_offline_from_package(tok: Tokenizer) -> None:
    assert Path(tok.name_or_path) == DEFAULT_TOKENIZER_DIR
    assert type(tok.hf).__name__ == "Qwen2Tokenizer"
    assert (tok.eos_token_id, tok.vocab_size) == (IM_END, 151669)
    assert isinstance(tok, TokenizerLike)
    assert tok.encode("<|im_end|>") == [IM_END]
    assert tok.encode("") == []


def test_chat_template(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    text = tok.apply_chat_template(messages)
    assert text == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.encode(text) == [
        *[151644, 8948, 198, 2610, 525, 10950, 13, 151645, 198],
        *[151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30, 151645, 198],
        *[151644, 77091, 198],
    ]
    no_think = tok.apply_chat_template(messages, enable_thinking=False)
    assert no_think == text + "<think>\n\n</think>\n\n"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    assert "<tools>" in tok.apply_chat_template(messages, tools=tools)


# ---------------------------------------------------------------- retokenization (why ids are kept)


@pytest.mark.parametrize(
    ("prompt", "response", "separate", "joint"),
    [
        ("Answer: ", "yes", [16141, 25, 220, 9693], [16141, 25, 9834]),
        (
            "<|im_start|>assistant\n",
            "\nHello",
            [151644, 77091, 198, 198, 9707],
            [151644, 77091, 271, 9707],
        ),
        (
            "cafe",
            "\u0301 au lait",
            [924, 1859, 53839, 7906, 1187, 275],
            [924, 58858, 7906, 1187, 275],
        ),
    ],
)
def test_concatenation_changes_tokens(
    tok: Tokenizer, prompt: str, response: str, separate: list[int], joint: list[int]
) -> None:
    assert tok.encode(prompt) + tok.encode(response) == separate
    assert tok.encode(prompt + response) == joint


def test_concatenation_merges_across_the_boundary(tok: Tokenizer) -> None:
    prompt, response = "The capital of France is Par", "is."
    assert (tok.encode(prompt) + tok.encode(response))[-4:] == [374, 4270, 285, 13]
    assert tok.encode(prompt + response)[-3:] == [374, 12095, 13]


def test_nfc_changes_the_text(tok: Tokenizer) -> None:
    text = "cafe\u0301 au lait"
    assert tok.decode(tok.encode(text)) == "café au lait" != text


def test_sampled_ids_are_not_canonical(tok: Tokenizer) -> None:
    assert tok.decode([32713, 385]) == "Hello"
    assert tok.encode("Hello") == [9707]
    assert tok.encode("🫠") == MELT


def test_emoji_cut_mid_character(tok: Tokenizer) -> None:
    ids = [562, 220, 9284, 104]
    assert tok.decode(ids) == "ok \ufffd"
    assert [tok.token_bytes(t) for t in ids] == [b"ok", b" ", b"\xf0\x9f", b"\xab"]
    assert tok.token_bytes(254) == b"\xa0"
    assert b"".join(tok.token_bytes(t) for t in MELT).decode() == "🫠"
    assert tok.encode("ok \ufffd") == [562, 29333]  # lossy: the ids cannot come back


# ---------------------------------------------------------------- token bytes and specials


def joined(tok: Tokenizer, ids: list[int]) -> str:
    return b"".join(tok.token_bytes(t) for t in ids).decode("utf-8", "replace")


PIECES = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>"]
TEXTS = st.lists(
    st.one_of(
        st.text(max_size=24),
        st.sampled_from([*PIECES, "🫠", "e\u0301", "  ", "\n\n", " Hello", "中文", "\r\n"]),
    ),
    max_size=8,
).map("".join)
IDS = st.lists(
    st.one_of(st.integers(0, 151668), st.sampled_from([*MELT, IM_START, IM_END, THINK, ENDOFTEXT])),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ids=IDS)
def test_token_bytes_match_decode_of_random_ids(tok: Tokenizer, ids: list[int]) -> None:
    assert joined(tok, ids) == tok.decode(ids, skip_special_tokens=False)


@settings(max_examples=300, deadline=None)
@given(text=TEXTS)
def test_token_bytes_match_decode_of_encodings(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    decoded = tok.decode(ids, skip_special_tokens=False)
    assert joined(tok, ids) == decoded == unicodedata.normalize("NFC", text)


@settings(max_examples=100, deadline=None)
@given(text=TEXTS, ids=IDS)
def test_agrees_with_huggingface(tok: Tokenizer, text: str, ids: list[int]) -> None:
    assert tok.encode(text) == tok.hf.encode(text, add_special_tokens=False)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == tok.hf.decode(
            ids, skip_special_tokens=skip
        )


def test_is_special(tok: Tokenizer) -> None:
    assert all(tok.is_special(i) for i in (ENDOFTEXT, IM_START, IM_END, 151656))
    assert not any(tok.is_special(i) for i in (TOOL_CALL, THINK, END_THINK, 9707, 0))
    assert tok.decode([THINK, 9707, IM_END]) == "<think>Hello"
    assert tok.decode([THINK, 9707, IM_END], skip_special_tokens=False) == "<think>Hello<|im_end|>"


def test_out_of_range_ids(tok: Tokenizer) -> None:
    assert tok.decode([151669, 151935, 9707]) == "Hello"  # padded embedding rows: no text
    assert tok.token_bytes(151935) == b""
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="out of range"):
        tok.token_bytes(-1)


# ---------------------------------------------------------------- async


async def test_aencode_adecode_match_sync(tok: Tokenizer) -> None:
    short, long = "Answer: yes", "The quick brown fox 🫠 jumps. " * 40
    assert len(short) < INLINE_MAX_CHARS <= len(long)
    with trio.fail_after(10):
        assert await tok.aencode(short) == tok.encode(short)
        ids = await tok.aencode(long)
        assert ids == tok.encode(long)
        assert len(ids) >= INLINE_MAX_IDS
        assert await tok.adecode(ids) == tok.decode(ids) == long
        assert await tok.adecode([IM_END, 9707], skip_special_tokens=False) == "<|im_end|>Hello"


async def ticks_during(coro_fn: Any) -> int:
    """How often a concurrent task ran while ``coro_fn()`` was awaited."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await coro_fn()
        seen = ticks
        nursery.cancel_scope.cancel()
    return seen


async def test_aencode_runs_off_the_trio_thread(tok: Tokenizer) -> None:
    long = "All work and no play makes Jack a dull boy. " * 1000
    with trio.fail_after(10):
        assert await ticks_during(lambda: tok.aencode(long)) > 0
        assert await ticks_during(lambda: tok.adecode(tok.encode(long))) > 0
        assert await ticks_during(lambda: tok.aencode("short")) == 0  # inline


def test_limiter_is_configurable(tok: Tokenizer) -> None:
    assert tok.limiter.total_tokens == 2
    limiter = trio.CapacityLimiter(1)
    assert Tokenizer(tok.hf, limiter=limiter).limiter is limiter
    assert Tokenizer(tok.hf, limiter=3).limiter.total_tokens == 3


# ---------------------------------------------------------------- loading errors


def test_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^cannot load tokenizer from .*nope: not a directory$"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"no tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_corrupt_directory_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"broken\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot load tokenizer from") as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- simulated worker


async def post(app: SimWorker, path: str, body: Mapping[str, Any]) -> Any:
    sent: list[Mapping[str, Any]] = []
    pending = [{"type": "http.request", "body": orjson.dumps(body), "more_body": False}]

    async def receive() -> Mapping[str, Any]:
        if pending:
            return pending.pop()
        await trio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"content-type", b"application/json")]
    await app({"type": "http", "method": "POST", "path": path, "headers": headers}, receive, send)
    assert sent[0]["status"] == 200
    return orjson.loads(b"".join(m.get("body", b"") for m in sent[1:]))


async def test_sim_worker_with_qwen3(tok: Tokenizer) -> None:
    app = SimWorker(tokenizer=tok)
    assert app.vocab.eos_token_id == IM_END
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    with trio.fail_after(10):
        for i in range(20):  # find a generation that ends with EOS
            body = {"text": prompt + str(i), "sampling_params": {"max_new_tokens": 64}}
            out = await post(app, "/generate", body)
            if out["meta_info"]["finish_reason"] == {"type": "stop", "matched": IM_END}:
                break
        else:
            raise AssertionError("no generation stopped at EOS")
    ids = out["output_ids"]
    assert ids[-1] == IM_END
    assert IM_END not in ids[:-1]
    assert "<|im_end|>" not in out["text"]
    assert out["text"] == tok.decode(ids)
    words = out["text"].split()
    assert len(words) == len(ids) - 1
    assert all(w.isascii() and w.isalpha() for w in words)
