"""Llama (Touvron et al. 2023) as pure functions over a parameter tree, and the Llama-like families.

Follows `transformers.models.llama.modeling_llama`. Parameters are keyed like the HF checkpoint:
`params["model"]["layers"][i]["self_attn"]["q_proj"]["weight"]`. The config is a
`transformers.LlamaConfig`, carried by the tree from `load` / `init_params` (`params.config`) or
passed as `config=`.

Families that differ from Llama by switches (Qwen2, Qwen3, Mistral, Phi-3, and with LayerNorms, plain
MLPs, parallel residuals and their own module names StarCoder2, Phi, GPT-NeoX, ...) reuse these
functions: their record in `msfx.families` gives the `DecoderSpec` for their `model_type`, and the
parameters keep their checkpoint's names (`gpt_neox.layers.0.attention.query_key_value.weight`).
"""
from __future__ import annotations

from types import ModuleType
from typing import Callable, NamedTuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from transformers import LlamaConfig

from msfx.architectures.decoder_spec import DecoderSpec
from msfx.backend import lacks_bf16_kernels
from msfx.decode.cache import KVCache, write_cache, write_ring
from msfx import kernels
from msfx.families import family
from msfx.layers.attention import arange, attention_bias, ring_attention_bias, scaled_dot_product_attention
from msfx.layers.basic import activation, embedding, gated_mlp, linear, linears, scaled, tanh
from msfx.inputs import check_model_inputs
from msfx.jit import host_reads_allowed
from msfx.layers.dropout import dropout
from msfx.layers.moe import sparse_moe
from msfx.layers.norms import layer_norm, rms_norm
from msfx.layers.rotary import apply_rotary, decode_rope, rope_cos_sin, rope_frequencies
from msfx.params import load_params
from msfx.params.tree import Params, config_of, unflatten_keys

MODEL_TYPE = "llama"
CONFIG_CLASS = LlamaConfig


class CausalLMOutput(NamedTuple):
    """`logits` `[batch, seq, vocab]`; `hidden_states`: embeddings then each layer's output
    (the last one final-normed), each `[batch, seq, hidden]`, or None; `cache`: the
    updated cache, or with none passed this call's keys and values (`seq` slots); `router_logits`: each sparse layer's
    `[batch * seq, experts]` (mixture-of-experts families), else None."""

    logits: Tensor | None
    hidden_states: tuple[Tensor, ...] | None
    cache: KVCache | None
    router_logits: tuple[Tensor, ...] | None = None


class DecoderOutput(NamedTuple):
    """`model_forward`'s result: as `CausalLMOutput`, with the final-normed `last_hidden_state`
    `[batch, seq, hidden]` in place of logits."""

    last_hidden_state: Tensor
    hidden_states: tuple[Tensor, ...] | None
    cache: KVCache | None
    router_logits: tuple[Tensor, ...] | None = None


def spec_of(config) -> DecoderSpec:
    """The `DecoderSpec` of `config.model_type`'s family (`msfx.families`).

    Raises:
        ValueError: a model_type msfx does not support.
    """
    return family(config.model_type).spec(config)


class LayerPlan(NamedTuple):
    """How one decoder layer runs, fixed once per forward by the config, the spec and the cache
    (`layer_plans`); the layer branches on it, never on which keys its parameters hold."""

    window: int | None  # sliding-window length in positions; None: full attention
    ring: int | None  # the length of the layer's ring-buffer cache (`cache_lengths`); None: no ring
    rope: str  # the rotary tables it uses: its layer type's (Gemma 3) or "shared"
    rotary: bool  # False: no rotary at all on this layer (SmolLM3's `no_rope_layers`)
    sparse: bool  # its MLP is the sparse mixture of experts (`spec.moe.sparse_layers`)


def layer_plans(config, spec: DecoderSpec, cache: KVCache | None = None, keys: int | None = None):
    """Each layer's `LayerPlan`; a layer's cache is a ring when its buffer is shorter than the
    `keys` positions the cache covers."""
    n = config.num_hidden_layers
    windows = spec.attention.sliding_windows or (None,) * n
    rings = [None if cache is None or cache.keys[i].shape[2] == keys else cache.keys[i].shape[2] for i in range(n)]
    ropes = config.layer_types if spec.rope.by_layer_type else ("shared",) * n
    rotary = spec.rope.layers or (True,) * n
    sparse = spec.moe.sparse_layers if spec.moe else (False,) * n
    return tuple(LayerPlan(*row) for row in zip(windows, rings, ropes, rotary, sparse))


