"""Tokenizer protocol of the simulated worker, and a tiny built-in byte-level tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol, runtime_checkable

__all__ = ["END_OF_TURN", "WORDS", "ByteTokenizer", "TokenizerLike"]


@runtime_checkable
class TokenizerLike(Protocol):
    """The subset of a HuggingFace tokenizer the simulator uses."""

    eos_token_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


END_OF_TURN: Final = "<|im_end|>"

WORDS: Final[tuple[str, ...]] = tuple(
    """
    the of and to in is it you that he was for on are with as his they be at one have this
    from or had by hot word but what some we can out other were all there when up use your
    how said an each she which do their time if will way about many then them write would
    like so these her long make thing see him two has look more day could go come did number
    sound no most people my over know water than call first who may down side been now find
    any new work part take get place made live where after back little only round man year
    came show every good me give our under name very through just form sentence great think
    say help low line differ turn cause much mean before move right boy old too same tell
    does set three want air well also play small end put home read hand port large spell add
    even land here must big high such follow act why ask men change went light kind off need
    house picture try us again animal point mother world near build self earth father head
    stand own page should country found answer school grow study still learn plant cover food
    sun four between state keep eye never last let thought city tree cross farm hard start
    might story saw far sea draw left late run while press close night real life few north
    """.split()  # noqa: SIM905 - a word list reads better as text
)


class ByteTokenizer:
    """Byte-level tokenizer: ids 0-255 are UTF-8 bytes, 256 is ``<|im_end|>``, then words.

    ``encode`` only emits byte ids, so ``decode(encode(t)) == t`` for every ``str``; word
    ids (which decode to ``" " + word``) are produced by the simulated model.
    """

    eos_token_id: int = 256
    first_word_id: int = 257
    vocab_size: int = 257 + len(WORDS)
    name_or_path: str = "trio-router/byte-tokenizer"

    def __init__(self) -> None:
        pieces = [bytes((i,)) for i in range(256)]
        pieces.append(END_OF_TURN.encode())
        pieces.extend((" " + word).encode() for word in WORDS)
        self._pieces: list[bytes] = pieces
        self._pieces_skip: list[bytes] = [*pieces[:256], b"", *pieces[257:]]

    @property
    def word_ids(self) -> range:
        """Ids of the word tokens."""
        return range(self.first_word_id, self.vocab_size)

    def encode(self, text: str) -> list[int]:
        """Byte-level encoding of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Decode ids; invalid UTF-8 runs become U+FFFD."""
        table = self._pieces_skip if skip_special_tokens else self._pieces
        if ids and min(ids) < 0:
            raise ValueError(f"token id out of range: {min(ids)}")
        try:
            data = b"".join([table[i] for i in ids])
        except IndexError:
            raise ValueError(f"token id out of range: {max(ids)}") from None
        return data.decode("utf-8", errors="replace")
