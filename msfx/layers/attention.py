"""Scaled dot-product attention with causal or bidirectional padding masks and grouped-query heads.

Follows HF's eager attention (`transformers.models.llama.modeling_llama.eager_attention_forward`):
scores in the input dtype, masked and softmaxed in float32, cast back before `@ v`.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from msfx.decode.cache import KVCache
from msfx.layers.basic import cast, linear, scaled, tanh, transposed
from msfx.backend import lacks_bf16_kernels
from msfx.layers.dropout import dropout

_BMM_T = ops.BatchMatMul(transpose_b=True)
_BMM = ops.BatchMatMul()
_MASKED = float(np.finfo(np.float32).min)
LONG_QUERIES = 1024  # prompts up to this many tokens (and every decode step) attend in one block
SCORE_BLOCK_BYTES = 64 * 2**20  # float32 scores per query block beyond that


def arange(n: int) -> Tensor:
    """`[n]` int32 `0..n-1` as a constant (`ops.arange` cannot be traced by `jit`)."""
    return Tensor(np.arange(n, dtype=np.int32))


def attention_bias(key_mask: Tensor, query_slots: Tensor, sliding_window: int | None = None) -> Tensor:
    """Additive float32 mask `[batch, 1, 1, seq, keys]`: 0 where a query may attend, else the
    float32 minimum (HF's convention, so fully masked rows stay finite).

    Args:
        key_mask: `[batch, keys]` int/bool, 1 for real tokens, 0 for padding.
        query_slots: `[seq]` int, each query's index along the key axis (HF's `cache_position`);
            a query sees keys at slots `<=` its own.
        sliding_window: if set, a query also ignores keys `sliding_window` or more slots back.
    """
    keys = arange(key_mask.shape[-1]).reshape(1, -1)
    slots = query_slots.astype(ms.int32).reshape(-1, 1)
    allowed = keys <= slots
    if sliding_window is not None:
        allowed = ops.logical_and(allowed, keys > slots - sliding_window)
    allowed = ops.logical_and(allowed.expand_dims(0), key_mask.astype(ms.bool_).expand_dims(1))
    bias = (1.0 - allowed.astype(ms.float32)) * _MASKED
    return bias.reshape(bias.shape[0], 1, 1, bias.shape[1], bias.shape[2])


def ring_attention_bias(key_mask: Tensor, query_slots: Tensor, ring: int, sliding_window: int) -> Tensor:
    """Additive float32 mask `[batch, 1, 1, seq, ring + seq]` for sliding-window attention over a
    ring buffer (see `msfx.decode.cache.write_ring`) followed by the queries' own new keys.

    Before the first query's slot `p`, ring slot `j` holds position `p - 1 - ((p - 1 - j) mod ring)`
    (negative: never written). A query at slot `q` sees keys at positions in
    `(q - sliding_window, q]` that are real tokens in `key_mask` `[batch, max_len]`, as
    `attention_bias` with `sliding_window` does over a full-length cache.
    """
    first = query_slots[:1].astype(ms.int32) - 1
    held = first - ops.floor_mod(first - arange(ring), ring)
    positions = ops.concat((held, query_slots.astype(ms.int32)))  # [ring + seq]
    real = ops.gather(key_mask.astype(ms.int32), ops.maximum(positions, 0), 1).astype(ms.bool_)
    real = ops.logical_and(real, (positions >= 0).expand_dims(0))  # [batch, keys]
    slots = query_slots.astype(ms.int32).reshape(-1, 1)
    keys = positions.reshape(1, -1)
    allowed = ops.logical_and(keys <= slots, keys > slots - sliding_window)
    allowed = ops.logical_and(allowed.expand_dims(0), real.expand_dims(1))
    bias = (1.0 - allowed.astype(ms.float32)) * _MASKED
    return bias.reshape(bias.shape[0], 1, 1, bias.shape[1], bias.shape[2])


def padding_bias(key_mask: Tensor) -> Tensor:
    """Additive float32 mask `[batch, 1, 1, 1, keys]` for bidirectional (encoder) attention: every
    query sees every real key; padding keys get the float32 minimum (HF's `create_bidirectional_mask`
    for eager attention).

    Args:
        key_mask: `[batch, keys]` int/bool, 1 for real tokens, 0 for padding.
    """
    bias = (1.0 - key_mask.astype(ms.bool_).astype(ms.float32)) * _MASKED
    return bias.reshape(bias.shape[0], 1, 1, 1, bias.shape[1])


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float,
                                 softcap: float | None = None, dropout_rate: float = 0.0) -> Tensor:
    """softmax(q k^T * scale + bias) v with grouped-query heads (Ainslie et al. 2023).

    More than `LONG_QUERIES` queries are attended in blocks of rows whose float32 scores take at
    most `SCORE_BLOCK_BYTES`, so the `[batch, heads, seq, keys]` scores never exist whole (a
    4096-token SmolLM2 forward peaked at 6.1 GB unblocked, HF + torch at 2.0 GB); softmax is per
    row, so the result is the same.

    Args:
        q: `[batch, heads, seq, head_dim]`.
        k, v: `[batch, kv_heads, keys, head_dim]`; `heads` is a multiple of `kv_heads` and query
            head `i` reads kv head `i // (heads // kv_heads)`, as HF's `repeat_kv`.
        bias: additive float32 mask broadcastable to `[batch, kv_heads, groups, seq, keys]`
            (see `attention_bias`).
        scale: usually `head_dim ** -0.5`.
        softcap: if set, scores become `softcap * tanh(scores / softcap)` before the mask
            (Gemma 2's `attn_logit_softcapping`).
        dropout_rate: dropout on the probabilities in training (`msfx.layers.dropout`; HF's
            `attention_dropout` / `attention_probs_dropout_prob` / `attn_pdrop`).

    Returns:
        `[batch, heads, seq, head_dim]` in q's dtype.
    """
    b, h, s, _ = q.shape
    if s <= LONG_QUERIES:
        return _attend(q, k, v, bias, scale, softcap, dropout_rate)
    rows = max(64, SCORE_BLOCK_BYTES // (4 * b * h * k.shape[2]))
    blocks = []
    for start in range(0, s, rows):
        stop = min(start + rows, s)
        block_bias = bias if bias.shape[-2] == 1 else bias[..., start:stop, :]
        blocks.append(_attend(q[:, :, start:stop], k, v, block_bias, scale, softcap, dropout_rate))
    return ops.concat(blocks, 2)


def _attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float, softcap: float | None,
            dropout_rate: float) -> Tensor:
    b, h, s, d = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    groups = h // kv_heads
    # Folding the query groups into the sequence axis shares each kv head without copying it.
    scores = scaled(_bmm(_BMM_T, q.reshape(b, kv_heads, groups * s, d), k), scale)
    if softcap is not None:
        scores = tanh(scores / softcap) * softcap
    scores = cast(scores, ms.float32)
    probs = ops.softmax(scores.reshape(b, kv_heads, groups, s, keys) + bias, -1)
    probs = cast(probs, q.dtype)
    probs = dropout(probs, dropout_rate)
    return _bmm(_BMM, probs.reshape(b, kv_heads, groups * s, keys), v).reshape(b, h, s, d)


def _bmm(op, a: Tensor, b: Tensor) -> Tensor:
    if lacks_bf16_kernels(a):  # float32 product rounded to bfloat16 (see `lacks_bf16_kernels`)
        return cast(op(cast(a, ms.float32), cast(b, ms.float32)), a.dtype)
    return op(a, b)


def split_heads(x: Tensor, batch: int, heads: int) -> Tensor:
    """`[batch * seq, d_model]` -> `[batch, heads, seq, head_dim]`."""
    return transposed(x.reshape(batch, -1, heads, x.shape[-1] // heads), (0, 2, 1, 3))


def key_values(x: Tensor, p: dict, batch: int, heads: int) -> tuple[Tensor, Tensor]:
    """Keys and values `[batch, heads, seq, head_dim]` of an attention module `p` (`k_proj`, `v_proj`;
    Whisper's `k_proj` has no bias) over `x` `[batch * seq, d_model]`."""
    return (split_heads(linear(x, p["k_proj"]["weight"], p["k_proj"].get("bias")), batch, heads),
            split_heads(linear(x, p["v_proj"]["weight"], p["v_proj"].get("bias")), batch, heads))


def cross_attention_cache(layers: list, encoder_hidden_states: Tensor, heads: int) -> KVCache:
    """Each decoder layer's cross-attention (`encoder_attn`) keys and values `[batch, heads, source_seq,
    head_dim]` over `encoder_hidden_states` `[batch, source_seq, d_model]`: computed once per generation
    (BART, Whisper)."""
    b, s = encoder_hidden_states.shape[:2]
    x = encoder_hidden_states.reshape(b * s, -1)
    kv = [key_values(x, layer["encoder_attn"], b, heads) for layer in layers]
    return KVCache(tuple(k for k, _ in kv), tuple(v for _, v in kv))