def cache_lengths(config, max_len: int) -> tuple[int, ...]:
    """Per-layer KV-cache lengths for a generation of up to `max_len` positions: sliding-window
    layers keep a ring of their last `window` positions (`msfx.decode.cache.write_ring`), the
    others every position."""
    windows = spec_of(config).attention.sliding_windows or (None,) * config.num_hidden_layers
    return tuple(max_len if w is None or w >= max_len else w for w in windows)


def step_inputs(config) -> Callable[[np.ndarray], tuple[Tensor, ...]]:
    """What a compiled forward step takes after `cache_position`, by its positions: the rotary
    frequencies (`msfx.layers.rotary.decode_rope`), passed on as `forward`'s `inv_freq`."""
    return decode_rope(config, spec_of(config).rope.partial_default)


def base_prefix(config) -> str:
    """The base model's key prefix, HF's `base_model_prefix` (`model`; GPT-NeoX's `gpt_neox`)."""
    return family(config.model_type).base_prefix


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config, spec: DecoderSpec) -> int:
    # GPT-NeoX's per-head fused q | k | v has one key/value head per query head
    return config.num_attention_heads if spec.attention.fused_qkv == "heads" else config.num_key_value_heads


# each norm placement's per-layer norms (see `decoder_layer`)
LAYER_NORMS = {"pre": ("input_layernorm", "post_attention_layernorm"),
               "post": ("post_attention_layernorm", "post_feedforward_layernorm"),
               "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                            "post_feedforward_layernorm"),
               "parallel": ("input_layernorm", "post_attention_layernorm"), "shared": ("input_layernorm",)}


_NORM_PARAMETERS = {"rms": ("weight",), "layer": ("weight", "bias"), "parameter_free": ()}


def _norm_shapes(key: str, h: int, spec: DecoderSpec) -> dict:
    return {f"{key}.{name}": (h,) for name in _NORM_PARAMETERS[spec.norms.kind]}


def _linear_shapes(key: str, out: int, n_in: int, bias: bool) -> dict:
    return {key + ".weight": (out, n_in)} | ({key + ".bias": (out,)} if bias else {})


def _attention_shapes(p: str, config, spec: DecoderSpec) -> dict:
    attn, names, h, d = spec.attention, spec.names, config.hidden_size, head_dim(config)
    q, kv = config.num_attention_heads * d, kv_heads(config, spec) * d
    rows = [(names.qkv, q + 2 * kv)] if attn.fused_qkv else [("q_proj", q), ("k_proj", kv), ("v_proj", kv)]
    shapes = {}
    for name, out in rows:
        shapes |= _linear_shapes(p + name, out, h, attn.qkv_bias)
    shapes |= _linear_shapes(p + names.o, h, q, attn.o_bias)
    if attn.qk_norm in ("head", "projection"):  # over each head, or over the whole projection (OLMo2)
        qn, kn = (q, kv) if attn.qk_norm == "projection" else (d, d)
        shapes |= {p + "q_norm.weight": (qn,), p + "k_norm.weight": (kn,)}
    elif attn.qk_norm == "head_layer":
        shapes |= {f"{p}{y}_layernorm.{w}": (d,) for y in "qk" for w in ("weight", "bias")}
    elif attn.qk_norm == "per_head_layer":
        for y, count in (("q", config.num_attention_heads), ("k", kv_heads(config, spec))):
            shapes |= {f"{p}{y}_layernorm.norms.{i}.weight": (d,) for i in range(count)}
    return shapes


def _mlp_shapes(p: str, config, spec: DecoderSpec, sparse: bool) -> dict:
    mlp, moe, h, inter = spec.mlp, spec.moe, config.hidden_size, config.intermediate_size
    if sparse:
        m, (gate, up, down), e_inter = p + moe.module, moe.expert_names, moe.intermediate
        shapes = {m + ".gate.weight": (moe.num_experts, h)}
        for e in range(moe.num_experts):
            shapes |= {f"{m}.experts.{e}.{gate}.weight": (e_inter, h), f"{m}.experts.{e}.{up}.weight": (e_inter, h),
                       f"{m}.experts.{e}.{down}.weight": (h, e_inter)}
        return shapes
    if mlp.plain:
        rows = [(mlp.plain[0], inter, h), (mlp.plain[1], h, inter)]
    elif mlp.fused_gate_up:
        rows = [("gate_up_proj", 2 * inter, h), ("down_proj", h, inter)]
    else:
        rows = [("gate_proj", inter, h), ("up_proj", inter, h), ("down_proj", h, inter)]
    shapes = {}
    for name, out, n_in in rows:
        shapes |= _linear_shapes(f"{p}mlp.{name}", out, n_in, mlp.bias)
    return shapes


