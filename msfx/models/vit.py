"""HF-named ViT classes: `ViTModel`, `ViTForImageClassification`.

Each forwards to `msfx.architectures.vit`; see `transformers.models.vit.modeling_vit`
(transformers 5.25) for the behaviour they reproduce (dropout only in training). Pixel values
`[batch, 3, H, W]` float32 come from `ViTImageProcessor(..., return_tensors="np")`; arrays, lists
and Tensors are accepted.
"""
from __future__ import annotations

from dataclasses import dataclass

from mindspore import Tensor
from transformers.utils import ModelOutput

from msfx.architectures import vit
from msfx.modeling import BaseModelOutputWithPooling, PreTrainedModel, as_tensor, sequence_classification_loss


@dataclass
class ImageClassifierOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


def hidden_states_flag(value, config) -> bool:
    """`output_hidden_states`, None meaning `config.output_hidden_states` (as HF)."""
    return bool(config.output_hidden_states if value is None else value)


def classifier_output(model: PreTrainedModel, features: Tensor, labels, hidden_states) -> ImageClassifierOutput:
    """`ImageClassifierOutput` of a `classifier` over `features` `[batch, n]` (HF's `nn.Identity`
    when `num_labels` is 0); with `labels`, HF's loss by `config.problem_type`."""
    logits = vit.classify(model.params, features) if model.config.num_labels else features
    loss = None if labels is None else sequence_classification_loss(logits, as_tensor(labels, None), model.config)
    return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states)


class ViTModel(PreTrainedModel):
    """The encoder and its pooler: `last_hidden_state` `[batch, 1 + patches, hidden]` (after
    `layernorm`), `pooler_output` `[batch, pooler_output_size]` (`tanh(dense(class token))`),
    `hidden_states` (embeddings, then each layer) with `output_hidden_states=True`. A checkpoint
    without the pooler (a `ViTForImageClassification` one) gets a fresh one, with a warning, as HF.

    Input: `pixel_values` `[batch, num_channels, image_size, image_size]` float (other sizes with
    `interpolate_pos_encoding=True`). Raises ValueError on bad inputs (see
    `msfx.architectures.vision_encoder.check_pixel_values`).
    """

    arch = vit
    model_type = vit.MODEL_TYPE
    base_model_prefix = vit.PREFIX
    main_input_name = "pixel_values"

    def state_tree(self) -> dict:
        return self.params[vit.PREFIX]  # HF saves the base model without the `vit.` prefix

    def construct(self, pixel_values=None, interpolate_pos_encoding=None, output_hidden_states=None,
                  return_dict=True):
        out = vit.forward(self.params, as_tensor(pixel_values, None), config=self.config,
                          interpolate_pos_encoding=bool(interpolate_pos_encoding),
                          output_hidden_states=hidden_states_flag(output_hidden_states, self.config))
        out = BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=out.pooler_output,
                                         hidden_states=out.hidden_states)
        return out if return_dict else out.to_tuple()


class ViTForImageClassification(PreTrainedModel):
    """ViT (no pooler) with a linear `classifier` on the class token of `last_hidden_state`: `logits`
    `[batch, num_labels]`; `labels` give HF's loss by `config.problem_type` (see
    `msfx.modeling.sequence_classification_loss`). Inputs and errors as `ViTModel`."""

    arch = vit
    model_type = vit.MODEL_TYPE
    base_model_prefix = vit.PREFIX
    main_input_name = "pixel_values"

    @classmethod
    def param_shapes(cls, config):
        return vit.param_shapes(config, with_pooler=False, num_labels=config.num_labels)

    def construct(self, pixel_values=None, labels=None, interpolate_pos_encoding=None, output_hidden_states=None,
                  return_dict=True):
        out = vit.forward(self.params, as_tensor(pixel_values, None), config=self.config,
                          interpolate_pos_encoding=bool(interpolate_pos_encoding),
                          output_hidden_states=hidden_states_flag(output_hidden_states, self.config),
                          with_pooler=False)
        out = classifier_output(self, out.last_hidden_state[:, 0], labels, out.hidden_states)
        return out if return_dict else out.to_tuple()
