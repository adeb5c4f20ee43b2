"""One simulated generation in flight, and the ``meta_info`` SGLang 0.5.23 reports for it.

Pure bookkeeping: decoder state, text, logprob entries and weight-version spans. The clock
and the worker's current weight version come in as arguments.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import trio

from .generation import Decoder, Finish, Vocab, prompt_logprobs, routed_experts, top_alternatives
from .tokenizer import TokenizerLike

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "Job", "Params", "Returns", "sampling"]

DEFAULT_MAX_NEW_TOKENS: Final = 128  # SGLang's default


@dataclass(slots=True)
class Params:
    """The sampling parameters the simulator acts on (SGLang's names)."""

    max_new_tokens: int
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False


@dataclass(slots=True)
class Returns:
    """What the request asked to get back besides the text and ids."""

    logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    text_in_logprobs: bool = False
    routed_experts: bool = False
    routed_experts_start_len: int = 0


class Job:
    """One generation: decoder state, text bookkeeping and abort plumbing."""

    __slots__ = (
        "_checked",
        "_frozen",
        "_input_lp",
        "_lp",
        "_piece",
        "_text",
        "_text_n",
        "abort_message",
        "cached_tokens",
        "dec",
        "disconnected",
        "no_stop_trim",
        "prompt_ids",
        "responded",
        "returns",
        "rid",
        "seed",
        "sent_first",
        "skip_special",
        "spans",
        "start",
        "stops",
        "tokenizer",
        "wait_scope",
    )

    def __init__(
        self,
        rid: str,
        prompt_ids: list[int],
        params: Params,
        *,
        vocab: Vocab,
        tokenizer: TokenizerLike,
        piece: Callable[[int], str],
        weight_version: str,
        seed: int = 0,
        returns: Returns | None = None,
    ) -> None:
        self.rid = rid
        self.prompt_ids = prompt_ids
        self.cached_tokens = 0
        self.seed = seed
        self.dec = Decoder(
            prompt_ids,
            params.max_new_tokens,
            vocab,
            stop_token_ids=params.stop_token_ids,
            ignore_eos=params.ignore_eos,
            seed=seed,
        )
        self.stops = params.stop
        self.skip_special = params.skip_special_tokens
        self.no_stop_trim = params.no_stop_trim
        self.tokenizer = tokenizer
        self.returns = returns if returns is not None else Returns()
        self.start = trio.current_time()
        self.abort_message: str | None = None
        self.wait_scope: trio.CancelScope | None = None
        self.disconnected = False
        self.responded = False
        self.sent_first = False
        self.spans: list[list[Any]] = [[weight_version, 0, 0]]
        """SGLang's weight-version spans: ``[version, start, end)`` over the output."""
        self._piece = piece
        self._text = ""
        self._text_n = 0
        self._frozen = False
        self._checked = 0
        self._lp: list[list[Any]] = []
        self._input_lp: list[list[Any]] | None = None

    @property
    def finish(self) -> Finish | None:
        return self.dec.finish

    def step(self, weight_version: str) -> None:
        """Generate one token under ``weight_version`` (a new span when it changed)."""
        n = len(self.dec.output_ids)
        if self.spans[-1][0] != weight_version:
            self.spans.append([weight_version, n, n])
        self.dec.step()
        self.spans[-1][2] = n + 1
        if self.stops:
            self.check_stops()

    def _shown_ids(self) -> list[int]:
        """The ids the text shows: SGLang trims a matched stop token unless no_stop_trim."""
        ids = self.dec.output_ids
        finish = self.dec.finish
        if (
            finish is not None
            and finish.type == "stop"
            and isinstance(finish.matched, int)
            and not self.no_stop_trim
        ):
            return ids[:-1]
        return ids

    def text(self) -> str:
        """Decoded output so far, trimmed at a matched stop string or token."""
        ids = self._shown_ids()
        if not self._frozen and self._text_n != len(ids):
            self._text = self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)
            self._text_n = len(ids)
        return self._text

    def check_stops(self) -> None:
        """Finish on the earliest stop string in the newly decoded text, trimming it."""
        finish = self.dec.finish
        if self._frozen or (finish is not None and finish.type != "length"):
            return
        text = self.text()
        best: tuple[int, str] | None = None
        for stop in self.stops:
            i = text.find(stop, max(0, self._checked - len(stop) + 1))
            if i != -1 and (best is None or i < best[0]):
                best = (i, stop)
        self._checked = len(text)
        if best is not None:
            cut = best[0] + (len(best[1]) if self.no_stop_trim else 0)
            self._text = text[:cut]
            self._frozen = True
            self.dec.finish_with(Finish("stop", matched=best[1]))

    def abort(self, message: str) -> None:
        """Ask the generation loop to stop with finish_reason abort."""
        if self.dec.finish is None and self.abort_message is None:
            self.abort_message = message
            if self.wait_scope is not None:
                self.wait_scope.cancel()

    # ------------------------------------------------------------ logprobs

    def _entry(self, logprob: float | None, token_id: int) -> list[Any]:
        text = self._piece(token_id) if self.returns.text_in_logprobs else None
        return [logprob, token_id, text]

    def logprob_entries(self) -> list[list[Any]]:
        """SGLang's ``output_token_logprobs``: ``[[logprob, token_id, text|None], ...]``."""
        lp, ids, logprobs = self._lp, self.dec.output_ids, self.dec.logprobs
        for i in range(len(lp), len(ids)):
            lp.append(self._entry(logprobs[i], ids[i]))
        return lp

    def input_logprob_entries(self) -> list[list[Any]]:
        """``input_token_logprobs``: the prompt from ``logprob_start_len`` on (``[]`` when it
        is -1, SGLang's default); the first entry's logprob is null."""
        if self._input_lp is None:
            start = self.returns.logprob_start_len
            values = prompt_logprobs(self.prompt_ids, start, self.seed) if start >= 0 else []
            ids = self.prompt_ids[start:] if start >= 0 else []
            self._input_lp = [self._entry(v, t) for v, t in zip(values, ids, strict=True)]
        return self._input_lp

    def _top(self, entry: list[Any], salt: int) -> list[list[Any]]:
        k = self.returns.top_logprobs_num
        alternatives = top_alternatives(entry[1], entry[0], k, self.dec.vocab, salt)
        return [self._entry(lp, t) for lp, t in alternatives]

    def input_top_logprobs(self) -> list[Any]:
        entries = self.input_logprob_entries()
        return [None if e[0] is None else self._top(e, i) for i, e in enumerate(entries)]

    def output_top_logprobs(self) -> list[Any]:
        base = len(self.prompt_ids)
        return [self._top(e, base + i) for i, e in enumerate(self.logprob_entries())]

    # ------------------------------------------------------------ meta_info

    def weight_versions(self) -> list[dict[str, Any]]:
        """SGLang's ``weight_versions``: the spans that cover the output (the first one
        even when nothing was generated)."""
        n = len(self.dec.output_ids)
        return [
            {"version": v, "start": s, "end": min(e, n)}
            for v, s, e in self.spans
            if s < n or s == 0
        ]

    def routed_experts(self) -> str:
        """R3 rows for positions ``[routed_experts_start_len, len(prompt + output) - 1)``:
        the last token was never fed to the model (base64 int32, as SGLang sends it)."""
        ids = (self.prompt_ids + self.dec.output_ids)[:-1]
        raw = routed_experts(ids, start=self.returns.routed_experts_start_len)
        return base64.b64encode(raw).decode("ascii")

    def meta_info(self, weight_version: str, wall_clock: float) -> dict[str, Any]:
        """``meta_info`` as SGLang 0.5.23 builds it, in its key order: the weight-version
        spans and ``e2e_latency`` once finished, ``response_sent_to_client_ts`` on the first
        answer sent."""
        dec, returns = self.dec, self.returns
        finish = dec.finish
        n = len(dec.output_ids)
        meta: dict[str, Any] = {
            "id": self.rid,
            "finish_reason": None if finish is None else finish.to_json(),
            "prompt_tokens": len(self.prompt_ids),
            "weight_version": weight_version,
            "num_retractions": 0,
        }
        if returns.logprob:
            meta["input_token_logprobs"] = self.input_logprob_entries()
            meta["output_token_logprobs"] = self.logprob_entries()
            meta["output_token_logprobs_length"] = n
            if returns.top_logprobs_num > 0:
                meta["input_top_logprobs"] = self.input_top_logprobs()
                meta["output_top_logprobs"] = self.output_top_logprobs()
        meta["reasoning_tokens"] = 0
        meta["completion_tokens"] = n
        meta["cached_tokens"] = self.cached_tokens
        if finish is not None:
            spans = self.weight_versions()
            meta["weight_versions"] = spans
            meta["weight_version"] = spans[-1]["version"]
        cached = self.cached_tokens
        meta["cached_tokens_details"] = {"device": cached, "host": 0} if cached else None
        if finish is not None and returns.routed_experts:
            meta["routed_experts"] = self.routed_experts()
        meta["dp_rank"] = None
        if finish is not None:
            meta["e2e_latency"] = trio.current_time() - self.start
        if not self.sent_first:
            self.sent_first = True
            meta["response_sent_to_client_ts"] = wall_clock
        return meta


def sampling(sp: Mapping[str, Any], max_new_tokens: int | None = None) -> Params:
    """The simulator's ``Params`` from checked SGLang ``sampling_params``."""
    if max_new_tokens is None:
        max_new_tokens = sp.get("max_new_tokens")
    stop = sp.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return Params(
        max_new_tokens=DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens,
        stop=tuple(s for s in stops if s),
        stop_token_ids=tuple(sp.get("stop_token_ids") or ()),
        ignore_eos=sp.get("ignore_eos") is True,
        skip_special_tokens=sp.get("skip_special_tokens") is not False,
        no_stop_trim=sp.get("no_stop_trim") is True,
    )
