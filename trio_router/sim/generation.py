"""Deterministic fake decoding: pure, synchronous, no I/O.

Every token is derived from a BLAKE2b hash of (seed, prompt digest, position, last few
generated ids), so the same request always produces the same ids and logprobs.
"""

from __future__ import annotations

import re
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any, Final

from .tokenizer import ByteTokenizer, TokenizerLike

__all__ = [
    "Decoder",
    "Finish",
    "Vocab",
    "generate",
    "next_token",
    "prompt_key",
    "prompt_logprobs",
    "routed_experts",
    "top_alternatives",
    "vocab_from_tokenizer",
]

EOS_ODDS: Final = 24
"""After ``MIN_TOKENS_BEFORE_EOS`` tokens, EOS is chosen with probability ~1/EOS_ODDS."""
MIN_TOKENS_BEFORE_EOS: Final = 2
CONTEXT: Final = 4
"""How many trailing generated ids feed the hash."""
SCAN_LIMIT: Final = 5000
"""How many ids of a foreign tokenizer are scanned for word tokens."""

_WORD_RE: Final = re.compile(r" ?[A-Za-z]{2,12}")
_MIN_SPACED_WORDS: Final = 50


@dataclass(frozen=True, slots=True)
class Vocab:
    """What the fake model may emit: readable word ids, and the EOS id."""

    word_ids: tuple[int, ...]
    eos_token_id: int

    def __post_init__(self) -> None:
        if not self.word_ids:
            raise ValueError("vocab has no word ids")


@dataclass(frozen=True, slots=True)
class Finish:
    """Why generation ended, serialisable to SGLang's ``finish_reason``."""

    type: str  # "stop" | "length" | "abort"
    matched: int | str | None = None
    length: int | None = None
    message: str | None = None

    def to_json(self) -> dict[str, Any]:
        """SGLang's ``meta_info.finish_reason`` dict."""
        if self.type == "length":
            return {"type": "length", "length": self.length}
        if self.type == "abort":  # SGLang's FINISH_ABORT (a client's abort has no status)
            return {"type": "abort", "message": self.message, "status_code": None, "err_type": None}
        return {"type": self.type, "matched": self.matched}


def vocab_from_tokenizer(tokenizer: TokenizerLike) -> Vocab:
    """Pick generatable word ids: ByteTokenizer's words, else plain ASCII words among the
    first ``SCAN_LIMIT`` ids (preferring ones with a leading space)."""
    eos = tokenizer.eos_token_id
    if isinstance(tokenizer, ByteTokenizer):
        return Vocab(tuple(tokenizer.word_ids), eos)
    spaced: list[int] = []
    bare: list[int] = []
    for i in range(min(tokenizer.vocab_size, SCAN_LIMIT)):
        if i == eos:
            continue
        try:
            piece = tokenizer.decode([i], skip_special_tokens=True)
        except Exception:  # some ids of some tokenizers cannot be decoded alone
            continue
        if _WORD_RE.fullmatch(piece):
            (spaced if piece[0] == " " else bare).append(i)
    if len(spaced) >= _MIN_SPACED_WORDS:
        return Vocab(tuple(spaced), eos)
    if spaced or bare:
        return Vocab(tuple(spaced + bare), eos)
    fallback = tuple(i for i in range(min(tokenizer.vocab_size, SCAN_LIMIT)) if i != eos)
    return Vocab(fallback, eos)


def prompt_key(prompt_ids: Sequence[int], seed: int = 0) -> bytes:
    """16-byte digest of the seed and prompt, the per-request part of every token hash."""
    h = blake2b(digest_size=16)
    h.update(seed.to_bytes(8, "little", signed=True))
    h.update(array("q", prompt_ids).tobytes())
    return h.digest()


def _logprob(digest: bytes) -> float:
    x = int.from_bytes(digest[12:16], "little") / 4294967296.0  # uniform in [0, 1)
    return -(0.001 + 4.99 * x * x)  # in (-5, 0), skewed towards confident tokens


def _sample(
    key: bytes, generated: Sequence[int], position: int, vocab: Vocab, allow_eos: bool
) -> tuple[int, float]:
    tail = generated[-CONTEXT:]
    digest = blake2b(key + array("q", (position, *tail)).tobytes(), digest_size=16).digest()
    pick = int.from_bytes(digest[:8], "little")
    logprob = _logprob(digest)
    if (
        allow_eos
        and position >= MIN_TOKENS_BEFORE_EOS
        and int.from_bytes(digest[8:12], "little") % EOS_ODDS == 0
    ):
        return vocab.eos_token_id, logprob
    words = vocab.word_ids
    return words[pick % len(words)], logprob


