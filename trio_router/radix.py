"""The token cache: a radix tree of token runs, looked up by text.

Edges are runs of token ids, split only at token boundaries, so the tokens of
any matched path are a sequence the engine really saw. Each node also keeps
the bytes its tokens decode to (``key``), and a text lookup walks those bytes.
A match may end inside a node only at a token boundary that is also a UTF-8
character boundary. Per token the tree stores the logprob and a small code:
0 for tokens the router tokenized (loss mask 0), ``k > 0`` for tokens the
engine generated under weight version slot ``k`` (loss mask 1).

*Hidden tails.* SGLang leaves special tokens (``<|im_end|>``) and trimmed stop
strings out of ``text`` though they are in ``output_ids``. Such a tail is kept
as its own node marked ``hidden``: a lookup that ends exactly where the
visible text ends includes it (the trajectory the engine produced), and a
lookup that goes on with the tail's literal text (``<|im_end|>\\n...``) walks
through it like any other node.

Pure and synchronous: time is the ``now`` argument, nothing awaits, so every
method is atomic under trio. In-flight requests pin the deepest node they
matched; eviction and GC never remove a pinned node or its ancestors.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

PROMPT = 0  # code of a token the router tokenized (mask 0)
MAX_VERSION_SLOTS = 255
#: What one namespace's root costs in the token budget: the node and dict entry
#: (~350 bytes at ~11.5 bytes per stored token), plus its name, a token per 8 bytes.
ROOT_COST_TOKENS = 32


def _object_bytes(node: Node) -> int:
    """What one node's objects take (allocator slack aside)."""
    size = sys.getsizeof(node) + sys.getsizeof(node.ids)
    for part in (node.logps, node.codes, node.children, node.opaque_key):
        if part is not None:
            size += sys.getsizeof(part)
    return size


def root_cost(namespace: str) -> int:
    """The budget, in tokens, one namespace's root takes."""
    return ROOT_COST_TOKENS + len(namespace.encode()) // 8


def _char_boundary(key: bytes, offset: int) -> bool:
    return offset >= len(key) or (key[offset] & 0xC0) != 0x80


class Node:
    """A run of tokens, with the logprob and code of each.

    Memory matters (it holds every cached token), so a node keeps only the
    ids, and per-token logprobs and codes from its first generated token on
    (``gen_from``): the tokens before it are prompt tokens (code 0, logprob 0).
    The bytes a node spells are derived from its ids on demand (``RadixTrie.key``);
    only an opaque node, whose text is not its tokens' bytes, stores them.
    """

    __slots__ = (
        "children",
        "codes",
        "first",
        "gen_from",
        "hidden",
        "ids",
        "last_access",
        "logps",
        "opaque_key",
        "parent",
        "pins",
        "plain_end",
        "worker",
    )

    def __init__(self, first: int, ids: array[int], parent: Node | None, now: float) -> None:
        self.first = first  # first byte of the node's text: children are indexed by it
        self.ids = ids
        self.gen_from = len(ids)
        self.logps: array[float] | None = None
        self.codes: array[int] | None = None
        self.parent = parent
        self.children: list[Node] | None = None
        self.last_access = now
        self.pins = 0
        self.hidden = False
        #: how the client saw these tokens when that is not their bytes; never split
        self.opaque_key: bytes | None = None
        #: when a trajectory last ended right here with no hidden tail (cut by length)
        self.plain_end: float | None = None
        self.worker: str | None = None

    @property
    def opaque(self) -> bool:
        return self.opaque_key is not None

    def set_payload(self, logps: Sequence[float], codes: Sequence[int]) -> None:
        """Store per-token logprobs and codes (aligned with ``ids``)."""
        start = next((i for i, code in enumerate(codes) if code), len(codes))
        self.gen_from = start
        if start == len(codes):
            self.logps = self.codes = None
        else:
            self.logps = array("f", logps[start:])
            self.codes = array("B", codes[start:])

    def payload(self, count: int) -> tuple[list[float], list[int]]:
        """Logprobs and codes of the first ``count`` tokens."""
        prompt = min(count, self.gen_from)
        logps = [0.0] * prompt
        codes = [PROMPT] * prompt
        if count > prompt and self.logps is not None and self.codes is not None:
            logps.extend(self.logps[: count - prompt].tolist())
            codes.extend(self.codes[: count - prompt].tolist())
        return logps, codes

    def child_starting_with(self, token: int) -> Node | None:
        for child in self.children or ():
            if child.ids[0] == token:
                return child
        return None

    def add_child(self, child: Node) -> None:
        if self.children is None:
            self.children = [child]
        else:
            self.children.append(child)

    def remove_child(self, child: Node) -> None:
        assert self.children is not None
        self.children.remove(child)
        if not self.children:
            self.children = None

    def iter_children(self) -> Iterator[Node]:
        return iter(self.children or ())

    def children_at(self, first: int) -> list[Node]:
        """Children whose text starts with byte ``first``."""
        return [c for c in self.children or () if c.first == first]

    @property
    def is_leaf(self) -> bool:
        return not self.children


