"""Greedy or sampled decoding over an explicit KV cache (HF `GenerationMixin._sample`).

The loop runs on the host; each step is one call of a `CompiledStep` (or its eager twin).
The cache length is the prompt plus new tokens rounded up to `CACHE_BUCKET`, so prompts of
similar length share compiled graphs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from mindspore import Tensor

from msfx.decode.cache import KVCache
from msfx.decode.sampling import make_rng, sample_tokens
from msfx.decode.step import CompiledStep
from msfx.layers.rotary import rope_frequencies

CACHE_BUCKET = 64


@dataclass
class GenerationStats:
    """Timings of the last `decode_loop` call, in seconds and tokens."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0
    step_times: list = field(default_factory=list)


def left_padding_positions(attention_mask: np.ndarray) -> np.ndarray:
    """HF's generation positions (`_prepare_position_ids_for_generation`): `cumsum(mask) - 1`,
    with 0 on padding slots."""
    positions = np.cumsum(attention_mask, -1) - 1
    return np.where(attention_mask == 0, 0, positions).astype(np.int32)


def _inv_freq(config, position_ids: np.ndarray, constant: Tensor | None) -> Tensor:
    if constant is not None:
        return constant
    return Tensor(rope_frequencies(config, int(position_ids.max()) + 1)[0])


def decode_loop(config, prefill: CompiledStep, step: CompiledStep, input_ids: np.ndarray,
                attention_mask: np.ndarray, max_new_tokens: int, eos_token_id: list[int], pad_token_id: int | None,
                streamer=None, stats: GenerationStats | None = None, *, logits_processor=None,
                do_sample: bool = False, rng: np.random.Generator | None = None, stopping_criteria=None,
                max_time: float | None = None, scores_out: list | None = None,
                logits_out: list | None = None) -> np.ndarray:
    """Greedy or sampled continuation of `input_ids` `[batch, seq]` (left-padded, `attention_mask` 0 on pads),
    HF's `GenerationMixin._sample`.

    Each step's last logits (float32 numpy `[batch, vocab]`) go through `logits_processor`
    (`(sequences, scores) -> scores`, e.g. a `msfx.decode.processors.LogitsProcessorList`), then
    the next token is their argmax, or with `do_sample` a draw from their softmax with `rng`.
    Returns int64 `[batch, seq + new]`, `new <= max_new_tokens`: generation stops when every row
    has finished, i.e. produced one of `eos_token_id` or been stopped by a `stopping_criteria`
    callable `(sequences int64 [batch, cur_len], scores [batch, vocab]) -> bool or bool [batch]`,
    or once `max_time` seconds have passed since the call began. As in HF, when there is an eos
    (or a criterion with an `eos_token_id` attribute), finished rows continue with `pad_token_id`.
    `streamer` (e.g. `transformers.TextStreamer`) gets the prompt, then each new token column.
    `scores_out` / `logits_out`, when given, get each step's processed scores / a copy of its raw
    logits appended (HF's `output_scores` / `output_logits`); nothing is kept otherwise.
    `prefill` runs the prompt and `step` each new token; an eager prefill skips compiling a
    graph per prompt length, which costs more than it saves for one call.
    """
    began = time.perf_counter()
    stopping_criteria = list(stopping_criteria or [])
    pads_finished = pad_token_id is not None and (bool(eos_token_id) or any(hasattr(c, "eos_token_id")
                                                                             for c in stopping_criteria))
    if do_sample and rng is None:
        rng = make_rng()
    batch, prompt_len = input_ids.shape
    max_len = -(-(prompt_len + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = prefill.leaves[0].dtype
    cache = KVCache.init(config.num_hidden_layers, batch, config.num_key_value_heads, max_len, d, dtype)
    key_mask = np.ones((batch, max_len), np.int32)
    key_mask[:, :prompt_len] = attention_mask
    key_mask = Tensor(key_mask)
    rope_type = config.rope_parameters.get("rope_type", "default")
    constant = None if rope_type in ("dynamic", "longrope") else Tensor(rope_frequencies(config)[0])
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = int(attention_mask.sum())

    if streamer is not None:
        streamer.put(input_ids)
    position_ids = left_padding_positions(attention_mask)
    start = time.perf_counter()
    logits, cache = prefill(Tensor(input_ids.astype(np.int32)), key_mask, Tensor(position_ids),
                         Tensor(np.arange(prompt_len, dtype=np.int32)), _inv_freq(config, position_ids, constant), cache)
    sequences = input_ids.astype(np.int64)
    unfinished = np.ones(batch, bool)
    next_positions = position_ids[:, -1:] + 1  # HF 5.x: each new token at the last position + 1
    compiles = step.compiles
    for i in range(max_new_tokens):
        scores = logits.asnumpy()
        if logits_out is not None:
            logits_out.append(scores.copy())  # a processor may edit its input in place
        if logits_processor:
            scores = logits_processor(sequences, scores)
        if scores_out is not None:
            scores_out.append(scores)
        tokens = sample_tokens(scores, rng) if do_sample else np.argmax(scores, -1)
        now = time.perf_counter()
        if i == 0:
            stats.prefill_seconds = now - start
        elif step.compiles > compiles:  # this step built its graph: time it apart from decoding
            stats.compile_seconds += now - start
            compiles = step.compiles
        else:
            stats.step_times.append(now - start)
        start = now
        if pads_finished:
            tokens = np.where(unfinished, tokens, pad_token_id)
        sequences = np.concatenate([sequences, tokens[:, None]], 1)
        if streamer is not None:
            streamer.put(tokens)
        unfinished &= ~np.isin(tokens, eos_token_id)
        for criterion in stopping_criteria:
            unfinished &= ~np.broadcast_to(np.asarray(criterion(sequences, scores), bool), unfinished.shape)
        if max_time is not None and time.perf_counter() - began > max_time:
            unfinished[:] = False
        if not unfinished.any() or i == max_new_tokens - 1:
            break
        slot = prompt_len + i
        logits, cache = step(Tensor(tokens[:, None].astype(np.int32)), key_mask, Tensor(next_positions),
                             Tensor(np.array([slot], np.int32)), _inv_freq(config, next_positions, constant), cache)
        next_positions = next_positions + 1
    if streamer is not None:
        streamer.end()
    stats.new_tokens = sequences.shape[1] - prompt_len
    stats.decode_seconds = float(sum(stats.step_times))
    return sequences