def prompt_logprobs(prompt_ids: Sequence[int], start: int, seed: int = 0) -> list[float | None]:
    """Fake logprobs of the prompt tokens from ``start`` on, SGLang's ``input_token_logprobs``
    values: each depends on the token and the few before it (so a shared prefix gets the
    same values); the first is None, as SGLang reports it."""
    out: list[float | None] = []
    salt = seed.to_bytes(8, "little", signed=True)
    for i in range(start, len(prompt_ids)):
        if i == start:
            out.append(None)
            continue
        tail = prompt_ids[max(0, i - CONTEXT) : i + 1]
        digest = blake2b(salt + array("q", (i, *tail)).tobytes(), digest_size=16).digest()
        out.append(_logprob(digest))
    return out


def top_alternatives(
    token_id: int, logprob: float, k: int, vocab: Vocab, salt: int
) -> list[tuple[float, int]]:
    """``k`` fake top-logprob entries, most likely first: the token itself, then other
    words slightly less likely (SGLang's ``*_top_logprobs`` items)."""
    if k <= 0:
        return []
    words = vocab.word_ids
    out = [(logprob, token_id)]
    for j in range(1, k):
        out.append((logprob - 0.25 * j, words[(salt * 7 + token_id + j) % len(words)]))
    return out


def next_token(
    prompt_ids: Sequence[int],
    generated_ids: Sequence[int],
    position: int,
    vocab: Vocab,
    *,
    seed: int = 0,
    allow_eos: bool = True,
) -> tuple[int, float]:
    """The token (and its logprob) the fake model emits at output ``position``."""
    return _sample(prompt_key(prompt_ids, seed), generated_ids, position, vocab, allow_eos)


class Decoder:
    """Step-by-step generation of one sequence, with SGLang's token-level stop rules.

    Stop strings need text, so the caller applies them (see ``finish_with``).
    """

    __slots__ = (
        "_key",
        "_stop_ids",
        "finish",
        "ignore_eos",
        "logprobs",
        "max_new_tokens",
        "output_ids",
        "vocab",
    )

    def __init__(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        vocab: Vocab,
        *,
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        seed: int = 0,
    ) -> None:
        self._key = prompt_key(prompt_ids, seed)
        self.vocab = vocab
        self.max_new_tokens = max_new_tokens
        self.ignore_eos = ignore_eos
        self._stop_ids = frozenset(stop_token_ids)
        self.output_ids: list[int] = []
        self.logprobs: list[float] = []
        self.finish: Finish | None = (
            Finish("length", length=max_new_tokens) if max_new_tokens <= 0 else None
        )

    def step(self) -> int:
        """Emit one token, setting ``finish`` when a stop rule fires."""
        if self.finish is not None:
            raise RuntimeError("generation already finished")
        out = self.output_ids
        tok, lp = _sample(self._key, out, len(out), self.vocab, not self.ignore_eos)
        out.append(tok)
        self.logprobs.append(lp)
        if (tok == self.vocab.eos_token_id and not self.ignore_eos) or tok in self._stop_ids:
            self.finish = Finish("stop", matched=tok)
        elif len(out) >= self.max_new_tokens:
            self.finish = Finish("length", length=self.max_new_tokens)
        return tok

    def finish_with(self, finish: Finish) -> None:
        """End generation early (stop string, abort)."""
        self.finish = finish


def generate(
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    vocab: Vocab,
    *,
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    seed: int = 0,
) -> tuple[list[tuple[int, float]], Finish]:
    """Generate a whole sequence: ``[(token_id, logprob), ...]`` and the finish reason."""
    dec = Decoder(
        prompt_ids,
        max_new_tokens,
        vocab,
        stop_token_ids=stop_token_ids,
        ignore_eos=ignore_eos,
        seed=seed,
    )
    while dec.finish is None:
        dec.step()
    return list(zip(dec.output_ids, dec.logprobs, strict=True)), dec.finish


def routed_experts(
    ids: Sequence[int],
    *,
    start: int = 0,
    num_layers: int = 4,
    top_k: int = 2,
    num_experts: int = 64,
) -> bytes:
    """Fake MoE routing of the tokens ``ids[start:]`` (at their positions in ``ids``): an
    int32 little-endian array of shape (len(ids) - start, num_layers, top_k)."""
    out = array("i")
    for pos in range(max(0, start), len(ids)):
        tok = ids[pos]
        for layer in range(num_layers):
            first = (tok * 31 + pos * 7 + layer * 13) % num_experts
            for k in range(top_k):
                out.append(
                    (first + k * (1 + (tok + layer) % max(num_experts - 1, 1))) % num_experts
                )
    if sys.byteorder == "big":  # pragma: no cover
        out.byteswap()
    return out.tobytes()