def param_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every checkpoint key of the `...ForCausalLM` with its shape (the params layout).

    Raises:
        ValueError: an activation msfx lacks (checked here, at load time: an error raised while
            `mindspore.jit` traces a step leaves MindSpore 2.10 unable to exit the process).
    """
    spec = spec_of(config)
    activation(spec.mlp.hidden_act or config.hidden_act)
    names, base, h = spec.names, base_prefix(config), config.hidden_size
    shapes = {f"{base}.{names.embed}.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"{base}.layers.{i}."
        for name in LAYER_NORMS[spec.norms.placement]:
            shapes |= _norm_shapes(p + name, h, spec)
        shapes |= _attention_shapes(f"{p}{names.attention}.", config, spec)
        shapes |= _mlp_shapes(p, config, spec, spec.moe is not None and spec.moe.sparse_layers[i])
    shapes |= _norm_shapes(f"{base}.{names.final_norm}", h, spec)
    if not config.tie_word_embeddings:
        shapes[names.lm_head + ".weight"] = (config.vocab_size, h)
    if spec.lm_head_bias:  # Phi's, kept when the weight is tied
        shapes[names.lm_head + ".bias"] = (config.vocab_size,)
    return shapes


def init_params(config, seed: int = 0, dtype=ms.float32, shapes: dict | None = None) -> Params:
    """Random parameters as HF's `_init_weights`: normal(0, `initializer_range`) matrices,
    zero biases, unit norm weights. `shapes` (default `param_shapes(config)`) picks the keys,
    e.g. a classification head's."""
    rng = np.random.default_rng(seed)
    unit_norm = 1.0 - spec_of(config).norms.offset  # Gemma's norms scale by 1 + weight: zeros
    flat = {}
    for key, shape in (shapes or param_shapes(config)).items():
        if key.endswith("norm.weight"):
            value = np.full(shape, unit_norm, np.float32)
        elif key.endswith(".bias"):
            value = np.zeros(shape, np.float32)
        else:
            value = rng.normal(0.0, config.initializer_range, shape).astype(np.float32)
        flat[key] = Tensor(value).astype(dtype)
    return Params(unflatten_keys(flat), config)


def _attention(x, p, config, spec, plan, cos, sin, bias, layer_cache, cache_position):
    b, s = cos.shape[0], cos.shape[2]
    d, heads, n_kv = head_dim(config), config.num_attention_heads, kv_heads(config, spec)
    attn, names = spec.attention, spec.names
    if attn.fused_qkv:
        qkv = linear(x, p[names.qkv]["weight"], p[names.qkv].get("bias"))
        if attn.fused_qkv == "heads":  # GPT-NeoX: q | k | v within each head's rows
            q, k, v = (y.reshape(b * s, heads * d) for y in ops.split(qkv.reshape(b * s, heads, 3 * d), d, -1))
        else:  # Phi-3: q | k | v blocks
            q, k, v = ops.split(qkv, (heads * d, n_kv * d, n_kv * d), -1)
    else:
        q, k, v = linears(x, [p[name] for name in ("q_proj", "k_proj", "v_proj")])
    if attn.clip_qkv is not None:  # OLMo; bfloat16 on CPU (no Maximum kernel) clamps in float32, exactly
        wide = lacks_bf16_kernels(x)
        q, k, v = (ops.clamp(y.astype(ms.float32) if wide else y, -attn.clip_qkv, attn.clip_qkv).astype(y.dtype)
                   for y in (q, k, v))
    if attn.qk_norm == "projection":  # OLMo2: over the whole projection, before the split into heads
        q, k = _qk_norm(q, k, p, config, spec)
    scale = d ** -0.5 if attn.scale is None else attn.scale
    if _fused_attention(q, spec, plan, layer_cache, s):
        q, *new_kv = kernels.rope_cache_write(q, k, v, cos, sin, *layer_cache, cache_position)
        out = kernels.cache_attention(q, *new_kv, bias, scale)
        return linear(out, p[names.o]["weight"], p[names.o].get("bias")), tuple(new_kv)
    q, k, v = (y.reshape(b, s, n, d) for y, n in ((q, heads), (k, n_kv), (v, n_kv)))
    if attn.qk_norm not in (None, "projection"):  # per head, before the rotation
        q, k = _qk_norm(q, k, p, config, spec)
    q, k, v = (y.transpose(0, 2, 1, 3) for y in (q, k, v))
    if plan.rotary:
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if layer_cache is None:
        new_kv = (k, v)
    elif plan.ring is not None:
        # a sliding-window ring buffer (see `cache_lengths`): attend over its old entries and the
        # new keys (`ring_attention_bias`), then keep the last window of positions in it
        new_kv = (write_ring(layer_cache[0], k, cache_position), write_ring(layer_cache[1], v, cache_position))
        k, v = ops.concat((layer_cache[0], k), 2), ops.concat((layer_cache[1], v), 2)
    else:
        k, v = write_cache(layer_cache[0], k, cache_position), write_cache(layer_cache[1], v, cache_position)
        new_kv = (k, v)
    out = scaled_dot_product_attention(q, k, v, bias, scale, attn.softcap, config.attention_dropout)
    out = out.transpose(0, 2, 1, 3).reshape(b * s, -1)
    return linear(out, p[names.o]["weight"], p[names.o].get("bias")), new_kv


