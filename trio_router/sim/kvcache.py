"""A stand-in for SGLang's prefix (KV) cache, so benchmarks can see prefix reuse.

Prompts are cut into blocks of ``block`` tokens, each named by a hash chained
over everything before it (starting from the request's ``extra_key``, as SGLang
keys its radix cache by it); a request's ``cached_tokens`` is the length of its
leading blocks the worker has seen before (least recently used blocks go
first). Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence


class PrefixCache:
    def __init__(self, *, block: int = 16, capacity_blocks: int = 262_144) -> None:
        self.block = block
        self.capacity = capacity_blocks
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def _chain(self, ids: Sequence[int], extra_key: str) -> list[bytes]:
        digests = []
        previous = extra_key.encode()
        for start in range(0, len(ids) - self.block + 1, self.block):
            chunk = array("I", ids[start : start + self.block]).tobytes()
            previous = hashlib.blake2b(previous + chunk, digest_size=12).digest()
            digests.append(previous)
        return digests

    def lookup(self, ids: Sequence[int], extra_key: str = "") -> int:
        """Tokens of ``ids`` whose KV this worker still holds (a prefix, whole blocks)."""
        cached = 0
        for digest in self._chain(ids, extra_key):
            if digest not in self._blocks:
                break
            self._blocks.move_to_end(digest)
            cached += self.block
        return min(cached, max(0, len(ids) - 1))  # SGLang always computes the last token

    def insert(self, ids: Sequence[int], extra_key: str = "") -> None:
        for digest in self._chain(ids, extra_key):
            self._blocks[digest] = None
            self._blocks.move_to_end(digest)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)
