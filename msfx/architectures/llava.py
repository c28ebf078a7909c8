"""LLaVA (Liu et al. 2023, "Visual Instruction Tuning") as pure functions over a parameter tree.

Follows `transformers.models.llava.modeling_llava`: a CLIP vision tower (`params["vision_tower"]`),
a two-layer projector (`multi_modal_projector`) and a causal language model of a decoder family
msfx has (`params["language_model"]`, `config.text_config`), whose embeddings take the projected
image features at the image-token positions. Keys are the checkpoint's, as HF 5.x writes them
(`language_model.model.layers.0...`, `vision_tower.encoder...`); the language model's subtree is
its family's causal-LM tree, run with that family's functions, so decoding reuses the text path's
KV cache and compiled steps.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from transformers import LlavaConfig

from msfx.architectures import clip
from msfx.backend import lacks_bf16_kernels
from msfx.families import family
from msfx.inputs import check_token_ids
from msfx.layers.basic import activation, embedding, linear
from msfx.params.tree import Params, config_of

MODEL_TYPE = "llava"
CONFIG_CLASS = LlavaConfig


def _prefixed(shapes: dict, old: str, new: str) -> dict:
    return {new + key[len(old):]: shape for key, shape in shapes.items() if key.startswith(old)}


def _feature_layers(config) -> list[int]:
    layers = config.vision_feature_layer
    return [layers] if isinstance(layers, int) else list(layers)


def param_shapes(config: LlavaConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint key of `LlavaForConditionalGeneration` with its shape: `vision_tower.`,
    `multi_modal_projector.`, `language_model.` (its family's causal LM, `lm_head` unless tied).

    Raises:
        ValueError: a vision tower other than CLIP's, or a text model_type msfx lacks.
    """
    if config.vision_config.model_type != "clip_vision_model":
        raise ValueError(f"msfx's LLaVA runs a CLIP vision tower, not {config.vision_config.model_type!r}")
    text = config.text_config
    shapes = _prefixed(clip.vision_param_shapes(config.vision_config), "vision_model.", "vision_tower.")
    vision_in = config.vision_config.hidden_size * len(_feature_layers(config))
    for name, fan_in in (("linear_1", vision_in), ("linear_2", text.hidden_size)):
        shapes[f"multi_modal_projector.{name}.weight"] = (text.hidden_size, fan_in)
        if config.multimodal_projector_bias:
            shapes[f"multi_modal_projector.{name}.bias"] = (text.hidden_size,)
    language = family(text.model_type).arch.param_shapes(text)
    if config.tie_word_embeddings:
        language.pop("lm_head.weight", None)
    return shapes | {"language_model." + key: shape for key, shape in language.items()}


def init_params(config, seed: int = 0, dtype=ms.float32, shapes: dict | None = None) -> Params:
    """Random parameters for `shapes` (default `param_shapes(config)`): the vision tower's and the
    language model's initializers, normal(0, `text_config.initializer_range`) projector weights,
    zero projector biases."""
    shapes = shapes or param_shapes(config)
    text = config.text_config
    vision = clip.init_params(config.vision_config, seed, dtype, shapes=_prefixed(shapes, "vision_tower.", "vision_model."))
    language = family(text.model_type).arch.init_params(text, seed, dtype,
                                                        shapes=_prefixed(shapes, "language_model.", ""))
    rng = np.random.default_rng(seed)
    projector = {}
    for key, shape in _prefixed(shapes, "multi_modal_projector.", "").items():
        name, kind = key.split(".")
        value = rng.normal(0.0, text.initializer_range, shape) if kind == "weight" else np.zeros(shape)
        projector.setdefault(name, {})[kind] = Tensor(value.astype(np.float32)).astype(dtype)
    return Params({"vision_tower": dict(vision)["vision_model"], "multi_modal_projector": projector,
                   "language_model": dict(language)}, config)


def language_params(params: dict, config: LlavaConfig) -> tuple:
    """`(core module, tree, text_config)` of the language model, to run with its family's
    functions and decode steps (the head tied to the embeddings where only the LLaVA config ties them)."""
    text = config.text_config
    tree = dict(params["language_model"])
    if "lm_head" not in tree and not text.tie_word_embeddings:
        tree["lm_head"] = {"weight": tree["model"]["embed_tokens"]["weight"]}
    return family(text.model_type).arch, tree, text


