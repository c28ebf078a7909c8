"""GPT-2 (Radford et al. 2019) as pure functions over a parameter tree.

Follows `transformers.models.gpt2.modeling_gpt2` (5.x, eager attention). Parameters are keyed like
the HF checkpoint of `GPT2LMHeadModel`: `params["transformer"]["h"][i]["attn"]["c_attn"]["weight"]`.
GPT-2's projections are HF `Conv1D`s, whose weights are stored `[in_features, out_features]`
(the transpose of `nn.Linear`'s): they are kept in that layout and multiplied as `x @ weight`.
Positions are learned (`wpe`, `n_positions` rows): a compiled decode step takes no inputs beyond
the ids, mask, positions and cache (`step_inputs`). The config is a `transformers.GPT2Config`,
carried by the tree from `load` / `init_params` (`params.config`) or passed as `config=`; its `hidden_size`,
`num_attention_heads`, `num_hidden_layers` and `max_position_embeddings` are HF's aliases of
`n_embd`, `n_head`, `n_layer` and `n_positions`.
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from transformers import GPT2Config

from msfx.architectures.llama import CausalLMOutput
from msfx.decode.cache import KVCache, write_cache
from msfx.families import family
from msfx.layers.attention import arange, attention_bias, scaled_dot_product_attention
from msfx.layers.basic import LoraWeight, activation, embedding, linear
from msfx.backend import lacks_bf16_kernels
from msfx.inputs import check_model_inputs
from msfx.jit import host_reads_allowed
from msfx.layers.dropout import dropout
from msfx.layers.norms import layer_norm
from msfx.params import load_params
from msfx.params.tree import Params, config_of, unflatten_keys

MODEL_TYPE = "gpt2"
CONFIG_CLASS = GPT2Config
BASE_MODEL_PREFIX = "transformer"

_MATMUL = ops.MatMul()


def conv1d(x: Tensor, weight: Tensor | LoraWeight, bias: Tensor) -> Tensor:
    """HF's `Conv1D` (`pytorch_utils.Conv1D`): `x @ weight + bias` (a `LoraWeight` adds its adapter's
    term, as peft's `lora.Linear` with `fan_in_fan_out`).

    Shapes: x `[n, in]`, weight `[in, out]` (as stored in GPT-2 checkpoints), bias `[out]` -> `[n, out]`.
    The weight is read in its stored layout: no transpose is materialized per call.
    """
    if isinstance(weight, LoraWeight):
        return conv1d(x, weight.base, bias) + weight.delta(x)
    if lacks_bf16_kernels(x):  # float32 product, one rounding to bfloat16, as torch's CPU addmm
        y = _MATMUL(x.astype(ms.float32), weight.astype(ms.float32)) + bias.astype(ms.float32)
        return y.astype(x.dtype)
    return _MATMUL(x, weight) + bias


def _inner_size(config) -> int:
    return config.n_inner if config.n_inner is not None else 4 * config.hidden_size


def param_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every checkpoint key of `GPT2LMHeadModel` with its shape (the params layout).

    `lm_head.weight` `[vocab, hidden]` only when `tie_word_embeddings` is False (tied, HF's
    `save_pretrained` does not write it: the head is `transformer.wte.weight`).

    Raises:
        NotImplementedError: `add_cross_attention` (GPT-2 as the decoder of an encoder-decoder).
        ValueError: `n_embd` not divisible by `n_head` (as HF's `GPT2Attention`).
    """
    if config.add_cross_attention:
        raise NotImplementedError("msfx's GPT-2 has no cross-attention (config.add_cross_attention=True)")
    h, heads, inner = config.hidden_size, config.num_attention_heads, _inner_size(config)
    if h % heads:
        raise ValueError(f"`embed_dim` must be divisible by num_heads (got `embed_dim`: {h} and `num_heads`: {heads}).")
    shapes = {"transformer.wte.weight": (config.vocab_size, h), "transformer.wpe.weight": (config.n_positions, h)}
    for i in range(config.num_hidden_layers):
        p = f"transformer.h.{i}."
        for name, (n_in, n_out) in (("attn.c_attn", (h, 3 * h)), ("attn.c_proj", (h, h)),
                                    ("mlp.c_fc", (h, inner)), ("mlp.c_proj", (inner, h))):
            shapes[p + name + ".weight"] = (n_in, n_out)  # Conv1D: [in, out]
            shapes[p + name + ".bias"] = (n_out,)
        for norm in ("ln_1", "ln_2"):
            shapes[p + norm + ".weight"] = shapes[p + norm + ".bias"] = (h,)
    shapes["transformer.ln_f.weight"] = shapes["transformer.ln_f.bias"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def init_params(config, seed: int = 0, dtype=ms.float32, shapes: dict | None = None) -> Params:
    """Random parameters as HF's `GPT2PreTrainedModel._init_weights`: normal(0, `initializer_range`)
    matrices and embeddings, the residual projections (`c_proj`) with std divided by
    `sqrt(2 * n_layer)` (the GPT-2 paper's scheme), zero biases, unit LayerNorm weights.
    `shapes` (default `param_shapes(config)`) picks the keys, e.g. a classification head's."""
    rng = np.random.default_rng(seed)
    std = config.initializer_range
    flat = {}
    for key, shape in (shapes or param_shapes(config)).items():
        if key.endswith(".bias"):
            value = np.zeros(shape, np.float32)
        elif ".ln_" in key:
            value = np.ones(shape, np.float32)
        else:
            scale = 1 / math.sqrt(2 * config.num_hidden_layers) if key.endswith("c_proj.weight") else 1.0
            value = rng.normal(0.0, std * scale, shape).astype(np.float32)
        flat[key] = Tensor(value).astype(dtype)
    return Params(unflatten_keys(flat), config)


def _attention_scale(config, layer_idx: int) -> float:
    """HF's `GPT2Attention.scaling`: `head_dim ** -0.5` with `scale_attn_weights`, further
    divided by `layer_idx + 1` with `scale_attn_by_inverse_layer_idx`."""
    scale = (config.hidden_size // config.num_attention_heads) ** -0.5 if config.scale_attn_weights else 1.0
    return scale / (layer_idx + 1) if config.scale_attn_by_inverse_layer_idx else scale


def _attention(x, p, config, layer_idx, b, s, bias, layer_cache, cache_position):
    h, heads = config.hidden_size, config.num_attention_heads
    d = h // heads

    def heads_first(y):
        return y.reshape(b, s, heads, d).transpose(0, 2, 1, 3)

    # c_attn's output columns are [q | k | v], each `heads` blocks of `d` (HF splits at `split_size`)
    q, k, v = (heads_first(y) for y in ops.split(conv1d(x, p["c_attn"]["weight"], p["c_attn"]["bias"]), h, -1))
    if layer_cache is not None:
        k = write_cache(layer_cache[0], k, cache_position)
        v = write_cache(layer_cache[1], v, cache_position)
    scale = _attention_scale(config, layer_idx)
    if config.reorder_and_upcast_attn and q.dtype != ms.float32:
        # HF's `_upcast_and_reordered_attn`: scores and softmax in float32 whatever the weights' dtype.
        # (HF then rounds the probabilities to v's dtype before `@ v`; here the product stays float32
        # and the output is rounded once. In float32 both paths are the plain attention.)
        out = scaled_dot_product_attention(q.astype(ms.float32), k.astype(ms.float32), v.astype(ms.float32),
                                           bias, scale, dropout_rate=config.attn_pdrop).astype(q.dtype)
    else:
        out = scaled_dot_product_attention(q, k, v, bias, scale, dropout_rate=config.attn_pdrop)
    out = out.transpose(0, 2, 1, 3).reshape(b * s, h)
    return dropout(conv1d(out, p["c_proj"]["weight"], p["c_proj"]["bias"]), config.resid_pdrop), (k, v)


def block(x: Tensor, p: dict, config, layer_idx: int, batch: int, seq: int, bias: Tensor,
          layer_cache: tuple[Tensor, Tensor] | None = None, cache_position: Tensor | None = None):
    """One `GPT2Block`: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`. Returns `(x, (k, v))`. In
    training, dropout on the attention probabilities (`attn_pdrop`) and on both outputs (`resid_pdrop`).

    `x` is `[batch * seq, hidden]` (kept 2-D through the stack so each projection is one matmul);
    `bias` the additive attention mask from `attention_bias`; `layer_cache` this layer's
    `(keys, values)` buffers `[batch, heads, max_len, head_dim]`, written at `cache_position`.
    `(k, v)` are the updated buffers (with a cache) or this call's keys and values.
    """
    eps = config.layer_norm_epsilon
    ln_1, ln_2, mlp = p["ln_1"], p["ln_2"], p["mlp"]
    h, kv = _attention(layer_norm(x, ln_1["weight"], ln_1["bias"], eps), p["attn"], config, layer_idx, batch, seq,
                       bias, layer_cache, cache_position)
    x = x + h
    y = conv1d(layer_norm(x, ln_2["weight"], ln_2["bias"], eps), mlp["c_fc"]["weight"], mlp["c_fc"]["bias"])
    y = activation(config.activation_function)(y)
    return x + dropout(conv1d(y, mlp["c_proj"]["weight"], mlp["c_proj"]["bias"]), config.resid_pdrop), kv


def _check_positions(config, seq: int, position_ids, cache_position, check_ids: bool) -> None:
    """GPT-2 has `n_positions` learned position embeddings: a position beyond them has no row
    (HF's `wpe` lookup fails with an IndexError there). Statically checked for the default
    positions `0..seq-1`; given positions are read on the host only with `check_ids`."""
    limit = config.n_positions
    if position_ids is None and cache_position is None:
        if seq > limit:
            raise ValueError(f"the input has {seq} tokens but GPT-2 has learned position embeddings for "
                             f"{limit} positions only (config.n_positions): give at most {limit} tokens")
        return
    if check_ids and host_reads_allowed():
        given = (position_ids if position_ids is not None else cache_position).asnumpy()
        if given.size and (given.min() < 0 or given.max() >= limit):
            raise ValueError(f"position {given.max() if given.max() >= limit else given.min()} is out of range: "
                             f"GPT-2 has learned position embeddings for positions 0..{limit - 1} "
                             "(config.n_positions)")


def model_forward(params: dict, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                  position_ids: Tensor | None = None, cache: KVCache | None = None,
                  cache_position: Tensor | None = None, *, config=None, inputs_embeds: Tensor | None = None,
                  token_type_ids: Tensor | None = None,
                  output_hidden_states: bool = False, check_ids: bool = True):
    """The transformer (`GPT2Model`). Returns `(last_hidden_state, hidden_states, cache)`.

    Args:
        params: the tree (with or without `lm_head`).
        input_ids: `[batch, seq]` int token ids (or `inputs_embeds` `[batch, seq, hidden]`).
        attention_mask: `[batch, keys]`, 1 for tokens to attend to, 0 for padding; `keys` is
            `seq` without a cache and the cache length with one. Default: all ones.
        position_ids: `[batch, seq]` or `[1, seq]` int rows of `wpe`; default `cache_position`
            (as HF, padding is not skipped: generation passes `cumsum(mask) - 1`).
        cache: a `KVCache` (`[batch, n_head, max_len, head_dim]` per layer) to read and write;
            None for a plain forward.
        cache_position: `[seq]` int32 slots of the new tokens; default `0..seq-1`.
        token_type_ids: `[batch, seq]` int; as HF, their rows of `wte` are added to the embeddings.
        check_ids: check on the host that every id is in `[0, vocab_size)` and every given
            position in `[0, n_positions)` (compiled steps pass False; generation checks the
            prompt and the length once).

    Returns:
        `last_hidden_state` `[batch, seq, hidden]` (after `ln_f`) in the params' dtype;
        `hidden_states` (with `output_hidden_states`): the embeddings, then each block's output,
        the last one after `ln_f` (HF's convention), each `[batch, seq, hidden]`; else None;
        the updated `KVCache`, or with none passed this call's keys and values (`seq` slots).

    Raises:
        ValueError: no config, missing/both of `input_ids`/`inputs_embeds`, non-integer or
            out-of-range ids, an empty sequence, mis-shaped `attention_mask`/`position_ids`/
            `token_type_ids`, or more tokens (or a position) than `n_positions` allows.
    """
    config = config or config_of(params)
    check_model_inputs(config, input_ids, inputs_embeds, attention_mask, position_ids,
                       None if cache is None else cache.max_len, check_ids)
    p = params["transformer"]
    x = embedding(input_ids, p["wte"]["weight"]) if inputs_embeds is None else inputs_embeds
    b, s = x.shape[0], x.shape[1]
    _check_positions(config, s, position_ids, cache_position, check_ids)
    if cache_position is None:
        cache_position = arange(s)
    if position_ids is None:
        position_ids = cache_position.reshape(1, s)  # broadcast over the batch by the addition below
    x = x + embedding(position_ids, p["wpe"]["weight"])
    if token_type_ids is not None:
        if tuple(token_type_ids.shape) != (b, s):
            raise ValueError(f"token_type_ids has shape {list(token_type_ids.shape)}, expected [{b}, {s}]")
        if check_ids and host_reads_allowed():  # HF embeds token types with `wte`: each is a row of it
            types = token_type_ids.asnumpy()
            if types.min() < 0 or types.max() >= config.vocab_size:
                raise ValueError(f"token_type_ids must be in [0, vocab_size) = [0, {config.vocab_size}) (HF embeds "
                                 f"them with wte), got {types.min()}..{types.max()}")
        x = x + embedding(token_type_ids, p["wte"]["weight"])
    x = dropout(x, config.embd_pdrop)  # in training only (see `msfx.layers.dropout`)
    keys = s if cache is None else cache.max_len
    if attention_mask is None:
        attention_mask = ops.ones((b, keys), ms.int32)
    bias = attention_bias(attention_mask, cache_position)
    hidden_states = [x] if output_hidden_states else None
    x = x.reshape(b * s, -1)
    new_keys, new_values = [], []
    for i, layer in enumerate(p["h"]):
        layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
        x, (k, v) = block(x, layer, config, i, b, s, bias, layer_cache, cache_position)
        new_keys.append(k)
        new_values.append(v)
        if output_hidden_states:
            hidden_states.append(x.reshape(b, s, -1))
    x = layer_norm(x, p["ln_f"]["weight"], p["ln_f"]["bias"], config.layer_norm_epsilon).reshape(b, s, -1)
    if output_hidden_states:
        hidden_states[-1] = x
    return x, (tuple(hidden_states) if output_hidden_states else None), KVCache(tuple(new_keys), tuple(new_values))


def step_inputs(config):
    """A compiled decode step's inputs beyond ids, mask, positions and cache: none (learned positions)."""
    return lambda position_ids: ()


def lm_head(params: dict, hidden: Tensor, config) -> Tensor:
    """Logits `[..., vocab]` from final hidden states `[..., hidden]`: `hidden @ W.T` with `W`
    `[vocab, hidden]` the token embeddings (`transformer.wte.weight`, tied: HF's default) or
    `lm_head.weight` (`tie_word_embeddings=False`). No bias, as HF's `GPT2LMHeadModel.lm_head`."""
    weight = params["transformer"]["wte"]["weight"] if config.tie_word_embeddings else params["lm_head"]["weight"]
    return linear(hidden, weight)


def forward(params: dict, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
            position_ids: Tensor | None = None, cache: KVCache | None = None,
            cache_position: Tensor | None = None, *, config=None, inputs_embeds: Tensor | None = None,
            token_type_ids: Tensor | None = None,
            output_hidden_states: bool = False, logits_to_keep: int = 0, check_ids: bool = True) -> CausalLMOutput:
    """`GPT2LMHeadModel`: logits `[batch, seq, vocab]` in the params' dtype.

    Arguments and errors as `model_forward`; `logits_to_keep=n > 0` computes logits for the last
    `n` positions only (HF's argument; generation needs just the last one).
    """
    config = config or config_of(params)
    hidden, hidden_states, cache = model_forward(
        params, input_ids, attention_mask, position_ids, cache, cache_position, config=config,
        inputs_embeds=inputs_embeds, token_type_ids=token_type_ids, output_hidden_states=output_hidden_states,
        check_ids=check_ids)
    if 0 < logits_to_keep < hidden.shape[1]:  # a no-op slice still costs ~1.5 ms in a compiled CPU step
        hidden = hidden[:, -logits_to_keep:]
    return CausalLMOutput(lm_head(params, hidden, config), hidden_states, cache)


def load(ref, *, dtype="auto", **hub_kwargs) -> Params:
    """Parameters of a GPT-2 safetensors checkpoint (directory or hub id), config attached.

    Checkpoints saved from `GPT2Model` (keys without `transformer.`) load too. See
    `msfx.params.load_params` for the arguments and the errors raised.
    """
    return load_params(family(MODEL_TYPE), ref, dtype=dtype, prefix=BASE_MODEL_PREFIX, **hub_kwargs)
