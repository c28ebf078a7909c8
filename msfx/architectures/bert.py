"""BERT (Devlin et al. 2019) and the encoders written as its diff, RoBERTa / XLM-RoBERTa (Liu et al.
2019) and DistilBERT (Sanh et al. 2019), as pure functions over a parameter tree.

Follows `transformers.models.bert.modeling_bert` (encoder use: bidirectional self-attention, no
cross-attention or cache), `roberta.modeling_roberta`, `xlm_roberta.modeling_xlm_roberta` and
`distilbert.modeling_distilbert`. Parameters are keyed like the HF checkpoint:
`params["bert"]["encoder"]["layer"][i]["attention"]["self"]["query"]["weight"]`. The config (a
`BertConfig`, `RobertaConfig`, `XLMRobertaConfig` or `DistilBertConfig`), carried by the tree from
`load` / `init_params` (`params.config`) or passed as `config=`, picks the family's `EncoderSpec`
(`SPECS`, by `model_type`): its key names, RoBERTa's positions, DistilBERT's missing token types.

Layout of one layer (post-LayerNorm, as the original BERT):
`x = LN(x + attention.output.dense(self_attention(x)))`, then
`x = LN(x + output.dense(act(intermediate.dense(x))))`.
Dropout (training only, `msfx.layers.dropout`) where HF applies it: on the embeddings, the attention
probabilities and both dense outputs before their residual.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

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


class LayerKeys(NamedTuple):
    """Where one layer's weights sit (dotted paths inside `...layer.{i}`)."""

    query: str = "attention.self.query"
    key: str = "attention.self.key"
    value: str = "attention.self.value"
    attention_output: str = "attention.output.dense"
    attention_norm: str = "attention.output.LayerNorm"
    intermediate: str = "intermediate.dense"
    output: str = "output.dense"
    output_norm: str = "output.LayerNorm"


class MLMKeys(NamedTuple):
    """The masked-LM head's paths: `dense` -> `act` -> `norm` -> the decoder (`decoder`'s weight and
    bias, or with `tie_word_embeddings` the word embeddings and `bias`)."""

    dense: str
    norm: str
    decoder: str
    bias: str
    act: str | None = None  # None: `EncoderSpec.hidden_act`


