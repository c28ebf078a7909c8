"""Encoder-decoder (T5, Whisper) generation state over an explicit KV cache: the compiled decoder step and
the per-generation state `msfx.generation.GenerationMixin` decodes with (as `msfx.decode.generate.DecodeState`
for decoder-only models). The architecture module (`msfx.architectures.t5`, `.whisper`) supplies pure
functions: `encode_source`, `cross_attention_cache`, `decoder_forward`, `decode_step`, `lm_head`,
`decoder_cache_shape`, `decoder_params`.
"""
from __future__ import annotations

from types import ModuleType

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from msfx.decode.cache import KVCache, reorder_cache
from msfx.decode.generate import CACHE_BUCKET
from msfx.decode.step import graph_weights
from msfx.jit import Graph
from msfx.layers.attention import padding_bias
from msfx.inputs import check_token_ids
from msfx.params.tree import flatten, unflatten


class DecoderStep:
    """`arch.decode_step` compiled with `mindspore.jit` (trace mode) over flat positional tensors, as
    `msfx.decode.step.CompiledStep` does for decoder-only models: `(tokens, position, cross_bias,
    *cross_leaves, *cache_leaves) -> (logits, *cache_leaves)`, closing over the decoder's weights
    (`graph_weights`). The cross-attention
    keys/values are inputs only (computed once per generation); the self-attention cache goes in and
    comes back. Called with `beam_idx` (int32 `[batch]`), the step first gathers the self-attention
    cache rows by it, inside the same graph.

    One graph per (batch, source length, cache length, reordering or not); `compiles` counts them. A
    model keeps one `DecoderStep`, so its graphs serve every later generation with the same shapes.
    """

    def __init__(self, arch: ModuleType, params: dict, config):
        leaves, keys = flatten(arch.decoder_params(params))  # not the encoder's leaves
        weights = graph_weights(leaves)
        cache_start = 2 * arch.decoder_cache_shape(config)[0]

        def step(tokens, position, cross_bias, *leaves):
            logits, cache = arch.decode_step(unflatten(weights, keys), tokens, position, cross_bias,
                                           KVCache.from_leaves(leaves[:cache_start]),
                                           KVCache.from_leaves(leaves[cache_start:]), config)
            return (logits, *cache.leaves())

        def reordered_step(beam_idx, tokens, position, cross_bias, *leaves):
            cache = reorder_cache(KVCache.from_leaves(leaves[cache_start:]), beam_idx)
            return step(tokens, position, cross_bias, *leaves[:cache_start], *cache.leaves())

        name = arch.MODEL_TYPE
        self._graph, self._reordered = Graph(step, f"{name}_step"), Graph(reordered_step, f"{name}_reordered_step")

    @property
    def compiles(self) -> int:
        """Graphs built so far (distinct input signatures seen)."""
        return self._graph.compiles + self._reordered.compiles

    def __call__(self, tokens: Tensor, position: Tensor, cross_bias: Tensor, cross_cache: KVCache, cache: KVCache,
                 beam_idx: Tensor | None = None) -> tuple[Tensor, KVCache]:
        """`arch.decode_step`'s logits (float32 `[batch, vocab]`) and updated cache; arguments as there, all
        validated by the caller (an error while tracing would hang the process at exit)."""
        signature = (tuple(tokens.shape), tuple(cross_bias.shape), tuple(cache.keys[0].shape))
        args = (tokens, position, cross_bias, *cross_cache.leaves(), *cache.leaves())
        if beam_idx is None:
            logits, *leaves = self._graph(*args, signature=signature)
        else:
            logits, *leaves = self._reordered(beam_idx, *args, signature=signature)
        return logits, KVCache.from_leaves(leaves)


