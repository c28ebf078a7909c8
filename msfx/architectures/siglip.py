"""SigLIP (Zhai et al. 2023) as pure functions over a parameter tree.

Follows `transformers.models.siglip.modeling_siglip` (transformers 5.25). CLIP's layers and text
embeddings (`msfx.architectures.clip.text_encode`, `CLIP_LAYOUT`), with these differences: the
text tower attends bidirectionally (padding keys masked) and pools its last position through a
linear `head`; the vision tower has no class token or pre-norm, a patch bias, `post_layernorm` on
every position and pools with a multi-head attention `head` (a learned `probe` query, HF's
`SiglipMultiheadAttentionPoolingHead`); there are no projections, and the image-text logits are
`exp(logit_scale) * cosine + logit_bias`, scored by a sigmoid (not a softmax over texts).
Parameters are keyed like the HF checkpoint: `params["text_model"]["head"]["weight"]`,
`params["vision_model"]["head"]["probe"]`, `params["logit_bias"]` `[1]`.

Configs as HF: `SiglipConfig` ("siglip") for the dual model, `SiglipTextConfig`
("siglip_text_model") and `SiglipVisionConfig` ("siglip_vision_model") for the towers (`TEXT` and
`VISION` describe loading those).
"""
from __future__ import annotations

from typing import NamedTuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from transformers import SiglipConfig, SiglipTextConfig, SiglipVisionConfig

from msfx.architectures.clip import TowerOutput, Tower, check_text_inputs, text_encode
from msfx.architectures.vision_encoder import (CLIP_LAYOUT, check_pixel_values, embed_patches, encoder, int_size,
                                               layer_shapes, mlp, no_mask, norm, position_embeddings)
from msfx.layers.attention import padding_bias, scaled_dot_product_attention
from msfx.layers.basic import linear
from msfx.params.tree import Params, unflatten_keys

MODEL_TYPE = "siglip"
CONFIG_CLASS = SiglipConfig
PREFIX = "siglip"
TEXT_PREFIX = "text_model"
VISION_PREFIX = "vision_model"


class SiglipLogits(NamedTuple):
    """`logits_per_image` `[images, texts]`, `logits_per_text` `[texts, images]`; `text_embeds` /
    `image_embeds` `[n, hidden]`, the towers' pooled outputs L2-normalized; the towers' outputs."""

    logits_per_image: Tensor
    logits_per_text: Tensor
    text_embeds: Tensor
    image_embeds: Tensor
    text_model_output: TowerOutput
    vision_model_output: TowerOutput


def _linear_shapes(key: str, out: int, inp: int) -> dict[str, tuple[int, ...]]:
    return {key + ".weight": (out, inp), key + ".bias": (out,)}


