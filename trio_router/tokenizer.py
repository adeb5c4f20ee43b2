"""The router's tokenizer: a HuggingFace tokenizer with exact token bytes and trio-friendly calls.

Encoding and decoding go through the raw ``tokenizers.Tokenizer`` batch calls, which release
the GIL, so ``aencode``/``adecode`` can run them on worker threads without stalling the trio
thread. ``transformers`` is imported on first ``load_tokenizer`` only (it costs ~1 s).
"""

from __future__ import annotations

import ctypes
import logging
import os
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio

from .errors import ConfigError
from .text_split import CHUNK_CHARS, can_split, chunks

if TYPE_CHECKING:
    import tokenizers
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_TOKENIZER_DIR",
    "INLINE_MAX_CHARS",
    "INLINE_MAX_IDS",
    "Tokenizer",
    "load_tokenizer",
]

T = TypeVar("T")

DEFAULT_TOKENIZER_DIR: Final = Path(__file__).resolve().parent / "data" / "qwen3"
"""The packaged Qwen3 tokenizer (``tokenizer.json`` + ``tokenizer_config.json``)."""

INLINE_MAX_CHARS: Final = 256
"""``aencode`` runs texts shorter than this inline on the trio thread."""
INLINE_MAX_IDS: Final = 256
"""``adecode`` runs sequences shorter than this inline on the trio thread."""


def _byte_decoder() -> dict[int, str]:
    """GPT-2 byte-level alphabet: maps the code point of each vocab character to its byte,
    as a latin-1 character (for ``str.translate`` then ``encode("latin-1")``)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = 256 + extra
            extra += 1
    return {code: chr(b) for b, code in table.items()}


class _DropTorchNotice(logging.Filter):
    """Drops transformers' "PyTorch was not found" notice (we only need its tokenizers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("PyTorch was not found")


