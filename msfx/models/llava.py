"""HF-named LLaVA class: `LlavaForConditionalGeneration` over `msfx.architectures.llava`.

`generate(input_ids, pixel_values=...)` runs the vision tower and the projector once, prefills the
language model from the merged embeddings, then decodes with the language model's own compiled
step (the text path's KV cache and jit). See `transformers.models.llava.modeling_llava`.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from msfx.architectures import llava
from msfx.backend import lacks_bf16_kernels
from msfx.decode.generate import DecodeState
from msfx.decode.step import CompiledStep
from msfx.generation import GenerationMixin
from msfx.modeling import CausalLMOutputWithPast, PreTrainedModel, as_tensor
from msfx.layers.losses import causal_lm_loss


class LlavaForConditionalGeneration(GenerationMixin, PreTrainedModel):
    """LLaVA: `logits` `[batch, seq, vocab]` for `input_ids` `[batch, seq]` holding one
    `config.image_token_id` per image patch feature of `pixel_values` `[images, 3, H, W]`
    (as `transformers.LlavaProcessor` builds them, `return_tensors="np"`)."""

    arch = llava
    model_type = llava.MODEL_TYPE

    def __init__(self, config, params: dict | None = None):
        super().__init__(config, params)
        self._pixel_values, self._prompts = None, 1  # the images and prompts of the `generate` call in progress
        self._language_steps: dict = {}

    def construct(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, labels=None,
                  logits_to_keep: int = 0, output_hidden_states=None, return_dict=True):
        if input_ids is None:
            raise ValueError("LlavaForConditionalGeneration needs input_ids (inputs_embeds are not supported in msfx)")
        out = llava.forward(self.params, input_ids, _pixels(pixel_values), as_tensor(attention_mask),
                            as_tensor(position_ids), config=self.config,
                            output_hidden_states=bool(output_hidden_states), logits_to_keep=logits_to_keep)
        loss = None if labels is None else causal_lm_loss(out.logits, as_tensor(labels))
        result = CausalLMOutputWithPast(loss=loss, logits=out.logits, hidden_states=out.hidden_states)
        return result if return_dict else result.to_tuple()

    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):
        """HF's `generate` (see `msfx.generation.GenerationMixin.generate`) with the images of the
        prompt: `pixel_values` `[images, 3, H, W]`, the images of each row in order.

        Raises:
            ValueError: as `GenerationMixin.generate`, and image tokens that do not match the features.
        """
        self._pixel_values = _pixels(pixel_values)
        self._prompts = len(input_ids)
        try:
            return super().generate(input_ids, attention_mask, **kwargs)
        finally:
            self._pixel_values = None

    def _language_step(self, jit: bool, embeds: bool) -> CompiledStep:
        if (jit, embeds) not in self._language_steps:
            core, tree, text = llava.language_params(self.params, self.config)
            self._language_steps[jit, embeds] = CompiledStep(core, tree, text, jit=jit, embeds=embeds)
        return self._language_steps[jit, embeds]

    def _decode_state(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int, jit: bool | str,
                      encoder_inputs=None, use_cache: bool = True) -> DecodeState:
        """The language model's decode state, prefilled from the prompt's embeddings with the image
        features merged in (rows repeated per beam / returned sequence: each row's images with it)."""
        if lacks_bf16_kernels(self.weights[0]):
            jit = False
        embeds = None
        if self._pixel_values is not None:
            features = llava.image_features(self.params, self._pixel_values, self.config)
            embeds = llava.input_embeddings(self.params, input_ids, None, self.config)
            copies = len(input_ids) // self._prompts  # rows per prompt (beams, returned sequences)
            features = _features_per_row(features, input_ids, copies, self.config.image_token_id)
            embeds = llava.merge_image_features(embeds, input_ids, features, self.config.image_token_id)
        step = self._language_step(bool(jit), False)
        prefill = self._language_step(jit is True, embeds is not None)
        return DecodeState(self.config.text_config, prefill, step, input_ids, attention_mask, max_new_tokens,
                           bucket_prompt=jit is True, use_cache=use_cache,
                           prompt_embeds=embeds)


def _pixels(pixel_values) -> Tensor | None:
    """`pixel_values` (numpy, MindSpore) as a float Tensor (float32 unless already floating)."""
    if pixel_values is None or (isinstance(pixel_values, Tensor) and pixel_values.is_floating_point()):
        return pixel_values
    values = pixel_values.asnumpy() if isinstance(pixel_values, Tensor) else np.asarray(pixel_values)
    return Tensor(values.astype(np.float32) if not np.issubdtype(values.dtype, np.floating) else values)


def _features_per_row(features, input_ids: np.ndarray, copies: int, image_token_id: int):
    """`features` `[images, patches, hidden]` of the unrepeated prompts, in the order the rows of
    `input_ids` (each prompt repeated `copies` times) need them.

    Raises:
        ValueError: the prompts' image tokens do not number `images * patches` (HF's message).
    """
    images, patches = features.shape[0], features.shape[1]
    tokens = (np.asarray(input_ids) == image_token_id).sum(1)
    if tokens[::copies].sum() != images * patches or np.any(tokens % patches):
        raise ValueError(f"Image features and image tokens do not match, tokens: {int(tokens[::copies].sum())}, "
                         f"features: {images * patches}")
    per_row = tokens // patches
    first = np.concatenate([[0], np.cumsum(per_row[::copies])])  # each prompt's first image
    order = [i for row in range(len(per_row)) for i in range(first[row // copies], first[row // copies] + per_row[row])]
    if not order:
        return features[:0]
    # exact in float32: MindSpore's CPU Gather has no bfloat16 kernel
    wide = features.astype(ms.float32) if lacks_bf16_kernels(features) else features
    return ops.gather(wide, Tensor(np.asarray(order, np.int32)), 0).astype(features.dtype)
