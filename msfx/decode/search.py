"""Beam search over an explicit KV cache (HF 5.x `GenerationMixin._beam_search`).

The bookkeeping runs in numpy on the host, vectorized over `[batch, beams]` as in HF's rewrite:
each step takes the top `K = max(2, 1 + n_eos) * num_beams` continuations of all beams, keeps
the best `num_beams` that did not finish as the running beams, and merges the finished ones
into the `num_beams` best finished hypotheses (scored `sum log p / generated_len **
length_penalty`). The model step reorders its cache rows by the chosen source beams inside the
compiled graph (`CompiledStep(..., beam_idx=...)`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from msfx.decode.generate import DecodeState, StepTimer
from msfx.decode.options import BeamOptions, DecodeOptions
from msfx.decode.processors import _log_softmax

_NEG = np.float32(-1.0e9)  # HF's "never choose this" score offset


@dataclass
class BeamSearchResult:
    """`sequences` int64 `[batch * num_return_sequences, prompt + generated]` (finished rows padded);
    `sequences_scores` float32 `[batch * num_return_sequences]` (length-penalized sum of log-probs);
    `beam_indices` int32 `[batch * num_return_sequences, generated]`: per generated token, the
    flat `batch * num_beams` row it was chosen from (-1 past the row's end)."""

    sequences: np.ndarray
    sequences_scores: np.ndarray
    beam_indices: np.ndarray


def _gather(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """`values[b, index[b, j], ...]` for `values` `[batch, n, ...]`, `index` `[batch, k]`."""
    return values[np.arange(values.shape[0])[:, None], index]


def _top_k(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` largest entries of each row of `values` `[batch, n]` in descending order, and their indices."""
    index = np.argpartition(-values, k - 1, axis=-1)[:, :k] if k < values.shape[-1] else \
        np.broadcast_to(np.arange(values.shape[-1]), values.shape)
    order = np.argsort(-_gather(values, index), axis=-1, kind="stable")
    index = _gather(index, order)
    return _gather(values, index), index


def _sample_k(log_probs: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`k` distinct indices per row drawn from `softmax(log_probs)` (HF: `multinomial` without
    replacement), sorted by descending score. A row with fewer than `k` candidates of non-zero
    probability takes all of them plus zero-probability ones (lowest ids first), as torch's CPU
    `multinomial` fills the draw; their -inf scores keep them out of the running beams."""
    index = np.empty((log_probs.shape[0], k), np.int64)
    for row, scores in enumerate(log_probs.astype(np.float64)):
        probs = np.exp(scores - scores.max())
        possible = np.count_nonzero(probs)
        if possible < k:
            index[row] = np.concatenate([np.flatnonzero(probs), np.flatnonzero(probs == 0)[:k - possible]])
            continue
        index[row] = rng.choice(scores.shape[0], size=k, replace=False, p=probs / probs.sum())
    order = np.argsort(-_gather(log_probs, index), axis=-1, kind="stable")
    index = _gather(index, order)
    return _gather(log_probs, index), index


@dataclass
class _Hypotheses:
    """Sequences `[batch, beams, max_length]` (int64), their scores `[batch, beams]` (float32) and
    origins `[batch, beams, max_new_tokens]` (int32: per generated token, the flat row it came from)."""

    seqs: np.ndarray
    scores: np.ndarray
    origin: np.ndarray

    def take(self, index: np.ndarray) -> _Hypotheses:
        """The hypotheses `index` `[batch, k]` picks in each row."""
        return _Hypotheses(_gather(self.seqs, index), _gather(self.scores, index), _gather(self.origin, index))

    def join(self, other: _Hypotheses, scores: np.ndarray) -> _Hypotheses:
        """Both sets side by side, scored by `scores` `[batch, both]`."""
        return _Hypotheses(np.concatenate([self.seqs, other.seqs], 1), scores,
                           np.concatenate([self.origin, other.origin], 1))


@dataclass
class _BeamSearch:
    """The running beams and the finished hypotheses of each batch row (HF's vectorized
    `_beam_search` state), with the rules that move candidates between them."""

    beams: BeamOptions
    prompt_len: int
    max_length: int
    running: _Hypotheses
    finished: _Hypotheses
    is_finished: np.ndarray  # bool [batch, beams]
    can_improve: np.ndarray  # bool [batch, 1]: a running beam can still beat the worst finished one

    @classmethod
    def start(cls, input_ids: np.ndarray, beams: BeamOptions, max_new_tokens: int, fill: int) -> _BeamSearch:
        n = beams.num_beams
        batch, prompt_len = input_ids.shape[0] // n, input_ids.shape[1]
        max_length = prompt_len + max_new_tokens
        seqs = np.full((batch, n, max_length), fill, np.int64)
        seqs[:, :, :prompt_len] = input_ids.reshape(batch, n, prompt_len)
        scores = np.zeros((batch, n), np.float32)
        scores[:, 1:] = _NEG  # only the first beam's continuations at the start: no duplicates
        origin = np.full((batch, n, max_new_tokens), -1, np.int32)
        finished = _Hypotheses(seqs.copy(), np.full((batch, n), _NEG, np.float32), origin.copy())
        return cls(beams, prompt_len, max_length, _Hypotheses(seqs, scores, origin), finished,
                   np.zeros((batch, n), bool), np.ones((batch, 1), bool))

    def candidates(self, log_probs: np.ndarray, cur_len: int, keep: int, rng) -> _Hypotheses:
        """The top (or, with `rng`, sampled) `keep` continuations of all beams of each row,
        scored by the running score plus `log_probs` `[batch * beams, vocab]`."""
        batch, n = self.running.scores.shape
        total = (log_probs.reshape(batch, n, -1) + self.running.scores[:, :, None]).reshape(batch, -1)
        scores, index = _top_k(total, keep) if rng is None else _sample_k(total, keep, rng)
        source = index // log_probs.shape[-1]
        cands = self.running.take(source)
        cands.scores = scores
        cands.seqs[:, :, cur_len] = index % log_probs.shape[-1]
        cands.origin[:, :, cur_len - self.prompt_len] = source + (np.arange(batch) * n)[:, None]
        return cands

    def advance(self, cands: _Hypotheses, hits: np.ndarray, cur_len: int) -> None:
        """The best candidates that did not finish (`hits` bool `[batch, keep]`) keep running; the
        finished ones among the top `num_beams` join the finished hypotheses if they rank, scored
        `sum log p / generated_len ** length_penalty`."""
        n, length_penalty, early_stopping = self.beams.num_beams, self.beams.length_penalty, self.beams.early_stopping
        open_scores, best = _top_k(cands.scores + hits * _NEG, n)
        self.running = _Hypotheses(_gather(cands.seqs, best), open_scores, _gather(cands.origin, best))
        just_finished = hits & (np.arange(hits.shape[1]) < n)
        penalized = cands.scores / np.float32((cur_len + 1 - self.prompt_len) ** length_penalty)
        full = self.is_finished.all(-1, keepdims=True) & (early_stopping is True)
        penalized = penalized + (full | ~self.can_improve) * _NEG + ~just_finished * _NEG
        scores = np.concatenate([self.finished.scores, penalized], 1)
        _, best = _top_k(scores, n)
        self.finished = self.finished.join(cands, scores).take(best)
        self.is_finished = _gather(np.concatenate([self.is_finished, just_finished], 1), best)

    def should_stop(self, cur_len: int, hits: np.ndarray) -> bool:
        """HF's `_beam_search` loop end, `cur_len` counting the token just chosen."""
        length_penalty, early_stopping = self.beams.length_penalty, self.beams.early_stopping
        hypothetical = (self.max_length if early_stopping == "never" and length_penalty > 0.0 else cur_len)
        best_possible = self.running.scores[:, :1] / np.float32((hypothetical - self.prompt_len) ** length_penalty)
        worst_finished = np.where(self.is_finished, self.finished.scores.min(-1, keepdims=True), _NEG)
        self.can_improve = self.can_improve & (best_possible > worst_finished).any(-1, keepdims=True)
        all_full = self.is_finished.all() and early_stopping is True
        return not self.can_improve.any() or all_full or hits.all()

    def result(self) -> BeamSearchResult:
        batch, n = self.finished.scores.shape[0], self.beams.num_return_sequences
        sequences = self.finished.seqs[:, :n].reshape(batch * n, self.max_length)
        origin = self.finished.origin[:, :n].reshape(batch * n, -1)
        generated = int((origin >= 0).sum(1).max())
        return BeamSearchResult(sequences[:, :self.prompt_len + generated],
                                self.finished.scores[:, :n].reshape(batch * n), origin[:, :generated])


def _step_log_probs(logits, sequences: np.ndarray, options: DecodeOptions) -> np.ndarray:
    """Log-softmax of the raw logits `[rows, vocab]`, through `options.logits_processor`, both
    recorded when `options.recorder` asks."""
    raw = logits.asnumpy()
    log_probs = _log_softmax(raw)
    if options.logits_processor:
        log_probs = options.logits_processor(sequences, log_probs)
    if options.recorder.logits is not None:
        options.recorder.logits.append(raw.copy())
    if options.recorder.scores is not None:
        options.recorder.scores.append(log_probs.copy())
    return log_probs


def _finishes(cands: _Hypotheses, cur_len: int, search: _BeamSearch, options: DecodeOptions,
              began: float) -> np.ndarray:
    """bool `[batch, keep]`: the candidates ending with an eos token, at the length limit, stopped
    by a stopping criterion, or (all) past `max_time`."""
    batch, keep = cands.scores.shape
    hits = np.isin(cands.seqs[:, :, cur_len], options.eos_token_id) | (cur_len + 1 >= search.max_length)
    flat = cands.seqs[:, :, :cur_len + 1].reshape(batch * keep, cur_len + 1)
    for criterion in options.stopping_criteria:
        hits |= np.broadcast_to(np.asarray(criterion(flat, None), bool), (batch * keep,)).reshape(batch, keep)
    if options.max_time is not None and time.perf_counter() - began > options.max_time:
        hits[:] = True
    return hits


def beam_search(state: DecodeState, input_ids: np.ndarray, options: DecodeOptions,
                beams: BeamOptions) -> BeamSearchResult:
    """Beam search continuation of `input_ids` `[batch * num_beams, seq]` (each prompt repeated
    `num_beams` times, as `state` was built), as HF's `_beam_search` (transformers 5.x).

    Each step's raw logits (float32 `[batch * num_beams, vocab]`) become log-softmax scores,
    pass through `options.logits_processor`, and are added to each beam's running score. With
    `do_sample`, the `K` candidates are drawn without replacement from the softmax of those sums
    instead of taken as the top `K`. A candidate finishes when its token is in `eos_token_id`, the
    length reaches prompt + `max_new_tokens`, a stopping criterion `(sequences [batch * K, cur_len],
    None) -> bool or bool [batch * K]` returns True for it, or `max_time` seconds have passed (all
    finish). `early_stopping`: True stops a batch row once `num_beams` hypotheses finished; False and
    "never" stop when no running beam can beat the worst finished one, estimated at the current
    length (False) or, with a positive `length_penalty`, at the maximum length ("never"), as HF.
    `options.recorder` gets the timings and, when asked, each step's processed log-probs / raw logits.

    Returns the best `num_return_sequences` hypotheses per row, best first (a `BeamSearchResult`).
    """
    began = time.perf_counter()
    rng = options.sampling_rng()
    eos = options.eos_token_id
    fill = (options.pad_token_id or eos[0]) if eos else -1  # HF's `pad or eos[0]`: pad 0 gives eos
    search = _BeamSearch.start(input_ids, beams, options.max_new_tokens, fill)
    keep = max(2, 1 + len(eos)) * beams.num_beams
    timer = StepTimer(options.recorder.stats, state)
    logits, cur_len = state.prefill(), search.prompt_len
    while True:
        log_probs = _step_log_probs(logits, search.running.seqs[:, :, :cur_len].reshape(-1, cur_len), options)
        timer.lap()
        cands = search.candidates(log_probs, cur_len, keep, rng)
        hits = _finishes(cands, cur_len, search, options, began)
        search.advance(cands, hits, cur_len)
        cur_len += 1
        if search.should_stop(cur_len, hits):
            break
        last = cur_len - 1
        logits = state.step(search.running.seqs[:, :, last].reshape(-1),
                            beam_idx=search.running.origin[:, :, last - search.prompt_len].reshape(-1))
    result = search.result()
    timer.finish(result.beam_indices.shape[1])
    return result
