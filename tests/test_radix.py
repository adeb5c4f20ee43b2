"""The radix trie, pure and synchronous, against a small byte tokenizer and a reference model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_router.radix import PROMPT, Alignment, RadixTrie, align, plain_prefix

# A toy vocabulary: ids 0..255 are single bytes; a few longer tokens, two halves of "é",
# and a special token whose literal text never appears in a worker's visible text.
EXTRA = {
    256: b"Hello",
    257: b" world",
    258: b" there",
    259: b"\xc3",  # first byte of "é"
    260: b"\xa9",  # second byte of "é"
    261: b"<E>",  # special end-of-turn token
    262: b"ab",
    263: b"abc",
}
EOS = 261


def token_bytes(token: int) -> bytes:
    return bytes([token]) if token < 256 else EXTRA[token]


def ids_of(text: bytes) -> list[int]:
    return list(text)


def key_of(ids: list[int]) -> bytes:
    return b"".join(map(token_bytes, ids))


def make_trie(max_tokens: int = 10_000) -> RadixTrie:
    return RadixTrie(token_bytes, max_tokens=max_tokens)


def insert(
    trie: RadixTrie,
    ids: list[int],
    *,
    generated_from: int | None = None,
    version: str = "v0",
    hidden_from: int | None = None,
    now: float = 0.0,
    namespace: str = "",
) -> int:
    slot = trie.version_slot(version)
    cut = len(ids) if generated_from is None else generated_from
    codes = [PROMPT] * cut + [slot] * (len(ids) - cut)
    logps = [0.0] * cut + [-0.5 - 0.01 * i for i in range(len(ids) - cut)]
    shape = None if hidden_from is None else Alignment(hidden_from, hidden_from, b"")
    return trie.insert(ids, logps, codes, alignment=shape, now=now, namespace=namespace)


def lookup(trie: RadixTrie, text: bytes, namespace: str = "") -> list[int]:
    return trie.trajectory(trie.match(text, namespace)).ids


def test_hello_world_then_hello_there_splits_the_shared_edge():
    trie = make_trie()
    insert(trie, [256, 257])
    assert trie.node_count == 1
    insert(trie, [256, 258])
    assert trie.node_count == 3  # "Hello" with children " world" and " there"
    root = trie.roots[""]
    (shared,) = list(root.iter_children())
    assert trie.key(shared) == b"Hello"
    assert sorted(trie.key(c) for c in shared.iter_children()) == [b" there", b" world"]
    assert lookup(trie, b"Hello world") == [256, 257]
    assert lookup(trie, b"Hello there") == [256, 258]
    assert lookup(trie, b"Hello") == [256]


def test_a_match_inside_a_node_stops_at_a_token_boundary():
    trie = make_trie()
    insert(trie, [256, 257])
    match = trie.match(b"Hello wor")
    assert match.matched_bytes == 5
    assert trie.trajectory(match).ids == [256]


def test_a_match_never_ends_inside_a_utf8_character():
    trie = make_trie()
    insert(trie, [ord("c"), ord("a"), ord("f"), 259, 260, ord("!")])  # "café!"
    assert lookup(trie, "café!".encode()) == [99, 97, 102, 259, 260, 33]
    # "cafè" shares the byte \xc3 with "café"; ending there would split "è": back off to "caf"
    assert trie.match("cafè".encode()).matched_bytes == 3
    assert lookup(trie, "café".encode()) == [99, 97, 102, 259, 260]


def test_the_hidden_end_of_turn_token_comes_back_with_the_visible_text():
    trie = make_trie()
    prompt = ids_of(b"Q: hi\nA:")
    answer = ids_of(b" yes")
    ids = prompt + answer + [EOS]
    insert(trie, ids, generated_from=len(prompt), hidden_from=len(ids) - 1)
    # the worker's text has no "<E>": the visible text alone returns the whole trajectory
    trajectory = trie.trajectory(trie.match(b"Q: hi\nA: yes"))
    assert trajectory.ids == ids
    assert trajectory.mask == [0] * len(prompt) + [1] * (len(answer) + 1)
    assert trajectory.versions[-1] == "v0"
    # a next turn that writes the token's literal text walks through it ...
    assert lookup(trie, b"Q: hi\nA: yes<E>\nQ: more") == ids
    # ... and one that goes on without it does not get it
    assert lookup(trie, b"Q: hi\nA: yes\nQ: more") == prompt + answer


def test_logprobs_mask_and_versions_follow_each_token():
    trie = make_trie()
    ids = ids_of(b"abcdef")
    insert(trie, ids, generated_from=3, version="step-7")
    t = trie.trajectory(trie.match(b"abcdef"))
    assert t.mask == [0, 0, 0, 1, 1, 1]
    assert t.logps == pytest.approx([0.0, 0.0, 0.0, -0.5, -0.51, -0.52])
    assert t.versions == [None, None, None, "step-7", "step-7", "step-7"]


def test_two_tokenizations_of_one_text_are_both_kept():
    trie = make_trie()
    insert(trie, [263], now=1.0)  # "abc" as one token
    insert(trie, [262, ord("c")], now=2.0)  # "abc" as "ab" + "c"
    assert trie.node_count == 2
    assert lookup(trie, b"abc") == [262, 99]  # the more recently used wins a tie


def test_a_lone_part_of_a_character_inside_the_text_is_kept_as_the_engine_showed_it():
    """The engine generated the first byte of "é" and then a new character: SGLang's text
    shows U+FFFD there. The tokens stay exact, and a later turn walks through them."""
    ids = [ord("x"), 259, ord("A"), ord("B")]
    shown = "x\ufffdAB".encode()
    shape = align(shown, ids, token_bytes)
    assert shape == Alignment(4, 4, b"", ((1, 2, "\ufffd".encode()),))
    trie = make_trie()
    trie.insert(ids, [0.0] * 4, [PROMPT] * 4, alignment=shape)
    assert lookup(trie, shown) == ids
    next_turn = shown + b" more"
    match = trie.match(next_turn)
    assert trie.trajectory(match).ids == ids
    assert match.matched_bytes == len(shown)


def test_namespaces_share_one_budget_and_an_emptied_one_is_dropped():
    trie = make_trie(max_tokens=2_000)
    for i in range(500):  # 500 namespaces of 16 tokens, each with a 100-byte name
        insert(trie, ids_of(b"0123456789abcdef"), namespace=f"{i:03d}" + "n" * 97, now=i)
        assert trie.budget_used <= trie.max_tokens
    assert len(trie.roots) < 100  # the oldest namespaces were evicted with their tokens
    assert trie.root_cost == sum(32 + len(ns) // 8 for ns in trie.roots)
    assert lookup(trie, b"0123456789abcdef", "499" + "n" * 97) == ids_of(b"0123456789abcdef")
    assert lookup(trie, b"0123456789abcdef", "000" + "n" * 97) == []


def test_the_reported_memory_counts_namespace_names():
    trie = make_trie()
    insert(trie, ids_of(b"hi"), namespace="a")
    small = trie.statistics().memory_bytes
    insert(trie, ids_of(b"hi"), namespace="b" * 16_384)
    assert trie.statistics().memory_bytes - small > 16_384
    assert trie.statistics().namespaces == 2


def test_gc_drops_namespaces_it_empties():
    trie = make_trie()
    insert(trie, ids_of(b"old answer"), generated_from=0, version="v1", namespace="x")
    insert(trie, ids_of(b"new answer"), generated_from=0, version="v2", namespace="y")
    trie.drop_versions_older_than(1)
    assert list(trie.roots) == ["y"]
    assert trie.root_cost == 32


def test_namespaces_never_see_each_other():
    trie = make_trie()
    insert(trie, ids_of(b"secret plan"), generated_from=0, namespace="tenant-a")
    assert lookup(trie, b"secret plan", "tenant-b") == []
    assert lookup(trie, b"secret plan", "") == []
    assert lookup(trie, b"secret plan", "tenant-a") == ids_of(b"secret plan")


def test_eviction_keeps_the_budget_and_removes_least_recently_used_leaves():
    trie = make_trie(max_tokens=100)
    for i in range(10):
        insert(trie, ids_of(f"conversation {i:02d} ".encode() + b"x" * 10), now=float(i))
    assert trie.tokens <= 100
    assert trie.evicted_tokens > 0
    assert lookup(trie, b"conversation 09 " + b"x" * 10) != []  # newest kept
    assert trie.match(b"conversation 00 " + b"x" * 10).matched_bytes <= len(b"conversation 0")


def test_eviction_never_removes_a_pinned_span():
    trie = make_trie(max_tokens=40 + 32)  # 32: the namespace's root
    insert(trie, ids_of(b"old but in use: " + b"y" * 10), now=0.0)
    pinned = trie.pin(trie.match(b"old but in use: " + b"y" * 10, now=0.0))
    for i in range(10):
        insert(trie, ids_of(f"new {i} ".encode() + b"z" * 10), now=10.0 + i)
    assert lookup(trie, b"old but in use: " + b"y" * 10) == ids_of(b"old but in use: " + b"y" * 10)
    trie.unpin(pinned)
    insert(trie, ids_of(b"final " + b"w" * 30), now=100.0)
    assert lookup(trie, b"old but in use: " + b"y" * 10) == []


def test_splitting_a_pinned_node_keeps_the_pin_on_what_was_matched():
    trie = make_trie(max_tokens=30 + 32)  # 32: the root
    insert(trie, ids_of(b"abcdefghij"), now=0.0)
    pinned = trie.pin(trie.match(b"abcdefghij"))
    insert(trie, ids_of(b"abcdeXYZ"), now=1.0)  # splits the pinned node after "abcde"
    for i in range(5):
        insert(trie, ids_of(f"{i}".encode() * 12), now=2.0 + i)
    assert lookup(trie, b"abcdefghij") == ids_of(b"abcdefghij")
    trie.unpin(pinned)


def test_version_gc_drops_spans_of_old_weights_and_keeps_prompts():
    trie = make_trie()
    insert(trie, ids_of(b"prompt one|gen A"), generated_from=10, version="v1")
    insert(trie, ids_of(b"prompt one|gen B"), generated_from=10, version="v2")
    insert(trie, ids_of(b"prompt two|gen C"), generated_from=10, version="v3")
    removed = trie.drop_versions_older_than(2)
    assert removed == 1  # "A": the shared "|gen " was generated again under v2
    assert trie.versions == ["v2", "v3"]
    assert lookup(trie, b"prompt one|gen A") == ids_of(b"prompt one|gen ")
    assert lookup(trie, b"prompt one|gen B") == ids_of(b"prompt one|gen B")


def test_version_gc_orders_string_versions_by_first_appearance_and_never_crashes():
    trie = make_trie()
    for i, version in enumerate(["default", "step_10", "2", "abc"]):
        insert(trie, ids_of(f"p{i}:".encode() + b"gen"), generated_from=3, version=version)
    trie.drop_versions_older_than(1)
    assert trie.versions == ["abc"]
    assert trie.drop_versions_older_than(5) == 0


def test_version_gc_spares_pinned_spans():
    trie = make_trie()
    insert(trie, ids_of(b"p:old"), generated_from=2, version="v1")
    pinned = trie.pin(trie.match(b"p:old"))
    insert(trie, ids_of(b"q:new"), generated_from=2, version="v2")
    assert trie.drop_versions_older_than(1) == 0
    assert lookup(trie, b"p:old") == ids_of(b"p:old")
    trie.unpin(pinned)
    assert trie.drop_versions_older_than(1) == 3


def test_a_newer_generation_of_the_same_tokens_takes_over_their_logprobs():
    trie = make_trie()
    insert(trie, ids_of(b"p:xyz"), generated_from=2, version="v1")
    slot = trie.version_slot("v2")
    trie.insert(ids_of(b"p:xyz"), [0, 0, -1.0, -1.0, -1.0], [0, 0, slot, slot, slot])
    t = trie.trajectory(trie.match(b"p:xyz"))
    assert t.versions[2:] == ["v2"] * 3
    assert t.logps[2:] == [-1.0] * 3


def test_align_finds_the_hidden_tail_and_alignment_failures():
    ids = [*ids_of(b"ok"), EOS]
    assert align(b"ok", ids, token_bytes) == Alignment(2, 2, b"")
    assert align(b"ok<E>", ids, token_bytes) == Alignment(3, 3, b"")
    assert align(b"oX", ids, token_bytes) is None  # fails before the text ends


def test_a_character_cut_by_max_tokens_is_kept_as_an_opaque_run():
    ids = [*ids_of(b"ok "), 259]  # the first byte of "é", then generation stopped
    shown = "ok \ufffd".encode()  # what the client sees
    shape = align(shown, ids, token_bytes)
    assert shape == Alignment(4, 4, b"", ((3, 4, "\ufffd".encode()),))
    trie = make_trie()
    slot = trie.version_slot("v0")
    trie.insert(ids, [0.0, 0, 0, -2.0], [0, 0, 0, slot], alignment=shape)
    t = trie.trajectory(trie.match(shown))
    assert t.ids == ids
    assert t.mask == [0, 0, 0, 1]
    # continuing after the replacement character walks through the opaque run
    assert lookup(trie, shown + b" and more") == ids
    # the opaque run is never split or matched partially
    assert lookup(trie, b"ok ") == ids_of(b"ok ")


# -- property test against a reference model -------------------------------------------------

TOKENS = st.one_of(st.sampled_from([97, 98, 99, 32]), st.sampled_from(sorted(EXTRA)))


@dataclass
class Stored:
    ids: list[int]
    hidden_from: int


def reference_best(stored: list[Stored], text: bytes) -> int:
    """Longest byte prefix of ``text`` that some stored trajectory's token prefix spells."""
    best = 0
    for s in stored:
        offset = 0
        key = key_of(s.ids)
        for k, token in enumerate(s.ids, start=1):
            offset += len(token_bytes(token))
            if text.startswith(key[:offset]) and (
                offset == len(text) or text[offset] & 0xC0 != 0x80
            ):
                best = max(best, offset)
            if k == s.hidden_from and text == key[:offset]:
                best = max(best, offset)
    return best