class Seq2SeqDecodeState:
    """One generation's model side: runs the encoder once (eagerly), keeps its cross-attention keys/values
    and a self-attention cache of `decoder_ids` plus `max_new_tokens` slots, and gives the next-token
    logits (float32 `[batch, vocab]`) after the decoder's prompt (`prefill`) and after each new token
    (`step`), as `msfx.generation.GenerationMixin` expects of an encoder-decoder.

    `encoder_ids` / `encoder_mask`: the source as numpy, `[batch, source_seq]` token ids and mask (T5) or
    `[batch, mels, frames]` features and a `[batch, 1]` mask (Whisper); `decoder_ids`: `[batch, n]` numpy
    (the `decoder_start_token_id` column, or Whisper's start tokens), rows already repeated per beam /
    returned sequence. With
    `step` (a `DecoderStep`), every decoder token runs the compiled step, over a cache rounded up to
    `CACHE_BUCKET` slots so that one graph serves generations of similar lengths; without, the decoder
    runs eagerly (`decoder_forward`); without `use_cache` too, running all its tokens at each step (HF's
    `use_cache=False`).

    Raises:
        ValueError: a decoder id outside `[0, vocab_size)`; a `step` without `use_cache`; in compiled steps,
            more tokens than the cache holds (checked before the step runs: an error while tracing would hang
            the process at exit).
    """

    def __init__(self, arch: ModuleType, params: dict, config, encoder_ids: np.ndarray, encoder_mask: np.ndarray,
                 decoder_ids: np.ndarray, max_new_tokens: int, step: DecoderStep | None = None,
                 use_cache: bool = True):
        if step is not None and not use_cache:
            raise ValueError("use_cache=False runs the decoder eagerly: pass no compiled step")
        self.arch, self.params, self.config, self._step, self._use_cache = arch, params, config, step, use_cache
        self.decoder_ids = check_token_ids(decoder_ids, config.vocab_size)  # then each new token
        encoded = arch.encode_source(params, encoder_ids, encoder_mask, config)
        # the cross-attention mask is over the encoder's output positions (Whisper: all of them)
        if encoder_mask.shape[1] != encoded.shape[1]:
            encoder_mask = np.ones(encoded.shape[:2], np.int32)
        self.encoder_mask = Tensor(encoder_mask.astype(np.int32))
        self.cross_cache = arch.cross_attention_cache(params, encoded, config)
        batch, max_len = decoder_ids.shape[0], decoder_ids.shape[1] + max_new_tokens
        if step is None:
            self.key_mask = ops.ones((batch, max_len), ms.int32)  # HF decodes without a decoder mask: causal only
        else:
            max_len = -(-max_len // CACHE_BUCKET) * CACHE_BUCKET
            self.cross_bias = padding_bias(self.encoder_mask)
            # Beam search gathers rows among one prompt's copies, whose encoder rows are equal: the
            # cross-attention state needs moving only when a row comes from a different encoder row.
            rows = np.concatenate([encoder_ids.reshape(batch, -1), encoder_mask.reshape(batch, -1)], 1)
            self._encoder_row = np.unique(rows, axis=0, return_inverse=True)[1].reshape(-1)
        layers, heads, head_dim = arch.decoder_cache_shape(config)
        self.cache = KVCache.init(layers, batch, heads, max_len, head_dim, encoded.dtype)
        self.slot = 0

    @property
    def compiles(self) -> int:
        """Graphs the compiled step has built so far, over its lifetime (0 when eager)."""
        return 0 if self._step is None else self._step.compiles

    def _run(self, ids: np.ndarray, beam_idx: Tensor | None = None) -> Tensor:
        if self._step is None:
            out = self.arch.decoder_forward(self.params, Tensor(ids.astype(np.int32)), None, self.key_mask, self.encoder_mask,
                                  cache=self.cache, past_length=self.slot, cross_cache=self.cross_cache,
                                  config=self.config, check_ids=False)
            self.cache, self.slot = out.cache, self.slot + ids.shape[1]
            return self.arch.lm_head(self.params, out.last_hidden_state[:, -1], self.config).astype(ms.float32)
        if self.slot + ids.shape[1] > self.cache.max_len:
            raise ValueError(f"the decoder cache has {self.cache.max_len} slots: {ids.shape[1]} more tokens after "
                             f"{self.slot} do not fit (max_new_tokens sizes it)")
        for column in ids.T:  # the compiled step takes one token per row; the cache makes this exact
            logits, self.cache = self._step(Tensor(column.astype(np.int32)), Tensor(np.int32(self.slot)),
                                            self.cross_bias, self.cross_cache, self.cache, beam_idx)
            self.slot, beam_idx = self.slot + 1, None
        return logits

    def prefill(self) -> Tensor:
        """Logits float32 `[batch, vocab]` after the decoder's prompt; fills its cache slots."""
        return self._run(self.decoder_ids)

    def step(self, tokens: np.ndarray, beam_idx: np.ndarray | None = None) -> Tensor:
        """Logits float32 `[batch, vocab]` after `tokens` (int `[batch]`). `beam_idx` (int `[batch]`, beam
        search): first gather the cache rows by it, and the cross-attention keys/values and encoder mask
        (the compiled path skips those while every row keeps its encoder row, as within a prompt's beams)."""
        index = None if beam_idx is None else Tensor(beam_idx.astype(np.int32))
        previous = self.decoder_ids if beam_idx is None else self.decoder_ids[beam_idx]
        self.decoder_ids = np.concatenate([previous, tokens[:, None]], 1)
        if not self._use_cache:  # the whole decoder sequence again, from slot 0
            self.encoder_mask = self.encoder_mask if index is None else ops.gather(self.encoder_mask, index, 0)
            self.cross_cache = self.cross_cache if index is None else reorder_cache(self.cross_cache, index)
            self.slot = 0
            return self._run(self.decoder_ids)
        if index is not None and self._step is None:
            self.cache, self.cross_cache = reorder_cache(self.cache, index), reorder_cache(self.cross_cache, index)
            self.encoder_mask = ops.gather(self.encoder_mask, index, 0)
            index = None
        elif index is not None and (self._encoder_row[beam_idx] != self._encoder_row).any():
            self.cross_cache = reorder_cache(self.cross_cache, index)
            self.cross_bias = ops.gather(self.cross_bias, index, 0)
            self._encoder_row = self._encoder_row[beam_idx]
        return self._run(tokens[:, None], index)
