"""DINOv2 (Oquab et al. 2023) as pure functions over a parameter tree.

Follows `transformers.models.dinov2.modeling_dinov2` (transformers 5.25): ViT's embeddings
(`msfx.architectures.vit.embeddings`) with the positions always resized to the image
(`interpolate_pos_encoding` has no switch: any size with at least one patch each way), pre-LN
layers with layer scales (`DINOV2_LAYOUT`; the SwiGLU MLP under `use_swiglu_ffn`), a final
`layernorm`; the pooled output is the normalized class token, and `Dinov2ForImageClassification`
classifies the class token concatenated with the mean of the patch tokens. Parameters are keyed
like the saved HF checkpoint under `dinov2.`: `params["dinov2"]["encoder"]["layer"][i]
["layer_scale1"]["lambda1"]`, `params["classifier"]` `[num_labels, 2 * hidden]`.
"""
from __future__ import annotations

from mindspore import Tensor, ops
from transformers import Dinov2Config

from msfx.architectures.vision_encoder import DINOV2_LAYOUT, check_pixel_values, layer_shapes
from msfx.architectures import vit
from msfx.architectures.vit import VisionOutput, embedding_shapes, encode, mean_tokens

MODEL_TYPE = "dinov2"
CONFIG_CLASS = Dinov2Config
PREFIX = "dinov2"
init_params = vit.init_params  # layer scales start at `config.layerscale_value`


def param_shapes(config: Dinov2Config, *, num_labels: int | None = None) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of `Dinov2Model` (its `mask_token` under `use_mask_token`), plus `classifier`
    `[num_labels, 2 * hidden]` when `num_labels` is given.

    Raises:
        ValueError: a non-int `image_size` / `patch_size`; `hidden_size` not a multiple of the heads.
    """
    h, p = config.hidden_size, PREFIX + "."
    shapes = embedding_shapes(config, p, mask_token=config.use_mask_token)
    shapes |= layer_shapes(config, DINOV2_LAYOUT, p, config.qkv_bias)
    shapes |= {p + "layernorm.weight": (h,), p + "layernorm.bias": (h,)}
    if num_labels:
        shapes |= {"classifier.weight": (num_labels, 2 * h), "classifier.bias": (num_labels,)}
    return shapes


def forward(params: dict, pixel_values: Tensor, *, config: Dinov2Config | None = None,
            output_hidden_states: bool = False) -> VisionOutput:
    """`Dinov2Model` over `params` (`config` defaults to the tree's): `pooler_output` is the class
    token of `last_hidden_state`.

    Args:
        pixel_values: `[batch, num_channels, H, W]` float (`BitImageProcessor`'s output), any `H`, `W`
            of at least one patch (positions resized bicubically, in float32, as HF).

    Raises:
        ValueError: see `vision_encoder.check_pixel_values`.
    """
    config = config or params.config
    check_pixel_values(pixel_values, config, True, "BitImageProcessor")
    x, hidden_states = encode(params, pixel_values, config, DINOV2_LAYOUT, PREFIX, True, output_hidden_states)
    return VisionOutput(x, x[:, 0], hidden_states)


def classifier_features(last_hidden_state: Tensor) -> Tensor:
    """`Dinov2ForImageClassification`'s input: the class token and the mean patch token
    concatenated -> `[batch, 2 * hidden]`."""
    return ops.concat([last_hidden_state[:, 0], mean_tokens(last_hidden_state[:, 1:])], 1)