def text_param_shapes(config: SiglipTextConfig) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the text tower under `text_model.` (HF's `SiglipTextModel` saves them
    without the prefix; `msfx.params.load_params` adds it)."""
    h, t = config.hidden_size, TEXT_PREFIX
    shapes = {f"{t}.embeddings.token_embedding.weight": (config.vocab_size, h),
              f"{t}.embeddings.position_embedding.weight": (config.max_position_embeddings, h)}
    shapes |= layer_shapes(config, CLIP_LAYOUT, t + ".")
    shapes |= {f"{t}.final_layer_norm.weight": (h,), f"{t}.final_layer_norm.bias": (h,)}
    return shapes | _linear_shapes(f"{t}.head", config.projection_size, h)


def vision_param_shapes(config: SiglipVisionConfig) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the vision tower under `vision_model.` (its attention-pooling `head` under
    `vision_use_head`).

    Raises:
        ValueError: a non-int `image_size` / `patch_size`.
    """
    h, v = config.hidden_size, VISION_PREFIX
    patch = int_size(config, "patch_size")
    shapes = {f"{v}.embeddings.patch_embedding.weight": (h, config.num_channels, patch, patch),
              f"{v}.embeddings.patch_embedding.bias": (h,),
              f"{v}.embeddings.position_embedding.weight": ((int_size(config, "image_size") // patch) ** 2, h)}
    shapes |= layer_shapes(config, CLIP_LAYOUT, v + ".")
    shapes |= {f"{v}.post_layernorm.weight": (h,), f"{v}.post_layernorm.bias": (h,)}
    if config.vision_use_head:
        head = f"{v}.head."
        shapes |= {head + "probe": (1, 1, h), head + "attention.in_proj_weight": (3 * h, h),
                   head + "attention.in_proj_bias": (3 * h,), head + "layernorm.weight": (h,),
                   head + "layernorm.bias": (h,)}
        shapes |= _linear_shapes(head + "attention.out_proj", h, h)
        shapes |= _linear_shapes(head + "mlp.fc1", config.intermediate_size, h)
        shapes |= _linear_shapes(head + "mlp.fc2", h, config.intermediate_size)
    return shapes


def param_shapes(config: SiglipConfig, *, num_labels: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every key of `SiglipModel`: both towers, `logit_scale` and `logit_bias` `[1]`; with
    `num_labels`, `SiglipForImageClassification`'s: the vision tower and `classifier`."""
    vision = vision_param_shapes(config.vision_config)
    if num_labels:
        return vision | _linear_shapes("classifier", num_labels, config.vision_config.hidden_size)
    return text_param_shapes(config.text_config) | vision | {"logit_scale": (1,), "logit_bias": (1,)}


def init_params(config, seed: int = 0, dtype=ms.float32, shapes: dict | None = None) -> Params:
    """Random parameters for `shapes` (default: the bare model of `config`, any of the three SigLIP
    configs): unit norm weights, zero biases, `logit_scale` and `logit_bias` zero (HF's
    `_init_weights`), other tensors normal(0, 0.02)."""
    rng = np.random.default_rng(seed)
    if shapes is None:
        shapes = {SiglipTextConfig: text_param_shapes, SiglipVisionConfig: vision_param_shapes}.get(
            type(config), param_shapes)(config)
    flat = {}
    for key, shape in shapes.items():
        if key.startswith("logit_") or key.endswith("bias"):
            value = np.zeros(shape, np.float32)
        elif "norm" in key.rsplit(".", 2)[-2]:
            value = np.ones(shape, np.float32)
        else:
            value = rng.normal(0.0, 0.02, shape).astype(np.float32)
        flat[key] = Tensor(value).astype(dtype)
    return Params(unflatten_keys(flat), config)


TEXT = Tower("siglip_text_model", SiglipTextConfig, TEXT_PREFIX, text_param_shapes, init_params)
VISION = Tower("siglip_vision_model", SiglipVisionConfig, VISION_PREFIX, vision_param_shapes, init_params)


def text_forward(params: dict, input_ids: Tensor, attention_mask: Tensor | None = None,
                 position_ids: Tensor | None = None, *, config: SiglipTextConfig,
                 output_hidden_states: bool = False) -> TowerOutput:
    """The text tower (`SiglipTextModel`) over `params["text_model"]`: `pooler_output` `[batch,
    projection_size]` is `head` of the last position (SigLIP pads every text to the same length,
    64 in HF's pipeline, so no per-row end is looked up).

    Args:
        input_ids: `[batch, seq]` int token ids; `attention_mask` `[batch, seq]` (1 real, 0 padding:
            padding keys masked, as HF's bidirectional mask); `position_ids` default `0..seq-1`.

    Raises:
        ValueError: see `clip.check_text_inputs`.
    """
    check_text_inputs(config, input_ids, attention_mask, position_ids)
    bias = no_mask() if attention_mask is None else padding_bias(attention_mask)
    p = params[TEXT_PREFIX]
    x, hidden_states = text_encode(p, input_ids, position_ids, bias, config, output_hidden_states)
    return TowerOutput(x, linear(x[:, -1], p["head"]["weight"], p["head"]["bias"]), hidden_states)


def attention_pool(x: Tensor, p: dict, config: SiglipVisionConfig) -> Tensor:
    """`SiglipMultiheadAttentionPoolingHead` over `x` `[batch, patches, hidden]`: the `probe` query
    attends over the patches (`nn.MultiheadAttention`, q/k/v rows of `in_proj_weight` in that
    order), then a residual MLP on its `layernorm` -> `[batch, hidden]`."""
    b, s, h = x.shape
    heads = config.num_attention_heads
    d = h // heads
    wq, wk, wv = ops.chunk(p["attention"]["in_proj_weight"], 3, 0)
    bq, bk, bv = ops.chunk(p["attention"]["in_proj_bias"], 3, 0)
    q = linear(p["probe"].reshape(1, h), wq, bq).reshape(1, heads, 1, d)
    k = linear(x, wk, bk).reshape(b, s, heads, d).transpose(0, 2, 1, 3)
    v = linear(x, wv, bv).reshape(b, s, heads, d).transpose(0, 2, 1, 3)
    q = ops.broadcast_to(q, (b, heads, 1, d))
    ctx = scaled_dot_product_attention(q, k, v, no_mask(), d ** -0.5).reshape(b, h)
    out = linear(ctx, p["attention"]["out_proj"]["weight"], p["attention"]["out_proj"]["bias"])
    return out + mlp(norm(out, p["layernorm"], config.layer_norm_eps), p, CLIP_LAYOUT, config)


def vision_forward(params: dict, pixel_values: Tensor, *, config: SiglipVisionConfig,
                   interpolate_pos_encoding: bool = False, output_hidden_states: bool = False,
                   with_head: bool = True) -> TowerOutput:
    """The vision tower (`SiglipVisionModel`) over `params["vision_model"]`: `last_hidden_state`
    `[batch, patches, hidden]` after `post_layernorm`; `pooler_output` `[batch, hidden]` from the
    attention-pooling head, None without `vision_use_head` or `with_head` (a classifier, which
    pools by a mean, skips it).

    Args:
        pixel_values: `[batch, num_channels, image_size, image_size]` float (`SiglipImageProcessor`'s
            output); other sizes with `interpolate_pos_encoding` (positions resized bicubically).

    Raises:
        ValueError: see `vision_encoder.check_pixel_values`.
    """
    check_pixel_values(pixel_values, config, interpolate_pos_encoding, "SiglipImageProcessor")
    v = params[VISION_PREFIX]
    p = v["embeddings"]
    x = embed_patches(pixel_values, p["patch_embedding"]["weight"], p["patch_embedding"]["bias"])
    positions = p["position_embedding"]["weight"]
    if interpolate_pos_encoding:
        positions = position_embeddings(positions, *pixel_values.shape[2:], int_size(config, "patch_size"),
                                        class_token=False)
    x, hidden_states = encoder(x + positions.reshape(1, -1, x.shape[2]), v["encoder"]["layers"], CLIP_LAYOUT, config,
                               no_mask(), output_hidden_states)
    x = norm(x, v["post_layernorm"], config.layer_norm_eps)
    pooled = attention_pool(x, v["head"], config) if config.vision_use_head and with_head else None
    return TowerOutput(x, pooled, hidden_states)


def _l2_normalize(x: Tensor) -> Tensor:
    """`x / ||x||` over the last axis, the norm summed in float32 and rounded to `x`'s dtype (torch's
    bfloat16 `norm`; MindSpore 2.10's CPU reductions have no bfloat16 kernel)."""
    h = x.astype(ms.float32)
    return x / ops.sqrt((h * h).sum(-1, keepdims=True)).astype(x.dtype)


def forward(params: dict, input_ids: Tensor, pixel_values: Tensor, attention_mask: Tensor | None = None,
            position_ids: Tensor | None = None, *, config: SiglipConfig | None = None,
            interpolate_pos_encoding: bool = False, output_hidden_states: bool = False) -> SiglipLogits:
    """`SiglipModel`: both towers, their pooled outputs L2-normalized, and `logits_per_text =
    text_embeds @ image_embeds.T * exp(logit_scale) + logit_bias` (`logits_per_image` its
    transpose). Arguments and errors as `text_forward` and `vision_forward`; `config` defaults to
    the tree's.

    Raises:
        ValueError: also a vision config without `vision_use_head` (no image embedding to score), or a
            text `projection_size` other than the image tower's `hidden_size` (the two embeddings differ).
    """
    config = config or params.config
    if not config.vision_config.vision_use_head:
        raise ValueError("SiglipModel needs vision_config.vision_use_head=True (the image embedding is its head's)")
    if config.text_config.projection_size != config.vision_config.hidden_size:
        raise ValueError(f"text_config.projection_size {config.text_config.projection_size} must equal "
                         f"vision_config.hidden_size {config.vision_config.hidden_size}: SigLIP compares the two")
    vision = vision_forward(params, pixel_values, config=config.vision_config,
                            interpolate_pos_encoding=interpolate_pos_encoding,
                            output_hidden_states=output_hidden_states)
    text = text_forward(params, input_ids, attention_mask, position_ids, config=config.text_config,
                        output_hidden_states=output_hidden_states)
    text_embeds, image_embeds = _l2_normalize(text.pooler_output), _l2_normalize(vision.pooler_output)
    dtype = text_embeds.dtype  # float32 products and exp rounded once each, as torch's bfloat16 CPU kernels
    cosine = ops.matmul(text_embeds.astype(ms.float32), image_embeds.astype(ms.float32).T).astype(dtype)
    scale = ops.exp(params["logit_scale"].astype(ms.float32)).astype(dtype)
    logits_per_text = cosine * scale + params["logit_bias"].astype(dtype)
    return SiglipLogits(logits_per_text.T, logits_per_text, text_embeds, image_embeds, text, vision)


def sigmoid_loss(logits_per_text: Tensor) -> Tensor:
    """HF's SigLIP loss: text `i` matches image `i` (label +1), every other pair is -1;
    `-sum_j log sigmoid(label * logit)` per text, averaged over the texts (float32 scalar)."""
    logits = logits_per_text.astype(ms.float32)
    labels = 2.0 * ops.eye(logits.shape[0], logits.shape[1], ms.float32) - 1.0
    z = labels * logits
    log_sigmoid = ops.minimum(z, 0.0) - ops.log1p(ops.exp(-ops.abs(z)))  # stable for large |z|
    return -log_sigmoid.sum(-1).mean()
