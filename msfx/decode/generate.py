"""Greedy or sampled decoding over an explicit KV cache (HF `GenerationMixin._sample`).

The loop runs on the host; each step is one call of a `CompiledStep` (or its eager twin).
Compiled graphs are keyed by shape, so shapes are bucketed: the cache holds the prompt plus the
new tokens rounded up to `CACHE_BUCKET` slots, and a compiled prefill left-pads the prompt
(masked) to `prefill_width(length)` tokens. One decode graph then serves every step of a
generation and every prompt whose cache rounds to the same length; one prefill graph every
prompt of the same width.
"""
from __future__ import annotations

import time

import numpy as np
from mindspore import Tensor, ops

from msfx.decode.cache import KVCache
from msfx.decode.options import DecodeOptions, GenerationStats
from msfx.decode.sampling import sample_tokens
from msfx.decode.step import CompiledStep
from msfx.families import family

CACHE_BUCKET = 64


def prefill_width(length: int) -> int:
    """A compiled prefill's width for a `length`-token prompt: `length` rounded up to a multiple of 8, or of
    a quarter of the largest power of two within it, whichever is larger. Padding costs under a quarter of
    the prompt's work (a prompt's rows are its products' bill: 37 tokens padded to 64 took 1.3x as long as
    37 on SmolLM2, 40 to 64 at batch 8 1.7x; measured), and four graphs serve each doubling of length."""
    step = max(8, 1 << max(length.bit_length() - 3, 0))
    return -(-length // step) * step


def left_padding_positions(attention_mask: np.ndarray) -> np.ndarray:
    """HF's generation positions (`_prepare_position_ids_for_generation`): `cumsum(mask) - 1`,
    with 0 on padding slots."""
    positions = np.cumsum(attention_mask, -1) - 1
    return np.where(attention_mask == 0, 0, positions).astype(np.int32)


def new_cache(config, batch: int, max_len: int, dtype, lengths: tuple[int, ...] | None = None) -> KVCache:
    """Zeroed `KVCache` for a decoder with HF's standard attention config attributes
    (`num_hidden_layers`, `num_key_value_heads` or `num_attention_heads`, `head_dim` or
    `hidden_size // num_attention_heads`); `lengths`: per-layer slots (default `max_len`)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KVCache.init(config.num_hidden_layers, batch, kv_heads, max_len, d, dtype, lengths)


class DecodeState:
    """One generation's model-side state: the KV cache, the key mask over its slots, the ids and
    positions written so far; runs the prompt (`prefill`) and each new
    token (`step`).

    `input_ids` / `attention_mask`: `[batch, prompt]` numpy (left-padded, mask 0 on pads). With
    `bucket_prompt`, the prompt is left-padded further (masked, so the logits do not change) to
    `prefill_width(prompt)` tokens, for a compiled prefill. The cache holds the prompt plus `max_new_tokens`
    slots, rounded up to `CACHE_BUCKET`. With `use_cache` False every step runs the whole
    sequence through `prefill` again (HF's `use_cache=False`). A family whose record has a
    `cache_refill_length(config)` has its cache recomputed once, at the step whose sequence
    (HF-counted: without the bucket's padding) holds that many tokens before the new one
    (Phi-3's switch to the long rope factors). With `prompt_embeds` (`[batch, prompt, hidden]`, a
    multimodal prompt's embeddings), `prefill` is a step over embeddings (`CompiledStep(...,
    embeds=True)`) and runs them instead of the prompt's ids.
    """

    def __init__(self, config, prefill: CompiledStep, step: CompiledStep, input_ids: np.ndarray,
                 attention_mask: np.ndarray, max_new_tokens: int, bucket_prompt: bool = False,
                 use_cache: bool = True, prompt_embeds: Tensor | None = None):
        self.config, self._prefill, self._step, self._use_cache = config, prefill, step, use_cache
        extra = prefill_width(input_ids.shape[1]) - input_ids.shape[1] if bucket_prompt else 0
        if prompt_embeds is not None and extra:
            zeros = ops.zeros((prompt_embeds.shape[0], extra, prompt_embeds.shape[2]), prompt_embeds.dtype)
            prompt_embeds = ops.concat((zeros, prompt_embeds), 1)  # masked, as the padded ids
        self._prompt_embeds = prompt_embeds
        input_ids = np.pad(input_ids, ((0, 0), (extra, 0)))
        attention_mask = np.pad(attention_mask, ((0, 0), (extra, 0)))
        self.input_ids = input_ids  # then each new token: the ids in cache slots 0..slot-1
        batch, self.prompt_len = input_ids.shape
        max_len = -(-(self.prompt_len + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
        rules = family(config.model_type)
        lengths = rules.arch.cache_lengths(config, max_len) if rules.ring_cache else None  # sliding-window rings
        self.cache = new_cache(config, batch, max_len, prefill.dtype, lengths)
        refill = rules.cache_refill_length
        self._refill_slot = None if refill is None else refill(config) + extra
        key_mask = np.ones((batch, max_len), np.int32)
        key_mask[:, :self.prompt_len] = attention_mask
        self.key_mask = Tensor(key_mask)
        self._step_inputs = prefill.arch.step_inputs(config)  # e.g. rope frequencies, by positions
        self.position_ids = left_padding_positions(attention_mask)  # of slots 0..slot-1
        self.slot = 0

    @property
    def compiles(self) -> int:
        """Graphs the prefill and decode steps have compiled so far."""
        steps = {id(s): s for s in (self._prefill, self._step)}
        return sum(s.compiles for s in steps.values())

    def _run_from_start(self) -> Tensor:
        """Every id written so far run through `prefill`, rewriting cache slots 0..slot-1."""
        positions = self.position_ids
        if self._prompt_embeds is not None:
            if self.slot != self.prompt_len:
                raise NotImplementedError("generation from prompt embeddings (an image prompt) runs with the "
                                          "cache only: use_cache=False and cache refills are not supported")
            inputs = self._prompt_embeds
        else:
            inputs = Tensor(self.input_ids.astype(np.int32))
        logits, self.cache = self._prefill(inputs, self.key_mask, Tensor(positions),
                                           Tensor(np.arange(self.slot, dtype=np.int32)),
                                           self._step_inputs(positions), self.cache)
        return logits

    def prefill(self) -> Tensor:
        """The prompt's last-position logits, float32 `[batch, vocab]`; fills the cache."""
        self.slot = self.prompt_len
        return self._run_from_start()

    def step(self, tokens: np.ndarray, beam_idx: np.ndarray | None = None) -> Tensor:
        """Logits float32 `[batch, vocab]` after `tokens` (int `[batch]`), written to the next cache slot.
        `beam_idx` (int `[batch]`): first reorder the cache rows (beam search)."""
        if beam_idx is not None:
            self.input_ids, self.position_ids = self.input_ids[beam_idx], self.position_ids[beam_idx]
        positions = self.position_ids[:, -1:] + 1  # HF 5.x: last position + 1
        recompute = not self._use_cache or self.slot == self._refill_slot  # HF drops its cache: all slots rewritten
        self.input_ids = np.concatenate([self.input_ids, tokens[:, None]], 1)
        self.position_ids = np.concatenate([self.position_ids, positions], 1)
        self.slot += 1
        if recompute:
            return self._run_from_start()
        logits, self.cache = self._step(Tensor(tokens[:, None].astype(np.int32)), self.key_mask, Tensor(positions),
                                        Tensor(np.array([self.slot - 1], np.int32)), self._step_inputs(positions),
                                        self.cache, None if beam_idx is None else Tensor(beam_idx.astype(np.int32)))
        return logits


class StepTimer:
    """Splits wall time between the prefill, graph compiles and decode steps into `stats`. A call
    that compiled a graph counts as compile time (a compiling prefill leaves `prefill_seconds` 0)."""

    def __init__(self, stats: GenerationStats, state: DecodeState):
        self.stats, self._step, self._compiles = stats, state, state.compiles
        self._first, self._start = True, time.perf_counter()

    def lap(self) -> None:
        now = time.perf_counter()
        if self._step.compiles > self._compiles:  # this call built its graph: time it apart
            self.stats.compile_seconds += now - self._start
            self._compiles = self._step.compiles
        elif self._first:
            self.stats.prefill_seconds = now - self._start
        else:
            self.stats.step_times.append(now - self._start)
        self._first = False
        self._start = now

    def finish(self, new_tokens: int) -> None:
        self.stats.new_tokens = new_tokens
        self.stats.decode_seconds = float(sum(self.stats.step_times))


def decode_loop(state: DecodeState, input_ids: np.ndarray, options: DecodeOptions) -> np.ndarray:
    """Greedy or sampled continuation of `input_ids` `[batch, seq]`, HF's `GenerationMixin._sample`.

    `state` runs the model: its `prefill()` gives the logits after the prompt, its
    `step(tokens)` those after each new token (a `DecodeState`, or an encoder-decoder's).

    Each step's last logits (float32 numpy `[batch, vocab]`) go through `options.logits_processor`,
    then the next token is their argmax, or with `do_sample` a draw from their softmax. Returns int64
    `[batch, seq + new]`, `new <= max_new_tokens`: generation stops when every row has finished,
    i.e. produced one of `eos_token_id` or been stopped by a stopping criterion (given the sequences
    and this step's scores), or once `max_time` seconds have passed since the call began. As in HF,
    finished rows continue with `pad_token_id` (see `DecodeOptions.pads_finished`). `options.recorder`
    gets the timings, the streamed tokens and, when asked, each step's scores and raw logits.
    """
    began = time.perf_counter()
    rng = options.sampling_rng()
    recorder, pads_finished = options.recorder, options.pads_finished
    batch, prompt_len = input_ids.shape
    if recorder.streamer is not None:
        recorder.streamer.put(input_ids)
    timer = StepTimer(recorder.stats, state)
    logits = state.prefill()
    sequences = input_ids.astype(np.int64)
    unfinished = np.ones(batch, bool)
    for i in range(options.max_new_tokens):
        scores = logits.asnumpy()
        if recorder.logits is not None:
            recorder.logits.append(scores.copy())  # a processor may edit its input in place
        if options.logits_processor:
            scores = options.logits_processor(sequences, scores)
        if recorder.scores is not None:
            recorder.scores.append(scores)
        tokens = sample_tokens(scores, rng) if options.do_sample else np.argmax(scores, -1)
        timer.lap()
        if pads_finished:
            tokens = np.where(unfinished, tokens, options.pad_token_id)
        sequences = np.concatenate([sequences, tokens[:, None]], 1)
        if recorder.streamer is not None:
            recorder.streamer.put(tokens)
        unfinished &= ~np.isin(tokens, options.eos_token_id)
        for criterion in options.stopping_criteria:
            unfinished &= ~np.broadcast_to(np.asarray(criterion(sequences, scores), bool), unfinished.shape)
        if options.max_time is not None and time.perf_counter() - began > options.max_time:
            unfinished[:] = False
        if not unfinished.any() or i == options.max_new_tokens - 1:
            break
        logits = state.step(tokens)
    if recorder.streamer is not None:
        recorder.streamer.end()
    timer.finish(sequences.shape[1] - prompt_len)
    return sequences