def _fused_attention(q, spec, plan, layer_cache, queries: int) -> bool:
    """Whether a layer attends through `msfx.kernels` (rotary, cache write and attention in two ops):
    in a compiled float32 inference step over a full-length cache, with rotary, no per-head q/k norm
    and no softcap, for up to `kernels.MAX_QUERIES` queries."""
    attn = spec.attention
    return (kernels.active() and q.dtype == ms.float32 and layer_cache is not None and plan.ring is None
            and plan.rotary and attn.qk_norm in (None, "projection") and attn.softcap is None
            and queries <= kernels.MAX_QUERIES)


def _qk_norm(q, k, p, config, spec):
    """q and k (`[batch, seq, heads, head_dim]`, or `[batch * seq, heads * head_dim]` for "projection")
    through `spec.attention.qk_norm`'s norms."""
    kind, eps = spec.attention.qk_norm, spec.norms.eps
    if kind == "head_layer":  # Phi
        return tuple(layer_norm(y, p[n]["weight"], p[n]["bias"], eps) for y, n in ((q, "q_layernorm"),
                                                                                   (k, "k_layernorm")))
    if kind == "per_head_layer":  # StableLM: the heads' weights stacked `[heads, head_dim]`
        return tuple(layer_norm(y, ops.stack([h["weight"] for h in p[n]["norms"]]), None, eps)
                     for y, n in ((q, "q_layernorm"), (k, "k_layernorm")))
    norms = spec.norms
    return (rms_norm(q, p["q_norm"]["weight"], config.rms_norm_eps, norms.offset, norms.scale_in_float32),
            rms_norm(k, p["k_norm"]["weight"], config.rms_norm_eps, norms.offset, norms.scale_in_float32))


def _mlp(x, p, spec, hidden_act: str, sparse: bool):
    """The layer's MLP (the sparse mixture of experts `p[spec.moe.module]` when `sparse`) with HF's
    activation `hidden_act`; returns `(y, router_logits or None)`."""
    if not (sparse or spec.mlp.plain):
        return gated_mlp(x, p["mlp"], hidden_act, spec.mlp.fused_gate_up), None
    act = activation(hidden_act)
    if sparse:
        moe = spec.moe
        return sparse_moe(x, p[moe.module], moe.expert_names, moe.top_k, moe.normalize_top_k, act, moe.float32_weights)
    up, down = (p["mlp"][name] for name in spec.mlp.plain)
    return linear(act(linear(x, up["weight"], up.get("bias"))), down["weight"], down.get("bias")), None


def norm(x: Tensor, p: dict | None, config, spec: DecoderSpec) -> Tensor:
    """`x` through the spec's norm kind with the norm's parameters `p` (None for a parameter-free norm)."""
    norms = spec.norms
    eps = config.rms_norm_eps if norms.eps is None else norms.eps
    if norms.kind == "rms":
        return rms_norm(x, p["weight"], eps, norms.offset, norms.scale_in_float32)
    if norms.kind == "layer":
        return layer_norm(x, p["weight"], p["bias"], eps)
    return layer_norm(x, None, None, eps)


