"""Token-exact trajectories: ``/generate`` interception and ``/retrieve_from_text``.

For a ``/generate`` with ``text``, the router looks up the longest cached
prefix of that text, tokenizes only the remainder, and forwards ``input_ids``
(cached ids + new ids) with ``return_logprob: true``. When the answer is
complete it records prompt + generated ids, their logprobs, the loss mask
(0 for tokens the router tokenized, 1 for generated ones) and the weight
version of each generated token. ``/retrieve_from_text`` then returns, for any
text the router produced, exactly the tokens the engine consumed and produced.

It is a built-in ``Middleware``, on the same hooks a user's plugin gets.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import trio

from .errors import BadRequest, PayloadTooLarge
from .hooks import Middleware, Outcome, ProxyRequest, Reply, ResponseHead, Tap
from .radix import PROMPT, Match, Node, RadixTrie, Trajectory, align, plain_prefix
from .request_json import check_depth
from .text_split import is_cut, piece_start, word_end
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .router import Router

log = logging.getLogger("trio_router.token_cache")

STATE_KEY = "token_cache"
SERIALIZE_NUMPY = orjson.OPT_SERIALIZE_NUMPY
MAX_NAMESPACE_CHARS = 128  # a declared namespace name (each costs cache budget)
PIECE_TOKENS = 65536  # fresh tokens written per piece of a retrieval answer
DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's, when a request names none


@dataclass(slots=True)
class CacheSettings:
    max_tokens: int
    gc_threshold_k: int = 5
    gc_interval: float = 30.0
    namespace_header: bytes = b"x-trio-router-namespace"
    max_text_bytes: int = 8 * 1024 * 1024
    abort_retries: int = 0
    abort_retry_backoff: float = 0.5
    cache_threshold: float = 0.5


@dataclass(slots=True)
class CacheCounters:
    requests: int = 0
    cached_prompt_tokens: int = 0
    fresh_prompt_tokens: int = 0
    recorded: int = 0
    alignment_failures: int = 0
    unrecorded: int = 0
    retrievals: int = 0
    continued_aborts: int = 0


@dataclass(slots=True, eq=False)
class Pending:
    """What one intercepted /generate carries from request to response."""

    namespace: str
    prompt: Trajectory
    prompt_text: bytes
    stream: bool
    pinned: Node | None
    chunks: list[bytes] = field(default_factory=list)
    last_event: bytes | None = None
    worker: str | None = None
    recorded: bool = False
    hint: str | None = None


class _RecordingTap(Tap):
    """Records the answer when the worker's body ends: before the client has all of
    it, so a /retrieve_from_text sent after the answer always sees it."""

    def __init__(self, body: AsyncIterator[bytes], pending: Pending, cache: TokenCache) -> None:
        super().__init__(body)
        self.pending = pending
        self.cache = cache

    def finished(self) -> None:
        if not self.pending.recorded:
            self.pending.recorded = True
            self.cache.record(self.pending, self.pending.worker)


class _SSETap(_RecordingTap):
    """Remembers the last complete ``data:`` event of an SSE stream (they are cumulative)."""

    def __init__(self, body: AsyncIterator[bytes], pending: Pending, cache: TokenCache) -> None:
        super().__init__(body, pending, cache)
        self.buffer = bytearray()

    def seen(self, chunk: bytes) -> None:
        start = max(0, len(self.buffer) - 1)
        self.buffer += chunk
        end = self.buffer.rfind(b"\n\n", start)
        if end < 0:
            return
        for event in bytes(self.buffer[:end]).split(b"\n\n"):
            event = event.strip()
            if event.startswith(b"data:") and event[5:].strip() != b"[DONE]":
                self.pending.last_event = event[5:].strip()
        del self.buffer[: end + 2]


class _BodyTap(_RecordingTap):
    def seen(self, chunk: bytes) -> None:
        self.pending.chunks.append(chunk)


class TokenCache(Middleware):
    """The radix-tree token cache and the hooks that fill it."""

    def __init__(
        self, tokenizer: Tokenizer, settings: CacheSettings, router: Router | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        self.router = router  # to send continuations of aborted requests
        self._bytes_table = tokenizer.bytes_table()
        self.trie = RadixTrie(self._bytes_table.__getitem__, max_tokens=settings.max_tokens)
        self.counters = CacheCounters()

    def namespace(self, request: ProxyRequest) -> str:
        value = request.header(self.settings.namespace_header)
        return scope_of(
            request.state.get("tenant"), value.decode("utf-8", "replace") if value else ""
        )

    # -- request ------------------------------------------------------------------

    async def on_request(self, request: ProxyRequest) -> Reply | None:
        if request.path != "/generate" or request.method not in ("POST", "PUT"):
            return None
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            return None  # the worker answers malformed input itself
        if not isinstance(body, dict):
            return None
        check_depth(body, request.body)  # the body is written again below
        text = body.get("text")
        input_ids = body.get("input_ids")
        namespace = self.namespace(request)
        if isinstance(text, str) and text and input_ids is None and "input_embeds" not in body:
            pending = await self.prepare_text(text, namespace)
            del body["text"]
            body["input_ids"] = pending.prompt.ids
        elif _is_id_list(input_ids, self.tokenizer.vocab_size):
            assert isinstance(input_ids, list)
            pending = self.prepare_ids(input_ids, namespace)
        else:
            return None  # batches and embeddings pass through unrecorded
        request.hint = pending.hint
        self.counters.requests += 1
        body["return_logprob"] = True
        request.set_json_body(orjson.dumps(body))
        pending.stream = bool(body.get("stream"))
        request.state[STATE_KEY] = pending
        if self.settings.abort_retries and not pending.stream and self.router is not None:
            return await self._generate_continuing_aborts(request, body, pending)
        return None

    async def _generate_continuing_aborts(
        self, request: ProxyRequest, body: dict[str, Any], pending: Pending
    ) -> Reply:
        """Send the request; when SGLang aborts it, continue from the partial output.

        Each continuation resends prompt + everything generated so far as
        ``input_ids`` with ``max_new_tokens`` reduced, so the pieces join into
        one answer whose ids, logprobs and per-token weight versions are exact.
        """
        from .proxy import fetch  # the proxy imports the router, which imports us

        assert self.router is not None
        sampling = body.get("sampling_params")
        sampling = dict(sampling) if isinstance(sampling, dict) else {}
        budget = sampling.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        ids: list[int] = []
        logps: list[float] = []
        versions: list[str] = []
        answer: dict[str, Any] = {}
        last_ids: list[int] = []
        attempts = 0
        while True:
            if isinstance(budget, int):
                sampling["max_new_tokens"] = budget - len(ids)
            body["sampling_params"] = sampling
            body["input_ids"] = pending.prompt.ids + ids
            request.set_json_body(orjson.dumps(body))
            fetched = await fetch(self.router, request)
            piece = _answer_of(fetched.body) if fetched.status == 200 else None
            if piece is None:
                if attempts == 0:  # nothing to stitch: relay the worker's answer as it is
                    request.state.pop(STATE_KEY, None)
                    self.trie.unpin(pending.pinned)
                    return Reply(fetched.status, fetched.body, fetched.headers)
                break  # keep what was generated before this failure
            answer, generated = piece
            last_ids, piece_logps, piece_versions, _ = generated
            ids += last_ids
            logps += piece_logps
            versions += piece_versions
            finish = answer.get("meta_info", {}).get("finish_reason")
            aborted = isinstance(finish, dict) and finish.get("type") == "abort"
            left = budget - len(ids) if isinstance(budget, int) else 1
            if not aborted or attempts >= self.settings.abort_retries or left <= 0:
                break
            attempts += 1
            self.counters.continued_aborts += 1
            await trio.sleep(self.settings.abort_retry_backoff)
        text = self._stitched_text(ids, last_ids, answer.get("text", ""))
        meta = dict(answer.get("meta_info", {}))
        finish = meta.get("finish_reason")
        if isinstance(finish, dict) and finish.get("type") == "length":
            meta["finish_reason"] = {**finish, "length": len(ids)}
        meta.update(
            prompt_tokens=len(pending.prompt.ids),
            completion_tokens=len(ids),
            output_token_logprobs=[[lp, t, None] for lp, t in zip(logps, ids, strict=True)],
            output_token_weight_versions=versions,
            continued_aborts=attempts,
        )
        stitched = {**answer, "text": text, "output_ids": ids, "meta_info": meta}
        request.state.pop(STATE_KEY, None)
        try:
            self._record_output(pending, ids, logps, versions, text, fetched.worker)
        finally:
            self.trie.unpin(pending.pinned)
        return Reply(200, orjson.dumps(stitched))

    def _stitched_text(self, ids: list[int], last_ids: list[int], last_text: str) -> str:
        """The text of all pieces, with the last piece's stop-string trim kept."""
        full = self.tokenizer.decode(ids)
        last_full = self.tokenizer.decode(last_ids)
        trimmed = len(last_full) - len(last_text) if last_full.startswith(last_text) else 0
        return full[: len(full) - trimmed] if trimmed > 0 else full

    async def prepare_text(self, text: str, namespace: str) -> Pending:
        """The prompt ids for ``text``: its longest cached prefix, then fresh tokens.

        The cached span stays pinned until ``finish(pending)``.
        """
        prompt_text = text.encode()
        self.check_text_size(len(prompt_text))
        match = self.trie.match(prompt_text, namespace, trio.current_time(), with_hidden_tail=False)
        match = self.canonical_match(match, text, prompt_text)
        pinned = self.trie.pin(match)
        try:
            prompt = self.trie.trajectory(match)
            remainder = prompt_text[match.matched_bytes :].decode()
            fresh = await self.tokenizer.aencode(remainder) if remainder else []
        except BaseException:
            self.trie.unpin(pinned)
            raise
        prompt.extend(_prompt_tokens(fresh))
        self.counters.cached_prompt_tokens += match.token_count
        self.counters.fresh_prompt_tokens += len(fresh)
        pending = Pending(namespace, prompt, prompt_text, False, pinned)
        if match.matched_bytes >= self.settings.cache_threshold * len(prompt_text):
            pending.hint = _served_by(match)
        return pending

    def canonical_match(self, match: Match, text: str, key: bytes) -> Match:
        """``match`` cut back to where reusing cached ids cannot change how ``text`` is
        tokenized: after a token the engine generated, at the end of an earlier prompt
        (the engine generated what followed it), next to an added token, or at a cut
        ``text_split`` proves safe for both the new text and the cached one. Fresh text
        is then tokenized exactly as the tokenizer would (docs/token-cache.md)."""
        if not match.path:
            return match
        cached = self.trie.trajectory(match)
        ids, mask = cached.ids, cached.mask
        # walk back from the end: ``offset`` is where token ``count - 1`` ends in ``key``
        # (the search stops at the first generated token, so only prompt tokens, whose
        # bytes are what they spell, are stepped over; most prompts stop at once)
        offset = match.matched_bytes
        for count in range(len(ids), 0, -1):
            following = (
                [(ids[count], mask[count] == 1)] if count < len(ids) else self.trie.following(match)
            )
            if self._may_end_reuse(ids[count - 1], mask[count - 1], following, text, key, offset):
                return match if count == len(ids) else self.trie.shortened(match, count)
            offset -= len(self.tokenizer.token_bytes(ids[count - 1]))
        return Match([], 0)

    def _may_end_reuse(
        self,
        last: int,
        last_generated: int,
        following: list[tuple[int, bool]],
        text: str,
        key: bytes,
        offset: int,
    ) -> bool:
        """Whether reused ids may end after ``last``, ``offset`` bytes into ``key``."""
        tokenizer = self.tokenizer
        if last_generated or any(generated for _, generated in following):
            return True  # the engine's own ids, or an earlier prompt's end
        if last in tokenizer.added_ids:
            return True  # added tokens are split off before anything else
        try:
            pos = len(key[:offset].decode())
        except UnicodeDecodeError:
            return False  # inside a character
        guard = tokenizer.added_texts
        if pos < len(text):
            if any(text.startswith(t, pos) for t in guard) and all(
                token in tokenizer.added_ids for token, _ in following
            ):
                return True  # an added token starts here in both texts
            if not is_cut(text, pos, guard):
                return False
        elif not word_end(text[-1]):
            return False
        for token, _ in following:  # the cached text must have had a cut here too
            head = tokenizer.token_bytes(token).decode("utf-8", "ignore")[:1]
            if not head or not piece_start(head):
                return False
        return True

    def _token_bytes_for(self, ids: list[int]) -> Callable[[int], bytes]:
        """The fastest exact ``token_bytes`` for ``ids``: a plain table lookup when every
        id is inside the table (a negative one would index it from the end)."""
        if ids and min(ids) >= 0 and max(ids) < len(self._bytes_table):
            return self._bytes_table.__getitem__
        return self.tokenizer.token_bytes

    def check_text_size(self, size: int) -> None:
        """413 for a text over ``--max-text-bytes`` (before any of it is tokenized)."""
        limit = self.settings.max_text_bytes
        if size > limit:
            raise PayloadTooLarge(
                f"the text is {size} bytes; this router tokenizes at most {limit} "
                "(--max-text-bytes)"
            )

    def prepare_ids(self, ids: list[int], namespace: str) -> Pending:
        """A prompt given as ids, with what the cache knows about their prefix."""
        prompt, pinned, served_by, cached = self._known_prefix(ids, namespace, trio.current_time())
        prompt_text = b"".join(map(self.tokenizer.token_bytes, ids))
        pending = Pending(namespace, prompt, prompt_text, False, pinned)
        if cached >= self.settings.cache_threshold * len(ids):
            pending.hint = served_by
        return pending

    def finish(self, pending: Pending) -> None:
        """Release what ``prepare_*`` pinned."""
        self.trie.unpin(pending.pinned)
        pending.pinned = None

    def _known_prefix(
        self, ids: list[int], namespace: str, now: float
    ) -> tuple[Trajectory, Node | None, str | None, int]:
        """The prompt ids with what the cache knows about their longest cached prefix."""
        key = b"".join(map(self.tokenizer.token_bytes, ids))
        match = self.trie.match(key, namespace, now, with_hidden_tail=False)
        cached = self.trie.trajectory(match)
        same = 0
        while same < min(len(cached.ids), len(ids)) and cached.ids[same] == ids[same]:
            same += 1
        prompt = Trajectory(
            cached.ids[:same], cached.logps[:same], cached.mask[:same], cached.versions[:same]
        )
        prompt.extend(_prompt_tokens(ids[same:]))
        return prompt, self.trie.pin(match), _served_by(match), same

    # -- response -----------------------------------------------------------------

    def transform_body(
        self, request: ProxyRequest, head: ResponseHead, body: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        pending = request.state.get(STATE_KEY)
        if not isinstance(pending, Pending) or head.status != 200:
            return body
        pending.worker = head.worker
        tap = _SSETap if pending.stream else _BodyTap
        return tap(body, pending, self)

    async def on_response_end(self, request: ProxyRequest, outcome: Outcome) -> None:
        pending = request.state.pop(STATE_KEY, None)
        if not isinstance(pending, Pending):
            return
        if not pending.recorded:
            self.counters.unrecorded += 1
        self.trie.unpin(pending.pinned)

    def record(self, pending: Pending, worker: str | None) -> None:
        """Insert the trajectories of a finished /generate answer."""
        raw = pending.last_event if pending.stream else b"".join(pending.chunks)
        if not raw:
            self.counters.unrecorded += 1
            return
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.counters.unrecorded += 1
            return
        for item in answer if isinstance(answer, list) else [answer]:
            self.insert_answer(pending, item, worker)

    def insert_answer(self, pending: Pending, item: Any, worker: str | None) -> None:
        generated = _generated(item)
        if generated is None:
            self.counters.unrecorded += 1
            return
        ids, logps, versions, text = generated
        self._record_output(pending, ids, logps, versions, text, worker)

    def _codes(self, prompt: list[str | None], generated: list[str]) -> list[int]:
        slot = self.trie.version_slot
        return [slot(v) if v else PROMPT for v in prompt] + [slot(v) for v in generated]

    def _record_output(
        self,
        pending: Pending,
        ids: list[int],
        logps: list[float],
        versions: list[str],
        text: str,
        worker: str | None,
    ) -> None:
        prompt = pending.prompt
        all_ids = prompt.ids + ids
        try:
            codes = self._codes(prompt.versions, versions)
        except OverflowError:
            # more weight versions than codes: collect old ones now, then try once more
            self.trie.drop_versions_older_than(self.settings.gc_threshold_k)
            try:
                codes = self._codes(prompt.versions, versions)
            except OverflowError:
                self.counters.unrecorded += 1
                return
        visible = pending.prompt_text + text.encode()
        alignment = align(visible, all_ids, self._token_bytes_for(all_ids))
        if alignment is None:
            # the tokens stop spelling the visible text before it ends (a normalised
            # character, a special token skipped mid-text): keep the aligned part
            self.counters.alignment_failures += 1
            cut = plain_prefix(visible, all_ids, self._token_bytes_for(all_ids))
            all_ids = all_ids[:cut]
        self.trie.insert(
            all_ids,
            (prompt.logps + logps)[: len(all_ids)],
            codes[: len(all_ids)],
            namespace=pending.namespace,
            alignment=alignment,
            worker=worker,
            now=trio.current_time(),
        )
        self.counters.recorded += 1

    # -- retrieval ------------------------------------------------------------------

    async def retrieve(self, text: object, namespace: str) -> Iterator[bytes]:
        """The trajectory of ``text`` as a JSON document: cached tokens, then fresh ones.

        Fresh tokens stay a compact array until they are written out, so a long
        text costs a few bytes per token beyond its JSON answer.
        """
        if not isinstance(text, str):
            raise BadRequest('"text" must be a string')
        if not text:
            raise BadRequest('"text" must not be empty')
        key = text.encode()
        self.check_text_size(len(key))
        self.counters.retrievals += 1
        match = self.trie.match(key, namespace, trio.current_time())
        if match.matched_bytes < len(key):  # a whole match is exactly what was cached
            match = self.canonical_match(match, text, key)
        pinned = self.trie.pin(match)
        try:
            trajectory = self.trie.trajectory(match)
            remainder = key[match.matched_bytes :].decode()
            del key
            fresh = await self.tokenizer.aencode_array(remainder) if remainder else array("i")
        finally:
            self.trie.unpin(pinned)
        return retrieval_json(text, trajectory, fresh)

    # -- background ---------------------------------------------------------------------

    async def gc_loop(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Every ``gc_interval``: drop old weight versions, then hold the token budget."""
        task_status.started()
        while True:
            await trio.sleep(self.settings.gc_interval)
            removed = self.trie.drop_versions_older_than(self.settings.gc_threshold_k)
            evicted = self.trie.enforce_budget(trio.current_time())
            if removed or evicted:
                log.info("cache gc: %d tokens of old versions, %d evicted", removed, evicted)

    def report(self) -> dict[str, Any]:
        """The ``cache`` section of /metrics."""
        stats = self.trie.statistics()
        lookups = stats.hits + stats.misses
        return {
            "enabled": True,
            "total_entries": stats.nodes,
            "cache_hits": stats.hits,
            "cache_misses": stats.misses,
            "hit_rate": round(stats.hits / lookups, 4) if lookups else 0.0,
            "cur_cache_size": stats.tokens,
            "max_cache_size": stats.max_tokens,
            "cache_size_mb": round(stats.memory_bytes / 2**20, 3),
            "payload_mb": round((stats.key_bytes + stats.payload_bytes) / 2**20, 3),
            "namespaces": stats.namespaces,
            "budget_used": self.trie.budget_used,
            "gc_threshold_k": self.settings.gc_threshold_k,
            "evictions": stats.evicted_tokens,
            "gc_removed_tokens": stats.gc_removed_tokens,
            "weight_versions": stats.versions,
            "requests": self.counters.requests,
            "recorded": self.counters.recorded,
            "unrecorded": self.counters.unrecorded,
            "alignment_failures": self.counters.alignment_failures,
            "cached_prompt_tokens": self.counters.cached_prompt_tokens,
            "fresh_prompt_tokens": self.counters.fresh_prompt_tokens,
            "retrievals": self.counters.retrievals,
            "continued_aborts": self.counters.continued_aborts,
        }


def retrieval_json(
    text: str, cached: Trajectory, fresh: array[int], piece_tokens: int = PIECE_TOKENS
) -> Iterator[bytes]:
    """The ``/retrieve_from_text`` answer in pieces: ``cached`` followed by the ``fresh``
    prompt tokens (loss mask 0, logprob 0.0, no weight version). Fresh tokens are
    written ``piece_tokens`` at a time, so the document is never whole in memory."""
    n = len(fresh)
    ids = np.frombuffer(fresh, dtype=np.int32)

    def fresh_ids() -> Iterator[bytes]:
        for start in range(0, n, piece_tokens):
            yield orjson.dumps(ids[start : start + piece_tokens], option=SERIALIZE_NUMPY)[1:-1]

    def constant(item: bytes) -> Iterator[bytes]:
        for start in range(0, n, piece_tokens):
            count = min(piece_tokens, n - start)
            yield item + (b"," + item) * (count - 1)

    yield b'{"tokens":'
    yield from _json_list(orjson.dumps(cached.ids), fresh_ids())
    yield b',"response":' + orjson.dumps(text) + b',"loss_mask":'
    yield from _json_list(orjson.dumps(cached.mask), constant(b"0"))
    yield b',"rollout_logp":'
    yield from _json_list(orjson.dumps(cached.logps), constant(b"0.0"))
    yield b',"weight_versions":'
    yield from _json_list(orjson.dumps(cached.versions), constant(b"null"))
    total = len(cached) + n
    counts = {
        "token_length": total,
        "loss_mask_length": total,
        "cached_tokens": len(cached),
        "fresh_tokens": n,
    }
    yield b"," + orjson.dumps(counts)[1:]  # its closing brace ends the document


def _json_list(known: bytes, more: Iterator[bytes]) -> Iterator[bytes]:
    """The JSON list ``known`` followed by the comma-separated item runs of ``more``."""
    yield known[:-1]
    empty = known == b"[]"
    for run in more:
        yield run if empty else b"," + run
        empty = False
    yield b"]"


def scope_of(tenant: str | None, declared: str) -> str:
    """The namespace of cached trajectories: the caller's API-key tenant (when keys are
    set), subdivided by the namespace the caller declared (400 when that is too long)."""
    if len(declared) > MAX_NAMESPACE_CHARS:
        raise BadRequest(
            f"the namespace header is {len(declared)} characters; at most "
            f"{MAX_NAMESPACE_CHARS} are accepted"
        )
    return f"{tenant}/{declared}" if tenant else declared


def _prompt_tokens(ids: list[int]) -> Trajectory:
    n = len(ids)
    return Trajectory(list(ids), [0.0] * n, [0] * n, [None] * n)


def _is_id_list(value: object, vocab_size: int) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in value
        )
    )


def _served_by(match: Match) -> str | None:
    """The worker that produced the deepest cached span of ``match``."""
    for node, _ in reversed(match.path):
        if node.worker is not None:
            return node.worker
    return None


def _answer_of(
    raw: bytes,
) -> tuple[dict[str, Any], tuple[list[int], list[float], list[str], str]] | None:
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    generated = _generated(answer)
    if generated is None or not isinstance(answer, dict):
        return None
    return answer, generated


def _generated(item: Any) -> tuple[list[int], list[float], list[str], str] | None:
    """(ids, logprobs, weight version per token, text) of one /generate answer, or None."""
    if not isinstance(item, dict):
        return None
    meta = item.get("meta_info")
    text = item.get("text")
    if not isinstance(meta, dict) or not isinstance(text, str):
        return None
    pairs = meta.get("output_token_logprobs")
    if not isinstance(pairs, list):
        return None
    ids: list[int] = []
    logps: list[float] = []
    for pair in pairs:
        if not isinstance(pair, list | tuple) or len(pair) < 2:
            return None
        logp, token = pair[0], pair[1]
        if not isinstance(token, int):
            return None
        ids.append(token)
        logps.append(float(logp) if isinstance(logp, int | float) else 0.0)
    return ids, logps, token_versions(meta, len(ids)), text


def token_versions(meta: dict[str, Any], count: int) -> list[str]:
    """The weight version of each of ``count`` generated tokens.

    SGLang 0.5.23 sends ``weight_versions``, ``[{"version", "start", "end"}]`` ranges
    over the output tokens (end excluded), so a generation that spans a weight update
    gets each token's own version; tokens no range covers (or an engine without the
    field) take ``weight_version``.
    """
    version = meta.get("weight_version")
    versions = [str(version) if version is not None else "unknown"] * count
    ranges = meta.get("weight_versions")
    if isinstance(ranges, list):
        for span in ranges:
            if not isinstance(span, dict):
                continue
            start, end, name = span.get("start"), span.get("end"), span.get("version")
            if isinstance(start, int) and isinstance(end, int) and name is not None:
                low, high = max(0, start), min(count, end)
                versions[low:high] = [str(name)] * max(0, high - low)
    return versions
