"""BART (Lewis et al. 2019) and mBART (Liu et al. 2020) as pure functions over a parameter tree.

Follows `transformers.models.bart.modeling_bart` and `...mbart.modeling_mbart` (5.x), which differ by
one switch (`BartSpec.pre_norm`). Parameters are keyed like `BartForConditionalGeneration`'s checkpoint:
`model.shared.weight` (the token embeddings of both stacks and the head, under `tie_word_embeddings`;
untied, each stack reads its own `model.{encoder,decoder}.embed_tokens` and the head `lm_head.weight`),
`model.{encoder,decoder}.*`, `final_logits_bias` `[1, vocab]` added to the logits, the
`classification_head.*` of `BartForSequenceClassification` and the `qa_outputs` of
`BartForQuestionAnswering`.

Each stack: token embeddings (times `sqrt(d_model)` with `scale_embedding`) plus learned positions read
at `position + 2` (HF's `BartLearnedPositionalEmbedding` offset), `layernorm_embedding`, then layers of
self-attention (causal in the decoder), cross-attention over the encoder output (decoder), and
`fc2(act(fc1(x)))`. BART normalizes after each residual sum (`norm(x + f(x))`); mBART before each
sub-layer (`x + f(norm(x))`) and once more at each stack's end (`layer_norm`). Queries are scaled by
`head_dim ** -0.5`; every projection has a bias.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from transformers import BartConfig

from msfx.architectures.vision_encoder import norm
from msfx.decode.cache import KVCache, write_cache
from msfx.families import family
from msfx.inputs import check_model_inputs
from msfx.layers.attention import attention_bias, padding_bias, scaled_dot_product_attention, split_heads
from msfx.layers.attention import cross_attention_cache as cross_kv, key_values
from msfx.layers.basic import activation, embedding, linear, scaled
from msfx.layers.dropout import dropout
from msfx.params import load_params
from msfx.params.tree import Params, config_of, unflatten_keys

MODEL_TYPE = "bart"
CONFIG_CLASS = BartConfig
PREFIX = "model"
POSITION_OFFSET = 2  # HF's `BartLearnedPositionalEmbedding.offset`: row `position + 2` (fairseq's padding rows)
_LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which HF's BART layers use


class BartSpec(NamedTuple):
    """What tells the families apart. `pre_norm` (mBART): `x + f(norm(x))` and a final `layer_norm` per
    stack; else (BART) `norm(x + f(x))`."""

    pre_norm: bool = False


SPECS = {"bart": BartSpec(), "mbart": BartSpec(pre_norm=True)}


def spec(config) -> BartSpec:
    """The `BartSpec` of `config.model_type` ("bart" or "mbart")."""
    return SPECS[config.model_type]


class BartStackOutput(NamedTuple):
    """`last_hidden_state` `[batch, seq, d_model]`; `cache`: the decoder's updated self-attention cache, or None."""

    last_hidden_state: Tensor
    cache: KVCache | None = None


class BartModelOutput(NamedTuple):
    """The decoder's `last_hidden_state` `[batch, target_seq, d_model]`; `encoder_last_hidden_state`
    `[batch, source_seq, d_model]`."""

    last_hidden_state: Tensor
    encoder_last_hidden_state: Tensor


class Seq2SeqLogits(NamedTuple):
    """`logits` `[batch, target_seq, vocab]`; `encoder_last_hidden_state` `[batch, source_seq, d_model]`."""

    logits: Tensor
    encoder_last_hidden_state: Tensor