@dataclass(slots=True)
class Trajectory:
    """A token sequence with what the trainer needs per token."""

    ids: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    versions: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def extend(self, other: Trajectory) -> None:
        self.ids.extend(other.ids)
        self.logps.extend(other.logps)
        self.mask.extend(other.mask)
        self.versions.extend(other.versions)


@dataclass(slots=True)
class Match:
    """The longest cached prefix of a text: nodes and how many tokens of each."""

    path: list[tuple[Node, int]]
    matched_bytes: int

    @property
    def token_count(self) -> int:
        return sum(n for _, n in self.path)

    @property
    def deepest(self) -> Node | None:
        return self.path[-1][0] if self.path else None


@dataclass(slots=True)
class TrieStatistics:
    namespaces: int
    #: the Python objects the tree holds (nodes, arrays, keys, namespace names), in bytes
    memory_bytes: int
    nodes: int
    tokens: int
    max_tokens: int
    key_bytes: int
    payload_bytes: int
    hits: int
    misses: int
    evicted_tokens: int
    gc_removed_tokens: int
    versions: list[str]


class RadixTrie:
    """Text-addressed cache of token trajectories, with one root per namespace."""

    def __init__(
        self,
        token_bytes: Callable[[int], bytes],
        *,
        max_tokens: int,
        low_water: float = 0.9,
        key_cache_size: int = 4096,
    ) -> None:
        self.token_bytes = token_bytes
        self.max_tokens = max_tokens
        self.low_water = low_water
        self.key_cache_size = key_cache_size
        self._keys: dict[Node, bytes] = {}
        self.roots: dict[str, Node] = {}
        self._namespace_of: dict[Node, str] = {}
        self.root_cost = 0  # budget the namespace roots take (see ROOT_COST_TOKENS)
        self.tokens = 0
        self.node_count = 0
        self.hits = 0
        self.misses = 0
        self.evicted_tokens = 0
        self.gc_removed_tokens = 0
        self._slots: list[str | None] = [None]  # slot 0 is PROMPT
        self._slot_of: dict[str, int] = {}
        self._order: list[str] = []  # versions by first appearance

    def key(self, node: Node) -> bytes:
        """The bytes ``node`` spells (how the client saw it, for an opaque node).

        Keys are derived from the ids (storing them would double the memory); the
        most recently used ones are kept in a small LRU so hot prefixes (shared
        system prompts, a GRPO group's prompt) are not rebuilt on every lookup.
        """
        if node.opaque_key is not None:
            return node.opaque_key
        cache = self._keys
        key = cache.get(node)
        if key is None:
            key = b"".join(map(self.token_bytes, node.ids))
            if len(cache) >= self.key_cache_size:
                del cache[next(iter(cache))]
        else:
            del cache[node]  # re-insert: dict order is least recently used first
        cache[node] = key
        return key

    # -- versions -------------------------------------------------------------

    def version_slot(self, version: str) -> int:
        """The small code for ``version``, allocated on first sight."""
        slot = self._slot_of.get(version)
        if slot is not None:
            return slot
        try:
            slot = self._slots.index(None, 1)
        except ValueError:
            if len(self._slots) > MAX_VERSION_SLOTS:
                raise OverflowError(
                    "more than 255 weight versions cached; run version GC"
                ) from None
            slot = len(self._slots)
            self._slots.append(None)
        self._slots[slot] = version
        self._slot_of[version] = slot
        self._order.append(version)
        return slot

    @property
    def versions(self) -> list[str]:
        """Weight versions in the cache, oldest first (by first appearance)."""
        return list(self._order)

    # -- lookup -----------------------------------------------------------------

    def match(
        self, text: bytes, namespace: str = "", now: float = 0.0, *, with_hidden_tail: bool = True
    ) -> Match:
        """The longest cached prefix of ``text`` that ends on a usable token boundary.

        With ``with_hidden_tail`` (for retrieval), a text that ends exactly where a
        trajectory's visible text ended also gets its hidden tail; a prompt to
        forward wants only tokens that spell the text.
        """
        root = self.roots.get(namespace)
        if root is None or not text:
            self.misses += 1
            return Match([], 0)
        path, matched = self._best(root, text, 0) or ([], 0)
        if with_hidden_tail and matched == len(text):
            if path and path[-1][1] == len(path[-1][0].ids):
                self._append_hidden(path)
            elif not path:
                self._append_hidden(path, root)
        for node, _ in path:
            node.last_access = now
        if path:
            self.hits += 1
        else:
            self.misses += 1
        return Match(path, matched)

    def _best(self, node: Node, text: bytes, pos: int) -> tuple[list[tuple[Node, int]], int] | None:
        """The longest match below ``node`` from ``pos`` that ends between characters.

        None when no such end exists (``pos`` itself splits a character and no
        child gets past it).
        """
        best: tuple[list[tuple[Node, int]], int] | None = None
        if _char_boundary(text, pos):
            best = ([], pos)
        best_access = -1.0
        for child in node.children_at(text[pos]) if pos < len(text) else ():
            found: tuple[list[tuple[Node, int]], int] | None = None
            key = self.key(child)
            if text.startswith(key, pos):
                deeper = self._best(child, text, pos + len(key))
                if deeper is not None:
                    found = ([(child, len(child.ids)), *deeper[0]], deeper[1])
                elif not child.opaque:
                    count, size = self._partial(child, key, text, pos, len(key) - 1)
                    if count:
                        found = ([(child, count)], pos + size)
            elif not child.opaque:
                count, size = self._partial(child, key, text, pos, len(key))
                if count:
                    found = ([(child, count)], pos + size)
            if found is None:
                continue
            if (
                best is None
                or found[1] > best[1]
                or (found[1] == best[1] and child.last_access > best_access)
            ):
                best, best_access = found, child.last_access
        return best

    def _partial(
        self, node: Node, key: bytes, text: bytes, pos: int, limit: int
    ) -> tuple[int, int]:
        """Tokens (and their bytes) of ``node`` spelling ``text[pos:]``, ending between
        characters and within the first ``limit`` bytes of the node."""
        limit = min(limit, len(key), len(text) - pos)
        lo, hi = 0, limit  # longest common byte prefix by bisection over slice compares
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if text[pos : pos + mid] == key[:mid]:
                lo = mid
            else:
                hi = mid - 1
        common = lo
        best_count, best_size, offset = 0, 0, 0
        for index, token in enumerate(node.ids):
            offset += len(self.token_bytes(token))
            if offset > common:
                break
            if _char_boundary(text, pos + offset):
                best_count, best_size = index + 1, offset
        return best_count, best_size

    def _append_hidden(self, path: list[tuple[Node, int]], start: Node | None = None) -> None:
        """Add the hidden tail of a trajectory that ended where the text ends.

        When trajectories ended here both with a tail (an end-of-turn token) and
        without one (cut by ``max_new_tokens``), the text cannot tell them apart;
        the more recent one wins.
        """
        node = start if start is not None else path[-1][0]
        while True:
            hidden = [c for c in node.iter_children() if c.hidden]
            if not hidden:
                return
            tail = max(hidden, key=lambda c: c.last_access)
            if node.plain_end is not None and node.plain_end >= tail.last_access:
                return
            node = tail
            path.append((node, len(node.ids)))

    def trajectory(self, match: Match) -> Trajectory:
        """The cached tokens of a match, with logprobs, mask and versions."""
        result = Trajectory()
        slots = self._slots
        for node, count in match.path:
            result.ids.extend(node.ids[:count].tolist())
            logps, codes = node.payload(count)
            result.logps.extend(logps)
            result.mask.extend(1 if c else 0 for c in codes)
            result.versions.extend(slots[c] if c else None for c in codes)
        return result

    def following(self, match: Match) -> list[tuple[int, bool]]:
        """The tokens cached right after ``match`` ends, each with whether the engine
        generated it: the next token of its node, or the first of each child."""
        if not match.path:
            return []
        node, count = match.path[-1]
        if count < len(node.ids):
            return [(node.ids[count], node.payload(count + 1)[1][count] != PROMPT)]
        return [(child.ids[0], child.payload(1)[1][0] != PROMPT) for child in node.iter_children()]

    def shortened(self, match: Match, tokens: int) -> Match:
        """``match`` cut to its first ``tokens`` tokens."""
        path: list[tuple[Node, int]] = []
        size = 0
        for node, count in match.path:
            take = min(count, tokens)
            if take <= 0:
                break
            path.append((node, take))
            key = self.key(node)
            size += (
                len(key)
                if take == len(node.ids) and node.opaque
                else sum(len(self.token_bytes(t)) for t in node.ids[:take])
            )
            tokens -= take
        return Match(path, size)

    # -- pins ---------------------------------------------------------------------

    def pin(self, match: Match) -> Node | None:
        """Keep the matched path from eviction until ``unpin``."""
        node = match.deepest
        if node is not None:
            node.pins += 1
        return node

    def unpin(self, node: Node | None) -> None:
        if node is not None and node.pins > 0:
            node.pins -= 1

    # -- insert ---------------------------------------------------------------------

    def insert(
        self,
        ids: Sequence[int],
        logps: Sequence[float],
        codes: Sequence[int],
        *,
        namespace: str = "",
        alignment: Alignment | None = None,
        worker: str | None = None,
        now: float = 0.0,
    ) -> int:
        """Add a trajectory; returns how many new tokens were stored.

        ``codes`` holds PROMPT or a version slot per token. ``alignment`` says
        which tokens spell the visible text, which are shown as something else
        (an opaque run) and which are a hidden tail (see the module docstring);
        without it every token is visible. A run already cached takes the new
        logprobs and versions when the new ones are generated tokens (the latest
        weights win). Two tokenizations of the same text are both kept, as
        sibling branches; a lookup prefers the longer match, then the more
        recently used.
        """
        n = len(ids)
        if n == 0:
            return 0
        shape = alignment or Alignment(plain=n, opaque=n, opaque_text=b"")
        root = self.roots.get(namespace)
        if root is None:
            root = Node(0, array("I"), None, now)
            self.roots[namespace] = root
            self._namespace_of[root] = namespace
            self.root_cost += root_cost(namespace)
        node: Node | None = root
        added = 0
        tail = [(shape.opaque, n, b"hidden")] if n > shape.opaque else []
        for lo, hi, shown in [*shape.visible_runs(), *tail]:
            if node is None:
                break  # another reading of these tokens is cached: keep it
            if shown is None or shown == b"hidden":
                hidden = shown is not None
                node, count = self._insert_run(node, ids, logps, codes, lo, hi, hidden, worker, now)
            else:
                node, count = self._insert_opaque(
                    node, ids, logps, codes, lo, hi, shown, worker, now
                )
            added += count
        if shape.opaque == n and node is not None and node is not root:
            node.plain_end = now  # ended without a hidden tail
        if added:
            self.enforce_budget(now)
        return added

    def _insert_run(
        self,
        node: Node,
        ids: Sequence[int],
        logps: Sequence[float],
        codes: Sequence[int],
        index: int,
        end: int,
        hidden: bool,
        worker: str | None,
        now: float,
    ) -> tuple[Node | None, int]:
        """Walk or extend the tree with tokens ``ids[index:end]``; returns the last node."""
        while index < end:
            child = node.child_starting_with(ids[index])
            if child is None:
                leaf = self._new_node(node, ids, logps, codes, index, end, None, worker, now)
                if leaf is None:
                    return None, 0
                leaf.hidden = hidden
                return leaf, end - index
            if child.opaque:
                return None, 0  # the same ids shown as other text: keep what is cached
            common = 0
            limit = min(len(child.ids), end - index)
            while common < limit and child.ids[common] == ids[index + common]:
                common += 1
            if common < len(child.ids):
                child = self._split(child, common)
            run = codes[index : index + common]
            if any(run):
                child.set_payload(logps[index : index + common], run)
            if worker is not None:
                child.worker = worker
            child.last_access = now
            if hidden:
                child.hidden = True
            index += common
            node = child
        return node, 0

    def _insert_opaque(
        self,
        node: Node,
        ids: Sequence[int],
        logps: Sequence[float],
        codes: Sequence[int],
        lo: int,
        hi: int,
        shown: bytes,
        worker: str | None,
        now: float,
    ) -> tuple[Node | None, int]:
        child = node.child_starting_with(ids[lo])
        if child is None:
            leaf = self._new_node(node, ids, logps, codes, lo, hi, shown, worker, now)
            return leaf, (hi - lo if leaf is not None else 0)
        if child.opaque_key == shown and child.ids.tolist() == list(ids[lo:hi]):
            child.last_access = now
            return child, 0
        return None, 0  # another reading of these tokens is cached: keep it

    def _new_node(
        self,
        parent: Node,
        ids: Sequence[int],
        logps: Sequence[float],
        codes: Sequence[int],
        lo: int,
        hi: int,
        opaque_text: bytes | None,
        worker: str | None,
        now: float,
    ) -> Node | None:
        run_ids = array("I", ids[lo:hi])
        first_bytes = opaque_text if opaque_text is not None else self.token_bytes(run_ids[0])
        if not first_bytes:  # tokens that decode to nothing cannot be looked up by text
            return None
        leaf = Node(first_bytes[0], run_ids, parent, now)
        leaf.set_payload(logps[lo:hi], codes[lo:hi])
        leaf.opaque_key = opaque_text
        leaf.worker = worker
        parent.add_child(leaf)
        self.node_count += 1
        self.tokens += hi - lo
        return leaf

    def _split(self, node: Node, count: int) -> Node:
        """Cut ``node`` after ``count`` tokens; returns the new upper part.

        The original object keeps the lower part (with its children and pins),
        so a pin taken on it still covers everything its holder matched.
        """
        parent = node.parent
        assert parent is not None
        assert 0 < count < len(node.ids)
        logps, codes = node.payload(len(node.ids))
        upper = Node(node.first, node.ids[:count], parent, node.last_access)
        upper.set_payload(logps[:count], codes[:count])
        upper.worker = node.worker
        upper.hidden = node.hidden
        parent.remove_child(node)
        parent.add_child(upper)
        self._keys.pop(node, None)  # its ids change
        node.ids = node.ids[count:]
        node.set_payload(logps[count:], codes[count:])
        head = self.token_bytes(node.ids[0]) or b"".join(map(self.token_bytes, node.ids))
        node.first = head[0]
        node.parent = upper
        upper.add_child(node)
        self.node_count += 1
        return upper

    # -- memory -----------------------------------------------------------------

    @property
    def budget_used(self) -> int:
        """Stored tokens plus what the namespaces' roots cost, in tokens."""
        return self.tokens + self.root_cost

    def enforce_budget(self, now: float) -> int:
        """Evict least recently used unpinned leaves until under the token budget
        (namespace roots count too; a namespace left empty is dropped)."""
        if self.budget_used <= self.max_tokens:
            return 0
        target = int(self.max_tokens * self.low_water) - self.root_cost
        leaves = sorted(
            (n for n in self._all_nodes() if n.is_leaf and n.pins == 0),
            key=lambda n: n.last_access,
        )
        evicted = 0
        queue = list(reversed(leaves))
        while self.tokens > target and queue:
            leaf = queue.pop()
            if not leaf.is_leaf or leaf.pins or leaf.parent is None:
                continue
            parent = leaf.parent
            evicted += self._remove(leaf)
            if parent.parent is None and parent.is_leaf and parent.pins == 0:
                target += self._drop_root(parent)
            if parent.parent is not None and parent.is_leaf and parent.pins == 0:
                # the parent became a leaf; it is at least as old as the least recent leaf
                queue.append(parent)
                queue.sort(key=lambda n: -n.last_access)
        self.evicted_tokens += evicted
        return evicted

    def drop_versions_older_than(self, keep: int) -> int:
        """Remove every node holding tokens of a version older than the newest ``keep``."""
        if keep < 1 or len(self._order) <= keep:
            return 0
        stale = {self._slot_of[v] for v in self._order[:-keep]}
        removed = 0
        for root in self.roots.values():
            stack = list(root.iter_children())
            while stack:
                node = stack.pop()
                codes = node.codes
                if codes is None or stale.isdisjoint(codes):
                    stack.extend(node.iter_children())
                    continue
                if any(n.pins for n in self._subtree(node)):
                    continue  # in use: collected on a later pass
                first = node.gen_from + next(i for i, c in enumerate(codes) if c in stale)
                if first > 0 and not node.opaque:
                    self._split(node, first)  # keep the tokens before the stale ones
                removed += self._remove_subtree(node)
        still_used: set[int] = set()
        for node in self._all_nodes():
            if node.codes is not None:
                still_used.update(node.codes)
        for slot in stale - still_used:
            version = self._slots[slot]
            assert version is not None
            self._slots[slot] = None
            del self._slot_of[version]
            self._order.remove(version)
        self.gc_removed_tokens += removed
        self.drop_empty_namespaces()
        return removed

    def clear(self) -> None:
        self.roots.clear()
        self._namespace_of.clear()
        self._keys.clear()
        self.tokens = self.node_count = self.root_cost = 0

    def _drop_root(self, root: Node) -> int:
        """Forget an empty namespace; returns the budget it gave back."""
        namespace = self._namespace_of.pop(root)
        del self.roots[namespace]
        cost = root_cost(namespace)
        self.root_cost -= cost
        return cost

    def drop_empty_namespaces(self) -> int:
        """Forget every namespace with nothing cached and nothing pinned (after GC)."""
        empty = [root for root in self.roots.values() if root.is_leaf and root.pins == 0]
        for root in empty:
            self._drop_root(root)
        return len(empty)

    def _remove(self, leaf: Node) -> int:
        parent = leaf.parent
        assert parent is not None
        parent.remove_child(leaf)
        leaf.parent = None
        self._keys.pop(leaf, None)
        self.node_count -= 1
        self.tokens -= len(leaf.ids)
        return len(leaf.ids)

    def _remove_subtree(self, node: Node) -> int:
        removed = 0
        for descendant in list(self._subtree(node))[::-1]:
            removed += self._remove(descendant)
        return removed

    def _subtree(self, node: Node) -> Iterator[Node]:
        stack = [node]
        while stack:
            current = stack.pop()
            yield current
            stack.extend(current.iter_children())

    def _all_nodes(self) -> Iterator[Node]:
        for root in self.roots.values():
            for node in self._subtree(root):
                if node.parent is not None:
                    yield node

    # -- introspection ------------------------------------------------------------

    def statistics(self) -> TrieStatistics:
        key_bytes = payload = 0
        objects = sum(_object_bytes(root) + sys.getsizeof(ns) for ns, root in self.roots.items())
        for node in self._all_nodes():
            key_bytes += len(node.opaque_key or b"")
            payload += node.ids.itemsize * len(node.ids)
            if node.logps is not None and node.codes is not None:
                payload += node.logps.itemsize * len(node.logps) + len(node.codes)
            objects += _object_bytes(node)
        return TrieStatistics(
            namespaces=len(self.roots),
            memory_bytes=objects + sys.getsizeof(self.roots) + sys.getsizeof(self._keys),
            nodes=self.node_count,
            tokens=self.tokens,
            max_tokens=self.max_tokens,
            key_bytes=key_bytes,
            payload_bytes=payload,
            hits=self.hits,
            misses=self.misses,
            evicted_tokens=self.evicted_tokens,
            gc_removed_tokens=self.gc_removed_tokens,
            versions=self.versions,
        )


