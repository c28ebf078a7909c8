"""T5 (Raffel et al. 2020) as pure functions over a parameter tree.

Follows `transformers.models.t5.modeling_t5` (5.x). Parameters are keyed like the HF checkpoint:
`params["encoder"]["block"][i]["layer"][0]["SelfAttention"]["q"]["weight"]`, one `shared.weight`
embedding for both stacks (HF's `encoder.embed_tokens` / `decoder.embed_tokens` are tied to it and not
saved), and `lm_head.weight` only when the checkpoint holds its own. The config is a
`transformers.T5Config`, carried by the tree from `load` / `init_params` (`params.config`) or passed as
`config=`.

Layout of one block (pre-norm, RMS "T5LayerNorm" without bias or mean subtraction):
`x = x + SelfAttention(norm(x))`, in the decoder `x = x + EncDecAttention(norm(x), encoder_out)`, then
`x = x + DenseReluDense(norm(x))`; each stack ends with `final_layer_norm`. Attention scores are not
scaled by `1/sqrt(d_kv)`; a learned relative-position bias (table in block 0, shared by every block of
the stack; bidirectional buckets in the encoder, causal ones in the decoder) is added instead.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from transformers import T5Config

from msfx import kernels
from msfx.backend import lacks_bf16_kernels
from msfx.decode.cache import KVCache, write_cache
from msfx.families import family
from msfx.layers.attention import arange, attention_bias, padding_bias, scaled_dot_product_attention
from msfx.layers.basic import activation, add, cast, embedding, linear, mul, transposed
from msfx.inputs import check_model_inputs
from msfx.layers.dropout import dropout
from msfx.layers.norms import rms_norm
from msfx.params import load_params, resolve_model_dir
from msfx.params.safetensors_io import checkpoint_files, read_shapes
from msfx.params.tree import Params, config_of, unflatten_keys

MODEL_TYPE = "t5"
CONFIG_CLASS = T5Config
# HF's `base_model_prefix`; no T5 key carries it (a checkpoint whose every key does loads without it).
PREFIX = "transformer"


class T5StackOutput(NamedTuple):
    """`last_hidden_state` `[batch, seq, d_model]` (after `final_layer_norm`); `cache`: the decoder's
    updated self-attention cache, or None."""

    last_hidden_state: Tensor
    cache: KVCache | None = None


class T5ModelOutput(NamedTuple):
    """`last_hidden_state`: the decoder's `[batch, target_seq, d_model]`; `encoder_last_hidden_state`
    `[batch, source_seq, d_model]`."""

    last_hidden_state: Tensor
    encoder_last_hidden_state: Tensor


class Seq2SeqLogits(NamedTuple):
    """`logits` `[batch, target_seq, vocab]`; `encoder_last_hidden_state` `[batch, source_seq, d_model]`."""

    logits: Tensor
    encoder_last_hidden_state: Tensor


def param_shapes(config, *, decoder: bool = True, lm_head: bool = False) -> dict[str, tuple[int, ...]]:
    """Checkpoint keys with their shapes: `shared`, the encoder, the decoder unless `decoder=False`
    (`T5EncoderModel`), and an untied `lm_head.weight` with `lm_head=True` (T5 v1.1 / Flan-T5
    checkpoints store one; otherwise the head is `shared.weight`)."""
    d, inner, ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
    shapes = {"shared.weight": (config.vocab_size, d)}
    mlp = [("wi_0", (ff, d)), ("wi_1", (ff, d))] if config.is_gated_act else [("wi", (ff, d))]
    mlp.append(("wo", (d, ff)))

    def attention(prefix: str) -> None:
        for name in "qkv":
            shapes[f"{prefix}.{name}.weight"] = (inner, d)
        shapes[f"{prefix}.o.weight"] = (d, inner)

    stacks = [("encoder", config.num_layers)] + ([("decoder", config.num_decoder_layers)] if decoder else [])
    for stack, layers in stacks:
        for i in range(layers):
            p = f"{stack}.block.{i}.layer."
            attention(p + "0.SelfAttention")
            if i == 0:
                shapes[p + "0.SelfAttention.relative_attention_bias.weight"] = (config.relative_attention_num_buckets,
                                                                                config.num_heads)
            shapes[p + "0.layer_norm.weight"] = (d,)
            if stack == "decoder":
                attention(p + "1.EncDecAttention")
                shapes[p + "1.layer_norm.weight"] = (d,)
            ff_layer = p + ("2" if stack == "decoder" else "1")
            for name, shape in mlp:
                shapes[f"{ff_layer}.DenseReluDense.{name}.weight"] = shape
            shapes[ff_layer + ".layer_norm.weight"] = (d,)
        shapes[f"{stack}.final_layer_norm.weight"] = (d,)
    if lm_head:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


def _init_std(key: str, config) -> float | None:
    """HF's `T5PreTrainedModel._init_weights` standard deviation for `key` (None: a norm weight,
    set to `initializer_factor`)."""
    d, factor = config.d_model, config.initializer_factor
    name = key.split(".")[-2]
    if name in ("layer_norm", "final_layer_norm"):
        return None
    return factor * {"shared": 1.0, "lm_head": 1.0, "wi": d ** -0.5, "wi_0": d ** -0.5, "wi_1": d ** -0.5,
                     "wo": config.d_ff ** -0.5, "q": (d * config.d_kv) ** -0.5, "k": d ** -0.5, "v": d ** -0.5,
                     "o": (config.num_heads * config.d_kv) ** -0.5, "relative_attention_bias": d ** -0.5}[name]


def init_params(config, seed: int = 0, dtype=ms.float32, shapes: dict | None = None) -> Params:
    """Random parameters as HF's `_init_weights` (normal with `initializer_factor`-scaled standard
    deviations, norm weights `initializer_factor`). `shapes` (default `param_shapes(config)`) picks the keys."""
    rng = np.random.default_rng(seed)
    flat = {}
    for key, shape in (shapes or param_shapes(config)).items():
        std = _init_std(key, config)
        value = np.full(shape, config.initializer_factor, np.float32) if std is None else \
            rng.normal(0.0, std, shape).astype(np.float32)
        flat[key] = Tensor(value).astype(dtype)
    return Params(unflatten_keys(flat), config)


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> np.ndarray:
    """HF's `T5Attention._relative_position_bucket` on the host: int64 buckets in `[0, num_buckets)` for
    `relative_position` (int, key position minus query position). Half the buckets (per direction when
    `bidirectional`) are exact distances, the rest logarithmic up to `max_distance`. The logarithm runs
    in float32, as torch's, so buckets at the boundaries match HF's exactly."""
    buckets = np.zeros(relative_position.shape, np.int64)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(np.int64) * num_buckets
        relative_position = np.abs(relative_position)
    else:
        relative_position = -np.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    # small distances take the other branch: clip them so the logarithm stays finite
    ratio = np.maximum(relative_position, max_exact).astype(np.float32) / np.float32(max_exact)
    scaled = np.log(ratio) / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
    return buckets + np.where(is_small, relative_position, large)


def position_bias(table: Tensor, query_positions: np.ndarray, key_length: int, bidirectional: bool,
                  config) -> Tensor:
    """HF's `T5Attention.compute_bias`: the additive bias `[1, heads, 1, queries, keys]` (the layout
    `scaled_dot_product_attention` broadcasts) in `table`'s dtype, from the relative-attention table
    `[num_buckets, heads]` for queries at `query_positions` (int `[queries]`) over keys `0..key_length-1`."""
    relative = np.arange(key_length)[None, :] - np.asarray(query_positions)[:, None]
    buckets = relative_position_bucket(relative, bidirectional, config.relative_attention_num_buckets,
                                       config.relative_attention_max_distance)
    values = embedding(Tensor(buckets.astype(np.int32)), table)  # [queries, keys, heads]
    return values.transpose(2, 0, 1).expand_dims(0).expand_dims(2)


def step_self_bias(table: Tensor, position: Tensor, key_length: int, config) -> Tensor:
    """The decoder's self-attention bias `[1, heads, 1, 1, key_length]` (float32) for one query per row at
    `position` (0-d int32 Tensor) over cache slots `0..key_length-1`: `position_bias` plus the causal mask,
    computed from a tensor position so that one compiled step serves every position. The causal bucket
    depends only on the distance `position - slot`; the buckets per distance are a host constant of
    `key_length` (part of the step's shape signature); later slots are masked."""
    by_distance = relative_position_bucket(-np.arange(key_length), False, config.relative_attention_num_buckets,
                                           config.relative_attention_max_distance)
    distance = position - arange(key_length)  # [keys]; negative: not yet written
    buckets = ops.gather(Tensor(by_distance.astype(np.int32)), ops.maximum(distance, 0), 0)
    # not the two-argument `Tensor.transpose(1, 0)`: MindSpore 2.10's trace records its result as a
    # constant, so every later position reused the traced one's bias (measured)
    values = ops.transpose(embedding(buckets, table), (1, 0))  # [heads, keys]
    causal = attention_bias(Tensor(np.ones((1, key_length), np.int32)), position.reshape(1))  # [1, 1, 1, 1, keys]
    return values.reshape(1, values.shape[0], 1, 1, key_length) + causal


def _clamp_fp16(x: Tensor) -> Tensor:
    """HF's float16 guard after each sub-layer: clamp to the float16 range (1000 inside it once any
    value overflowed), so an inf does not turn into NaN in the next norm."""
    if x.dtype != ms.float16:
        return x
    top = float(np.finfo(np.float16).max)
    limit = ops.where(ops.isinf(x).any(), Tensor(top - 1000, ms.float16), Tensor(top, ms.float16))
    return ops.clamp(x, -limit, limit)


def _norm(x: Tensor, p: dict, config) -> Tensor:
    """HF's `T5LayerNorm`: the output takes the weight's dtype (a float32 residual stream, after a float32
    `wo`, is normalized in float32 and cast to a float16 weight's dtype)."""
    weight = p["weight"]
    if x.dtype == weight.dtype:
        return rms_norm(x, weight, config.layer_norm_epsilon)
    if x.dtype == ms.float32 and lacks_bf16_kernels(weight) and kernels.available():
        return kernels.rms_norm_bf16(x, weight, config.layer_norm_epsilon)
    h = cast(x, ms.float32)
    h = h * ops.rsqrt(ops.mean(h * h, -1, keep_dims=True) + config.layer_norm_epsilon)
    return weight * cast(h, weight.dtype)


def _residual(x: Tensor, h: Tensor) -> Tensor:
    """`x + h` with torch's type promotion (float16 plus a float32 `wo` output is float32), then HF's
    float16 clamp (`_clamp_fp16`)."""
    if x.dtype != h.dtype:
        x, h = cast(x, ms.float32), cast(h, ms.float32)
    return _clamp_fp16(add(x, h))


def _heads(x: Tensor, batch: int, config) -> Tensor:
    """`[batch * seq, heads * d_kv]` -> `[batch, heads, seq, d_kv]`."""
    return transposed(x.reshape(batch, -1, config.num_heads, config.d_kv), (0, 2, 1, 3))


def key_values(x: Tensor, p: dict, batch: int, config) -> tuple[Tensor, Tensor]:
    """Keys and values `[batch, heads, seq, d_kv]` of one attention module `p` over `x` `[batch * seq, d_model]`."""
    return _heads(linear(x, p["k"]["weight"]), batch, config), _heads(linear(x, p["v"]["weight"]), batch, config)


def attention(x: Tensor, p: dict, bias: Tensor, batch: int, config, kv: tuple[Tensor, Tensor] | None = None,
              layer_cache: tuple[Tensor, Tensor] | None = None,
              cache_position: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """`T5Attention` without score scaling. `x` `[batch * seq, d_model]`; `bias` the position bias plus
    mask (see `position_bias`, `attention_bias`). Keys and values come from `kv` (cross-attention over
    the encoder, computed once) or from `x`, written into `layer_cache` at `cache_position` when given.
    Returns the output `[batch * seq, d_model]` (with the residual dropout of HF's `T5LayerSelfAttention`
    in training) and the `(keys, values)` attended to."""
    q = _heads(linear(x, p["q"]["weight"]), batch, config)
    if kv is None:
        k, v = key_values(x, p, batch, config)
        if layer_cache is not None:
            k = write_cache(layer_cache[0], k, cache_position)
            v = write_cache(layer_cache[1], v, cache_position)
    else:
        k, v = kv
    out = scaled_dot_product_attention(q, k, v, bias, 1.0, dropout_rate=config.dropout_rate)
    out = transposed(out, (0, 2, 1, 3)).reshape(x.shape[0], -1)
    return dropout(linear(out, p["o"]["weight"]), config.dropout_rate), (k, v)


def feed_forward(x: Tensor, p: dict, config) -> Tensor:
    """`T5DenseActDense` (`wo(act(wi(x)))`) or, with `config.is_gated_act`, `T5DenseGatedActDense`
    (`wo(act(wi_0(x)) * wi_1(x))`); `act` is `config.dense_act_fn` ("gated-gelu" -> gelu_new). The input of
    `wo` takes its dtype: a float32 `wo` (`keep_in_fp32` in `msfx.families`) gives a float32 output, as HF. In
    training, dropout before `wo` and on the output (HF's `T5LayerFF` residual dropout)."""
    act = activation(config.dense_act_fn)
    if config.is_gated_act:
        h = mul(act(linear(x, p["wi_0"]["weight"])), linear(x, p["wi_1"]["weight"]))
    else:
        h = act(linear(x, p["wi"]["weight"]))
    wo = p["wo"]["weight"]
    h = dropout(h, config.dropout_rate)
    h = cast(h, wo.dtype)  # HF casts to `wo`'s dtype (float32 kept)
    return dropout(linear(h, wo), config.dropout_rate)


def _embed(params: dict, input_ids: Tensor | None, inputs_embeds: Tensor | None, config) -> Tensor:
    x = embedding(input_ids, params["shared"]["weight"]) if inputs_embeds is None else inputs_embeds
    return dropout(x, config.dropout_rate)


def encoder_forward(params: dict, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
                    config=None, inputs_embeds: Tensor | None = None, check_ids: bool = True) -> T5StackOutput:
    """The encoder stack (`T5EncoderModel`, HF's `T5Stack` with `is_decoder=False`).

    Args:
        params: the tree (`shared`, `encoder`).
        input_ids: `[batch, seq]` int32/int64 token ids (or `inputs_embeds` `[batch, seq, d_model]`).
        attention_mask: `[batch, seq]`, 1 for tokens, 0 for padding (either side). Default: all ones.
        check_ids: check that every id is in `[0, vocab_size)` (reads the ids on the host).

    Raises:
        ValueError: no config, missing/both of `input_ids`/`inputs_embeds`, non-integer or out-of-range
            ids, an empty sequence, or a mis-shaped `attention_mask`.
    """
    config = config or config_of(params)
    b, s = check_model_inputs(config, input_ids, inputs_embeds, attention_mask, check_ids=check_ids)
    x = _embed(params, input_ids, inputs_embeds, config)
    if attention_mask is None:
        attention_mask = ops.ones((b, s), ms.int32)
    blocks = params["encoder"]["block"]
    table = blocks[0]["layer"][0]["SelfAttention"]["relative_attention_bias"]["weight"]
    bias = position_bias(table, np.arange(s), s, True, config) + padding_bias(attention_mask)
    x = x.reshape(b * s, -1)
    for block in blocks:
        sa, ff = block["layer"]
        x = _residual(x, attention(_norm(x, sa["layer_norm"], config), sa["SelfAttention"], bias, b, config)[0])
        x = _residual(x, feed_forward(_norm(x, ff["layer_norm"], config), ff["DenseReluDense"], config))
    x = dropout(_norm(x, params["encoder"]["final_layer_norm"], config), config.dropout_rate)
    return T5StackOutput(x.reshape(b, s, -1))


def encode_source(params: dict, input_ids: np.ndarray, attention_mask: np.ndarray, config) -> Tensor:
    """The encoder output for generation (`msfx.decode.seq2seq`): ids and mask numpy `[batch, source_seq]`,
    already checked."""
    return encoder_forward(params, Tensor(input_ids.astype(np.int32)), Tensor(attention_mask.astype(np.int32)),
                           config=config, check_ids=False).last_hidden_state


def decoder_cache_shape(config) -> tuple[int, int, int]:
    """`(layers, heads, head_dim)` of the decoder's self-attention cache."""
    return config.num_decoder_layers, config.num_heads, config.d_kv


def decoder_params(params: dict) -> dict:
    """The subtree a decoder step reads (not the encoder's leaves)."""
    return {k: params[k] for k in ("shared", "decoder", "lm_head") if k in params}


def cross_attention_cache(params: dict, encoder_hidden_states: Tensor, config) -> KVCache:
    """Every decoder block's cross-attention keys and values `[batch, heads, source_seq, d_kv]` over
    `encoder_hidden_states` `[batch, source_seq, d_model]`: computed once per generation (HF's
    `EncoderDecoderCache.cross_attention_cache`)."""
    b, s = encoder_hidden_states.shape[:2]
    x = encoder_hidden_states.reshape(b * s, -1)
    kv = [key_values(x, block["layer"][1]["EncDecAttention"], b, config) for block in params["decoder"]["block"]]
    return KVCache(tuple(k for k, _ in kv), tuple(v for _, v in kv))


def decoder_forward(params: dict, input_ids: Tensor | None, encoder_hidden_states: Tensor | None,
                    attention_mask: Tensor | None = None, encoder_attention_mask: Tensor | None = None, *,
                    cache: KVCache | None = None, past_length: int = 0, cross_cache: KVCache | None = None,
                    config=None, inputs_embeds: Tensor | None = None, check_ids: bool = True) -> T5StackOutput:
    """The decoder stack (HF's `T5Stack` with `is_decoder=True`): causal self-attention, cross-attention
    over the encoder's output, feed-forward.

    Args:
        input_ids: `[batch, seq]` int decoder token ids (or `inputs_embeds` `[batch, seq, d_model]`).
        encoder_hidden_states: `[batch, source_seq, d_model]`; may be None when `cross_cache` is given.
        attention_mask: `[batch, keys]` 1/0 over the decoder tokens (`keys`: `seq`, or the cache
            length with a cache). Default: all ones (causal only, as HF).
        encoder_attention_mask: `[batch, source_seq]` 1/0; default all ones.
        cache: a self-attention `KVCache` (`[batch, heads, max_len, d_kv]` per block) to write the new
            tokens into at slots `past_length ..`; None for a plain forward.
        past_length: how many cache slots earlier calls filled (the new tokens' first position).
        cross_cache: the blocks' cross-attention keys/values (`cross_attention_cache`), else computed.

    Raises:
        ValueError: as `encoder_forward`, or neither `encoder_hidden_states` nor `cross_cache`.
    """
    config = config or config_of(params)
    keys = None if cache is None else cache.max_len
    b, s = check_model_inputs(config, input_ids, inputs_embeds, attention_mask, keys=keys, check_ids=check_ids)
    if cross_cache is None:
        if encoder_hidden_states is None:
            raise ValueError("the T5 decoder needs encoder_hidden_states (or a cross_cache)")
        cross_cache = cross_attention_cache(params, encoder_hidden_states, config)
    x = _embed(params, input_ids, inputs_embeds, config)
    keys = keys or s
    if attention_mask is None:
        attention_mask = ops.ones((b, keys), ms.int32)
    if encoder_attention_mask is None:
        encoder_attention_mask = ops.ones((b, cross_cache.max_len), ms.int32)
    positions = np.arange(past_length, past_length + s)
    cache_position = Tensor(positions.astype(np.int32))
    blocks = params["decoder"]["block"]
    table = blocks[0]["layer"][0]["SelfAttention"]["relative_attention_bias"]["weight"]
    self_bias = position_bias(table, positions, keys, False, config) + attention_bias(attention_mask, cache_position)
    cross_bias = padding_bias(encoder_attention_mask)
    x, cache = _decoder_blocks(params, x.reshape(b * s, -1), b, self_bias, cross_bias, cache, cross_cache,
                               cache_position, config)
    return T5StackOutput(x.reshape(b, s, -1), cache)


def _decoder_blocks(params: dict, x: Tensor, batch: int, self_bias: Tensor, cross_bias: Tensor,
                    cache: KVCache | None, cross_cache: KVCache, cache_position: Tensor,
                    config) -> tuple[Tensor, KVCache | None]:
    """The decoder's blocks and `final_layer_norm` over `x` `[batch * seq, d_model]`, shared by
    `decoder_forward` and the compiled `decode_step`. Returns `[batch * seq, d_model]` and the
    self-attention cache with the new keys/values written at `cache_position` (None without `cache`)."""
    new_keys, new_values = [], []
    for i, block in enumerate(params["decoder"]["block"]):
        sa, ca, ff = block["layer"]
        layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
        h, (k, v) = attention(_norm(x, sa["layer_norm"], config), sa["SelfAttention"], self_bias, batch, config,
                              layer_cache=layer_cache, cache_position=cache_position)
        new_keys.append(k)
        new_values.append(v)
        x = _residual(x, h)
        h, _ = attention(_norm(x, ca["layer_norm"], config), ca["EncDecAttention"], cross_bias, batch, config,
                         kv=(cross_cache.keys[i], cross_cache.values[i]))
        x = _residual(x, h)
        x = _residual(x, feed_forward(_norm(x, ff["layer_norm"], config), ff["DenseReluDense"], config))
    x = dropout(_norm(x, params["decoder"]["final_layer_norm"], config), config.dropout_rate)
    return x, None if cache is None else KVCache(tuple(new_keys), tuple(new_values))


def lm_head(params: dict, hidden: Tensor, config) -> Tensor:
    """Logits `[..., vocab]` from the decoder output: scaled by `d_model ** -0.5` when
    `config.scale_decoder_outputs` (original T5; HF 5.x derives it from `tie_word_embeddings`, False for
    v1.1 / Flan-T5), then `lm_head.weight` when the tree has one, else `shared.weight`."""
    if getattr(config, "scale_decoder_outputs", config.tie_word_embeddings):
        hidden = hidden * (config.d_model ** -0.5)
    head = params["lm_head"] if "lm_head" in params else params["shared"]
    return linear(hidden, head["weight"])


def shift_right(labels: np.ndarray, config) -> np.ndarray:
    """HF's `T5PreTrainedModel._shift_right`: `[batch, seq]` labels -> decoder input ids, shifted one to
    the right after `decoder_start_token_id`, `-100` replaced by `pad_token_id`.

    Raises:
        ValueError: `config.decoder_start_token_id` or `config.pad_token_id` is None.
    """
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        raise ValueError("self.model.config.decoder_start_token_id has to be defined. In T5 it is usually set to "
                         "the pad_token_id. See T5 docs for more information.")
    if config.pad_token_id is None:
        raise ValueError("self.model.config.pad_token_id has to be defined.")
    labels = np.asarray(labels)
    shifted = np.empty_like(labels)
    shifted[..., 0] = start
    shifted[..., 1:] = labels[..., :-1]
    return np.where(shifted == -100, config.pad_token_id, shifted)


def _decoder_inputs(decoder_input_ids, decoder_inputs_embeds) -> None:
    if decoder_input_ids is None and decoder_inputs_embeds is None:
        raise ValueError("T5 needs decoder_input_ids or decoder_inputs_embeds (or labels, for "
                         "T5ForConditionalGeneration): e.g. decoder_input_ids=model._shift_right(target_ids)")


def model_forward(params: dict, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                  decoder_input_ids: Tensor | None = None, decoder_attention_mask: Tensor | None = None, *,
                  encoder_hidden_states: Tensor | None = None, config=None, inputs_embeds: Tensor | None = None,
                  decoder_inputs_embeds: Tensor | None = None, check_ids: bool = True) -> T5ModelOutput:
    """`T5Model`: the encoder (skipped when `encoder_hidden_states` `[batch, source_seq, d_model]` is
    given), then the decoder over `decoder_input_ids` `[batch, target_seq]` (or `decoder_inputs_embeds`).
    `attention_mask` `[batch, source_seq]` masks the encoder's padding in both stacks;
    `decoder_attention_mask` `[batch, target_seq]` the decoder's.

    Raises:
        ValueError: no decoder inputs, or as `encoder_forward` / `decoder_forward`.
    """
    config = config or config_of(params)
    _decoder_inputs(decoder_input_ids, decoder_inputs_embeds)
    if encoder_hidden_states is None:
        encoder_hidden_states = encoder_forward(params, input_ids, attention_mask, config=config,
                                                inputs_embeds=inputs_embeds, check_ids=check_ids).last_hidden_state
    out = decoder_forward(params, decoder_input_ids, encoder_hidden_states, decoder_attention_mask, attention_mask,
                          config=config, inputs_embeds=decoder_inputs_embeds, check_ids=check_ids)
    return T5ModelOutput(out.last_hidden_state, encoder_hidden_states)


def forward(params: dict, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
            decoder_input_ids: Tensor | None = None, decoder_attention_mask: Tensor | None = None, *,
            encoder_hidden_states: Tensor | None = None, config=None, inputs_embeds: Tensor | None = None,
            decoder_inputs_embeds: Tensor | None = None, check_ids: bool = True) -> Seq2SeqLogits:
    """`T5ForConditionalGeneration`: logits `[batch, target_seq, vocab]` in the params' dtype. Arguments
    and errors as `model_forward`."""
    config = config or config_of(params)
    out = model_forward(params, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                        encoder_hidden_states=encoder_hidden_states, config=config, inputs_embeds=inputs_embeds,
                        decoder_inputs_embeds=decoder_inputs_embeds, check_ids=check_ids)
    return Seq2SeqLogits(lm_head(params, out.last_hidden_state, config), out.encoder_last_hidden_state)


def decode_step(params: dict, tokens: Tensor, position: Tensor, cross_bias: Tensor, cross_cache: KVCache,
                cache: KVCache, config) -> tuple[Tensor, KVCache]:
    """One decoder token per row over the caches, traceable by `mindspore.jit`: no host reads, no checks
    (the caller validates), the position a tensor.

    Args:
        tokens: int32 `[batch]`, in `[0, vocab_size)`.
        position: 0-d int32, the tokens' position, which is also the cache slot they are written to.
        cross_bias: float32 `[batch, 1, 1, 1, source_seq]`, `padding_bias` of the encoder's mask.
        cross_cache: `cross_attention_cache`'s keys and values, `[batch, heads, source_seq, d_kv]` per block.
        cache: the self-attention `KVCache`, `[batch, heads, max_len, d_kv]` per block, `position < max_len`.

    Returns:
        The next-token logits, float32 `[batch, vocab]`, and `cache` with the tokens' keys/values written.
    """
    table = params["decoder"]["block"][0]["layer"][0]["SelfAttention"]["relative_attention_bias"]["weight"]
    self_bias = step_self_bias(table, position, cache.max_len, config)
    x = embedding(tokens, params["shared"]["weight"])  # [batch, d_model]
    x, cache = _decoder_blocks(params, x, tokens.shape[0], self_bias, cross_bias, cache, cross_cache,
                               position.reshape(1), config)
    logits = lm_head(params, x, config)
    # the float32 cast inside the graph: an eager op on a compiled output slows the next steps (decode.step)
    return (logits if logits.dtype == ms.float32 else logits.astype(ms.float32)), cache


def checkpoint_has_lm_head(model_dir: str | Path) -> bool:
    """Whether the safetensors checkpoint in `model_dir` stores its own `lm_head.weight` (HF unties the
    head from `shared` then, unless the two are equal, which gives the same logits)."""
    return "lm_head.weight" in read_shapes(checkpoint_files(model_dir))


def load(ref, *, dtype="auto", decoder: bool = True, lm_head: bool | None = None, **hub_kwargs) -> Params:
    """Parameters of a T5 checkpoint (directory or hub id), config attached; `decoder` and `lm_head`
    choose the keys as in `param_shapes` (`lm_head` default: whether the checkpoint stores one).

    See `msfx.params.load_params` for the arguments and the errors raised.
    """
    if lm_head is None:
        lm_head = decoder and checkpoint_has_lm_head(resolve_model_dir(ref, **hub_kwargs))

    def shapes(config):
        return param_shapes(config, decoder=decoder, lm_head=lm_head)

    return load_params(family(MODEL_TYPE), ref, dtype=dtype, shapes=shapes, prefix=PREFIX, **hub_kwargs)
