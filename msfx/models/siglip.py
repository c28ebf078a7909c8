"""HF-named SigLIP classes: `SiglipModel`, `SiglipTextModel`, `SiglipVisionModel`,
`SiglipForImageClassification`.

Each forwards to `msfx.architectures.siglip`; see `transformers.models.siglip.modeling_siglip`
(transformers 5.25). Token ids come from SigLIP's tokenizer padded to the model's length
(`padding="max_length"`, as HF's pipeline: the text is pooled at its last position), pixel values
`[batch, 3, H, W]` float32 from `SiglipImageProcessor(..., return_tensors="np")`.

The towers load from their own checkpoints (`siglip_text_model` / `siglip_vision_model`, saved
without a prefix, as HF 5.25 saves them) or from a full SigLIP checkpoint, whose sub-config and
`text_model.` / `vision_model.` keys they take, as HF does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mindspore import Tensor
from transformers.utils import ModelOutput

from msfx.architectures import siglip, vit
from msfx.modeling import BaseModelOutputWithPooling, PreTrainedModel, as_tensor, token_ids
from msfx.models.clip import TowerModel
from msfx.models.vit import classifier_output, hidden_states_flag


@dataclass
class SiglipOutput(ModelOutput):
    loss: Tensor | None = None
    logits_per_image: Tensor | None = None
    logits_per_text: Tensor | None = None
    text_embeds: Tensor | None = None
    image_embeds: Tensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        # the towers' outputs become tuples too, as HF's `SiglipOutput.to_tuple`
        return tuple(v.to_tuple() if k.endswith("model_output") else v for k, v in self.items())


def _pooling_output(out) -> BaseModelOutputWithPooling:
    return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=out.pooler_output,
                                      hidden_states=out.hidden_states)


class _Towers:
    def _text(self, config, input_ids, attention_mask, position_ids, output_hidden_states):
        return siglip.text_forward(self.params, token_ids(input_ids, config.vocab_size), as_tensor(attention_mask),
                                   as_tensor(position_ids), config=config,
                                   output_hidden_states=hidden_states_flag(output_hidden_states, config))

    def _vision(self, config, pixel_values, interpolate_pos_encoding, output_hidden_states):
        return siglip.vision_forward(self.params, as_tensor(pixel_values, None), config=config,
                                     interpolate_pos_encoding=bool(interpolate_pos_encoding),
                                     output_hidden_states=hidden_states_flag(output_hidden_states, config))


class SiglipTextModel(_Towers, TowerModel):
    """The text tower: `last_hidden_state` `[batch, seq, hidden]` (after `final_layer_norm`),
    `pooler_output` `[batch, projection_size]` (`head` of the last position), `hidden_states` with
    `output_hidden_states=True`. Inputs: `input_ids`, `attention_mask` (padding keys masked; no
    causal mask), `position_ids`. Raises ValueError on bad inputs."""

    arch = siglip.TEXT
    model_type = siglip.TEXT.MODEL_TYPE
    base_model_prefix = siglip.TEXT_PREFIX
    full_model_type = siglip.MODEL_TYPE

    def state_tree(self) -> dict:
        return self.params[siglip.TEXT_PREFIX]  # HF 5.25 saves the tower without its prefix

    def construct(self, input_ids=None, attention_mask=None, position_ids=None, output_hidden_states=None,
                  return_dict=True):
        out = _pooling_output(self._text(self.config, input_ids, attention_mask, position_ids, output_hidden_states))
        return out if return_dict else out.to_tuple()


class SiglipVisionModel(_Towers, TowerModel):
    """The vision tower: `last_hidden_state` `[batch, patches, hidden]` (after `post_layernorm`),
    `pooler_output` `[batch, hidden]` (the attention-pooling head; None without
    `vision_use_head`), `hidden_states` with `output_hidden_states=True`. Input: `pixel_values`
    `[batch, num_channels, image_size, image_size]` (other sizes with `interpolate_pos_encoding=True`).
    Raises ValueError on bad inputs (see `msfx.architectures.vision_encoder.check_pixel_values`)."""

    arch = siglip.VISION
    model_type = siglip.VISION.MODEL_TYPE
    base_model_prefix = siglip.VISION_PREFIX
    full_model_type = siglip.MODEL_TYPE
    main_input_name = "pixel_values"

    def state_tree(self) -> dict:
        return self.params[siglip.VISION_PREFIX]  # HF 5.25 saves the tower without its prefix

    def construct(self, pixel_values=None, interpolate_pos_encoding=False, output_hidden_states=None,
                  return_dict=True):
        out = self._vision(self.config, pixel_values, interpolate_pos_encoding, output_hidden_states)
        out = _pooling_output(out)
        return out if return_dict else out.to_tuple()


class SiglipModel(_Towers, PreTrainedModel):
    """Both towers, `logit_scale` and `logit_bias` (a `SiglipConfig` checkpoint).

    `construct(input_ids, pixel_values, attention_mask=None, ...)` returns `logits_per_image`
    `[images, texts]` and `logits_per_text` `[texts, images]` (`exp(logit_scale) * cosine +
    logit_bias`: apply a sigmoid for match probabilities), the L2-normalized `text_embeds` /
    `image_embeds`, the towers' outputs, and with `return_loss=True` HF's sigmoid loss (as many
    texts as images). `get_text_features` / `get_image_features` return the tower's
    `BaseModelOutputWithPooling` (pooled, not normalized), as transformers 5.25.
    """

    arch = siglip
    model_type = siglip.MODEL_TYPE
    base_model_prefix = siglip.PREFIX

    def get_text_features(self, input_ids=None, attention_mask=None, position_ids=None, output_hidden_states=None,
                          return_dict=True):
        out = _pooling_output(self._text(self.config.text_config, input_ids, attention_mask, position_ids,
                                         output_hidden_states))
        return out if return_dict else out.to_tuple()

    def get_image_features(self, pixel_values=None, interpolate_pos_encoding=False, output_hidden_states=None,
                           return_dict=True):
        out = _pooling_output(self._vision(self.config.vision_config, pixel_values, interpolate_pos_encoding,
                                           output_hidden_states))
        return out if return_dict else out.to_tuple()

    def construct(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, return_loss=None,
                  interpolate_pos_encoding=False, output_hidden_states=None, return_dict=True):
        text_config = self.config.text_config
        out = siglip.forward(self.params, token_ids(input_ids, text_config.vocab_size), as_tensor(pixel_values, None),
                             as_tensor(attention_mask), as_tensor(position_ids), config=self.config,
                             interpolate_pos_encoding=bool(interpolate_pos_encoding),
                             output_hidden_states=hidden_states_flag(output_hidden_states, self.config))
        out = SiglipOutput(loss=siglip.sigmoid_loss(out.logits_per_text) if return_loss else None,
                           logits_per_image=out.logits_per_image, logits_per_text=out.logits_per_text,
                           text_embeds=out.text_embeds, image_embeds=out.image_embeds,
                           text_model_output=_pooling_output(out.text_model_output),
                           vision_model_output=_pooling_output(out.vision_model_output))
        return out if return_dict else out.to_tuple()


class SiglipForImageClassification(_Towers, PreTrainedModel):
    """The vision tower with a linear `classifier` on the mean of `last_hidden_state` over the
    patches (its pooling head is loaded and saved, not run, as HF): `logits` `[batch, num_labels]`;
    `labels` give HF's loss by `config.problem_type`. A `SiglipConfig` checkpoint."""

    arch = siglip
    model_type = siglip.MODEL_TYPE
    base_model_prefix = siglip.PREFIX
    main_input_name = "pixel_values"

    @classmethod
    def param_shapes(cls, config):
        return siglip.param_shapes(config, num_labels=config.num_labels)

    def construct(self, pixel_values=None, labels=None, interpolate_pos_encoding=False, output_hidden_states=None,
                  return_dict=True):
        out = siglip.vision_forward(self.params, as_tensor(pixel_values, None), config=self.config.vision_config,
                                    interpolate_pos_encoding=bool(interpolate_pos_encoding),
                                    output_hidden_states=hidden_states_flag(output_hidden_states, self.config),
                                    with_head=False)
        out = classifier_output(self, vit.mean_tokens(out.last_hidden_state), labels, out.hidden_states)
        return out if return_dict else out.to_tuple()