@dataclass(frozen=True, slots=True)
class Alignment:
    """How a trajectory's tokens line up with the text the client saw.

    Tokens ``[0, plain)`` spell the visible text byte for byte, except the
    ``inner`` runs ``(lo, hi, shown)``: tokens ``[lo, hi)`` the client saw as
    ``shown`` (a lone part of a character that the engine followed with a new
    character, which SGLang's text shows as U+FFFD). Tokens ``[plain, opaque)``
    are shown as ``opaque_text`` (e.g. a character cut by ``max_new_tokens``,
    also U+FFFD to the client); tokens ``[opaque, n)`` are the hidden tail.
    """

    plain: int
    opaque: int
    opaque_text: bytes
    inner: tuple[tuple[int, int, bytes], ...] = ()

    def visible_runs(self) -> list[tuple[int, int, bytes | None]]:
        """``(lo, hi, shown)`` runs up to ``opaque``: ``shown`` None where the tokens'
        own bytes are what the client saw."""
        runs: list[tuple[int, int, bytes | None]] = []
        cursor = 0
        for lo, hi, shown in self.inner:
            runs += [(cursor, lo, None), (lo, hi, shown)]
            cursor = hi
        runs.append((cursor, self.plain, None))
        if self.opaque > self.plain:
            runs.append((self.plain, self.opaque, self.opaque_text))
        return [run for run in runs if run[1] > run[0]]


