"""Where a long text may be cut so that its pieces tokenize exactly like the whole.

Tokenizing a whole 30 MiB text at once costs the tokenizer ~50-150 bytes of memory
per input byte; in pieces of ``CHUNK_CHARS`` it costs a few MB. A cut is made only
where it cannot change the tokens: **between a letter or digit and a following
character that is neither a letter, a digit nor a combining mark** (a space, a
newline, punctuation, a symbol), and not inside an added token. For the byte-level
BPE tokenizers recognised here (GPT-2, Llama 3, Qwen 2/3 split patterns; NFC or no
normaliser; no added token that contains whitespace or strips its neighbours):

- the regex split is a left-to-right scan with no look-behind, so the pieces
  after the cut depend only on the text after it;
- a letter or digit run ends at such a character in every one of those patterns
  (no alternative matches a letter or digit followed by it), so the scan of the
  whole text has a piece boundary there, matched the same when the text ends there;
- BPE merges never cross a piece boundary; NFC composes a character only with a
  following combining mark (or a Hangul jamo, a letter), and the character after
  the cut is checked to be NFC-stable by itself;
- no added token is cut in two (its occurrences around the cut are checked).

A text with no cut for ``MAX_RUN`` characters is refused: tokenizing such a run
would cost the tokenizer's full ~100 bytes per byte at once.

Pure: no trio, no tokenizer import; ``can_split`` reads the tokenizer's JSON.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from typing import Any, Final

from .errors import PayloadTooLarge

__all__ = ["CHUNK_CHARS", "can_split", "chunks"]

CHUNK_CHARS: Final = 64 * 1024
"""Target size of one piece (a piece may be longer when no safe cut is near)."""

#: Split patterns whose letter and digit runs end at a space (see the module doc).
KNOWN_PATTERNS: Final = frozenset(
    {
        # Qwen 2 / Qwen 3
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+",
        # Llama 3
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    }
)
_SAFE_NORMALIZERS: Final = frozenset({None, "NFC"})
MAX_RUN: Final = 256 * 1024
"""Longest piece tokenized at once (characters)."""
#: A character that follows a letter or digit and is not one (``\w`` less ``_``).
_AFTER_WORD: Final = re.compile(r"(?<=[^\W_])[\W_]")


def can_split(tokenizer_json: str) -> bool:
    """Whether texts for this tokenizer (its ``tokenizer.json`` text) may be cut."""
    try:
        spec: dict[str, Any] = json.loads(tokenizer_json)
    except ValueError:
        return False
    normalizer = spec.get("normalizer")
    if (normalizer or {}).get("type") not in _SAFE_NORMALIZERS:
        return False
    for token in spec.get("added_tokens") or ():
        content = token.get("content", "")
        if token.get("lstrip") or token.get("rstrip") or any(c.isspace() for c in content):
            return False
    return _splits_at_word_ends(spec.get("pre_tokenizer") or {})


def _splits_at_word_ends(pre: dict[str, Any]) -> bool:
    if pre.get("type") == "ByteLevel":  # GPT-2: its own regex
        return bool(pre.get("use_regex", True)) and not pre.get("add_prefix_space", False)
    if pre.get("type") != "Sequence":
        return False
    steps = pre.get("pretokenizers") or []
    if len(steps) != 2:
        return False
    split, byte_level = steps
    return (
        split.get("type") == "Split"
        and split.get("behavior") == "Isolated"
        and not split.get("invert", False)
        and (split.get("pattern") or {}).get("Regex") in KNOWN_PATTERNS
        and byte_level.get("type") == "ByteLevel"
        and not byte_level.get("use_regex", True)
        and not byte_level.get("add_prefix_space", False)
    )


def chunks(text: str, size: int = CHUNK_CHARS, guard: Sequence[str] = ()) -> list[str]:
    """``text`` cut at safe points into pieces of about ``size`` characters.

    A piece runs to the first safe cut at or after ``size`` characters, never
    inside one of the ``guard`` strings (the tokenizer's added tokens). Raises
    ``PayloadTooLarge`` when a piece would exceed ``MAX_RUN`` characters.
    """
    pieces = []
    start = 0
    while len(text) - start > size:
        cut = _next_cut(text, start + size, guard)
        if cut is None or cut - start > MAX_RUN:
            break
        pieces.append(text[start:cut])
        start = cut
    if len(text) - start > MAX_RUN:
        raise PayloadTooLarge(
            f"the text has {len(text) - start} characters with no word boundary the router "
            f"may cut at; it tokenizes runs of at most {MAX_RUN}"
        )
    pieces.append(text[start:])
    return pieces


def is_cut(text: str, pos: int, guard: Sequence[str] = ()) -> bool:
    """Whether ``text`` may be cut at ``pos`` (see the module doc): a letter or digit
    before, a character after that starts a new piece, no ``guard`` string spanning."""
    if not 0 < pos < len(text):
        return False
    return word_end(text[pos - 1]) and piece_start(text[pos]) and not _inside_any(text, pos, guard)


def word_end(char: str) -> bool:
    """A letter or digit: a run of them ends where a ``piece_start`` follows."""
    return char.isalnum()


def piece_start(char: str) -> bool:
    """Not a letter, digit or mark, and unchanged by NFC (so nothing composes across)."""
    return _safe_start(char)


def _next_cut(text: str, position: int, guard: Sequence[str]) -> int | None:
    """The first safe cut at or after ``position`` (see the module doc), or None."""
    while True:
        found = _AFTER_WORD.search(text, position)
        if found is None:
            return None
        cut = found.start()
        if _safe_start(text[cut]) and not _inside_any(text, cut, guard):
            return cut
        position = cut + 1


def _safe_start(char: str) -> bool:
    """Not a letter, digit or mark, and unchanged by NFC (so nothing composes across)."""
    return unicodedata.category(char)[0] not in "LNM" and unicodedata.normalize("NFC", char) == char


def _inside_any(text: str, cut: int, guard: Sequence[str]) -> bool:
    """Whether an occurrence of one of ``guard`` spans ``cut``."""
    for token in guard:
        low = max(0, cut - len(token) + 1)
        found = text.find(token, low, cut + len(token) - 1)
        while found != -1 and found < cut:
            if found + len(token) > cut:
                return True
            found = text.find(token, found + 1, cut + len(token) - 1)
    return False
