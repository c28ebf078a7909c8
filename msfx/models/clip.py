"""HF-named CLIP classes: `CLIPModel`, `CLIPTextModel`, `CLIPTextModelWithProjection`,
`CLIPVisionModel`, `CLIPVisionModelWithProjection`.

Each forwards to `msfx.architectures.clip`; see `transformers.models.clip.modeling_clip`
(transformers 5.24) for the behaviour they reproduce (dropout only in training: `msfx.layers.dropout`).
Token ids come from `CLIPTokenizer`, pixel values `[batch, 3, H, W]` float32 from
`CLIPImageProcessor(..., return_tensors="np")`; arrays, lists and Tensors are accepted.

The towers load from their own checkpoints (`clip_text_model` / `clip_vision_model`, with or
without the `text_model.` / `vision_model.` prefix, the projection beside it) or from a full CLIP
checkpoint, whose `text_config` / `vision_config` and `text_model.` / `vision_model.` keys they
take, as HF does; they save with those prefixes, as HF 5.24.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from mindspore import Tensor
from transformers.utils import ModelOutput

from msfx.architectures import clip
from msfx.errors import CheckpointError
from msfx.modeling import BaseModelOutputWithPooling, PreTrainedModel, as_tensor, masked_cross_entropy, token_ids
from msfx.layers.attention import arange
from msfx.params.hub import resolve_model_dir


@dataclass
class CLIPTextModelOutput(ModelOutput):
    text_embeds: Tensor | None = None
    last_hidden_state: Tensor | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class CLIPVisionModelOutput(ModelOutput):
    image_embeds: Tensor | None = None
    last_hidden_state: Tensor | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class CLIPOutput(ModelOutput):
    loss: Tensor | None = None
    logits_per_image: Tensor | None = None
    logits_per_text: Tensor | None = None
    text_embeds: Tensor | None = None
    image_embeds: Tensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        # the towers' outputs become tuples too, as HF's `CLIPOutput.to_tuple`
        return tuple(v.to_tuple() if k.endswith("model_output") else v for k, v in self.items())


def _pooling_output(out: clip.TowerOutput, pooled: Tensor | None = None) -> BaseModelOutputWithPooling:
    return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state,
                                      pooler_output=out.pooler_output if pooled is None else pooled,
                                      hidden_states=out.hidden_states)


def _flag(value, config) -> bool:
    return bool(config.output_hidden_states if value is None else value)


class _TextMixin:
    def _text(self, config, input_ids, attention_mask, position_ids, output_hidden_states) -> clip.TowerOutput:
        return clip.text_forward(self.params, token_ids(input_ids, config.vocab_size), as_tensor(attention_mask),
                                 as_tensor(position_ids), config=config,
                                 output_hidden_states=_flag(output_hidden_states, config))


class _VisionMixin:
    def _vision(self, config, pixel_values, interpolate_pos_encoding, output_hidden_states) -> clip.TowerOutput:
        return clip.vision_forward(self.params, as_tensor(pixel_values, None), config=config,
                                   interpolate_pos_encoding=bool(interpolate_pos_encoding),
                                   output_hidden_states=_flag(output_hidden_states, config))


class TowerModel(PreTrainedModel):
    """A tower loaded on its own: `arch` is `clip.TEXT` or `clip.VISION` (SigLIP's: `siglip.TEXT`,
    `siglip.VISION`), which also loads from a checkpoint of `full_model_type`."""

    full_model_type = clip.MODEL_TYPE

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, config=None, dtype="auto",
                        revision: str | None = None, cache_dir: str | None = None, local_files_only: bool = False,
                        token=None, gguf_file: str | None = None, **config_kwargs) -> "PreTrainedModel":
        """Load from the tower's own checkpoint or a full CLIP / SigLIP one (then the tower's sub-config and
        keys, as HF). Arguments as `PreTrainedModel.from_pretrained` (no GGUF).

        Raises:
            ValueError: a `gguf_file`.
            CheckpointError: a checkpoint of another model type (named); and the loading errors of
                `PreTrainedModel.from_pretrained`.
        """
        if gguf_file is not None:
            raise ValueError(f"{cls.__name__} cannot load GGUF files")
        hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        if config is None:
            directory = resolve_model_dir(pretrained_model_name_or_path, **hub)
            with open(directory / "config.json") as f:
                model_type = json.load(f).get("model_type")
            if model_type not in (cls.arch.MODEL_TYPE, cls.full_model_type):
                # checked here: HF's sub-config `from_pretrained` would only warn and build a default config
                raise CheckpointError(f"{pretrained_model_name_or_path} is a {model_type!r} checkpoint; {cls.__name__} "
                                      f"needs {cls.arch.MODEL_TYPE!r} or {cls.full_model_type!r}")
            passed_on = {k: config_kwargs.pop(k) for k in ("torch_dtype",) if k in config_kwargs}
            config = cls.arch.CONFIG_CLASS.from_pretrained(directory, **config_kwargs)
            pretrained_model_name_or_path, config_kwargs = directory, passed_on
        return super().from_pretrained(pretrained_model_name_or_path, config=config, dtype=dtype, **hub,
                                       **config_kwargs)


class CLIPTextModel(_TextMixin, TowerModel):
    """The text tower: `last_hidden_state` `[batch, seq, hidden]` (after `final_layer_norm`),
    `pooler_output` `[batch, hidden]` (the end-of-text token: see `clip.eos_positions`),
    `hidden_states` (embeddings, then each layer, the last before `final_layer_norm`) with
    `output_hidden_states=True`; diffusion pipelines read `hidden_states[-2]`.

    Inputs: `input_ids` `[batch, seq]`, `attention_mask` `[batch, seq]` (1 real, 0 padding; attention
    is causal as well), `position_ids` (default `0..seq-1`). Raises ValueError on bad inputs (see
    `msfx.architectures.clip.text_forward`).
    """

    arch = clip.TEXT
    model_type = clip.TEXT.MODEL_TYPE
    base_model_prefix = clip.TEXT_PREFIX

    def construct(self, input_ids=None, attention_mask=None, position_ids=None, output_hidden_states=None,
                  return_dict=True):
        out = _pooling_output(self._text(self.config, input_ids, attention_mask, position_ids, output_hidden_states))
        return out if return_dict else out.to_tuple()


class CLIPTextModelWithProjection(_TextMixin, TowerModel):
    """The text tower and `text_projection`: `text_embeds` `[batch, projection_dim]` (not
    normalized), `last_hidden_state`, `hidden_states` as `CLIPTextModel`."""

    arch = clip.TEXT
    model_type = clip.TEXT.MODEL_TYPE
    base_model_prefix = clip.TEXT_PREFIX

    @classmethod
    def param_shapes(cls, config):
        return cls.arch.param_shapes(config, with_projection=True)

    def construct(self, input_ids=None, attention_mask=None, position_ids=None, output_hidden_states=None,
                  return_dict=True):
        out = self._text(self.config, input_ids, attention_mask, position_ids, output_hidden_states)
        out = CLIPTextModelOutput(text_embeds=clip.project(self.params, "text_projection", out.pooler_output),
                                  last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states)
        return out if return_dict else out.to_tuple()


class CLIPVisionModel(_VisionMixin, TowerModel):
    """The vision tower: `last_hidden_state` `[batch, 1 + patches, hidden]`, `pooler_output`
    `[batch, hidden]` (`post_layernorm` of the class token), `hidden_states` (the `pre_layrnorm`
    output, then each layer) with `output_hidden_states=True`.

    Input: `pixel_values` `[batch, num_channels, image_size, image_size]` float (other sizes with
    `interpolate_pos_encoding=True`). Raises ValueError on bad inputs (see
    `msfx.architectures.clip.check_pixel_values`).
    """

    arch = clip.VISION
    model_type = clip.VISION.MODEL_TYPE
    base_model_prefix = clip.VISION_PREFIX
    main_input_name = "pixel_values"

    def construct(self, pixel_values=None, interpolate_pos_encoding=False, output_hidden_states=None,
                  return_dict=True):
        out = _pooling_output(self._vision(self.config, pixel_values, interpolate_pos_encoding, output_hidden_states))
        return out if return_dict else out.to_tuple()


class CLIPVisionModelWithProjection(_VisionMixin, TowerModel):
    """The vision tower and `visual_projection`: `image_embeds` `[batch, projection_dim]` (not
    normalized), `last_hidden_state`, `hidden_states` as `CLIPVisionModel`."""

    arch = clip.VISION
    model_type = clip.VISION.MODEL_TYPE
    base_model_prefix = clip.VISION_PREFIX
    main_input_name = "pixel_values"

    @classmethod
    def param_shapes(cls, config):
        return cls.arch.param_shapes(config, with_projection=True)

    def construct(self, pixel_values=None, interpolate_pos_encoding=False, output_hidden_states=None,
                  return_dict=True):
        out = self._vision(self.config, pixel_values, interpolate_pos_encoding, output_hidden_states)
        out = CLIPVisionModelOutput(image_embeds=clip.project(self.params, "visual_projection", out.pooler_output),
                                    last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states)
        return out if return_dict else out.to_tuple()


class CLIPModel(_TextMixin, _VisionMixin, PreTrainedModel):
    """Both towers with their projections and `logit_scale` (a `CLIPConfig` checkpoint).

    `construct(input_ids, pixel_values, attention_mask=None, ...)` returns `logits_per_image`
    `[images, texts]`, `logits_per_text` `[texts, images]`, the L2-normalized `text_embeds` /
    `image_embeds` `[n, projection_dim]`, the towers' outputs (`pooler_output` projected, as HF
    5.24), and with `return_loss=True` HF's symmetric contrastive loss (as many texts as images).
    `get_text_features` /
    `get_image_features` return the tower's `BaseModelOutputWithPooling` with the projected (not
    normalized) `pooler_output` `[n, projection_dim]`, as transformers 5.24.

    Loading: checkpoint tensors the model lacks are dropped (as HF); a missing one raises
    `CheckpointError` naming it (HF would initialize it randomly), and keys under HF's
    `base_model_prefix` (`clip.`) load too (see `msfx.params.load_params`).
    """

    arch = clip
    model_type = clip.MODEL_TYPE
    base_model_prefix = clip.PREFIX

    def get_text_features(self, input_ids=None, attention_mask=None, position_ids=None, output_hidden_states=None,
                          return_dict=True):
        out = self._text(self.config.text_config, input_ids, attention_mask, position_ids, output_hidden_states)
        out = _pooling_output(out, clip.project(self.params, "text_projection", out.pooler_output))
        return out if return_dict else out.to_tuple()

    def get_image_features(self, pixel_values=None, interpolate_pos_encoding=False, output_hidden_states=None,
                           return_dict=True):
        out = self._vision(self.config.vision_config, pixel_values, interpolate_pos_encoding, output_hidden_states)
        out = _pooling_output(out, clip.project(self.params, "visual_projection", out.pooler_output))
        return out if return_dict else out.to_tuple()

    def construct(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, return_loss=None,
                  interpolate_pos_encoding=False, output_hidden_states=None, return_dict=True):
        text_config = self.config.text_config
        out = clip.forward(self.params, token_ids(input_ids, text_config.vocab_size), as_tensor(pixel_values, None),
                           as_tensor(attention_mask), as_tensor(position_ids), config=self.config,
                           interpolate_pos_encoding=bool(interpolate_pos_encoding),
                           output_hidden_states=_flag(output_hidden_states, self.config))
        loss = None
        if return_loss:  # HF's `image_text_contrastive_loss`: each text's match is the image of the same index
            targets = arange(out.logits_per_text.shape[0])
            loss = (masked_cross_entropy(out.logits_per_text, targets)
                    + masked_cross_entropy(out.logits_per_image, targets)) / 2
        out = CLIPOutput(loss=loss, logits_per_image=out.logits_per_image, logits_per_text=out.logits_per_text,
                         text_embeds=out.text_embeds, image_embeds=out.image_embeds,
                         text_model_output=_pooling_output(out.text_model_output),
                         vision_model_output=_pooling_output(out.vision_model_output))
        return out if return_dict else out.to_tuple()