def decoder_layer(x, p, config, cos, sin, bias, layer_cache=None, cache_position=None, spec=None, plan=None):
    """One block by `spec.norms.placement`. Returns `(x, (k, v), router_logits)`, the last None
    unless `plan.sparse` (the MLP is a sparse mixture of experts). `plan`: the layer's `LayerPlan`
    (default: full attention, no ring, rotary, dense). `x` is `[batch * seq, hidden]`: kept 2-D
    through the stack so each linear is one matmul. Placements:

    - "pre" (Llama): `x + attn(norm(x))`, then `x + mlp(norm(x))`;
    - "post" (OLMo2): `x + norm(attn(x))`, then `x + norm(mlp(x))`;
    - "sandwich" (Gemma 2): `x + norm(attn(norm(x)))`, then `x + norm(mlp(norm(x)))`;
    - "parallel" (GPT-NeoX): `x + attn(norm1(x)) + mlp(norm2(x))`; "shared" (Phi): one norm for both.

    The attention and MLP outputs are scaled by `spec.residual_multiplier` (Granite) and, in
    training, dropped out with `spec.resid_pdrop` (Phi-3); the attention probabilities with
    `config.attention_dropout`.
    """
    spec = spec or spec_of(config)
    plan = plan or LayerPlan(None, None, "shared", True, False)
    hidden_act, placement = spec.mlp.hidden_act or config.hidden_act, spec.norms.placement

    def normed(y, name):
        return norm(y, p.get(name), config, spec)

    def attention(y):
        return _attention(y, p[spec.names.attention], config, spec, plan, cos, sin, bias, layer_cache, cache_position)

    def branch(h):  # a residual branch's output as it is added
        h = dropout(h, spec.resid_pdrop)
        return h if spec.residual_multiplier == 1.0 else scaled(h, spec.residual_multiplier)

    if placement in ("parallel", "shared"):
        y = normed(x, "input_layernorm")
        h, kv = attention(y)
        g, router_logits = _mlp(y if placement == "shared" else normed(x, "post_attention_layernorm"), p, spec,
                                hidden_act, plan.sparse)
        out = branch(h) + branch(g) + x if spec.norms.branches_first else x + branch(h) + branch(g)
        return out, kv, router_logits
    if placement == "post":
        h, kv = attention(x)
        x = x + normed(h, "post_attention_layernorm")
        h, router_logits = _mlp(x, p, spec, hidden_act, plan.sparse)
        return x + normed(h, "post_feedforward_layernorm"), kv, router_logits
    h, kv = attention(normed(x, "input_layernorm"))
    if placement == "sandwich":
        x = x + normed(h, "post_attention_layernorm")
        h, router_logits = _mlp(normed(x, "pre_feedforward_layernorm"), p, spec, hidden_act, plan.sparse)
        return x + normed(h, "post_feedforward_layernorm"), kv, router_logits
    x = x + branch(h)
    h, router_logits = _mlp(normed(x, "post_attention_layernorm"), p, spec, hidden_act, plan.sparse)
    return x + branch(h), kv, router_logits


def layer_biases(plans, attention_mask: Tensor, cache_position: Tensor) -> list[Tensor]:
    """Each layer's additive attention bias `[batch, 1, seq, keys]` for its plan's window and ring,
    built once per distinct (window, ring)."""
    built = {}
    for plan in plans:
        if (plan.window, plan.ring) not in built:
            built[plan.window, plan.ring] = (
                attention_bias(attention_mask, cache_position, plan.window) if plan.ring is None
                else ring_attention_bias(attention_mask, cache_position, plan.ring, plan.window))
    return [built[plan.window, plan.ring] for plan in plans]


