"""ViT (Dosovitskiy et al. 2021) as pure functions over a parameter tree.

Follows `transformers.models.vit.modeling_vit` (transformers 5.25): a class token and the patches
of a stride-`patch_size` convolution plus learned positions, pre-LN layers
(`msfx.architectures.vision_encoder`, `VIT_LAYOUT`), a final `layernorm`, and `ViTModel`'s
optional pooler (`tanh(dense(class token))`). Parameters are keyed like the saved HF checkpoint,
under `vit.` (HF's `base_model_prefix`): `params["vit"]["encoder"]["layer"][i]["attention"]
["attention"]["query"]["weight"]`, `params["vit"]["embeddings"]["cls_token"]`, and
`params["classifier"]` for `ViTForImageClassification`.
"""
from __future__ import annotations

from typing import NamedTuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from transformers import ViTConfig

from msfx.architectures.vision_encoder import (VIT_LAYOUT, EncoderLayout, check_pixel_values, embed_patches, encoder,
                                               int_size, layer_shapes, no_mask, norm, position_embeddings, subtree)
from msfx.layers.basic import activation, linear, tanh
from msfx.layers.dropout import dropout
from msfx.params.tree import Params, unflatten_keys

MODEL_TYPE = "vit"
CONFIG_CLASS = ViTConfig
PREFIX = "vit"


class VisionOutput(NamedTuple):
    """`last_hidden_state` `[batch, 1 + patches, hidden]` (after the final `layernorm`);
    `pooler_output` `[batch, pooler_output_size]` or None (no pooler); `hidden_states`: the
    embeddings then each layer's output (the last before `layernorm`), or None."""

    last_hidden_state: Tensor
    pooler_output: Tensor | None
    hidden_states: tuple[Tensor, ...] | None


