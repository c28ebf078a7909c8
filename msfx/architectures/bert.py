"""BERT (Devlin et al. 2019) as pure functions over a parameter tree.

Follows `transformers.models.bert.modeling_bert` (encoder use: bidirectional self-attention, no
cross-attention or cache). Parameters are keyed like the HF checkpoint:
`params["bert"]["encoder"]["layer"][i]["attention"]["self"]["query"]["weight"]`. The config is a
`transformers.BertConfig`, carried by the tree from `load` / `init_params` (`params.config`) or
passed as `config=`.

Layout of one layer (post-LayerNorm, as the original BERT):
`x = LN(x + attention.output.dense(self_attention(x)))`, then
`x = LN(x + output.dense(act(intermediate.dense(x))))`.
Dropout (training only, `msfx.layers.dropout`) where HF applies it: on the embeddings, the attention
probabilities and both dense outputs before their residual.
"""
from __future__ import annotations

from typing import NamedTuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from transformers import BertConfig

from msfx.families import family
from msfx.layers.attention import arange, attention_bias, padding_bias, scaled_dot_product_attention
from msfx.layers.basic import activation, embedding, linear, tanh
from msfx.inputs import check_model_inputs
from msfx.jit import host_reads_allowed
from msfx.layers.dropout import dropout
from msfx.layers.norms import layer_norm
from msfx.params import load_params
from msfx.params.tree import Params, config_of, unflatten_keys

MODEL_TYPE = "bert"
CONFIG_CLASS = BertConfig
PREFIX = "bert"  # HF's `base_model_prefix`


class BertOutput(NamedTuple):
    """`last_hidden_state` `[batch, seq, hidden]`; `pooler_output` `[batch, hidden]` (None when the
    tree has no pooler); `hidden_states`: the embeddings then each layer's output, each
    `[batch, seq, hidden]`, or None."""

    last_hidden_state: Tensor
    pooler_output: Tensor | None
    hidden_states: tuple[Tensor, ...] | None


class MaskedLMLogits(NamedTuple):
    """`logits` `[batch, seq, vocab]`; `hidden_states` as in `BertOutput`."""

    logits: Tensor
    hidden_states: tuple[Tensor, ...] | None


def head_dim(config) -> int:
    return config.hidden_size // config.num_attention_heads


def param_shapes(config, *, with_pooler: bool = True, with_mlm_head: bool = False) -> dict[str, tuple[int, ...]]:
    """Checkpoint keys with their shapes: the base model under `bert.` (`BertModel`), with its
    pooler unless `with_pooler=False` (HF's `add_pooling_layer`: `BertForMaskedLM` has none), plus the
    `cls.predictions` head with `with_mlm_head=True`. The default is `BertModel`'s layout.

    The MLM decoder is tied to the word embeddings unless `config.tie_word_embeddings` is False;
    then it has its own `cls.predictions.decoder.{weight,bias}` (and HF keeps the unused
    `cls.predictions.bias` as a parameter, so it is kept here too).

    Raises:
        ValueError: `config.add_cross_attention` (cross-attention layers are not supported).
    """
    if getattr(config, "add_cross_attention", False):
        raise ValueError("BERT with cross-attention (config.add_cross_attention=True) is not supported by msfx")
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    e = "bert.embeddings."
    shapes = {e + "word_embeddings.weight": (vocab, h),
              e + "position_embeddings.weight": (config.max_position_embeddings, h),
              e + "token_type_embeddings.weight": (config.type_vocab_size, h),
              e + "LayerNorm.weight": (h,), e + "LayerNorm.bias": (h,)}
    for i in range(config.num_hidden_layers):
        p = f"bert.encoder.layer.{i}."
        for name, shape in (("attention.self.query", (h, h)), ("attention.self.key", (h, h)),
                            ("attention.self.value", (h, h)), ("attention.output.dense", (h, h)),
                            ("intermediate.dense", (inter, h)), ("output.dense", (h, inter)),
                            ("attention.output.LayerNorm", (h,)), ("output.LayerNorm", (h,))):
            shapes[p + name + ".weight"] = shape
            shapes[p + name + ".bias"] = shape[:1]
    if with_pooler:
        shapes |= {"bert.pooler.dense.weight": (h, h), "bert.pooler.dense.bias": (h,)}
    if with_mlm_head:
        t = "cls.predictions."
        shapes |= {t + "transform.dense.weight": (h, h), t + "transform.dense.bias": (h,),
                   t + "transform.LayerNorm.weight": (h,), t + "transform.LayerNorm.bias": (h,), t + "bias": (vocab,)}
        if not config.tie_word_embeddings:
            shapes |= {t + "decoder.weight": (vocab, h), t + "decoder.bias": (vocab,)}
    return shapes


