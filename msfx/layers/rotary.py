"""Rotary position embeddings (Su et al. 2021, RoFormer) with HF's `rope_parameters` types.

Frequencies follow `transformers.modeling_rope_utils` (types `default`, `linear`, `dynamic`,
`llama3`, `yarn`, `longrope`). They are computed on the host in float32 numpy, as a pure
function of the config and, for `dynamic` and `longrope`, of the sequence length
(`max(position_ids) + 1`), which HF tracks as module state instead.
"""
from __future__ import annotations

import math
from typing import Callable

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def _rotary_dim(config, rope: dict, partial_default: bool) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if rope.get("rope_type", "default") == "default" and not partial_default:
        return head_dim
    return int(head_dim * rope.get("partial_rotary_factor", 1.0))


def _base_inv_freq(base: float, dim: int) -> np.ndarray:
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (1.0 / np.power(np.float32(base), exponent)).astype(np.float32)


def _llama3(inv_freq: np.ndarray, rope: dict) -> np.ndarray:
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled)


def _yarn(config, rope: dict, dim: int) -> tuple[np.ndarray, float]:
    base, original = rope["rope_theta"], rope["original_max_position_embeddings"]
    factor = rope.get("factor") or config.max_position_embeddings / original
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        if rope.get("mscale") and rope.get("mscale_all_dim"):
            attention_factor = mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = np.power(np.float32(base), np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def _longrope(config, rope: dict, dim: int, seq_len: int) -> tuple[np.ndarray, float]:
    original = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or config.max_position_embeddings / original
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = rope["long_factor"] if seq_len > original else rope["short_factor"]
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = 1.0 / (np.asarray(ext, np.float32) * np.power(np.float32(rope["rope_theta"]), exponent))
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_frequencies(config, seq_len: int = 0, rope: dict | None = None,
                     partial_default: bool = False) -> tuple[np.ndarray, float]:
    """Inverse frequencies `[rotary_dim // 2]` float32 and the attention scaling for cos/sin.

    Args:
        config: an HF config with `rope_parameters` (transformers >= 5), `head_dim` or
            `hidden_size` / `num_attention_heads`, and `max_position_embeddings`.
        seq_len: `max(position_ids) + 1` of the current call; only `dynamic` and `longrope`
            depend on it.
        rope: the parameters to use instead of `config.rope_parameters` (e.g. one layer type's,
            for configs that hold one set per layer type, as Gemma 3).
        partial_default: the `default` type rotates only `partial_rotary_factor` of each head too
            (Phi-3; HF's other families apply that factor only in the scaled types).

    Raises:
        ValueError: an unknown `rope_type`.
    """
    rope = dict(config.rope_parameters if rope is None else rope)
    rope_type = rope.get("rope_type", "default")
    dim = _rotary_dim(config, rope, partial_default)
    base = rope["rope_theta"]
    if rope_type == "default":
        return _base_inv_freq(base, dim), 1.0
    if rope_type == "linear":
        return (_base_inv_freq(base, dim) / np.float32(rope["factor"])).astype(np.float32), 1.0
    if rope_type == "dynamic":
        max_pos = config.max_position_embeddings
        seq_len = max(seq_len, max_pos)
        factor = rope["factor"]
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if rope_type == "llama3":
        return _llama3(_base_inv_freq(base, dim), rope).astype(np.float32), 1.0
    if rope_type == "yarn":
        return _yarn(config, rope, dim)
    if rope_type == "longrope":
        return _longrope(config, rope, dim, seq_len)
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {list(ROPE_TYPES)}")


def rope_cos_sin(position_ids: Tensor, inv_freq: Tensor, scaling: float, dtype) -> tuple[Tensor, Tensor]:
    """cos and sin tables `[batch, 1, seq, rotary_dim]` (broadcast over heads) for
    `position_ids` `[batch, seq]`.

    Computed in float32 and cast to `dtype`, as HF's `LlamaRotaryEmbedding.forward`.
    """
    freqs = position_ids.astype(ms.float32).reshape(position_ids.shape[0], 1, -1, 1) * inv_freq.astype(ms.float32)
    emb = ops.concat((freqs, freqs), -1)
    return (ops.cos(emb) * scaling).astype(dtype), (ops.sin(emb) * scaling).astype(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return ops.concat((-x[..., half:], x[..., :half]), -1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` `[batch, heads, seq, head_dim]` by cos/sin `[batch, 1, seq, rotary_dim]`
    (from `rope_cos_sin`).

    With a partial rotary factor only the first `rotary_dim` channels rotate (HF's GPT-NeoX /
    Phi convention); the rest pass through.
    """
    if cos.dtype != x.dtype:  # float32 tables (OLMo): rotated in float32, rounded once, as HF
        return apply_rotary(x.astype(cos.dtype), cos, sin).astype(x.dtype)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return ops.concat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), -1)


def rope_per_layer_type(config) -> bool:
    """True for configs whose `rope_parameters` map each layer type to its own parameters (Gemma 3)."""
    rope = getattr(config, "rope_parameters", None) or {}
    return "rope_theta" not in rope and all(isinstance(v, dict) for v in rope.values())


def decode_rope(config, partial_default: bool = False) -> Callable[[np.ndarray], tuple[Tensor, ...]]:
    """The rotary inputs of a compiled forward step, given its `position_ids` (int numpy `[batch, seq]`):
    `(inv_freq,)`, float32 `[rotary_dim // 2]`, computed once, or for `dynamic` and `longrope` per call
    from `max(position_ids) + 1` (HF updates those with the length reached); `()` where the tables are
    per layer type (Gemma 3: built inside the graph from the config). `partial_default`: as in
    `rope_frequencies`."""
    if rope_per_layer_type(config):
        return lambda position_ids: ()
    if config.rope_parameters.get("rope_type", "default") in ("dynamic", "longrope"):
        return lambda position_ids: (Tensor(rope_frequencies(config, int(position_ids.max()) + 1,
                                                             partial_default=partial_default)[0]),)
    fixed = (Tensor(rope_frequencies(config, partial_default=partial_default)[0]),)
    return lambda position_ids: fixed