def param_shapes(config, *, head: str | None = "lm") -> dict[str, tuple[int, ...]]:
    """Checkpoint keys with their shapes: the base model (`model.*`) and `head`: "lm" (`final_logits_bias`,
    plus `lm_head.weight` when untied), "classification" (`classification_head.*`), "question_answering"
    (`qa_outputs`, start and end logits) or None."""
    d, vocab = config.d_model, config.vocab_size
    shapes = {"model.shared.weight": (vocab, d)}

    def linear_shapes(key: str, out: int, inp: int) -> None:
        shapes[key + ".weight"], shapes[key + ".bias"] = (out, inp), (out,)

    def norm(key: str) -> None:
        shapes[key + ".weight"], shapes[key + ".bias"] = (d,), (d,)

    for stack, layers, ffn in (("encoder", config.encoder_layers, config.encoder_ffn_dim),
                               ("decoder", config.decoder_layers, config.decoder_ffn_dim)):
        if not config.tie_word_embeddings:
            shapes[f"model.{stack}.embed_tokens.weight"] = (vocab, d)
        shapes[f"model.{stack}.embed_positions.weight"] = (config.max_position_embeddings + POSITION_OFFSET, d)
        norm(f"model.{stack}.layernorm_embedding")
        for i in range(layers):
            p = f"model.{stack}.layers.{i}."
            for attention_name in ("self_attn", "encoder_attn") if stack == "decoder" else ("self_attn",):
                for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    linear_shapes(f"{p}{attention_name}.{name}", d, d)
                norm(f"{p}{attention_name}_layer_norm")
            linear_shapes(p + "fc1", ffn, d)
            linear_shapes(p + "fc2", d, ffn)
            norm(p + "final_layer_norm")
        if spec(config).pre_norm:
            norm(f"model.{stack}.layer_norm")
    if head == "lm":
        shapes["final_logits_bias"] = (1, vocab)
        if not config.tie_word_embeddings:
            shapes["lm_head.weight"] = (vocab, d)
    elif head == "classification":
        linear_shapes("classification_head.dense", d, d)
        linear_shapes("classification_head.out_proj", config.num_labels, d)
    elif head == "question_answering":
        linear_shapes("qa_outputs", 2, d)
    return shapes


def init_params(config, seed: int = 0, dtype=ms.float32, shapes: dict | None = None) -> Params:
    """Random parameters as HF's `_init_weights`: normal(0, `init_std`) matrices, zero biases (and
    `final_logits_bias`), unit norms. `shapes` (default `param_shapes(config)`) picks the keys."""
    rng = np.random.default_rng(seed)
    flat = {}
    for key, shape in (shapes or param_shapes(config)).items():
        if "norm" in key:
            value = np.full(shape, 1.0 if key.endswith("weight") else 0.0, np.float32)
        elif key.endswith("bias"):
            value = np.zeros(shape, np.float32)
        else:
            value = rng.normal(0.0, config.init_std, shape).astype(np.float32)
        flat[key] = Tensor(value).astype(dtype)
    return Params(unflatten_keys(flat), config)


def _norm(x: Tensor, p: dict) -> Tensor:
    """`nn.LayerNorm`; in bfloat16 / float16 rounded once, as torch's CPU kernel (`vision_encoder.norm`: three
    roundings put BART's bfloat16 logits 1.22-1.24x further from float32 than HF's on average)."""
    return norm(x, p, _LN_EPS)


def _sublayer_input(x: Tensor, norm: dict, config) -> Tensor:
    """A residual sub-layer's input: `norm(x)` (mBART, pre-norm) or `x` (BART)."""
    return _norm(x, norm) if spec(config).pre_norm else x


def _residual(x: Tensor, h: Tensor, norm: dict, config) -> Tensor:
    """A residual sub-layer's output `h` added to `x`: `x + h` (mBART) or `norm(x + h)` (BART, post-norm)."""
    return x + h if spec(config).pre_norm else _norm(x + h, norm)