def init_params(config, seed: int = 0, dtype=ms.float32, shapes: dict | None = None) -> Params:
    """Random parameters as HF's `_init_weights`: normal(0, `initializer_range`) matrices and
    embeddings, zero biases, unit LayerNorm weights. `shapes` (default `param_shapes(config)`)
    picks the keys, e.g. with the MLM head."""
    rng = np.random.default_rng(seed)
    flat = {}
    for key, shape in (shapes or param_shapes(config)).items():
        if key.endswith("LayerNorm.weight"):
            value = np.ones(shape, np.float32)
        elif key.endswith("bias"):  # also `cls.predictions.bias`
            value = np.zeros(shape, np.float32)
        else:
            value = rng.normal(0.0, config.initializer_range, shape).astype(np.float32)
        flat[key] = Tensor(value).astype(dtype)
    return Params(unflatten_keys(flat), config)


def _check_range(name: str, ids: Tensor, limit: int, what: str) -> None:
    values = ids.asnumpy()
    if values.size and (values.min() < 0 or values.max() >= limit):
        bad = values.max() if values.max() >= limit else values.min()
        raise ValueError(f"{name} holds {bad}, out of range for {what} {limit}")


def _check_inputs(config, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids,
                  check_ids) -> None:
    """`check_model_inputs` plus BERT's: token types and positions in range (host syncs, with
    `check_ids`), and no sequence beyond the learned position embeddings."""
    b, s = check_model_inputs(config, input_ids, inputs_embeds, attention_mask, position_ids, check_ids=check_ids)
    if token_type_ids is not None and tuple(token_type_ids.shape) not in ((b, s), (1, s)):
        raise ValueError(f"token_type_ids has shape {list(token_type_ids.shape)}, expected [{b}, {s}] or [1, {s}]")
    if position_ids is None and s > config.max_position_embeddings:
        raise ValueError(f"sequence length {s} exceeds max_position_embeddings {config.max_position_embeddings} "
                         "(BERT's learned position embeddings have no rows beyond it)")
    if check_ids and host_reads_allowed():
        if token_type_ids is not None:
            _check_range("token_type_ids", token_type_ids, config.type_vocab_size, "type_vocab_size")
        if position_ids is not None:
            _check_range("position_ids", position_ids, config.max_position_embeddings, "max_position_embeddings")


def embeddings(params: dict, input_ids: Tensor | None, token_type_ids: Tensor, position_ids: Tensor, config,
               inputs_embeds: Tensor | None = None) -> Tensor:
    """`BertEmbeddings`: `LayerNorm(word + token_type + position)` -> `[batch, seq, hidden]`.

    `token_type_ids` and `position_ids` are `[batch, seq]` or `[1, seq]` ints.
    """
    p = params["bert"]["embeddings"]
    x = embedding(input_ids, p["word_embeddings"]["weight"]) if inputs_embeds is None else inputs_embeds
    x = x + embedding(token_type_ids, p["token_type_embeddings"]["weight"])
    x = x + embedding(position_ids, p["position_embeddings"]["weight"])
    x = layer_norm(x, p["LayerNorm"]["weight"], p["LayerNorm"]["bias"], config.layer_norm_eps)
    return dropout(x, config.hidden_dropout_prob)


def _dense(x: Tensor, p: dict) -> Tensor:
    return linear(x, p["weight"], p["bias"])


def encoder_layer(x: Tensor, p: dict, config, bias: Tensor, batch: int) -> Tensor:
    """One post-LN `BertLayer`. `x` is `[batch * seq, hidden]` (kept 2-D so each linear is one
    matmul); `bias` the additive attention mask (`padding_bias` / `attention_bias`)."""
    s, heads, d = x.shape[0] // batch, config.num_attention_heads, head_dim(config)
    a = p["attention"]

    def project(name):
        return _dense(x, a["self"][name]).reshape(batch, s, heads, d).transpose(0, 2, 1, 3)

    ctx = scaled_dot_product_attention(project("query"), project("key"), project("value"), bias, d ** -0.5,
                                       dropout_rate=config.attention_probs_dropout_prob)
    ctx = ctx.transpose(0, 2, 1, 3).reshape(batch * s, -1)
    out, rate = a["output"], config.hidden_dropout_prob
    x = layer_norm(dropout(_dense(ctx, out["dense"]), rate) + x, out["LayerNorm"]["weight"], out["LayerNorm"]["bias"],
                   config.layer_norm_eps)
    h = activation(config.hidden_act)(_dense(x, p["intermediate"]["dense"]))
    out = p["output"]
    return layer_norm(dropout(_dense(h, out["dense"]), rate) + x, out["LayerNorm"]["weight"], out["LayerNorm"]["bias"],
                      config.layer_norm_eps)


def pooler(params: dict, hidden: Tensor) -> Tensor:
    """`BertPooler`: `tanh(dense(hidden[:, 0]))`, the [CLS] token -> `[batch, hidden]`."""
    return tanh(_dense(hidden[:, 0], params["bert"]["pooler"]["dense"]))


