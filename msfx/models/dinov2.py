"""HF-named DINOv2 classes: `Dinov2Model`, `Dinov2ForImageClassification`.

Each forwards to `msfx.architectures.dinov2`; see `transformers.models.dinov2.modeling_dinov2`
(transformers 5.25). Pixel values `[batch, 3, H, W]` float32 come from
`BitImageProcessor(..., return_tensors="np")` (DINOv2's image processor); any `H`, `W` of at least
one patch works (the positions are resized to the image, as HF always does for DINOv2).
"""
from __future__ import annotations

from msfx.architectures import dinov2
from msfx.modeling import BaseModelOutputWithPooling, PreTrainedModel, as_tensor
from msfx.models.vit import classifier_output, hidden_states_flag


class _Dinov2Base(PreTrainedModel):
    arch = dinov2
    model_type = dinov2.MODEL_TYPE
    base_model_prefix = dinov2.PREFIX
    main_input_name = "pixel_values"

    def _encode(self, pixel_values, output_hidden_states) -> dinov2.VisionOutput:
        return dinov2.forward(self.params, as_tensor(pixel_values, None), config=self.config,
                              output_hidden_states=hidden_states_flag(output_hidden_states, self.config))


class Dinov2Model(_Dinov2Base):
    """`last_hidden_state` `[batch, 1 + patches, hidden]` (after `layernorm`), `pooler_output`
    `[batch, hidden]` (its class token), `hidden_states` (embeddings, then each layer) with
    `output_hidden_states=True`. Raises ValueError on bad inputs (see
    `msfx.architectures.vision_encoder.check_pixel_values`)."""

    def state_tree(self) -> dict:
        return self.params[dinov2.PREFIX]  # HF saves the base model without the `dinov2.` prefix

    def construct(self, pixel_values=None, output_hidden_states=None, return_dict=True):
        out = self._encode(pixel_values, output_hidden_states)
        out = BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=out.pooler_output,
                                         hidden_states=out.hidden_states)
        return out if return_dict else out.to_tuple()


class Dinov2ForImageClassification(_Dinov2Base):
    """DINOv2 with a linear `classifier` on the class token concatenated with the mean patch token:
    `logits` `[batch, num_labels]`; `labels` give HF's loss by `config.problem_type`."""

    @classmethod
    def param_shapes(cls, config):
        return dinov2.param_shapes(config, num_labels=config.num_labels)

    def construct(self, pixel_values=None, labels=None, output_hidden_states=None, return_dict=True):
        out = self._encode(pixel_values, output_hidden_states)
        out = classifier_output(self, dinov2.classifier_features(out.last_hidden_state), labels, out.hidden_states)
        return out if return_dict else out.to_tuple()