MAX_OPAQUE_TOKENS = 8


def align(
    visible: bytes, ids: Sequence[int], token_bytes: Callable[[int], bytes]
) -> Alignment | None:
    """Line ``ids`` up with ``visible``; None when they do not spell it.

    Tokens are consumed while their bytes match the text. When the text is
    used up, the tokens left form the hidden tail (skipped special tokens,
    trimmed stop strings). When tokens stop matching first, a short run of
    them may still decode, with replacement characters, to the rest of the
    text (a cut multi-byte character): that run is opaque. Anything else (a
    normalised character, a special token skipped mid-text) cannot be keyed
    by this text, and the caller keeps only the plain prefix.
    """
    ends, empties, joined = _spelling(ids, token_bytes)
    pos = 0
    plain = len(ids)
    inner: list[tuple[int, int, bytes]] = []
    index = 0
    while index < len(ids):
        index, pos = _spelled(visible, pos, ends, empties, joined, index)
        if index == len(ids):
            break
        run = _lone_partial_run(visible, pos, ids, index, token_bytes)
        if run is None:
            plain = index
            break
        end, shown = run
        inner.append((index, end, shown))
        pos += len(shown)
        index = end
    if pos == len(visible):
        return Alignment(plain, plain, b"", tuple(inner))
    rest = visible[pos:]
    for end in range(min(len(ids), plain + MAX_OPAQUE_TOKENS), plain, -1):
        raw = b"".join(map(token_bytes, ids[plain:end]))
        if raw.decode("utf-8", "replace").encode() == rest:
            return Alignment(plain, end, rest, tuple(inner))
    return None