def model_forward(params: dict, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                  token_type_ids: Tensor | None = None, position_ids: Tensor | None = None, *, config=None,
                  inputs_embeds: Tensor | None = None, output_hidden_states: bool = False,
                  check_ids: bool = True) -> BertOutput:
    """The encoder (`BertModel`): embeddings, `num_hidden_layers` layers, and the pooler when the
    tree has one.

    Args:
        params: the tree (`bert.*`, with or without the pooler and heads).
        input_ids: `[batch, seq]` int32/int64 token ids (or `inputs_embeds` `[batch, seq, hidden]`).
        attention_mask: `[batch, seq]`, 1 for tokens to attend to, 0 for padding. Default: all ones.
            Attention is bidirectional (causal only with `config.is_decoder`, as HF).
        token_type_ids: `[batch, seq]` or `[1, seq]` segment ids; default zeros.
        position_ids: `[batch, seq]` or `[1, seq]`; default `0..seq-1` (padding is not skipped, as HF).
        output_hidden_states: also return the embeddings and each layer's output.
        check_ids: check that every id is in range (reads them on the host).

    Raises:
        ValueError: no config, missing/both of `input_ids`/`inputs_embeds`, non-integer or
            out-of-range ids (token, token type or position), an empty sequence, a sequence
            longer than `max_position_embeddings`, or mis-shaped mask / token types / positions.
    """
    config = config or config_of(params)
    _check_inputs(config, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids, check_ids)
    b, s = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
    if position_ids is None:
        position_ids = arange(s).reshape(1, s)
    if token_type_ids is None:
        token_type_ids = ops.zeros((1, s), ms.int32)
    x = embeddings(params, input_ids, token_type_ids, position_ids, config, inputs_embeds)
    if attention_mask is None:
        attention_mask = ops.ones((b, s), ms.int32)
    bias = attention_bias(attention_mask, arange(s)) if config.is_decoder else padding_bias(attention_mask)
    hidden_states = [x] if output_hidden_states else None
    x = x.reshape(b * s, -1)
    for layer in params["bert"]["encoder"]["layer"]:
        x = encoder_layer(x, layer, config, bias, b)
        if output_hidden_states:
            hidden_states.append(x.reshape(b, s, -1))
    x = x.reshape(b, s, -1)
    pooled = pooler(params, x) if "pooler" in params["bert"] else None
    return BertOutput(x, pooled, tuple(hidden_states) if output_hidden_states else None)


def mlm_head(params: dict, hidden: Tensor, config) -> Tensor:
    """`BertOnlyMLMHead`: dense + `hidden_act` + LayerNorm, then the decoder (the word embeddings
    when tied) plus the output bias -> logits `[..., vocab]`."""
    p = params["cls"]["predictions"]
    t = p["transform"]
    h = activation(config.hidden_act)(_dense(hidden, t["dense"]))
    h = layer_norm(h, t["LayerNorm"]["weight"], t["LayerNorm"]["bias"], config.layer_norm_eps)
    if config.tie_word_embeddings:  # HF ties `decoder.weight` to the embeddings and `decoder.bias` to `bias`
        return linear(h, params["bert"]["embeddings"]["word_embeddings"]["weight"], p["bias"])
    return linear(h, p["decoder"]["weight"], p["decoder"]["bias"])


def forward(params: dict, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
            token_type_ids: Tensor | None = None, position_ids: Tensor | None = None, *, config=None,
            inputs_embeds: Tensor | None = None, output_hidden_states: bool = False,
            check_ids: bool = True) -> MaskedLMLogits:
    """`BertForMaskedLM`: logits `[batch, seq, vocab]` in the params' dtype. Arguments and errors
    as `model_forward`; the tree needs the `cls.predictions` head (`param_shapes(with_mlm_head=True)`)."""
    config = config or config_of(params)
    out = model_forward(params, input_ids, attention_mask, token_type_ids, position_ids, config=config,
                        inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states, check_ids=check_ids)
    return MaskedLMLogits(mlm_head(params, out.last_hidden_state, config), out.hidden_states)


def load(ref, *, dtype="auto", with_pooler: bool = True, with_mlm_head: bool = False, **hub_kwargs) -> Params:
    """Parameters of a BERT checkpoint (directory or hub id), config attached; `with_pooler` and
    `with_mlm_head` choose the keys as in `param_shapes` (a checkpoint saved without the `bert.`
    prefix, as a bare `BertModel`, loads too).

    See `msfx.params.load_params` for the arguments and the errors raised.
    """
    def shapes(config):
        return param_shapes(config, with_pooler=with_pooler, with_mlm_head=with_mlm_head)

    return load_params(family(MODEL_TYPE), ref, dtype=dtype, shapes=shapes, prefix=PREFIX, **hub_kwargs)