class EncoderSpec(NamedTuple):
    """How a BERT-like family differs from BERT (one per `model_type` in `SPECS`, from its config)."""

    prefix: str  # HF's `base_model_prefix`, the base model's top key
    eps: float
    hidden_act: str
    hidden_dropout: float
    attention_dropout: float
    head_dropout: float  # before the token-classification head
    intermediate_size: int
    encoder: str = "encoder"  # the layer stack's key (DistilBERT: "transformer")
    layer: LayerKeys = LayerKeys()
    mlm: MLMKeys = MLMKeys("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                           "cls.predictions.decoder", "cls.predictions.bias")
    token_types: bool = True
    # RoBERTa's `create_position_ids_from_input_ids`: positions count real tokens from
    # `pad_token_id + 1`, padding keeps `pad_token_id`; None: `0..seq-1` (BERT)
    padding_idx: int | None = None
    pooler: bool = True  # the base model has BERT's tanh pooler (`...Model`, BERT's classifier)
    is_decoder: bool = False


def _bert_spec(config) -> EncoderSpec:
    rate = config.classifier_dropout
    return EncoderSpec(PREFIX, config.layer_norm_eps, config.hidden_act, config.hidden_dropout_prob,
                       config.attention_probs_dropout_prob, config.hidden_dropout_prob if rate is None else rate,
                       config.intermediate_size, is_decoder=config.is_decoder)


def _roberta_spec(config) -> EncoderSpec:
    """BERT with padding-offset positions and `lm_head` (exact GELU; HF's `RobertaLMHead`)."""
    return _bert_spec(config)._replace(prefix="roberta", padding_idx=config.pad_token_id,
                                       mlm=MLMKeys("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder",
                                                   "lm_head.bias", act="gelu"))


def _distilbert_spec(config) -> EncoderSpec:
    """BERT's layer under other names, no token types, no pooler, LayerNorm eps fixed at 1e-12."""
    return EncoderSpec(
        "distilbert", 1e-12, config.activation, config.dropout, config.attention_dropout, config.dropout, config.hidden_dim,
        encoder="transformer", token_types=False, pooler=False,
        layer=LayerKeys("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "sa_layer_norm",
                        "ffn.lin1", "ffn.lin2", "output_layer_norm"),
        mlm=MLMKeys("vocab_transform", "vocab_layer_norm", "vocab_projector", "vocab_projector.bias"))


SPECS: dict[str, Callable[..., EncoderSpec]] = {"bert": _bert_spec, "distilbert": _distilbert_spec,
                                                "roberta": _roberta_spec, "xlm-roberta": _roberta_spec}


def spec_of(config) -> EncoderSpec:
    """The `EncoderSpec` of `config.model_type`.

    Raises:
        ValueError: a model type this core does not run.
    """
    if config.model_type not in SPECS:
        raise ValueError(f"msfx.architectures.bert runs model types {sorted(SPECS)}, not {config.model_type!r}")
    return SPECS[config.model_type](config)


def at(tree: dict, path: str):
    """The subtree (or leaf) at dotted `path`."""
    for name in path.split("."):
        tree = tree[name]
    return tree


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
    """Checkpoint keys with their shapes: the base model under its prefix (`bert.`, `roberta.`,
    `distilbert.`), with BERT's pooler unless `with_pooler=False` (HF's `add_pooling_layer`: the
    masked LM has none; DistilBERT never has one), plus the masked-LM head with `with_mlm_head=True`
    (`cls.predictions`, `lm_head`, `vocab_*`). The default is `BertModel`'s layout.

    The MLM decoder is tied to the word embeddings unless `config.tie_word_embeddings` is False;
    then it has its own weight and bias (and HF keeps the unused tied bias, BERT's
    `cls.predictions.bias` / RoBERTa's `lm_head.bias`, as a parameter, so it is kept here too).

    Raises:
        ValueError: `config.add_cross_attention` (cross-attention layers are not supported).
    """
    if getattr(config, "add_cross_attention", False):
        raise ValueError(f"{config.model_type} with cross-attention (config.add_cross_attention=True) is not "
                         "supported by msfx")
    spec = spec_of(config)
    h, inter, vocab = config.hidden_size, spec.intermediate_size, config.vocab_size
    e = spec.prefix + ".embeddings."
    shapes = {e + "word_embeddings.weight": (vocab, h),
              e + "position_embeddings.weight": (config.max_position_embeddings, h),
              e + "LayerNorm.weight": (h,), e + "LayerNorm.bias": (h,)}
    if spec.token_types:
        shapes[e + "token_type_embeddings.weight"] = (config.type_vocab_size, h)
    keys = spec.layer
    for i in range(config.num_hidden_layers):
        p = f"{spec.prefix}.{spec.encoder}.layer.{i}."
        for name, shape in ((keys.query, (h, h)), (keys.key, (h, h)), (keys.value, (h, h)),
                            (keys.attention_output, (h, h)), (keys.intermediate, (inter, h)), (keys.output, (h, inter)),
                            (keys.attention_norm, (h,)), (keys.output_norm, (h,))):
            shapes[p + name + ".weight"] = shape
            shapes[p + name + ".bias"] = shape[:1]
    if with_pooler and spec.pooler:
        shapes |= {spec.prefix + ".pooler.dense.weight": (h, h), spec.prefix + ".pooler.dense.bias": (h,)}
    if with_mlm_head:
        m = spec.mlm
        shapes |= {m.dense + ".weight": (h, h), m.dense + ".bias": (h,), m.norm + ".weight": (h,),
                   m.norm + ".bias": (h,), m.bias: (vocab,)}
        if not config.tie_word_embeddings:
            shapes |= {m.decoder + ".weight": (vocab, h), m.decoder + ".bias": (vocab,)}
    return shapes


def init_params(config, seed: int = 0, dtype=ms.float32, shapes: dict | None = None) -> Params:
    """Random parameters as HF's `_init_weights`: normal(0, `initializer_range`) matrices and
    embeddings, zero biases, unit LayerNorm weights. `shapes` (default `param_shapes(config)`)
    picks the keys, e.g. with the MLM head."""
    rng = np.random.default_rng(seed)
    flat = {}
    for key, shape in (shapes or param_shapes(config)).items():
        if key.endswith("bias"):  # also `cls.predictions.bias`
            value = np.zeros(shape, np.float32)
        elif "norm" in key.lower():
            value = np.ones(shape, np.float32)
        else:
            value = rng.normal(0.0, config.initializer_range, shape).astype(np.float32)
        flat[key] = Tensor(value).astype(dtype)
    return Params(unflatten_keys(flat), config)


def _check_range(name: str, ids: Tensor, limit: int, what: str) -> None:
    values = ids.asnumpy()
    if values.size and (values.min() < 0 or values.max() >= limit):
        bad = values.max() if values.max() >= limit else values.min()
        raise ValueError(f"{name} holds {bad}, out of range for {what} {limit}")


def _check_inputs(config, spec: EncoderSpec, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids,
                  check_ids) -> None:
    """`check_model_inputs` plus BERT's: token types and positions in range (host syncs, with
    `check_ids`), and no sequence beyond the learned position embeddings."""
    b, s = check_model_inputs(config, input_ids, inputs_embeds, attention_mask, position_ids, check_ids=check_ids)
    if token_type_ids is not None and not spec.token_types:
        raise ValueError(f"token_type_ids given, but {config.model_type} has no token type embeddings")
    if token_type_ids is not None and tuple(token_type_ids.shape) not in ((b, s), (1, s)):
        raise ValueError(f"token_type_ids has shape {list(token_type_ids.shape)}, expected [{b}, {s}] or [1, {s}]")
    first = 0 if spec.padding_idx is None else spec.padding_idx + 1
    if position_ids is None and first + s > config.max_position_embeddings:
        offset = f" (positions start at pad_token_id + 1 = {first})" if first else ""
        raise ValueError(f"sequence length {s} exceeds max_position_embeddings {config.max_position_embeddings}"
                         f"{offset}: the learned position embeddings have no rows beyond it")
    if check_ids and host_reads_allowed():
        if token_type_ids is not None:
            _check_range("token_type_ids", token_type_ids, config.type_vocab_size, "type_vocab_size")
        if position_ids is not None:
            _check_range("position_ids", position_ids, config.max_position_embeddings, "max_position_embeddings")


def default_position_ids(spec: EncoderSpec, input_ids: Tensor | None, seq: int) -> Tensor:
    """`[1, seq]` `0..seq-1` (BERT); RoBERTa's `[batch, seq]` from `input_ids` (HF's
    `create_position_ids_from_input_ids`: the running count of real tokens plus `padding_idx`, and
    `padding_idx` on padding), or `padding_idx + 1 ..` for `inputs_embeds`."""
    if spec.padding_idx is None:
        return arange(seq).reshape(1, seq)
    if input_ids is None:
        return (arange(seq) + spec.padding_idx + 1).reshape(1, seq)
    real = (input_ids != spec.padding_idx).astype(ms.int32)
    return ops.cumsum(real, 1) * real + spec.padding_idx


def embeddings(params: dict, input_ids: Tensor | None, token_type_ids: Tensor | None, position_ids: Tensor, config,
               inputs_embeds: Tensor | None = None) -> Tensor:
    """`BertEmbeddings`: `LayerNorm(word + token_type + position)` -> `[batch, seq, hidden]`
    (DistilBERT: no token types).

    `token_type_ids` and `position_ids` are `[batch, seq]` or `[1, seq]` ints.
    """
    spec = spec_of(config)
    p = params[spec.prefix]["embeddings"]
    x = embedding(input_ids, p["word_embeddings"]["weight"]) if inputs_embeds is None else inputs_embeds
    if spec.token_types:
        x = x + embedding(token_type_ids, p["token_type_embeddings"]["weight"])
    x = x + embedding(position_ids, p["position_embeddings"]["weight"])
    x = layer_norm(x, p["LayerNorm"]["weight"], p["LayerNorm"]["bias"], spec.eps)
    return dropout(x, spec.hidden_dropout)


def _dense(x: Tensor, p: dict) -> Tensor:
    return linear(x, p["weight"], p["bias"])


def _norm(x: Tensor, p: dict, eps: float) -> Tensor:
    return layer_norm(x, p["weight"], p["bias"], eps)


def encoder_layer(x: Tensor, p: dict, spec: EncoderSpec, heads: int, bias: Tensor, batch: int) -> Tensor:
    """One post-LN `BertLayer` (DistilBERT's `TransformerBlock`). `x` is `[batch * seq, hidden]`
    (kept 2-D so each linear is one matmul); `bias` the additive attention mask
    (`padding_bias` / `attention_bias`)."""
    s, keys = x.shape[0] // batch, spec.layer
    d = x.shape[1] // heads

    def project(name):
        return _dense(x, at(p, name)).reshape(batch, s, heads, d).transpose(0, 2, 1, 3)

    ctx = scaled_dot_product_attention(project(keys.query), project(keys.key), project(keys.value), bias, d ** -0.5,
                                       dropout_rate=spec.attention_dropout)
    ctx = ctx.transpose(0, 2, 1, 3).reshape(batch * s, -1)
    rate = spec.hidden_dropout
    x = _norm(dropout(_dense(ctx, at(p, keys.attention_output)), rate) + x, at(p, keys.attention_norm), spec.eps)
    h = activation(spec.hidden_act)(_dense(x, at(p, keys.intermediate)))
    return _norm(dropout(_dense(h, at(p, keys.output)), rate) + x, at(p, keys.output_norm), spec.eps)


def pooler(params: dict, hidden: Tensor, prefix: str = PREFIX) -> Tensor:
    """`BertPooler`: `tanh(dense(hidden[:, 0]))`, the [CLS] token -> `[batch, hidden]`."""
    return tanh(_dense(hidden[:, 0], params[prefix]["pooler"]["dense"]))


def model_forward(params: dict, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                  token_type_ids: Tensor | None = None, position_ids: Tensor | None = None, *, config=None,
                  inputs_embeds: Tensor | None = None, output_hidden_states: bool = False,
                  check_ids: bool = True) -> BertOutput:
    """The encoder (`BertModel`, `RobertaModel`, `DistilBertModel`, ...): embeddings,
    `num_hidden_layers` layers, and the pooler when the tree has one.

    Args:
        params: the tree (`bert.*` / `roberta.*` / `distilbert.*`, with or without the pooler and heads).
        input_ids: `[batch, seq]` int32/int64 token ids (or `inputs_embeds` `[batch, seq, hidden]`).
        attention_mask: `[batch, seq]`, 1 for tokens to attend to, 0 for padding. Default: all ones.
            Attention is bidirectional (causal only with `config.is_decoder`, as HF).
        token_type_ids: `[batch, seq]` or `[1, seq]` segment ids; default zeros (none for DistilBERT).
        position_ids: `[batch, seq]` or `[1, seq]`; default `0..seq-1` (padding is not skipped, as
            HF), RoBERTa's from `input_ids` (see `default_position_ids`).
        output_hidden_states: also return the embeddings and each layer's output.
        check_ids: check that every id is in range (reads them on the host).

    Raises:
        ValueError: no config, missing/both of `input_ids`/`inputs_embeds`, non-integer or
            out-of-range ids (token, token type or position), token types for DistilBERT, an empty
            sequence, a sequence beyond `max_position_embeddings`, or mis-shaped mask / token
            types / positions.
    """
    config = config or config_of(params)
    spec = spec_of(config)
    _check_inputs(config, spec, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids, check_ids)
    b, s = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
    if position_ids is None:
        position_ids = default_position_ids(spec, input_ids, s)
    if token_type_ids is None and spec.token_types:
        token_type_ids = ops.zeros((1, s), ms.int32)
    x = embeddings(params, input_ids, token_type_ids, position_ids, config, inputs_embeds)
    if attention_mask is None:
        attention_mask = ops.ones((b, s), ms.int32)
    bias = attention_bias(attention_mask, arange(s)) if spec.is_decoder else padding_bias(attention_mask)
    hidden_states = [x] if output_hidden_states else None
    x = x.reshape(b * s, -1)
    base = params[spec.prefix]
    for layer in base[spec.encoder]["layer"]:
        x = encoder_layer(x, layer, spec, config.num_attention_heads, bias, b)
        if output_hidden_states:
            hidden_states.append(x.reshape(b, s, -1))
    x = x.reshape(b, s, -1)
    pooled = pooler(params, x, spec.prefix) if "pooler" in base else None
    return BertOutput(x, pooled, tuple(hidden_states) if output_hidden_states else None)


def mlm_head(params: dict, hidden: Tensor, config) -> Tensor:
    """The masked-LM head (`BertOnlyMLMHead`, `RobertaLMHead`, DistilBERT's `vocab_*`): dense + act +
    LayerNorm, then the decoder (the word embeddings when tied) plus the output bias -> logits `[..., vocab]`."""
    spec = spec_of(config)
    m = spec.mlm
    h = activation(m.act or spec.hidden_act)(_dense(hidden, at(params, m.dense)))
    h = _norm(h, at(params, m.norm), spec.eps)
    if config.tie_word_embeddings:  # HF ties the decoder's weight to the embeddings and its bias to `bias`
        return linear(h, params[spec.prefix]["embeddings"]["word_embeddings"]["weight"], at(params, m.bias))
    return _dense(h, at(params, m.decoder))


def forward(params: dict, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
            token_type_ids: Tensor | None = None, position_ids: Tensor | None = None, *, config=None,
            inputs_embeds: Tensor | None = None, output_hidden_states: bool = False,
            check_ids: bool = True) -> MaskedLMLogits:
    """The masked LM (`BertForMaskedLM`, ...): logits `[batch, seq, vocab]` in the params' dtype.
    Arguments and errors as `model_forward`; the tree needs the MLM head
    (`param_shapes(with_mlm_head=True)`)."""
    config = config or config_of(params)
    out = model_forward(params, input_ids, attention_mask, token_type_ids, position_ids, config=config,
                        inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states, check_ids=check_ids)
    return MaskedLMLogits(mlm_head(params, out.last_hidden_state, config), out.hidden_states)


def load(ref, *, dtype="auto", with_pooler: bool = True, with_mlm_head: bool = False, model_type: str = MODEL_TYPE,
         **hub_kwargs) -> Params:
    """Parameters of a BERT checkpoint (or `model_type` "roberta", "xlm-roberta", "distilbert";
    directory or hub id), config attached; `with_pooler` and `with_mlm_head` choose the keys as in
    `param_shapes` (a checkpoint saved without the base prefix, as a bare `BertModel`, loads too).

    See `msfx.params.load_params` for the arguments and the errors raised.
    """
    def shapes(config):
        return param_shapes(config, with_pooler=with_pooler, with_mlm_head=with_mlm_head)

    record = family(model_type)
    return load_params(record, ref, dtype=dtype, shapes=shapes, prefix=record.base_prefix, **hub_kwargs)