REPLACEMENT = "\ufffd".encode()


def _spelled(
    visible: bytes,
    pos: int,
    ends: Sequence[int],
    empties: Sequence[int],
    joined: memoryview,
    index: int,
) -> tuple[int, int]:
    """How far the tokens from ``index`` spell ``visible`` from ``pos`` byte for byte:
    ``(first token that does not, its position)``. A token with no bytes never does.

    A binary search over the number of tokens, each step one C-speed comparison of
    the tokens' joined bytes, so a million-token answer costs milliseconds, not
    seconds of the event loop.
    """
    start = ends[index - 1] if index else 0

    def spells(count: int) -> bool:
        stop = ends[index + count - 1]
        return visible.startswith(joined[start:stop], pos)

    empty = bisect_left(empties, index)  # a token with no bytes stops the run
    stop = empties[empty] if empty < len(empties) else len(ends)
    low, high = 0, stop - index  # spells(low) holds; find the largest such
    while low < high:
        middle = (low + high + 1) // 2
        if spells(middle):
            low = middle
        else:
            high = middle - 1
    end = index + low
    return end, pos + ((ends[end - 1] if end else 0) - start)


def _lone_partial_run(
    visible: bytes,
    pos: int,
    ids: Sequence[int],
    index: int,
    token_bytes: Callable[[int], bytes],
) -> tuple[int, bytes] | None:
    """The shortest run of tokens from ``index`` that the client saw as
    ``visible[pos:...]`` with U+FFFD for a part of a character that the next token
    does not complete: ``(end of the run, what it showed)``, or None.

    The next token must not start with a continuation byte, so the run shows the same
    alone as in the answer (SGLang shows a lone part of a character, then the next
    character; a random model emits runs of them, at the end of an answer too).
    """
    raw = b""
    for end in range(index + 1, min(len(ids), index + MAX_OPAQUE_TOKENS) + 1):
        raw += token_bytes(ids[end - 1])
        shown = raw.decode("utf-8", "replace").encode()
        if not shown.endswith(REPLACEMENT) or not visible.startswith(shown, pos):
            continue
        following = token_bytes(ids[end]) if end < len(ids) else b""
        if not following or not 0x80 <= following[0] <= 0xBF:
            return end, shown
    return None


def plain_prefix(visible: bytes, ids: Sequence[int], token_bytes: Callable[[int], bytes]) -> int:
    """How many leading tokens spell a prefix of ``visible`` byte for byte."""
    ends, empties, joined = _spelling(ids, token_bytes)
    return _spelled(visible, 0, ends, empties, joined, 0)[0]


def _spelling(
    ids: Sequence[int], token_bytes: Callable[[int], bytes]
) -> tuple[list[int], list[int], memoryview]:
    """What ``_spelled`` needs of ``ids``: each token's end offset in their joined
    bytes, the tokens with no bytes, and the joined bytes."""
    pieces = list(map(token_bytes, ids))
    ends = list(accumulate(map(len, pieces)))
    empties = [i for i, piece in enumerate(pieces) if not piece] if b"" in pieces else []
    return ends, empties, memoryview(b"".join(pieces))