def layer_rotations(config, spec: DecoderSpec, plans, position_ids: Tensor, inv_freq: Tensor | None,
                    table_len: int | None, dtype) -> list[tuple[Tensor, Tensor]]:
    """Each layer's rotary `(cos, sin)` `[batch, 1, seq, rotary_dim]`: its layer type's static
    table (Gemma 3), else one table from `inv_freq` or, without it, from the config's rope for
    `table_len` positions (dynamic scalings depend on it); in `dtype`, float32 with `float32_tables`."""
    partial, dtype = spec.rope.partial_default, ms.float32 if spec.rope.float32_tables else dtype
    if spec.rope.by_layer_type:
        tables = {}
        for kind, rope in config.rope_parameters.items():
            freqs, scaling = rope_frequencies(config, rope=rope, partial_default=partial)
            tables[kind] = rope_cos_sin(position_ids, Tensor(freqs), scaling, dtype)
        return [tables[plan.rope] for plan in plans]
    if inv_freq is None:
        freqs, scaling = rope_frequencies(config, table_len, partial_default=partial)
        inv_freq = Tensor(freqs)
    else:
        scaling = rope_frequencies(config, partial_default=partial)[1]
    return [rope_cos_sin(position_ids, inv_freq, scaling, dtype)] * len(plans)


def _cache_slots(cache: KVCache, windows: tuple, attention_mask: Tensor | None) -> int:
    """The positions a cache covers: a full-attention layer's buffer length; with sliding-window
    ring buffers only (Mistral), the attention mask's length (or the longest buffer)."""
    full = [cache.keys[i].shape[2] for i, w in enumerate(windows) if w is None]
    if full:
        return full[0]
    return attention_mask.shape[1] if attention_mask is not None else cache.max_len


def model_forward(params: dict, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                  position_ids: Tensor | None = None, cache: KVCache | None = None,
                  cache_position: Tensor | None = None, inv_freq: Tensor | None = None, *, config=None,
                  inputs_embeds: Tensor | None = None, output_hidden_states: bool = False, check_ids: bool = True):
    """The decoder stack (`LlamaModel`). Returns a `DecoderOutput`.

    Args:
        params: the tree (with or without the `lm_head`).
        input_ids: `[batch, seq]` int token ids (or `inputs_embeds` `[batch, seq, hidden]`).
        attention_mask: `[batch, keys]`, 1 for tokens to attend to, 0 for padding; `keys` is
            `seq` without a cache and the cache length with one. Default: all ones.
        position_ids: `[batch, seq]`; default `cache_position` (as HF, padding is not skipped).
        cache: a `KVCache` to read and write (HF's `cache`, formerly `past_key_values`); None
            for a plain forward.
        cache_position: `[seq]` int32 slots of the new tokens; default `0..seq-1`.
        inv_freq: `[rotary_dim // 2]` float32 rotary frequencies; default from the config and
            the positions (pass it inside jit, where positions are not known on the host).
        check_ids: check that every id is in `[0, vocab_size)` (reads the ids on the host;
            compiled steps pass False and generation checks the prompt once).

    Raises:
        ValueError: no config, missing/both of `input_ids`/`inputs_embeds`, non-integer or
            out-of-range ids, an empty sequence, or mis-shaped `attention_mask`/`position_ids`.
    """
    config = config or config_of(params)
    spec = spec_of(config)
    windows = spec.attention.sliding_windows or (None,) * config.num_hidden_layers
    keys = None if cache is None else _cache_slots(cache, windows, attention_mask)
    check_model_inputs(config, input_ids, inputs_embeds, attention_mask, position_ids, keys, check_ids)
    base = params[base_prefix(config)]
    if inputs_embeds is None:
        x = embedding(input_ids, base[spec.names.embed]["weight"])
        if spec.embed_scale:  # HF rounds the scale to the weights' dtype first
            x = x * Tensor(np.float32(config.hidden_size ** 0.5)).astype(x.dtype)
    else:
        x = inputs_embeds
    if spec.embedding_multiplier != 1.0:  # Granite: also on given `inputs_embeds`
        x = scaled(x, spec.embedding_multiplier)
    x = dropout(x, spec.embed_pdrop)
    b, s = x.shape[0], x.shape[1]
    # positions 0..s-1 unless given: the rope table's length is known without reading them back
    table_len = s if position_ids is None and cache_position is None else None
    if cache_position is None:
        cache_position = arange(s)
    if position_ids is None:
        position_ids = ops.broadcast_to(cache_position.reshape(1, s), (b, s))
    keys = s if cache is None else keys
    if attention_mask is None:
        attention_mask = ops.ones((b, keys), ms.int32)
    plans = layer_plans(config, spec, cache, keys)
    biases = layer_biases(plans, attention_mask, cache_position)
    if inv_freq is None and table_len is None and not spec.rope.by_layer_type:
        # read the positions back for the table's length; inside a jit trace, sized by the sequence
        table_len = int(position_ids.asnumpy().max()) + 1 if host_reads_allowed() else s
    rotations = layer_rotations(config, spec, plans, position_ids, inv_freq, table_len, x.dtype)
    hidden_states = [x] if output_hidden_states else None
    x = x.reshape(b * s, -1)
    new_keys, new_values, router_logits = [], [], []
    for i, layer in enumerate(base["layers"]):
        layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
        cos, sin = rotations[i]
        x, (k, v), routed = decoder_layer(x, layer, config, cos, sin, biases[i], layer_cache, cache_position, spec,
                                          plans[i])
        new_keys.append(k)
        new_values.append(v)
        if routed is not None:
            router_logits.append(routed)
        if output_hidden_states:
            hidden_states.append(x.reshape(b, s, -1))
    x = norm(x, base.get(spec.names.final_norm), config, spec).reshape(b, s, -1)
    if output_hidden_states:
        hidden_states[-1] = x
    return DecoderOutput(x, tuple(hidden_states) if output_hidden_states else None,
                         KVCache(tuple(new_keys), tuple(new_values)),
                         tuple(router_logits) if router_logits else None)


