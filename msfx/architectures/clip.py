"""CLIP (Radford et al. 2021) as pure functions over a parameter tree.

Follows `transformers.models.clip.modeling_clip` (transformers 5.24): a causal text transformer
pooled at its end-of-text token, a ViT image transformer pooled at its class token, both pre-LN,
and linear projections into a shared space scored by cosine similarity times `exp(logit_scale)`.
Parameters are keyed like the HF checkpoint: `params["text_model"]["encoder"]["layers"][i]
["self_attn"]["q_proj"]["weight"]`, `params["vision_model"]["pre_layrnorm"]["weight"]` (HF's
spelling), `params["visual_projection"]["weight"]`, `params["logit_scale"]`.

Three configs, as HF: `CLIPConfig` ("clip", this module's `MODEL_TYPE`, with `text_config` and
`vision_config`) for the dual model, and the towers' own `CLIPTextConfig` ("clip_text_model") and
`CLIPVisionConfig` ("clip_vision_model"), whose loading descriptions are `TEXT` and `VISION`.

Layout of one encoder layer (both towers):
`x = x + out_proj(attention(layer_norm1(x)))`, then `x = x + fc2(act(fc1(layer_norm2(x))))`
(`msfx.architectures.vision_encoder`, shared with SigLIP, ViT and DINOv2).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

from msfx.families import family
from msfx.architectures.vision_encoder import (CLIP_LAYOUT, check_pixel_values, embed_patches, encoder, int_size,
                                               layer_shapes, no_mask, norm, position_embeddings)
from msfx.layers.attention import arange, attention_bias
from msfx.layers.basic import embedding, linear
from msfx.backend import lacks_bf16_kernels
from msfx.inputs import check_model_inputs
from msfx.params import load_params
from msfx.params.tree import Params, unflatten_keys

MODEL_TYPE = "clip"
CONFIG_CLASS = CLIPConfig
PREFIX = "clip"  # HF's `base_model_prefix`: a checkpoint whose every key carries it loads without it
TEXT_PREFIX = "text_model"
VISION_PREFIX = "vision_model"


class TowerOutput(NamedTuple):
    """`last_hidden_state` `[batch, seq, hidden]` (text: after `final_layer_norm`; vision: before
    `post_layernorm`); `pooler_output` `[batch, hidden]` (text: the end-of-text token; vision:
    `post_layernorm` of the class token); `hidden_states`: the encoder's input then each layer's
    output (the last one before any final norm, as HF), each `[batch, seq, hidden]`, or None."""

    last_hidden_state: Tensor
    pooler_output: Tensor
    hidden_states: tuple[Tensor, ...] | None


class CLIPLogits(NamedTuple):
    """`logits_per_image` `[images, texts]` and `logits_per_text` `[texts, images]` (scaled cosine
    similarities); `text_embeds` `[texts, projection_dim]` and `image_embeds` `[images, projection_dim]`,
    L2-normalized; the towers' outputs, their `pooler_output` projected but not normalized
    `[n, projection_dim]` (as transformers 5.24's `get_text_features` / `get_image_features`)."""

    logits_per_image: Tensor
    logits_per_text: Tensor
    text_embeds: Tensor
    image_embeds: Tensor
    text_model_output: TowerOutput
    vision_model_output: TowerOutput


def text_param_shapes(config: CLIPTextConfig, *, with_projection: bool = False) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the text tower under `text_model.` (`CLIPTextModel`; HF 5.24 saves it
    with that prefix too), plus `text_projection.weight` `[projection_dim, hidden]` with
    `with_projection` (`CLIPTextModelWithProjection`)."""
    h, t = config.hidden_size, TEXT_PREFIX
    shapes = {f"{t}.embeddings.token_embedding.weight": (config.vocab_size, h),
              f"{t}.embeddings.position_embedding.weight": (config.max_position_embeddings, h)}
    shapes |= layer_shapes(config, CLIP_LAYOUT, t + ".")
    shapes |= {f"{t}.final_layer_norm.weight": (h,), f"{t}.final_layer_norm.bias": (h,)}
    if with_projection:
        shapes["text_projection.weight"] = (config.projection_dim, h)
    return shapes


def vision_param_shapes(config: CLIPVisionConfig, *, with_projection: bool = False) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the vision tower under `vision_model.` (`CLIPVisionModel`), plus
    `visual_projection.weight` `[projection_dim, hidden]` with `with_projection`.

    Raises:
        ValueError: a non-int `image_size` / `patch_size`.
    """
    h, v = config.hidden_size, VISION_PREFIX
    patch, image = int_size(config, "patch_size"), int_size(config, "image_size")
    shapes = {f"{v}.embeddings.class_embedding": (h,),
              f"{v}.embeddings.patch_embedding.weight": (h, config.num_channels, patch, patch),
              f"{v}.embeddings.position_embedding.weight": ((image // patch) ** 2 + 1, h),
              f"{v}.pre_layrnorm.weight": (h,), f"{v}.pre_layrnorm.bias": (h,)}
    shapes |= layer_shapes(config, CLIP_LAYOUT, v + ".")
    shapes |= {f"{v}.post_layernorm.weight": (h,), f"{v}.post_layernorm.bias": (h,)}
    if with_projection:
        shapes["visual_projection.weight"] = (config.projection_dim, h)
    return shapes


def param_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
    """Every key of `CLIPModel` with its shape: both towers, both projections, `logit_scale` `[]`."""
    shapes = text_param_shapes(config.text_config) | vision_param_shapes(config.vision_config)
    return shapes | {"text_projection.weight": (config.projection_dim, config.text_config.hidden_size),
                     "visual_projection.weight": (config.projection_dim, config.vision_config.hidden_size),
                     "logit_scale": ()}


def init_params(config, seed: int = 0, dtype=ms.float32, shapes: dict | None = None) -> Params:
    """Random parameters for `shapes` (default: the keys of `config`'s bare model, `CLIPModel`,
    `CLIPTextModel` or `CLIPVisionModel`; `config` is any of the three CLIP configs): unit LayerNorm
    weights, zero biases, `logit_scale` = `config.logit_scale_init_value`, other tensors
    normal(0, `initializer_range * initializer_factor`) (a simplification of HF's per-module
    `_init_weights` scales)."""
    rng = np.random.default_rng(seed)
    std = getattr(config, "initializer_range", 0.02) * getattr(config, "initializer_factor", 1.0)
    flat = {}
    if shapes is None:
        shapes = {CLIPTextConfig: text_param_shapes, CLIPVisionConfig: vision_param_shapes}.get(
            type(config), param_shapes)(config)
    for key, shape in shapes.items():
        if key == "logit_scale":
            value = np.full(shape, config.logit_scale_init_value, np.float32)
        elif "norm" in key.rsplit(".", 2)[-2]:  # layer_norm1, final_layer_norm, pre_layrnorm, post_layernorm
            value = (np.ones if key.endswith("weight") else np.zeros)(shape, np.float32)
        elif key.endswith("bias"):
            value = np.zeros(shape, np.float32)
        else:
            value = rng.normal(0.0, std, shape).astype(np.float32)
        flat[key] = Tensor(value).astype(dtype)
    return Params(unflatten_keys(flat), config)


class Tower(NamedTuple):
    """What `msfx.params.load_params` and the wrappers need of an architecture, for one tower
    loaded on its own (its config's `model_type`, config class, key prefix and keys)."""

    MODEL_TYPE: str
    CONFIG_CLASS: type
    PREFIX: str
    param_shapes: Callable[..., dict]
    init_params: Callable[..., Params]


TEXT = Tower("clip_text_model", CLIPTextConfig, TEXT_PREFIX, text_param_shapes, init_params)
VISION = Tower("clip_vision_model", CLIPVisionConfig, VISION_PREFIX, vision_param_shapes, init_params)


def eos_positions(input_ids: np.ndarray, eos_token_id: int) -> np.ndarray:
    """Each row's pooling position, as HF's `CLIPTextModel`: with the legacy `eos_token_id == 2`
    (configs older than transformers PR #24773) the largest id (the original CLIP vocabulary ends
    with its end-of-text token); otherwise the first `eos_token_id` (position 0 in a row without one)."""
    if eos_token_id == 2:
        return input_ids.argmax(-1)
    return (input_ids == eos_token_id).argmax(-1)


def check_text_inputs(config, input_ids: Tensor | None, attention_mask: Tensor | None,
                      position_ids: Tensor | None) -> tuple[int, int]:
    """`(batch, seq)` of a text tower's inputs (CLIP's, SigLIP's).

    Raises:
        ValueError: missing, non-integer, empty or out-of-range `input_ids`; a sequence longer than
            `max_position_embeddings`; mis-shaped mask or positions.
    """
    if input_ids is None:
        raise ValueError("You have to specify input_ids")
    b, s = check_model_inputs(config, input_ids, None, attention_mask, position_ids)
    if s > config.max_position_embeddings:
        raise ValueError(f"sequence length {s} exceeds max_position_embeddings {config.max_position_embeddings}")
    return b, s


def text_encode(p: dict, input_ids: Tensor, position_ids: Tensor | None, bias: Tensor, config,
                output_hidden_states: bool) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """A text tower's token and position embeddings, layers and `final_layer_norm` over `p` (the
    tower's tree, CLIP's or SigLIP's) with attention `bias`: `([batch, seq, hidden], hidden_states)`."""
    s = input_ids.shape[1]
    if position_ids is None:
        position_ids = arange(s).reshape(1, s)
    x = embedding(input_ids, p["embeddings"]["token_embedding"]["weight"])
    x = x + embedding(position_ids, p["embeddings"]["position_embedding"]["weight"])
    x, hidden_states = encoder(x, p["encoder"]["layers"], CLIP_LAYOUT, config, bias, output_hidden_states)
    return norm(x, p["final_layer_norm"], config.layer_norm_eps), hidden_states


def text_forward(params: dict, input_ids: Tensor, attention_mask: Tensor | None = None,
                 position_ids: Tensor | None = None, *, config: CLIPTextConfig,
                 output_hidden_states: bool = False) -> TowerOutput:
    """The text tower (`CLIPTextModel`) over `params["text_model"]`.

    Args:
        input_ids: `[batch, seq]` int32/int64 token ids.
        attention_mask: `[batch, seq]`, 1 for tokens, 0 for padding; attention is causal on top.
        position_ids: `[batch, seq]` or `[1, seq]`; default `0..seq-1`.
        config: the `CLIPTextConfig` (a `CLIPConfig`'s `text_config`).

    Raises:
        ValueError: see `check_text_inputs`; a non-int `eos_token_id`.
    """
    b, s = check_text_inputs(config, input_ids, attention_mask, position_ids)
    if not isinstance(config.eos_token_id, int):
        raise ValueError(f"config.eos_token_id must be an int for CLIP's pooling, got {config.eos_token_id!r}")
    if attention_mask is None:
        attention_mask = ops.ones((b, s), ms.int32)
    bias = attention_bias(attention_mask, arange(s))  # causal, padding keys masked (HF's `create_causal_mask`)
    x, hidden_states = text_encode(params[TEXT_PREFIX], input_ids, position_ids, bias, config, output_hidden_states)
    rows = eos_positions(input_ids.asnumpy(), config.eos_token_id).astype(np.int32)
    # the pick in float32 (exact): MindSpore 2.10's CPU GatherNd has no bfloat16 kernel
    picked = x.astype(ms.float32) if lacks_bf16_kernels(x) else x
    pooled = picked[Tensor(np.arange(b, dtype=np.int32)), Tensor(rows)].astype(x.dtype)
    return TowerOutput(x, pooled, hidden_states)


def vision_forward(params: dict, pixel_values: Tensor, *, config: CLIPVisionConfig,
                   interpolate_pos_encoding: bool = False, output_hidden_states: bool = False) -> TowerOutput:
    """The vision tower (`CLIPVisionModel`) over `params["vision_model"]`.

    Args:
        pixel_values: `[batch, num_channels, H, W]` float (as `CLIPImageProcessor` produces), cast to
            the parameters' dtype; `H = W = image_size` unless `interpolate_pos_encoding`.
        config: the `CLIPVisionConfig` (a `CLIPConfig`'s `vision_config`).
        interpolate_pos_encoding: accept other sizes, resizing the position grid bicubically as HF
            (pixels beyond the last whole patch are ignored, as the strided convolution does).

    Raises:
        ValueError: see `check_pixel_values`.
    """
    check_pixel_values(pixel_values, config, interpolate_pos_encoding, "CLIPImageProcessor")
    v = params[VISION_PREFIX]
    p = v["embeddings"]
    x = embed_patches(pixel_values, p["patch_embedding"]["weight"])
    b, hidden = x.shape[0], x.shape[2]
    cls = ops.broadcast_to(p["class_embedding"].reshape(1, 1, hidden), (b, 1, hidden)).astype(x.dtype)
    x = ops.concat([cls, x], 1)
    positions = p["position_embedding"]["weight"]
    if interpolate_pos_encoding:
        positions = position_embeddings(positions, *pixel_values.shape[2:], int_size(config, "patch_size"))
    x = norm(x + positions.reshape(1, -1, hidden), v["pre_layrnorm"], config.layer_norm_eps)
    x, hidden_states = encoder(x, v["encoder"]["layers"], CLIP_LAYOUT, config, no_mask(), output_hidden_states)
    return TowerOutput(x, norm(x[:, 0], v["post_layernorm"], config.layer_norm_eps), hidden_states)


def project(params: dict, name: str, pooled: Tensor) -> Tensor:
    """`pooled` `[batch, hidden]` through `params[name]` (`text_projection` / `visual_projection`,
    no bias) -> `[batch, projection_dim]`."""
    return linear(pooled, params[name]["weight"])


def _l2_normalize(x: Tensor) -> Tensor:
    """`x / ||x||` over the last axis, rounded to `x`'s dtype where HF's `_get_vector_norm` rounds in
    bfloat16: the squares, their (float32-accumulated) sum and its square root. The sum runs in
    float32: MindSpore 2.10's CPU reductions have no bfloat16 kernel."""
    total = (x * x).astype(ms.float32).sum(-1, keepdims=True).astype(x.dtype)
    return x / ops.sqrt(total.astype(ms.float32)).astype(x.dtype)


def forward(params: dict, input_ids: Tensor, pixel_values: Tensor, attention_mask: Tensor | None = None,
            position_ids: Tensor | None = None, *, config: CLIPConfig | None = None,
            interpolate_pos_encoding: bool = False, output_hidden_states: bool = False) -> CLIPLogits:
    """`CLIPModel`: both towers, projections, L2-normalized embeddings, and the similarity logits
    `logits_per_text = exp(logit_scale) * text_embeds @ image_embeds.T` (`logits_per_image` its
    transpose). Arguments and errors as `text_forward` and `vision_forward`; `config` defaults to
    the tree's (`params.config`)."""
    config = config or params.config
    text = text_forward(params, input_ids, attention_mask, position_ids, config=config.text_config,
                        output_hidden_states=output_hidden_states)
    vision = vision_forward(params, pixel_values, config=config.vision_config,
                            interpolate_pos_encoding=interpolate_pos_encoding,
                            output_hidden_states=output_hidden_states)
    text = text._replace(pooler_output=project(params, "text_projection", text.pooler_output))
    vision = vision._replace(pooler_output=project(params, "visual_projection", vision.pooler_output))
    text_embeds, image_embeds = _l2_normalize(text.pooler_output), _l2_normalize(vision.pooler_output)
    dtype = text_embeds.dtype  # float32 product and exp, each rounded once, as torch's bfloat16 CPU kernels
    cosine = ops.matmul(text_embeds.astype(ms.float32), image_embeds.astype(ms.float32).T).astype(dtype)
    logits_per_text = cosine * ops.exp(params["logit_scale"].astype(ms.float32)).astype(dtype)
    return CLIPLogits(logits_per_text.T, logits_per_text, text_embeds, image_embeds, text, vision)


def load(ref, *, dtype="auto", **hub_kwargs) -> Params:
    """Parameters of a full CLIP checkpoint (directory or hub id), `CLIPConfig` attached. See
    `msfx.params.load_params` for the arguments and the errors raised."""
    return load_params(family(MODEL_TYPE), ref, dtype=dtype, prefix=PREFIX, **hub_kwargs)