class Tokenizer:
    """A loaded HuggingFace fast tokenizer, as the router uses it.

    Satisfies ``trio_router.sim.tokenizer.TokenizerLike``. Token ids are valid in
    ``range(vocab_size)``; larger ids (e.g. Qwen3's padded embedding rows 151669..151935)
    decode to nothing, as in HuggingFace and SGLang.
    """

    eos_token_id: int
    vocab_size: int
    """Number of ids the tokenizer knows, added tokens included (``len(hf)``)."""
    name_or_path: str

    def __init__(
        self, hf: PreTrainedTokenizerBase, *, limiter: trio.CapacityLimiter | int = 2
    ) -> None:
        """Wrap ``hf``; ``limiter`` bounds the worker threads of ``aencode``/``adecode``."""
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise TypeError(f"{type(hf).__name__} is not a fast (tokenizers-backed) tokenizer")
        eos = hf.eos_token_id
        if not isinstance(eos, int):
            raise ValueError("tokenizer has no eos_token_id")
        self.hf = hf
        self.backend: tokenizers.Tokenizer = backend
        """The raw ``tokenizers.Tokenizer`` doing the work."""
        self.eos_token_id = eos
        self.vocab_size = len(hf)
        self.name_or_path = str(hf.name_or_path)
        if not isinstance(limiter, trio.CapacityLimiter):
            limiter = trio.CapacityLimiter(limiter)
        self.limiter = limiter
        #: long texts also take this one: one at a time, so short ones always find a thread
        self.long_text_limiter = trio.CapacityLimiter(1)
        added = backend.get_added_tokens_decoder()
        self._added: dict[int, str] = {i: t.content for i, t in added.items()}
        self._special: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self._added_texts = tuple(self._added.values())
        #: added tokens: split off before pre-tokenizing, so always a token boundary
        self.added_ids: frozenset[int] = frozenset(self._added)
        self.added_texts: tuple[str, ...] = self._added_texts
        self._bytes: list[bytes] | None = None
        self._splittable: bool | None = None

    def __repr__(self) -> str:
        return f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size})"

    # ------------------------------------------------------------ text <-> ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no BOS/EOS added; special-token text becomes its id.

        A long text is encoded in pieces cut where the tokens cannot change
        (``text_split``), so memory stays proportional to the text.
        """
        if len(text) <= CHUNK_CHARS:
            [encoding] = self.backend.encode_batch_fast([text], add_special_tokens=False)
            ids: list[int] = encoding.ids
            return ids
        ids = []
        for part in self._encode_pieces(text):
            ids += part
        return ids

    def encode_array(self, text: str) -> array[int]:
        """``encode`` as a compact array (4 bytes per token, not a Python int each)."""
        ids = array("i")
        for part in self._encode_pieces(text):
            ids.extend(part)
        return ids

    def _encode_pieces(self, text: str) -> Iterator[list[int]]:
        """The ids of ``text``, piece by piece (one piece unless it is long and may be cut).

        ``encode_batch_fast`` skips the offsets (half the memory) and, like every
        batch call, releases the GIL.
        """
        long = len(text) > CHUNK_CHARS and self.splittable
        for piece in chunks(text, guard=self._added_texts) if long else (text,):
            [encoding] = self.backend.encode_batch_fast([piece], add_special_tokens=False)
            yield encoding.ids

    @property
    def splittable(self) -> bool:
        """Whether long texts may be encoded in pieces (see ``text_split``)."""
        if self._splittable is None:
            self._splittable = can_split(self.backend.to_str())
        return self._splittable

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` as SGLang returns it; invalid UTF-8 becomes U+FFFD."""
        try:
            [text] = self.backend.decode_batch([list(ids)], skip_special_tokens=skip_special_tokens)
        except OverflowError:
            raise ValueError(f"token id out of range in {_preview(ids)}") from None
        return text

    async def aencode(self, text: str) -> list[int]:
        """``encode`` off the trio thread (inline for short texts)."""
        if len(text) < INLINE_MAX_CHARS:
            return self.encode(text)
        return await self._off_loop(self.encode, text)

    async def aencode_array(self, text: str) -> array[int]:
        """``encode_array`` off the trio thread (inline for short texts)."""
        if len(text) < INLINE_MAX_CHARS:
            return self.encode_array(text)
        return await self._off_loop(self.encode_array, text)

    async def _off_loop(self, encode: Callable[[str], T], text: str) -> T:
        """``encode(text)`` on a worker thread; a long text waits for the long-text slot
        (bounding the memory of big tokenizations) and gives memory back after."""
        if len(text) <= CHUNK_CHARS:
            return await trio.to_thread.run_sync(encode, text, limiter=self.limiter)
        async with self.long_text_limiter:
            try:
                return await trio.to_thread.run_sync(encode, text, limiter=self.limiter)
            finally:
                release_free_memory()

    async def adecode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """``decode`` off the trio thread (inline for short sequences)."""
        if len(ids) < INLINE_MAX_IDS:
            return self.decode(ids, skip_special_tokens)
        snapshot = list(ids)  # the caller may keep appending while the thread runs
        return await trio.to_thread.run_sync(
            self.decode, snapshot, skip_special_tokens, limiter=self.limiter
        )

    # ------------------------------------------------------------ per-token facts

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special added token (dropped by ``skip_special_tokens``)."""
        return token_id in self._special

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes ``token_id`` contributes to ``decode(..., skip_special_tokens=False)``.

        A token may hold part of a character, so join the bytes of a sequence before decoding.
        """
        table = self._bytes if self._bytes is not None else self._build_bytes_table()
        if token_id < 0:
            raise ValueError(f"token id out of range: {token_id}")
        return table[token_id] if token_id < len(table) else b""

    def bytes_table(self) -> list[bytes]:
        """``token_bytes`` as a list indexed by id (padded with ``b""`` past the vocabulary,
        where models pad their embeddings), for C-speed lookups."""
        table = self._bytes if self._bytes is not None else self._build_bytes_table()
        if len(table) < self.vocab_size + 1024:
            table.extend([b""] * (self.vocab_size + 1024 - len(table)))
        return table

    def _build_bytes_table(self) -> list[bytes]:
        decoder = self.backend.decoder
        if type(decoder).__name__ != "ByteLevel":
            raise NotImplementedError(
                f"token_bytes needs a byte-level BPE tokenizer, not a {type(decoder).__name__} one"
            )
        to_latin1 = _byte_decoder()
        table = [b""] * self.vocab_size
        for piece, i in self.backend.get_vocab(with_added_tokens=False).items():
            if i < len(table):
                table[i] = piece.translate(to_latin1).encode("latin-1")
        for i, content in self._added.items():
            if i < len(table):
                table[i] = content.encode("utf-8")
        self._bytes = table
        return table

    # ------------------------------------------------------------ chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` (and ``tools``) with the tokenizer's chat template.

        Extra ``kwargs`` reach the template (Qwen3: ``enable_thinking``, ``clear_thinking``)
        and transformers, which also takes options and the template itself from them: they
        are trusted. Requests reach this only through ``chat_template.ChatTemplate``, which
        checks theirs and renders on a worker thread (this call blocks).
        """
        rendered = self.hf.apply_chat_template(
            [dict(m) for m in messages],
            tools=None if tools is None else [dict(t) for t in tools],
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **kwargs,
        )
        if not isinstance(rendered, str):
            raise TypeError(f"chat template rendered {type(rendered).__name__}, not str")
        return rendered


def release_free_memory() -> None:
    """Hand freed heap memory back to the system (glibc keeps it otherwise)."""
    if _libc is not None:
        _libc.malloc_trim(0)


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None  # not glibc: nothing to do


_libc = _load_libc()


def load_tokenizer(
    path: str | Path | None = None, *, limiter: trio.CapacityLimiter | int = 2
) -> Tokenizer:
    """Load a HuggingFace tokenizer directory offline (default: the packaged Qwen3 one).

    The directory needs a ``tokenizer.json`` (a fast tokenizer). Raises ``ConfigError``
    (one line) if it is missing or unusable.
    """
    directory = Path(path) if path is not None else DEFAULT_TOKENIZER_DIR
    if not directory.is_dir():
        raise ConfigError(f"cannot load tokenizer from {directory}: not a directory")
    if not (directory / "tokenizer.json").is_file():
        raise ConfigError(f"cannot load tokenizer from {directory}: no tokenizer.json")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    _quiet_transformers()
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        tokenizer = Tokenizer(hf, limiter=limiter)
        tokenizer.splittable  # noqa: B018 -- decided now (it reads the whole vocabulary)
        return tokenizer
    except Exception as exc:
        raise ConfigError(f"cannot load tokenizer from {directory}: {_one_line(exc)}") from exc


def _quiet_transformers() -> None:
    """Install the torch-notice filter on transformers' root logger (before it is imported)."""
    logger = logging.getLogger("transformers")
    if not any(isinstance(f, _DropTorchNotice) for f in logger.filters):
        logger.addFilter(_DropTorchNotice())


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _preview(ids: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in list(ids[:8]))
    return f"[{shown}{', ...' if len(ids) > 8 else ''}]"
