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
    num_beams, length_penalty, early_stopping = beams.num_beams, beams.length_penalty, beams.early_stopping
    eos_token_id, pad_token_id, max_new_tokens = options.eos_token_id, options.pad_token_id, options.max_new_tokens
    recorder = options.recorder
    prompt_len = input_ids.shape[1]
    batch = input_ids.shape[0] // num_beams
    max_length = prompt_len + max_new_tokens
    timer = StepTimer(recorder.stats, state)

    keep = max(2, 1 + len(eos_token_id)) * num_beams
    is_top_beam = np.arange(keep) < num_beams
    fill = (pad_token_id or eos_token_id[0]) if eos_token_id else -1  # HF's `pad or eos[0]`: pad 0 gives eos
    running = np.full((batch, num_beams, max_length), fill, np.int64)
    running[:, :, :prompt_len] = input_ids.reshape(batch, num_beams, prompt_len)
    finished_seqs = running.copy()
    running_scores = np.zeros((batch, num_beams), np.float32)
    running_scores[:, 1:] = _NEG  # only the first beam's continuations at the start: no duplicates
    finished_scores = np.full((batch, num_beams), _NEG, np.float32)
    is_finished = np.zeros((batch, num_beams), bool)
    can_improve = np.ones((batch, 1), bool)
    running_origin = np.full((batch, num_beams, max_new_tokens), -1, np.int32)
    finished_origin = running_origin.copy()
    batch_offset = (np.arange(batch) * num_beams)[:, None]

    logits = state.prefill()
    cur_len = prompt_len
    while True:
        raw = logits.asnumpy()
        flat_running = running[:, :, :cur_len].reshape(batch * num_beams, cur_len)
        log_probs = _log_softmax(raw)
        if options.logits_processor:
            log_probs = options.logits_processor(flat_running, log_probs)
        if recorder.logits is not None:
            recorder.logits.append(raw.copy())
        if recorder.scores is not None:
            recorder.scores.append(log_probs.copy())
        timer.lap()

        # candidates: the top K of all beams' continuations, scored by the summed log-probs
        total = (log_probs.reshape(batch, num_beams, -1) + running_scores[:, :, None]).reshape(batch, -1)
        cand_scores, cand_index = _sample_k(total, keep, rng) if options.do_sample else _top_k(total, keep)
        vocab = log_probs.shape[-1]
        source = cand_index // vocab
        cand_seqs = _gather(running, source)
        cand_seqs[:, :, cur_len] = cand_index % vocab
        cand_origin = _gather(running_origin, source)
        cand_origin[:, :, cur_len - prompt_len] = source + batch_offset

        hits = np.isin(cand_seqs[:, :, cur_len], eos_token_id) | (cur_len + 1 >= max_length)
        flat_cands = cand_seqs[:, :, :cur_len + 1].reshape(batch * keep, cur_len + 1)
        for criterion in options.stopping_criteria:
            hits |= np.broadcast_to(np.asarray(criterion(flat_cands, None), bool), (batch * keep,)).reshape(batch, keep)
        if options.max_time is not None and time.perf_counter() - began > options.max_time:
            hits[:] = True

        # the best candidates that did not finish keep running
        open_scores = cand_scores + hits * _NEG
        running_scores, best = _top_k(open_scores, num_beams)
        running = _gather(cand_seqs, best)
        running_origin = _gather(cand_origin, best)

        # finished candidates among the top num_beams join the finished hypotheses if they rank
        just_finished = hits & is_top_beam
        penalized = cand_scores / np.float32((cur_len + 1 - prompt_len) ** length_penalty)
        full = is_finished.all(-1, keepdims=True) & (early_stopping is True)
        penalized = penalized + (full | ~can_improve) * _NEG + ~just_finished * _NEG
        finished_scores, best = _top_k(np.concatenate([finished_scores, penalized], 1), num_beams)
        finished_seqs = _gather(np.concatenate([finished_seqs, cand_seqs], 1), best)
        finished_origin = _gather(np.concatenate([finished_origin, cand_origin], 1), best)
        is_finished = _gather(np.concatenate([is_finished, just_finished], 1), best)

        cur_len += 1
        hypothetical = (max_length if early_stopping == "never" and length_penalty > 0.0 else cur_len) - prompt_len
        best_possible = running_scores[:, :1] / np.float32(hypothetical ** length_penalty)
        worst_finished = np.where(is_finished, finished_scores.min(-1, keepdims=True), _NEG)
        can_improve = can_improve & (best_possible > worst_finished).any(-1, keepdims=True)
        all_full = is_finished.all() and early_stopping is True
        if not can_improve.any() or all_full or hits.all():
            break
        logits = state.step(running[:, :, cur_len - 1].reshape(-1),
                            beam_idx=running_origin[:, :, cur_len - 1 - prompt_len].reshape(-1))

    n = beams.num_return_sequences
    sequences = finished_seqs[:, :n].reshape(batch * n, max_length)
    scores = finished_scores[:, :n].reshape(batch * n)
    origin = finished_origin[:, :n].reshape(batch * n, max_new_tokens)
    generated = int((origin >= 0).sum(1).max())
    timer.finish(generated)
    return BeamSearchResult(sequences[:, :prompt_len + generated], scores, origin[:, :generated])