@settings(max_examples=300, deadline=None)
@given(
    trajectories=st.lists(
        st.tuples(st.lists(TOKENS, min_size=1, max_size=12), st.integers(0, 3)),
        min_size=1,
        max_size=6,
    ),
    probe=st.lists(TOKENS, max_size=14),
)
def test_matches_agree_with_a_reference_model(trajectories, probe):
    trie = make_trie()
    stored = []
    for now, (ids, tail) in enumerate(trajectories):
        hidden_from = max(1, len(ids) - tail)
        insert(trie, ids, generated_from=0, hidden_from=hidden_from, now=float(now))
        stored.append(Stored(ids, hidden_from))
    texts = [key_of(probe)] + [key_of(s.ids[: s.hidden_from]) for s in stored]
    texts += [key_of(s.ids) + key_of(probe) for s in stored]
    for text in texts:
        match = trie.match(text)
        got = trie.trajectory(match).ids
        spelled = key_of(got)
        # exactness: the returned tokens are a token prefix of something that was inserted ...
        assert any(s.ids[: len(got)] == got for s in stored) or not got
        # ... they spell a prefix of the text (or the text plus a hidden tail) ...
        assert spelled.startswith(text[: match.matched_bytes])
        assert text.startswith(spelled) or spelled.startswith(text)
        # ... and the match is as long as the best one available
        assert match.matched_bytes == reference_best(stored, text)


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.lists(TOKENS, min_size=1, max_size=10), st.booleans()),
        min_size=1,
        max_size=30,
    )
)
def test_token_accounting_and_budget_hold_under_inserts_pins_and_evictions(ops):
    trie = make_trie(max_tokens=25)
    pins = []
    for now, (ids, pin) in enumerate(ops):
        insert(trie, ids, now=float(now))
        if pin:
            pins.append(trie.pin(trie.match(key_of(ids), now=float(now))))
        counted = sum(len(n.ids) for n in trie._all_nodes())
        assert counted == trie.tokens
        assert trie.node_count == sum(1 for _ in trie._all_nodes())
        for node in trie._all_nodes():
            assert node.opaque or trie.key(node) == key_of(list(node.ids))
            assert node.first == trie.key(node)[0]
            assert node.parent is not None
        pinned_tokens = sum(len(n.ids) for n in trie._all_nodes() if n.pins)
        if pinned_tokens == 0:
            assert trie.tokens <= 25
    for node in pins:
        trie.unpin(node)
    assert all(n.pins == 0 for n in trie._all_nodes())