def attention(x: Tensor, p: dict, bias: Tensor, batch: int, heads: int, config,
              kv: tuple[Tensor, Tensor] | None = None, layer_cache: tuple[Tensor, Tensor] | None = None,
              cache_position: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """`BartAttention` over `x` `[batch * seq, d_model]`, with its output dropout: keys/values from `kv`
    (cross-attention, computed once) or from `x`, written into `layer_cache` at `cache_position` when given.
    Returns `[batch * seq, d_model]` and the `(keys, values)` attended to."""
    d = x.shape[-1]
    q = split_heads(linear(x, p["q_proj"]["weight"], p["q_proj"]["bias"]), batch, heads)
    if kv is None:
        k, v = key_values(x, p, batch, heads)
        if layer_cache is not None:
            k, v = write_cache(layer_cache[0], k, cache_position), write_cache(layer_cache[1], v, cache_position)
    else:
        k, v = kv
    out = scaled_dot_product_attention(q, k, v, bias, (d // heads) ** -0.5, dropout_rate=config.attention_dropout)
    out = linear(out.transpose(0, 2, 1, 3).reshape(x.shape[0], d), p["out_proj"]["weight"], p["out_proj"]["bias"])
    return dropout(out, config.dropout), (k, v)


def _mlp(x: Tensor, layer: dict, config) -> Tensor:
    """`fc2(act(fc1(x)))` with HF's `activation_dropout` and output dropout, as a residual sub-layer."""
    norm = layer["final_layer_norm"]
    h = activation(config.activation_function)(linear(_sublayer_input(x, norm, config), layer["fc1"]["weight"],
                                                      layer["fc1"]["bias"]))
    h = dropout(h, config.activation_dropout)
    return _residual(x, dropout(linear(h, layer["fc2"]["weight"], layer["fc2"]["bias"]), config.dropout), norm, config)


def token_embeddings(params: dict, stack: str, ids: Tensor, config) -> Tensor:
    """`BartScaledWordEmbedding` of `stack` ("encoder" / "decoder"): `model.shared` when tied, else the
    stack's own `embed_tokens`, times `sqrt(d_model)` with `scale_embedding`."""
    table = params["model"]["shared"] if config.tie_word_embeddings else params["model"][stack]["embed_tokens"]
    x = embedding(ids, table["weight"])
    return scaled(x, math.sqrt(config.d_model)) if config.scale_embedding else x


def _embed(params: dict, stack: str, x: Tensor, positions: Tensor, config) -> Tensor:
    """Token embeddings `x` `[batch, seq, d_model]` (or `[batch, d_model]`) plus the learned positions
    (`positions` int32 `[seq]`, read at `+ POSITION_OFFSET`), `layernorm_embedding`, dropout."""
    p = params["model"][stack]
    x = x + embedding(positions + POSITION_OFFSET, p["embed_positions"]["weight"])
    return dropout(_norm(x, p["layernorm_embedding"]), config.dropout)


def _check_length(length: int, config, what: str) -> None:
    if length > config.max_position_embeddings:
        raise ValueError(f"{what} positions up to {length} exceed max_position_embeddings "
                         f"({config.max_position_embeddings}): BART's learned position table has no rows beyond")


def encoder_forward(params: dict, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
                    config=None, inputs_embeds: Tensor | None = None, check_ids: bool = True) -> BartStackOutput:
    """`BartEncoder` / `MBartEncoder`: `input_ids` int `[batch, seq]` (or `inputs_embeds` `[batch, seq,
    d_model]`, already scaled) and `attention_mask` `[batch, seq]` 1/0 (default all ones; padding on either
    side masks keys only, as HF) -> `[batch, seq, d_model]` in the params' dtype.

    Raises:
        ValueError: bad ids or mask (`check_model_inputs`), or more than `max_position_embeddings` tokens.
    """
    config = config or config_of(params)
    b, s = check_model_inputs(config, input_ids, inputs_embeds, attention_mask, check_ids=check_ids)
    _check_length(s, config, "encoder")
    x = token_embeddings(params, "encoder", input_ids, config) if inputs_embeds is None else inputs_embeds
    x = _embed(params, "encoder", x, Tensor(np.arange(s, dtype=np.int32)), config).reshape(b * s, -1)
    if attention_mask is None:
        attention_mask = ops.ones((b, s), ms.int32)
    bias, heads = padding_bias(attention_mask), config.encoder_attention_heads
    enc = params["model"]["encoder"]
    for layer in enc["layers"]:
        norm = layer["self_attn_layer_norm"]
        h, _ = attention(_sublayer_input(x, norm, config), layer["self_attn"], bias, b, heads, config)
        x = _mlp(_residual(x, h, norm, config), layer, config)
    if spec(config).pre_norm:
        x = _norm(x, enc["layer_norm"])
    return BartStackOutput(x.reshape(b, s, -1))


def encode_source(params: dict, input_ids: np.ndarray, attention_mask: np.ndarray, config) -> Tensor:
    """The encoder output for generation (`msfx.decode.seq2seq`): ids and mask numpy `[batch, source_seq]`,
    ids already checked.

    Raises:
        ValueError: more source tokens than `max_position_embeddings`.
    """
    return encoder_forward(params, Tensor(input_ids.astype(np.int32)), Tensor(attention_mask.astype(np.int32)),
                           config=config, check_ids=False).last_hidden_state


def decoder_cache_shape(config) -> tuple[int, int, int]:
    """`(layers, heads, head_dim)` of the decoder's self-attention cache."""
    heads = config.decoder_attention_heads
    return config.decoder_layers, heads, config.d_model // heads


def decoder_params(params: dict) -> dict:
    """The subtree a decoder step reads (not the encoder's leaves)."""
    model = {k: params["model"][k] for k in ("shared", "decoder")}
    return {"model": model, **{k: params[k] for k in ("lm_head", "final_logits_bias") if k in params}}


def cross_attention_cache(params: dict, encoder_hidden_states: Tensor, config) -> KVCache:
    """Every decoder layer's cross-attention keys and values `[batch, heads, source_seq, head_dim]` over
    `encoder_hidden_states` `[batch, source_seq, d_model]`: computed once per generation."""
    return cross_kv(params["model"]["decoder"]["layers"], encoder_hidden_states, config.decoder_attention_heads)


def _decoder_layers(params: dict, x: Tensor, batch: int, self_bias: Tensor, cross_bias: Tensor,
                    cache: KVCache | None, cross_cache: KVCache, cache_position: Tensor,
                    config) -> tuple[Tensor, KVCache | None]:
    """The decoder's layers (and mBART's final `layer_norm`) over `x` `[batch * seq, d_model]`, shared by
    `decoder_forward` and the compiled `decode_step`."""
    heads, dec = config.decoder_attention_heads, params["model"]["decoder"]
    new_keys, new_values = [], []
    for i, layer in enumerate(dec["layers"]):
        layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
        norm = layer["self_attn_layer_norm"]
        h, (k, v) = attention(_sublayer_input(x, norm, config), layer["self_attn"], self_bias, batch, heads, config,
                              layer_cache=layer_cache, cache_position=cache_position)
        new_keys.append(k)
        new_values.append(v)
        x = _residual(x, h, norm, config)
        norm = layer["encoder_attn_layer_norm"]
        h, _ = attention(_sublayer_input(x, norm, config), layer["encoder_attn"], cross_bias, batch, heads, config,
                         kv=(cross_cache.keys[i], cross_cache.values[i]))
        x = _mlp(_residual(x, h, norm, config), layer, config)
    if spec(config).pre_norm:
        x = _norm(x, dec["layer_norm"])
    return x, None if cache is None else KVCache(tuple(new_keys), tuple(new_values))


def decoder_forward(params: dict, input_ids: Tensor | None, encoder_hidden_states: Tensor | None,
                    attention_mask: Tensor | None = None, encoder_attention_mask: Tensor | None = None, *,
                    cache: KVCache | None = None, past_length: int = 0, cross_cache: KVCache | None = None,
                    config=None, inputs_embeds: Tensor | None = None, check_ids: bool = True) -> BartStackOutput:
    """`BartDecoder` / `MBartDecoder` over `input_ids` `[batch, seq]` (or `inputs_embeds`) at positions
    `past_length ..`: causal self-attention (written into `cache` at those slots when given),
    cross-attention over `encoder_hidden_states` `[batch, source_seq, d_model]` (or the precomputed
    `cross_cache`). `attention_mask` `[batch, keys]` 1/0 over the decoder tokens (`keys`: `seq`, or the
    cache length; default all ones); `encoder_attention_mask` `[batch, source_seq]` (default all ones).

    Raises:
        ValueError: bad ids or mask (`check_model_inputs`), positions beyond `max_position_embeddings`, or
            neither `encoder_hidden_states` nor `cross_cache`.
    """
    config = config or config_of(params)
    keys = None if cache is None else cache.max_len
    b, s = check_model_inputs(config, input_ids, inputs_embeds, attention_mask, keys=keys, check_ids=check_ids)
    _check_length(past_length + s, config, "decoder")
    if cross_cache is None:
        if encoder_hidden_states is None:
            raise ValueError("the BART decoder needs encoder_hidden_states (or a cross_cache)")
        cross_cache = cross_attention_cache(params, encoder_hidden_states, config)
    positions = Tensor(np.arange(past_length, past_length + s, dtype=np.int32))
    x = token_embeddings(params, "decoder", input_ids, config) if inputs_embeds is None else inputs_embeds
    x = _embed(params, "decoder", x, positions, config).reshape(b * s, -1)
    if attention_mask is None:
        attention_mask = ops.ones((b, keys or s), ms.int32)
    if encoder_attention_mask is None:
        encoder_attention_mask = ops.ones((b, cross_cache.keys[0].shape[2]), ms.int32)
    x, cache = _decoder_layers(params, x, b, attention_bias(attention_mask, positions),
                               padding_bias(encoder_attention_mask), cache, cross_cache, positions, config)
    return BartStackOutput(x.reshape(b, s, -1), cache)


def lm_head(params: dict, hidden: Tensor, config) -> Tensor:
    """Logits `[..., vocab]`: `hidden` times `lm_head.weight` (untied) or `model.shared.weight`, plus
    `final_logits_bias`."""
    head = params["model"]["shared"] if config.tie_word_embeddings else params["lm_head"]
    return linear(hidden, head["weight"]) + params["final_logits_bias"].reshape(-1)


def shift_tokens_right(ids: np.ndarray, config) -> np.ndarray:
    """Decoder inputs from labels / target ids `[batch, seq]` (-100 read as `pad_token_id`): shifted one
    to the right after `decoder_start_token_id` (BART's `shift_tokens_right`), or for mBART after each
    row's last non-pad token, its language code (`MBart`'s `shift_tokens_right`).

    Raises:
        ValueError: `pad_token_id` (or BART's `decoder_start_token_id`) is None.
    """
    if config.pad_token_id is None:
        raise ValueError("self.model.config.pad_token_id has to be defined.")
    ids = np.where(np.asarray(ids) == -100, config.pad_token_id, ids)
    shifted = np.empty_like(ids)
    shifted[:, 1:] = ids[:, :-1]
    if spec(config).pre_norm:
        last = (ids != config.pad_token_id).sum(1) - 1
        shifted[:, 0] = ids[np.arange(ids.shape[0]), last]
    elif config.decoder_start_token_id is None:
        raise ValueError("config.decoder_start_token_id has to be defined to shift labels into decoder inputs")
    else:
        shifted[:, 0] = config.decoder_start_token_id
    return shifted


def model_forward(params: dict, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                  decoder_input_ids: Tensor | None = None, decoder_attention_mask: Tensor | None = None, *,
                  encoder_hidden_states: Tensor | None = None, config=None, inputs_embeds: Tensor | None = None,
                  decoder_inputs_embeds: Tensor | None = None, check_ids: bool = True) -> BartModelOutput:
    """`BartModel`: the encoder (skipped when `encoder_hidden_states` is given), then the decoder over
    `decoder_input_ids` `[batch, target_seq]` (or `decoder_inputs_embeds`); the caller derives decoder
    inputs from `input_ids` when neither is given (`shift_tokens_right`, as HF). `attention_mask`
    `[batch, source_seq]` masks the encoder's padding in both stacks; `decoder_attention_mask` the decoder's.

    Raises:
        ValueError: as `encoder_forward` / `decoder_forward`.
    """
    config = config or config_of(params)
    if encoder_hidden_states is None:
        encoder_hidden_states = encoder_forward(params, input_ids, attention_mask, config=config,
                                                inputs_embeds=inputs_embeds, check_ids=check_ids).last_hidden_state
    out = decoder_forward(params, decoder_input_ids, encoder_hidden_states, decoder_attention_mask, attention_mask,
                          config=config, inputs_embeds=decoder_inputs_embeds, check_ids=check_ids)
    return BartModelOutput(out.last_hidden_state, encoder_hidden_states)


def forward(params: dict, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
            decoder_input_ids: Tensor | None = None, decoder_attention_mask: Tensor | None = None, *,
            config=None, **kwargs) -> Seq2SeqLogits:
    """`BartForConditionalGeneration`: logits `[batch, target_seq, vocab]`. Arguments and errors as
    `model_forward` (`kwargs`: its keyword arguments)."""
    config = config or config_of(params)
    out = model_forward(params, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, config=config,
                        **kwargs)
    return Seq2SeqLogits(lm_head(params, out.last_hidden_state, config), out.encoder_last_hidden_state)


def classification_logits(params: dict, hidden: Tensor, input_ids: np.ndarray, config) -> Tensor:
    """`BartForSequenceClassification`'s head: the decoder's hidden state `[batch, seq, d_model]` at each
    row's last `eos_token_id` in `input_ids` (numpy `[batch, seq]`), through `dense`, tanh, `out_proj` ->
    `[batch, num_labels]`.

    Raises:
        ValueError: a row without eos, or rows with different eos counts (HF's checks).
    """
    counts = (input_ids == config.eos_token_id).sum(1)
    if (counts == 0).any():
        raise ValueError("Each example must contain at least one <eos> token.")
    if (counts != counts[0]).any():
        raise ValueError("All examples must have the same number of <eos> tokens.")
    last = input_ids.shape[1] - 1 - np.argmax(input_ids[:, ::-1] == config.eos_token_id, 1)
    x = hidden[Tensor(np.arange(hidden.shape[0]), ms.int32), Tensor(last.astype(np.int32))]
    p = params["classification_head"]
    h = dropout(x, config.classifier_dropout)
    h = dropout(ops.tanh(linear(h, p["dense"]["weight"], p["dense"]["bias"])), config.classifier_dropout)
    return linear(h, p["out_proj"]["weight"], p["out_proj"]["bias"])


def span_logits(params: dict, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """`BartForQuestionAnswering`'s head: `qa_outputs` over the decoder's hidden state `[batch, seq, d_model]`
    -> start and end logits, `[batch, seq]` each."""
    logits = linear(hidden, params["qa_outputs"]["weight"], params["qa_outputs"]["bias"])
    return logits[..., 0], logits[..., 1]


def decode_step(params: dict, tokens: Tensor, position: Tensor, cross_bias: Tensor, cross_cache: KVCache,
                cache: KVCache, config) -> tuple[Tensor, KVCache]:
    """One decoder token per row over the caches, traceable by `mindspore.jit` (no host reads, no checks).

    Args:
        tokens: int32 `[batch]`, in `[0, vocab_size)`.
        position: 0-d int32, the tokens' position and cache slot (`< max_position_embeddings`).
        cross_bias: float32 `[batch, 1, 1, 1, source_seq]`.
        cross_cache: `cross_attention_cache`'s keys and values.
        cache: the self-attention `KVCache`, `[batch, heads, max_len, head_dim]` per layer.

    Returns:
        The next-token logits, float32 `[batch, vocab]`, and `cache` with the tokens' keys/values written.
    """
    slot = position.reshape(1)
    x = _embed(params, "decoder", token_embeddings(params, "decoder", tokens, config), slot, config)
    self_bias = attention_bias(Tensor(np.ones((1, cache.max_len), np.int32)), slot)
    x, cache = _decoder_layers(params, x, tokens.shape[0], self_bias, cross_bias, cache, cross_cache, slot, config)
    logits = lm_head(params, x, config)
    return (logits if logits.dtype == ms.float32 else logits.astype(ms.float32)), cache


def load(ref, *, dtype="auto", model_type: str = MODEL_TYPE, **hub_kwargs) -> Params:
    """Parameters of a BART (or, with `model_type="mbart"`, mBART) checkpoint, directory or hub id, config
    attached. See `msfx.params.load_params` for the arguments and the errors raised."""
    return load_params(family(model_type), ref, dtype=dtype, **hub_kwargs)