def lm_head(params: dict, hidden: Tensor, config) -> Tensor:
    """Logits `[..., vocab]` from final hidden states; the embedding matrix when tied. With
    `lm_head_bias` (Phi) plus `lm_head.bias`; divided by `logits_scaling` (Granite); with
    `final_softcap` (Gemma 2): `cap * tanh(logits / cap)`."""
    spec = spec_of(config)
    head = params.get(spec.names.lm_head)
    weight = params[base_prefix(config)][spec.names.embed]["weight"] if config.tie_word_embeddings else head["weight"]
    logits = linear(hidden, weight, head["bias"] if spec.lm_head_bias else None)
    if spec.logits_scaling != 1.0:
        logits = logits / spec.logits_scaling
    cap = spec.final_softcap
    return logits if cap is None else tanh(logits / cap) * cap


def forward(params: dict, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
            position_ids: Tensor | None = None, cache: KVCache | None = None,
            cache_position: Tensor | None = None, inv_freq: Tensor | None = None, *, config=None,
            inputs_embeds: Tensor | None = None, output_hidden_states: bool = False,
            logits_to_keep: int = 0, check_ids: bool = True) -> CausalLMOutput:
    """`LlamaForCausalLM`: logits `[batch, seq, vocab]` in the params' dtype.

    Arguments as `model_forward`; `logits_to_keep=n > 0` computes logits for the last `n`
    positions only (HF's argument; generation needs just the last one).
    """
    config = config or config_of(params)
    out = model_forward(params, input_ids, attention_mask, position_ids, cache, cache_position, inv_freq,
                        config=config, inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states,
                        check_ids=check_ids)
    hidden = out.last_hidden_state
    if 0 < logits_to_keep < hidden.shape[1]:  # a no-op slice still costs ~1.5 ms in a compiled CPU step
        hidden = hidden[:, -logits_to_keep:]
    return CausalLMOutput(lm_head(params, hidden, config), out.hidden_states, out.cache, out.router_logits)


def loader(model_type: str) -> Callable[..., Params]:
    """The `load` function of the Llama-like family `model_type` (see `msfx.families`)."""
    def load(ref, *, dtype="auto", gguf_file: str | None = None, **hub_kwargs) -> Params:
        """Parameters of a checkpoint of this family (directory, hub id, or `gguf_file=`), config attached.

        See `msfx.params.load_params` for the arguments and the errors raised.
        """
        return load_params(family(model_type), ref, dtype=dtype, gguf_file=gguf_file, **hub_kwargs)

    return load


load = loader(MODEL_TYPE)

_FUNCTIONS = ("cache_lengths", "forward", "init_params", "lm_head", "model_forward", "param_shapes", "step_inputs")


def family_module(model_type: str) -> ModuleType:
    """`msfx.<model_type>` for a Llama-like family: this module's functions, with `load` reading
    that family's checkpoints (`msfx.qwen2.forward(msfx.qwen2.load(path), ids)`)."""
    spec = family(model_type).spec
    module = ModuleType(f"msfx.{model_type}", f"`{model_type}` as `msfx.llama`'s functions switched by "
                                              f"`msfx.families.{spec.__name__}`: {spec.__doc__ or 'Llama'}")
    module.__dict__.update({name: globals()[name] for name in _FUNCTIONS}, MODEL_TYPE=model_type,
                           load=loader(model_type))
    return module
