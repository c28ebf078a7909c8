"""Whisper (Radford et al. 2022) as pure functions over a parameter tree.

Follows `transformers.models.whisper.modeling_whisper` (5.x). Parameters are keyed like
`WhisperForConditionalGeneration`'s checkpoint: `model.encoder.*`, `model.decoder.*`, and
`proj_out.weight` only when the head is untied (by default it is `model.decoder.embed_tokens`).

The encoder: two convolutions (kernel 3, padding 1; the second of stride 2) with GELU over the
log-mel features `[batch, num_mel_bins, 2 * max_source_positions]`, plus the fixed sinusoidal
table `model.encoder.embed_positions` (stored in the checkpoint), then pre-norm blocks
`x + self_attn(ln(x))`, `x + fc2(act(fc1(ln(x))))` and a final `layer_norm`. The decoder: token
embeddings plus the learned `embed_positions` rows, causal self-attention, cross-attention over the
encoder output, the same MLP. Queries are scaled by `head_dim ** -0.5`; `k_proj` has no bias.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from transformers import WhisperConfig

from msfx.decode.cache import KVCache, write_cache
from msfx.families import family
from msfx.layers.attention import attention_bias, padding_bias, scaled_dot_product_attention, split_heads
from msfx.layers.attention import cross_attention_cache as cross_kv, key_values
from msfx.layers.basic import activation, embedding, linear, scaled
from msfx.inputs import check_model_inputs
from msfx.layers.dropout import dropout
from msfx.layers.norms import layer_norm
from msfx.params import load_params
from msfx.params.tree import Params, config_of, unflatten_keys

MODEL_TYPE = "whisper"
CONFIG_CLASS = WhisperConfig
PREFIX = "model"
_LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which HF's Whisper layers use


class WhisperStackOutput(NamedTuple):
    """`last_hidden_state` `[batch, seq, d_model]` (after the stack's `layer_norm`); `cache`: the
    decoder's updated self-attention cache, or None."""

    last_hidden_state: Tensor
    cache: KVCache | None = None


class Seq2SeqLogits(NamedTuple):
    """`logits` `[batch, target_seq, vocab]`; `encoder_last_hidden_state` `[batch, frames // 2, d_model]`."""

    logits: Tensor
    encoder_last_hidden_state: Tensor


def input_frames(config) -> int:
    """The mel frames the encoder takes: `max_source_positions` times the second conv's stride (2)."""
    return 2 * config.max_source_positions


def param_shapes(config, *, lm_head: bool | None = None) -> dict[str, tuple[int, ...]]:
    """Checkpoint keys with their shapes; `proj_out.weight` with `lm_head` (default: the head untied)."""
    d = config.d_model
    shapes = {"model.encoder.conv1.weight": (d, config.num_mel_bins, 3), "model.encoder.conv1.bias": (d,),
              "model.encoder.conv2.weight": (d, d, 3), "model.encoder.conv2.bias": (d,),
              "model.encoder.embed_positions.weight": (config.max_source_positions, d),
              "model.decoder.embed_tokens.weight": (config.vocab_size, d),
              "model.decoder.embed_positions.weight": (config.max_target_positions, d)}

    def norm(key: str) -> None:
        shapes[key + ".weight"], shapes[key + ".bias"] = (d,), (d,)

    def attention(prefix: str) -> None:
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{prefix}.{name}.weight"] = (d, d)
            if name != "k_proj":
                shapes[f"{prefix}.{name}.bias"] = (d,)

    for stack, layers, ffn in (("encoder", config.encoder_layers, config.encoder_ffn_dim),
                               ("decoder", config.decoder_layers, config.decoder_ffn_dim)):
        for i in range(layers):
            p = f"model.{stack}.layers.{i}."
            attention(p + "self_attn")
            norm(p + "self_attn_layer_norm")
            if stack == "decoder":
                attention(p + "encoder_attn")
                norm(p + "encoder_attn_layer_norm")
            shapes[p + "fc1.weight"], shapes[p + "fc1.bias"] = (ffn, d), (ffn,)
            shapes[p + "fc2.weight"], shapes[p + "fc2.bias"] = (d, ffn), (d,)
            norm(p + "final_layer_norm")
        norm(f"model.{stack}.layer_norm")
    if lm_head if lm_head is not None else not config.tie_word_embeddings:
        shapes["proj_out.weight"] = (config.vocab_size, d)
    return shapes


def sinusoids(length: int, channels: int, max_timescale: float = 10000) -> np.ndarray:
    """HF's `sinusoids`: float32 `[length, channels]`, sines then cosines (the encoder's position table)."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-increment * np.arange(channels // 2, dtype=np.float32)).astype(np.float32)
    scaled = np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], 1).astype(np.float32)


def init_params(config, seed: int = 0, dtype=ms.float32, shapes: dict | None = None) -> Params:
    """Random parameters as HF's `_init_weights`: normal(0, `init_std`) matrices, zero biases, unit norms,
    the sinusoidal encoder positions. `shapes` (default `param_shapes(config)`) picks the keys."""
    rng = np.random.default_rng(seed)
    flat = {}
    for key, shape in (shapes or param_shapes(config)).items():
        if key == "model.encoder.embed_positions.weight":
            value = sinusoids(*shape)
        elif "layer_norm" in key:
            value = np.full(shape, 1.0 if key.endswith("weight") else 0.0, np.float32)
        elif key.endswith("bias"):
            value = np.zeros(shape, np.float32)
        else:
            value = rng.normal(0.0, config.init_std, shape).astype(np.float32)
        flat[key] = Tensor(value).astype(dtype)
    return Params(unflatten_keys(flat), config)


def _norm(x: Tensor, p: dict) -> Tensor:
    return layer_norm(x, p["weight"], p["bias"], _LN_EPS)


def _conv(x: Tensor, p: dict, stride: int) -> Tensor:
    """`nn.Conv1d(kernel_size=3, padding=1, stride)` as one product over the three shifted windows:
    `x` `[batch, frames, channels]` (time-major) -> `[batch, frames // stride, out]`."""
    b, t, c = x.shape
    zeros = ops.zeros((b, 1, c), x.dtype)  # Concat, not Pad: MindSpore's CPU Pad has no bfloat16 kernel
    padded = ops.concat((zeros, x, zeros), 1)
    out_len = (t - 1) // stride + 1
    windows = [padded[:, k:k + stride * (out_len - 1) + 1:stride] for k in range(3)]
    # weight [out, in, 3] -> [out, 3 * in], matching the windows' (tap, channel) order
    weight = p["weight"].transpose(0, 2, 1).reshape(p["weight"].shape[0], 3 * c)
    return linear(ops.concat(windows, -1), weight, p["bias"])


def attention(x: Tensor, p: dict, bias: Tensor, batch: int, heads: int, config,
              kv: tuple[Tensor, Tensor] | None = None, layer_cache: tuple[Tensor, Tensor] | None = None,
              cache_position: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """`WhisperAttention` over `x` `[batch * seq, d_model]`: keys/values from `kv` (cross-attention,
    computed once) or from `x`, written into `layer_cache` at `cache_position` when given. Returns
    `[batch * seq, d_model]` and the `(keys, values)` attended to."""
    d = x.shape[-1]
    q = split_heads(scaled(linear(x, p["q_proj"]["weight"], p["q_proj"]["bias"]), (d // heads) ** -0.5), batch, heads)
    if kv is None:
        k, v = key_values(x, p, batch, heads)
        if layer_cache is not None:
            k = write_cache(layer_cache[0], k, cache_position)
            v = write_cache(layer_cache[1], v, cache_position)
    else:
        k, v = kv
    out = scaled_dot_product_attention(q, k, v, bias, 1.0, dropout_rate=config.attention_dropout)
    out = out.transpose(0, 2, 1, 3).reshape(x.shape[0], d)
    return linear(out, p["out_proj"]["weight"], p["out_proj"]["bias"]), (k, v)


def _mlp(x: Tensor, layer: dict, config) -> Tensor:
    h = activation(config.activation_function)(linear(x, layer["fc1"]["weight"], layer["fc1"]["bias"]))
    h = dropout(h, config.activation_dropout)
    return dropout(linear(h, layer["fc2"]["weight"], layer["fc2"]["bias"]), config.dropout)


def check_features(input_features, config) -> np.ndarray:
    """`input_features` (Tensor or array) as float numpy `[batch, num_mel_bins, frames]`.

    Raises:
        ValueError: not 3-D, not `num_mel_bins` mel bins, or (with `frames` not `input_frames`) as HF's
            `WhisperEncoder`: the length the encoder needs named.
    """
    x = input_features.asnumpy() if isinstance(input_features, Tensor) else np.asarray(input_features)
    if x.ndim != 3 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"input_features must be float [batch, num_mel_bins, frames], got {x.dtype} {list(x.shape)}")
    if x.shape[1] != config.num_mel_bins:
        raise ValueError(f"input_features has {x.shape[1]} mel bins; this model takes num_mel_bins="
                         f"{config.num_mel_bins} (use its WhisperFeatureExtractor)")
    return x


def encoder_forward(params: dict, input_features: Tensor, *, config=None) -> WhisperStackOutput:
    """`WhisperEncoder`: `input_features` float `[batch, num_mel_bins, input_frames(config)]` ->
    `[batch, max_source_positions, d_model]` in the params' dtype.

    Raises:
        ValueError: mis-shaped features (`check_features`) or a frame count other than `input_frames`.
    """
    config = config or config_of(params)
    enc = params["model"]["encoder"]
    shape = tuple(input_features.shape)
    if len(shape) != 3 or shape[1] != config.num_mel_bins:
        check_features(input_features, config)
    if shape[-1] != input_frames(config):
        raise ValueError(f"Whisper expects the mel input features to be of length {input_frames(config)}, but found "
                         f"{shape[-1]}. Make sure to pad the input mel features to {input_frames(config)}.")
    gelu = activation("gelu")
    x = input_features.astype(enc["conv1"]["weight"].dtype).transpose(0, 2, 1)  # [batch, frames, mels]
    x = gelu(_conv(gelu(_conv(x, enc["conv1"], 1)), enc["conv2"], 2))
    x = dropout(x + enc["embed_positions"]["weight"], config.dropout)
    b, s = x.shape[:2]
    x = x.reshape(b * s, -1)
    bias = ops.zeros((1, 1, 1, 1, s), ms.float32)
    for layer in enc["layers"]:
        h, _ = attention(_norm(x, layer["self_attn_layer_norm"]), layer["self_attn"], bias, b,
                         config.encoder_attention_heads, config)
        x = x + dropout(h, config.dropout)
        x = x + _mlp(_norm(x, layer["final_layer_norm"]), layer, config)
    return WhisperStackOutput(_norm(x, enc["layer_norm"]).reshape(b, s, -1))


def encode_source(params: dict, features: np.ndarray, mask: np.ndarray | None, config) -> Tensor:
    """The encoder output for generation (`msfx.decode.seq2seq`): features numpy, already checked; the
    mask is unused (HF's Whisper encoder attends every frame)."""
    return encoder_forward(params, Tensor(features.astype(np.float32)), config=config).last_hidden_state


def decoder_cache_shape(config) -> tuple[int, int, int]:
    """`(layers, heads, head_dim)` of the decoder's self-attention cache."""
    heads = config.decoder_attention_heads
    return config.decoder_layers, heads, config.d_model // heads


def decoder_params(params: dict) -> dict:
    """The subtree a decoder step reads (not the encoder's leaves)."""
    tree = {"model": {"decoder": params["model"]["decoder"]}}
    if "proj_out" in params:
        tree["proj_out"] = params["proj_out"]
    return tree


def cross_attention_cache(params: dict, encoder_hidden_states: Tensor, config) -> KVCache:
    """Every decoder layer's cross-attention keys and values `[batch, heads, frames, head_dim]` over
    `encoder_hidden_states` `[batch, frames, d_model]`: computed once per generation."""
    return cross_kv(params["model"]["decoder"]["layers"], encoder_hidden_states, config.decoder_attention_heads)


def _decoder_layers(params: dict, x: Tensor, batch: int, self_bias: Tensor, cross_bias: Tensor,
                    cache: KVCache | None, cross_cache: KVCache, cache_position: Tensor,
                    config) -> tuple[Tensor, KVCache | None]:
    """The decoder's layers and final `layer_norm` over `x` `[batch * seq, d_model]` (shared by
    `decoder_forward` and the compiled `decode_step`)."""
    heads = config.decoder_attention_heads
    new_keys, new_values = [], []
    for i, layer in enumerate(params["model"]["decoder"]["layers"]):
        layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
        h, (k, v) = attention(_norm(x, layer["self_attn_layer_norm"]), layer["self_attn"], self_bias, batch, heads,
                              config, layer_cache=layer_cache, cache_position=cache_position)
        new_keys.append(k)
        new_values.append(v)
        x = x + dropout(h, config.dropout)
        h, _ = attention(_norm(x, layer["encoder_attn_layer_norm"]), layer["encoder_attn"], cross_bias, batch, heads,
                         config, kv=(cross_cache.keys[i], cross_cache.values[i]))
        x = x + dropout(h, config.dropout)
        x = x + _mlp(_norm(x, layer["final_layer_norm"]), layer, config)
    x = _norm(x, params["model"]["decoder"]["layer_norm"])
    return x, None if cache is None else KVCache(tuple(new_keys), tuple(new_values))


def decoder_forward(params: dict, input_ids: Tensor, encoder_hidden_states: Tensor | None,
                    attention_mask: Tensor | None = None, encoder_attention_mask: Tensor | None = None, *,
                    cache: KVCache | None = None, past_length: int = 0, cross_cache: KVCache | None = None,
                    config=None, check_ids: bool = True) -> WhisperStackOutput:
    """`WhisperDecoder` over `input_ids` `[batch, seq]` at positions `past_length ..` (HF's
    `cache_length`): token embeddings plus `embed_positions` rows, causal self-attention (written into
    `cache` when given), cross-attention over `encoder_hidden_states` `[batch, frames, d_model]` (or the
    precomputed `cross_cache`). `attention_mask` `[batch, keys]` 1/0 over the decoder tokens (default all
    ones); `encoder_attention_mask` `[batch, frames]` (default all ones; HF passes none).

    Raises:
        ValueError: bad ids or mask (`check_model_inputs`), positions beyond `max_target_positions`, or
            neither `encoder_hidden_states` nor `cross_cache`.
    """
    config = config or config_of(params)
    keys = None if cache is None else cache.max_len
    b, s = check_model_inputs(config, input_ids, None, attention_mask, keys=keys, check_ids=check_ids)
    if past_length + s > config.max_target_positions:
        raise ValueError(f"decoder positions up to {past_length + s} exceed max_target_positions "
                         f"({config.max_target_positions}): Whisper's learned position table has no rows beyond")
    if cross_cache is None:
        if encoder_hidden_states is None:
            raise ValueError("the Whisper decoder needs encoder_hidden_states (or a cross_cache)")
        cross_cache = cross_attention_cache(params, encoder_hidden_states, config)
    dec = params["model"]["decoder"]
    positions = Tensor(np.arange(past_length, past_length + s, dtype=np.int32))
    x = embedding(input_ids, dec["embed_tokens"]["weight"]) + embedding(positions, dec["embed_positions"]["weight"])
    x = dropout(x, config.dropout).reshape(b * s, -1)
    keys = keys or s
    if attention_mask is None:
        attention_mask = ops.ones((b, keys), ms.int32)
    if encoder_attention_mask is None:
        encoder_attention_mask = ops.ones((b, cross_cache.keys[0].shape[2]), ms.int32)
    x, cache = _decoder_layers(params, x, b, attention_bias(attention_mask, positions),
                               padding_bias(encoder_attention_mask), cache, cross_cache, positions, config)
    return WhisperStackOutput(x.reshape(b, s, -1), cache)


def lm_head(params: dict, hidden: Tensor, config=None) -> Tensor:
    """Logits `[..., vocab]`: `proj_out.weight` when the tree has one, else the tied `embed_tokens`."""
    head = params["proj_out"] if "proj_out" in params else params["model"]["decoder"]["embed_tokens"]
    return linear(hidden, head["weight"])


def forward(params: dict, input_features: Tensor, decoder_input_ids: Tensor, *, config=None,
            check_ids: bool = True) -> Seq2SeqLogits:
    """`WhisperForConditionalGeneration`: logits `[batch, target_seq, vocab]` for `input_features`
    `[batch, num_mel_bins, input_frames]` and `decoder_input_ids` `[batch, target_seq]`. Raises as
    `encoder_forward` / `decoder_forward`."""
    config = config or config_of(params)
    encoded = encoder_forward(params, input_features, config=config).last_hidden_state
    hidden = decoder_forward(params, decoder_input_ids, encoded, config=config, check_ids=check_ids).last_hidden_state
    return Seq2SeqLogits(lm_head(params, hidden), encoded)


def decode_step(params: dict, tokens: Tensor, position: Tensor, cross_bias: Tensor, cross_cache: KVCache,
                cache: KVCache, config) -> tuple[Tensor, KVCache]:
    """One decoder token per row over the caches, traceable by `mindspore.jit` (no host reads, no checks).

    Args:
        tokens: int32 `[batch]`, in `[0, vocab_size)`.
        position: 0-d int32, the tokens' position and cache slot (`< max_target_positions`).
        cross_bias: float32 `[batch, 1, 1, 1, frames]`.
        cross_cache: `cross_attention_cache`'s keys and values.
        cache: the self-attention `KVCache`, `[batch, heads, max_len, head_dim]` per layer.

    Returns:
        The next-token logits, float32 `[batch, vocab]`, and `cache` with the tokens' keys/values written.
    """
    dec = params["model"]["decoder"]
    slot = position.reshape(1)
    x = embedding(tokens, dec["embed_tokens"]["weight"]) + embedding(slot, dec["embed_positions"]["weight"])
    self_bias = attention_bias(Tensor(np.ones((1, cache.max_len), np.int32)), slot)
    x, cache = _decoder_layers(params, x, tokens.shape[0], self_bias, cross_bias, cache, cross_cache, slot, config)
    logits = lm_head(params, x)
    return (logits if logits.dtype == ms.float32 else logits.astype(ms.float32)), cache


def load(ref, *, dtype="auto", **hub_kwargs) -> Params:
    """Parameters of a Whisper checkpoint (directory or hub id), config attached. See
    `msfx.params.load_params` for the arguments and the errors raised."""
    return load_params(family(MODEL_TYPE), ref, dtype=dtype, **hub_kwargs)