def embedding_shapes(config, prefix: str, mask_token: bool = False) -> dict[str, tuple[int, ...]]:
    """ViT's / DINOv2's embedding keys under `prefix` ("vit." / "dinov2."): `cls_token` `[1, 1,
    hidden]`, the patch `projection`, `position_embeddings` `[1, 1 + patches, hidden]`, and with
    `mask_token` DINOv2's `[1, hidden]` one (stored, unused without masked positions).

    Raises:
        ValueError: a non-int `image_size` / `patch_size`.
    """
    h, patch = config.hidden_size, int_size(config, "patch_size")
    e = prefix + "embeddings."
    shapes = {e + "cls_token": (1, 1, h),
              e + "patch_embeddings.projection.weight": (h, config.num_channels, patch, patch),
              e + "patch_embeddings.projection.bias": (h,),
              e + "position_embeddings": (1, (int_size(config, "image_size") // patch) ** 2 + 1, h)}
    return shapes | ({e + "mask_token": (1, h)} if mask_token else {})


def param_shapes(config: ViTConfig, *, with_pooler: bool = True, num_labels: int | None = None
                 ) -> dict[str, tuple[int, ...]]:
    """Keys and shapes: `ViTModel`'s (with its pooler unless `with_pooler=False`, HF's
    `add_pooling_layer`), plus `classifier` `[num_labels, hidden]` when `num_labels` is given."""
    h, p = config.hidden_size, PREFIX + "."
    shapes = embedding_shapes(config, p) | layer_shapes(config, VIT_LAYOUT, p, config.qkv_bias)
    shapes |= {p + "layernorm.weight": (h,), p + "layernorm.bias": (h,)}
    if with_pooler:
        shapes |= {p + "pooler.dense.weight": (config.pooler_output_size, h),
                   p + "pooler.dense.bias": (config.pooler_output_size,)}
    if num_labels:
        shapes |= {"classifier.weight": (num_labels, h), "classifier.bias": (num_labels,)}
    return shapes


def init_params(config, seed: int = 0, dtype=ms.float32, shapes: dict | None = None) -> Params:
    """Random parameters for `shapes` (default `param_shapes(config)`; ViT or DINOv2): unit norm
    weights, zero biases, layer scales `config.layerscale_value`, other tensors normal(0,
    `initializer_range`) (HF draws truncated normals)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for key, shape in (shapes or param_shapes(config)).items():
        if key.endswith("lambda1"):
            value = np.full(shape, config.layerscale_value, np.float32)
        elif "norm" in key.rsplit(".", 2)[-2]:
            value = (np.ones if key.endswith("weight") else np.zeros)(shape, np.float32)
        elif key.endswith("bias") or key.endswith("mask_token"):
            value = np.zeros(shape, np.float32)
        else:
            value = rng.normal(0.0, config.initializer_range, shape).astype(np.float32)
        flat[key] = Tensor(value).astype(dtype)
    return Params(unflatten_keys(flat), config)


def embeddings(p: dict, pixel_values: Tensor, config, interpolate: bool) -> Tensor:
    """`ViTEmbeddings` / `Dinov2Embeddings` over `p` (the tree's `embeddings`): the class token, then
    the patches, plus the positions (resized as HF's `interpolate_pos_encoding` when `interpolate`)
    -> `[batch, 1 + patches, hidden]` in the weights' dtype."""
    projection = p["patch_embeddings"]["projection"]
    x = embed_patches(pixel_values, projection["weight"], projection["bias"])
    b, hidden = x.shape[0], x.shape[2]
    x = ops.concat([ops.broadcast_to(p["cls_token"], (b, 1, hidden)).astype(x.dtype), x], 1)
    positions = p["position_embeddings"].reshape(-1, hidden)
    if interpolate:
        positions = position_embeddings(positions, *pixel_values.shape[2:], int_size(config, "patch_size"))
    return x + positions.reshape(1, -1, hidden)


def encode(params: dict, pixel_values: Tensor, config, layout: EncoderLayout, prefix: str, interpolate: bool,
           output_hidden_states: bool) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """Embeddings, layers and the final `layernorm` of ViT or DINOv2 (under `params[prefix]`):
    `([batch, 1 + patches, hidden], hidden_states)`."""
    p = params[prefix]
    x = embeddings(p["embeddings"], pixel_values, config, interpolate)
    x = dropout(x, config.hidden_dropout_prob)
    x, hidden_states = encoder(x, subtree(p, layout.layers_key), layout, config, no_mask(), output_hidden_states)
    return norm(x, p["layernorm"], config.layer_norm_eps), hidden_states


def forward(params: dict, pixel_values: Tensor, *, config: ViTConfig | None = None,
            interpolate_pos_encoding: bool = False, output_hidden_states: bool = False,
            with_pooler: bool = True) -> VisionOutput:
    """`ViTModel` over `params` (`config` defaults to the tree's).

    Args:
        pixel_values: `[batch, num_channels, image_size, image_size]` float (`ViTImageProcessor`'s
            output), cast to the weights' dtype; other sizes with `interpolate_pos_encoding`.
        with_pooler: run the pooler (`ViTModel(add_pooling_layer=True)`); else `pooler_output` is None.

    Raises:
        ValueError: see `vision_encoder.check_pixel_values`.
    """
    config = config or params.config
    check_pixel_values(pixel_values, config, interpolate_pos_encoding, "ViTImageProcessor")
    x, hidden_states = encode(params, pixel_values, config, VIT_LAYOUT, PREFIX, interpolate_pos_encoding,
                              output_hidden_states)
    pooled = None
    if with_pooler:  # HF's `ViTPooler`: `pooler_act` on the dense class token (tanh; others from ACT2FN)
        dense = params[PREFIX]["pooler"]["dense"]
        pooled = linear(x[:, 0], dense["weight"], dense["bias"])
        pooled = tanh(pooled) if config.pooler_act == "tanh" else activation(config.pooler_act)(pooled)
    return VisionOutput(x, pooled, hidden_states)


def mean_tokens(x: Tensor) -> Tensor:
    """The mean of `x` `[batch, tokens, hidden]` over the tokens, summed in float32 and rounded once
    (torch's bfloat16 mean; MindSpore 2.10's CPU reductions have no bfloat16 kernel)."""
    return x.astype(ms.float32).mean(1).astype(x.dtype)


def classify(params: dict, pooled: Tensor) -> Tensor:
    """`classifier` over `pooled` `[batch, features]` -> logits `[batch, num_labels]`."""
    return linear(pooled, params["classifier"]["weight"], params["classifier"]["bias"])