def test_the_same_text_ended_by_eos_and_by_length_resolves_to_the_most_recent():
    trie = make_trie()
    ids = ids_of(b"Q:A")
    insert(trie, [*ids, EOS], generated_from=2, hidden_from=3, now=1.0)  # stopped on EOS
    assert lookup(trie, b"Q:A") == [*ids, EOS]
    insert(trie, ids, generated_from=2, now=2.0)  # the same answer, cut by max_new_tokens
    assert lookup(trie, b"Q:A") == ids
    insert(trie, [*ids, EOS], generated_from=2, hidden_from=3, now=3.0)
    assert lookup(trie, b"Q:A") == [*ids, EOS]


def test_the_key_cache_follows_splits_and_removals():
    trie = RadixTrie(token_bytes, max_tokens=30 + 32, key_cache_size=2)
    insert(trie, ids_of(b"abcdef"), now=0.0)
    assert lookup(trie, b"abcdef") == ids_of(b"abcdef")  # the key is now cached
    insert(trie, ids_of(b"abcXYZ"), now=1.0)  # splits the cached node after "abc"
    assert lookup(trie, b"abcdef") == ids_of(b"abcdef")
    assert lookup(trie, b"abcXYZ") == ids_of(b"abcXYZ")
    for i in range(5):  # evictions remove nodes (and their cached keys)
        insert(trie, ids_of(f"{i}".encode() * 12), now=2.0 + i)
    for node in trie._all_nodes():
        assert trie.key(node) == key_of(list(node.ids))
    assert len(trie._keys) <= 2


def reference_plain_prefix(visible: bytes, ids: list[int]) -> int:
    """The token-by-token loop ``plain_prefix`` replaced with a binary search."""
    pos = 0
    for index, token in enumerate(ids):
        chunk = token_bytes(token) if token != 999 else b""
        if not chunk or not visible.startswith(chunk, pos):
            return index
        pos += len(chunk)
    return len(ids)


@given(
    ids=st.lists(st.sampled_from([97, 98, 256, 257, 259, 260, 262, 263, 999]), max_size=30),
    visible=st.binary(max_size=40),
    take=st.integers(0, 30),
)
def test_the_fast_plain_prefix_agrees_with_the_token_by_token_loop(
    ids: list[int], visible: bytes, take: int
) -> None:
    def bytes_of(token: int) -> bytes:
        return b"" if token == 999 else token_bytes(token)  # 999: a token with no bytes

    spelled = b"".join(map(bytes_of, ids[:take])) + visible  # often a real prefix
    for text in (visible, spelled):
        assert plain_prefix(text, ids, bytes_of) == reference_plain_prefix(text, ids)
