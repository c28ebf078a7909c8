"""ModernBERT (Warner et al. 2024) as pure functions over a parameter tree.

Follows `transformers.models.modernbert.modeling_modernbert` (eager attention on padded batches).
Parameters are keyed like the HF checkpoint: `params["model"]["layers"][i]["attn"]["Wqkv"]["weight"]`.
Against BERT: pre-LayerNorm layers (layer 0 has no `attn_norm`) and a `final_norm`; no position
table: rotary positions on q and k, with `rope_parameters` per layer type; `layer_types` alternate
"full_attention" and "sliding_attention" (a query sees keys within `local_attention // 2`
positions either side); a fused `Wqkv`; a GeGLU MLP (`Wi` gives input | gate, `Wo(act(input) *
gate)`); biases only where `attention_bias`, `mlp_bias`, `norm_bias`, `classifier_bias` and
`decoder_bias` ask. Its heads run the shared `head` (dense, `classifier_activation`, norm) first.
"""
from __future__ import annotations

from typing import NamedTuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from transformers import ModernBertConfig

from msfx.families import family
from msfx.layers.attention import arange, padding_bias, scaled_dot_product_attention
from msfx.layers.basic import activation, embedding, linear
from msfx.inputs import check_model_inputs
from msfx.layers.dropout import dropout
from msfx.layers.norms import layer_norm
from msfx.layers.rotary import apply_rotary, rope_cos_sin, rope_frequencies
from msfx.params import load_params
from msfx.params.tree import Params, config_of, unflatten_keys

MODEL_TYPE = "modernbert"
CONFIG_CLASS = ModernBertConfig
PREFIX = "model"  # HF's `base_model_prefix`
_MASKED = float(np.finfo(np.float32).min)


class ModernBertOutput(NamedTuple):
    """`last_hidden_state` `[batch, seq, hidden]` (after `final_norm`); `hidden_states`: the
    embeddings, each layer's output but the last, then `last_hidden_state` (HF's record), or None."""

    last_hidden_state: Tensor
    hidden_states: tuple[Tensor, ...] | None


def _linear_shapes(name: str, out: int, inp: int, bias: bool) -> dict[str, tuple[int, ...]]:
    return {name + ".weight": (out, inp), **({name + ".bias": (out,)} if bias else {})}


def _norm_shapes(name: str, config) -> dict[str, tuple[int, ...]]:
    h = (config.hidden_size,)
    return {name + ".weight": h, **({name + ".bias": h} if config.norm_bias else {})}


def param_shapes(config, *, with_head: bool = False, with_decoder: bool = False) -> dict[str, tuple[int, ...]]:
    """Checkpoint keys with their shapes: the base model under `model.` (`ModernBertModel`), plus the
    shared prediction `head` with `with_head`, plus the masked-LM `decoder` with `with_decoder` (its
    weight only when `tie_word_embeddings` is False; its bias with `decoder_bias`)."""
    h, inter = config.hidden_size, config.intermediate_size
    shapes = {"model.embeddings.tok_embeddings.weight": (config.vocab_size, h)}
    shapes |= _norm_shapes("model.embeddings.norm", config)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        if i:  # layer 0 reads the normed embeddings directly (HF's `nn.Identity`)
            shapes |= _norm_shapes(p + "attn_norm", config)
        shapes |= _linear_shapes(p + "attn.Wqkv", 3 * h, h, config.attention_bias)
        shapes |= _linear_shapes(p + "attn.Wo", h, h, config.attention_bias)
        shapes |= _norm_shapes(p + "mlp_norm", config)
        shapes |= _linear_shapes(p + "mlp.Wi", 2 * inter, h, config.mlp_bias)
        shapes |= _linear_shapes(p + "mlp.Wo", h, inter, config.mlp_bias)
    shapes |= _norm_shapes("model.final_norm", config)
    if with_head:
        shapes |= _linear_shapes("head.dense", h, h, config.classifier_bias) | _norm_shapes("head.norm", config)
    if with_decoder:
        if not config.tie_word_embeddings:
            shapes["decoder.weight"] = (config.vocab_size, h)
        if config.decoder_bias:
            shapes["decoder.bias"] = (config.vocab_size,)
    return shapes