def image_features(params: dict, pixel_values: Tensor, config: LlavaConfig) -> Tensor:
    """HF's `get_image_features`: the vision tower's hidden states at `vision_feature_layer`
    (several: concatenated), without the class token for the "default" strategy, through the
    projector. `pixel_values` `[images, channels, H, W]` -> `[images, patches, text_hidden]`.

    Raises:
        ValueError: pixel values of the wrong shape (see `msfx.architectures.clip.check_pixel_values`).
    """
    tower = clip.vision_forward({"vision_model": params["vision_tower"]}, pixel_values,
                                config=config.vision_config, output_hidden_states=True)
    selected = [tower.hidden_states[i] for i in _feature_layers(config)]
    if config.vision_feature_select_strategy == "default":
        selected = [h[:, 1:] for h in selected]
    x = selected[0] if len(selected) == 1 else ops.concat(selected, -1)
    p = params["multi_modal_projector"]
    x = linear(x, p["linear_1"]["weight"], p["linear_1"].get("bias"))
    x = activation(config.projector_hidden_act)(x)
    return linear(x, p["linear_2"]["weight"], p["linear_2"].get("bias"))


def merge_image_features(embeds: Tensor, input_ids: np.ndarray, features: Tensor, image_token_id: int) -> Tensor:
    """`embeds` `[batch, seq, hidden]` with the rows of `features` `[images, patches, hidden]`
    written, in order, at the positions where `input_ids` (numpy `[batch, seq]`) holds the image
    token (HF's `masked_scatter`).

    Raises:
        ValueError: the image tokens do not number `images * patches` (HF's message).
    """
    b, s, hidden = embeds.shape
    flat = features.reshape(-1, hidden)
    where = np.flatnonzero(np.asarray(input_ids).reshape(-1) == image_token_id)
    if where.size != flat.shape[0]:
        raise ValueError(f"Image features and image tokens do not match, tokens: {where.size}, features: "
                         f"{flat.shape[0]}")
    # bfloat16 on CPU has no TensorScatterUpdate kernel: scatter in float32 (exact both ways)
    wide = ms.float32 if lacks_bf16_kernels(embeds) else embeds.dtype
    rows = embeds.reshape(b * s, hidden).astype(wide)
    rows = ops.tensor_scatter_update(rows, Tensor(where.reshape(-1, 1).astype(np.int32)), flat.astype(wide))
    return rows.reshape(b, s, hidden).astype(embeds.dtype)


def input_embeddings(params: dict, input_ids: np.ndarray, pixel_values: Tensor | None, config) -> Tensor:
    """The language model's input embeddings `[batch, seq, hidden]` for numpy `input_ids`, with the
    projected image features at the image tokens when `pixel_values` is given."""
    weight = params["language_model"]["model"]["embed_tokens"]["weight"]
    embeds = embedding(Tensor(np.asarray(input_ids).astype(np.int32)), weight)
    if pixel_values is None:
        return embeds
    return merge_image_features(embeds, input_ids, image_features(params, pixel_values, config), config.image_token_id)


def forward(params: dict, input_ids, pixel_values: Tensor | None = None, attention_mask: Tensor | None = None,
            position_ids: Tensor | None = None, cache=None, cache_position: Tensor | None = None, *, config=None,
            output_hidden_states: bool = False, logits_to_keep: int = 0):
    """`LlavaForConditionalGeneration`: logits `[batch, seq, vocab]` (the language model's
    `CausalLMOutput`). `input_ids` int `[batch, seq]` (Tensor or numpy) with `image_token_id`
    placeholders, one per patch feature of `pixel_values` `[images, channels, H, W]`.

    Raises:
        ValueError: ids out of range, image tokens that do not match the features, bad pixel values.
    """
    config = config or config_of(params)
    ids = check_token_ids(input_ids, config.text_config.vocab_size)
    core, tree, text = language_params(params, config)
    embeds = input_embeddings(params, ids, pixel_values, config)
    return core.forward(tree, None, attention_mask, position_ids, cache, cache_position, config=text,
                        inputs_embeds=embeds, output_hidden_states=output_hidden_states, logits_to_keep=logits_to_keep)