def init_params(config, seed: int = 0, dtype=ms.float32, shapes: dict | None = None) -> Params:
    """Random parameters: normal(0, `initializer_range`) matrices, zero biases, unit norm weights.
    `shapes` (default `param_shapes(config)`) picks the keys."""
    rng = np.random.default_rng(seed)
    flat = {}
    for key, shape in (shapes or param_shapes(config)).items():
        if key.endswith("bias"):
            value = np.zeros(shape, np.float32)
        elif "norm" in key:
            value = np.ones(shape, np.float32)
        else:
            value = rng.normal(0.0, config.initializer_range, shape).astype(np.float32)
        flat[key] = Tensor(value).astype(dtype)
    return Params(unflatten_keys(flat), config)


def _norm(x: Tensor, p: dict, config) -> Tensor:
    return layer_norm(x, p["weight"], p.get("bias"), config.norm_eps)


def _linear(x: Tensor, p: dict) -> Tensor:
    return linear(x, p["weight"], p.get("bias"))


def window_bias(key_mask: Tensor, window: int) -> Tensor:
    """Additive float32 mask `[batch, 1, 1, seq, seq]` of a bidirectional sliding window: a query sees
    the real keys at most `window` positions away (HF's `sliding_window_bidirectional_overlay`)."""
    s = key_mask.shape[-1]
    positions = arange(s)
    near = ops.abs(positions.reshape(-1, 1) - positions.reshape(1, -1)) <= window
    allowed = ops.logical_and(near.expand_dims(0), key_mask.astype(ms.bool_).expand_dims(1))
    bias = (1.0 - allowed.astype(ms.float32)) * _MASKED
    return bias.reshape(bias.shape[0], 1, 1, s, s)


def rotary_tables(config, position_ids: Tensor, dtype) -> dict[str, tuple[Tensor, Tensor]]:
    """cos and sin `[batch, 1, seq, head_dim]` per layer type, from that type's `rope_parameters`."""
    tables = {}
    for kind in sorted(set(config.layer_types)):
        inv_freq, scaling = rope_frequencies(config, int(config.max_position_embeddings),
                                             rope=config.rope_parameters[kind])
        tables[kind] = rope_cos_sin(position_ids, Tensor(inv_freq), scaling, dtype)
    return tables


def encoder_layer(x: Tensor, p: dict, config, bias: Tensor, rope: tuple[Tensor, Tensor], first: bool) -> Tensor:
    """One pre-LN `ModernBertEncoderLayer` on `x` `[batch, seq, hidden]`: attention with rotary q/k
    (rotated in float32, as HF) under `bias`, then the GeGLU MLP; each added to the residual."""
    b, s, h = x.shape
    heads = config.num_attention_heads
    d = h // heads
    a = x if first else _norm(x, p["attn_norm"], config)
    qkv = _linear(a, p["attn"]["Wqkv"]).reshape(b, s, 3, heads, d).transpose(2, 0, 3, 1, 4)
    cos, sin = (t.astype(ms.float32) for t in rope)
    q, k = (apply_rotary(t.astype(ms.float32), cos, sin).astype(x.dtype) for t in (qkv[0], qkv[1]))
    ctx = scaled_dot_product_attention(q, k, qkv[2], bias, d ** -0.5, dropout_rate=config.attention_dropout)
    x = x + dropout(_linear(ctx.transpose(0, 2, 1, 3).reshape(b, s, h), p["attn"]["Wo"]), config.attention_dropout)
    inputs, gate = ops.chunk(_linear(_norm(x, p["mlp_norm"], config), p["mlp"]["Wi"]), 2, -1)
    hidden = dropout(activation(config.hidden_activation)(inputs) * gate, config.mlp_dropout)
    return x + _linear(hidden, p["mlp"]["Wo"])


def model_forward(params: dict, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                  position_ids: Tensor | None = None, *, config=None, inputs_embeds: Tensor | None = None,
                  output_hidden_states: bool = False, check_ids: bool = True) -> ModernBertOutput:
    """The encoder (`ModernBertModel`): normed embeddings, `num_hidden_layers` layers, `final_norm`.

    Args:
        params: the tree (`model.*`, with or without the heads).
        input_ids: `[batch, seq]` int32/int64 token ids (or `inputs_embeds` `[batch, seq, hidden]`).
        attention_mask: `[batch, seq]`, 1 for real tokens, 0 for padding. Default: all ones.
        position_ids: `[batch, seq]` or `[1, seq]`; default `0..seq-1`.
        output_hidden_states: also return the hidden states HF records.
        check_ids: check that every token id is in range (reads them on the host).

    Raises:
        ValueError: no config, missing/both of `input_ids`/`inputs_embeds`, non-integer or
            out-of-range ids, an empty sequence, a mis-shaped mask or positions, or `layer_types`
            not one per layer.
    """
    config = config or config_of(params)
    b, s = check_model_inputs(config, input_ids, inputs_embeds, attention_mask, position_ids, check_ids=check_ids)
    if len(config.layer_types) != config.num_hidden_layers:
        raise ValueError(f"config.layer_types has {len(config.layer_types)} entries for {config.num_hidden_layers} "
                         "layers")
    if position_ids is None:
        position_ids = arange(s).reshape(1, s)
    if attention_mask is None:
        attention_mask = ops.ones((b, s), ms.int32)
    p = params["model"]
    x = embedding(input_ids, p["embeddings"]["tok_embeddings"]["weight"]) if inputs_embeds is None else inputs_embeds
    x = dropout(_norm(x, p["embeddings"]["norm"], config), config.embedding_dropout)
    biases = {"full_attention": padding_bias(attention_mask),
              "sliding_attention": window_bias(attention_mask, config.local_attention // 2)}
    ropes = rotary_tables(config, position_ids.reshape(-1, s), x.dtype)
    hidden_states = [x] if output_hidden_states else None
    for i, (layer, kind) in enumerate(zip(p["layers"], config.layer_types)):
        x = encoder_layer(x, layer, config, biases[kind], ropes[kind], first=i == 0)
        if output_hidden_states:
            hidden_states.append(x)
    x = _norm(x, p["final_norm"], config)
    if output_hidden_states:  # HF's output recorder replaces the last layer's output by the normed one
        hidden_states[-1] = x
    return ModernBertOutput(x, tuple(hidden_states) if output_hidden_states else None)


def prediction_head(params: dict, hidden: Tensor, config) -> Tensor:
    """`ModernBertPredictionHead`: `norm(act(dense(hidden)))` with `classifier_activation`."""
    h = activation(config.classifier_activation)(_linear(hidden, params["head"]["dense"]))
    return _norm(h, params["head"]["norm"], config)


def mlm_head(params: dict, hidden: Tensor, config) -> Tensor:
    """The masked-LM logits `[..., vocab]`: `decoder(prediction_head(hidden))`, the decoder's weight
    the token embeddings when tied."""
    h = prediction_head(params, hidden, config)
    weight = params["model"]["embeddings"]["tok_embeddings"]["weight"] if config.tie_word_embeddings \
        else params["decoder"]["weight"]
    return linear(h, weight, params["decoder"]["bias"] if config.decoder_bias else None)


def pool(hidden: Tensor, attention_mask: Tensor | None, config) -> Tensor:
    """`classifier_pooling`: "cls" (the first token) or "mean" (over the real tokens) -> `[batch, hidden]`.

    Raises:
        ValueError: another pooling.
    """
    if config.classifier_pooling == "cls":
        return hidden[:, 0]
    if config.classifier_pooling != "mean":
        raise ValueError(f"classifier_pooling must be 'cls' or 'mean', got {config.classifier_pooling!r}")
    if attention_mask is None:
        return hidden.mean(1)
    mask = attention_mask.astype(hidden.dtype).expand_dims(-1)
    return (hidden * mask).sum(1) / mask.sum(1)


def load(ref, *, dtype="auto", with_head: bool = False, with_decoder: bool = False, **hub_kwargs) -> Params:
    """Parameters of a ModernBERT checkpoint (directory or hub id), config attached; `with_head` and
    `with_decoder` choose the keys as in `param_shapes`. See `msfx.params.load_params` for the
    arguments and the errors raised."""
    def shapes(config):
        return param_shapes(config, with_head=with_head, with_decoder=with_decoder)

    return load_params(family(MODEL_TYPE), ref, dtype=dtype, shapes=shapes, prefix=PREFIX, **hub_kwargs)
