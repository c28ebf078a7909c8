"""HF-named T5 classes: `T5Model`, `T5EncoderModel`, `T5ForConditionalGeneration`.

Each forwards to `msfx.architectures.t5`; see `transformers.models.t5.modeling_t5` for the behaviour
they reproduce (dropout only in training: `msfx.layers.dropout`). Hidden states and attentions are not returned.
"""
from __future__ import annotations

import os
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
from mindspore import Tensor
from transformers.utils import ModelOutput

from msfx.architectures import t5
from msfx.generation import Seq2SeqGenerationMixin
from msfx.modeling import BaseModelOutput, PreTrainedModel, as_tensor, masked_cross_entropy, token_ids
from msfx.params import resolve_model_dir


@dataclass
class Seq2SeqModelOutput(ModelOutput):
    """HF's `Seq2SeqModelOutput` (`T5Model`): the decoder's `last_hidden_state` `[batch, target_seq,
    d_model]` and the `encoder_last_hidden_state` `[batch, source_seq, d_model]`."""

    last_hidden_state: Tensor | None = None
    cache: Any = None
    decoder_hidden_states: tuple | None = None
    decoder_attentions: tuple | None = None
    cross_attentions: tuple | None = None
    encoder_last_hidden_state: Tensor | None = None
    encoder_hidden_states: tuple | None = None
    encoder_attentions: tuple | None = None


@dataclass
class Seq2SeqLMOutput(ModelOutput):
    """HF's `Seq2SeqLMOutput` (`T5ForConditionalGeneration`): `loss` (with `labels`), `logits`
    `[batch, target_seq, vocab]`, `encoder_last_hidden_state` `[batch, source_seq, d_model]`."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: Any = None
    decoder_hidden_states: tuple | None = None
    decoder_attentions: tuple | None = None
    cross_attentions: tuple | None = None
    encoder_last_hidden_state: Tensor | None = None
    encoder_hidden_states: tuple | None = None
    encoder_attentions: tuple | None = None


# Whether the checkpoint `from_pretrained` is loading stores its own `lm_head.weight` (None outside a load).
_CHECKPOINT_LM_HEAD: ContextVar[bool | None] = ContextVar("t5_checkpoint_lm_head", default=None)
_HUB_KEYS = ("revision", "cache_dir", "local_files_only", "token")


class _T5Base(PreTrainedModel):
    arch = t5
    model_type = t5.MODEL_TYPE
    base_model_prefix = t5.PREFIX

    def _shift_right(self, input_ids) -> Tensor:
        """HF's `_shift_right`: decoder inputs `[batch, seq]` int32 from labels / target ids (see
        `msfx.architectures.t5.shift_right`; raises ValueError without a decoder start or pad id)."""
        ids = input_ids.asnumpy() if isinstance(input_ids, Tensor) else np.asarray(input_ids)
        return Tensor(t5.shift_right(ids, self.config).astype(np.int32))

    def _encoder_states(self, input_ids, attention_mask, inputs_embeds, encoder_outputs) -> Tensor:
        """The encoder's last hidden state: from `encoder_outputs` (an output object or a tuple, as
        HF accepts it) or by running the encoder."""
        if encoder_outputs is not None:
            return encoder_outputs[0] if isinstance(encoder_outputs, (tuple, list)) else \
                encoder_outputs.last_hidden_state
        return t5.encoder_forward(self.params, token_ids(input_ids, self.config.vocab_size), as_tensor(attention_mask),
                                  config=self.config, inputs_embeds=inputs_embeds, check_ids=False).last_hidden_state

    def _decode(self, encoder_states, attention_mask, decoder_input_ids, decoder_attention_mask,
                decoder_inputs_embeds) -> Tensor:
        t5._decoder_inputs(decoder_input_ids, decoder_inputs_embeds)
        return t5.decoder_forward(self.params, token_ids(decoder_input_ids, self.config.vocab_size), encoder_states,
                                  as_tensor(decoder_attention_mask), as_tensor(attention_mask), config=self.config,
                                  inputs_embeds=decoder_inputs_embeds, check_ids=False).last_hidden_state


class T5Model(_T5Base):
    """The encoder-decoder without a head: `last_hidden_state` (the decoder's) `[batch, target_seq,
    d_model]` and `encoder_last_hidden_state` `[batch, source_seq, d_model]`.

    Inputs (arrays, lists or Tensors): `input_ids` / `attention_mask` `[batch, source_seq]` (padding on
    either side), `decoder_input_ids` `[batch, target_seq]` (required: e.g. `model._shift_right(ids)`),
    `decoder_attention_mask`, `encoder_outputs` (reuse an encoder result instead of `input_ids`).

    Raises:
        ValueError: no decoder inputs, or bad inputs (see `msfx.architectures.t5.model_forward`).
    """

    def construct(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                  encoder_outputs=None, inputs_embeds=None, decoder_inputs_embeds=None, return_dict=True):
        t5._decoder_inputs(decoder_input_ids, decoder_inputs_embeds)
        encoded = self._encoder_states(input_ids, attention_mask, inputs_embeds, encoder_outputs)
        hidden = self._decode(encoded, attention_mask, decoder_input_ids, decoder_attention_mask,
                              decoder_inputs_embeds)
        out = Seq2SeqModelOutput(last_hidden_state=hidden, encoder_last_hidden_state=encoded)
        return out if return_dict else out.to_tuple()


class T5EncoderModel(_T5Base):
    """The encoder alone (`shared` + `encoder.*`; a full checkpoint's decoder is dropped):
    `last_hidden_state` `[batch, seq, d_model]` for `input_ids` / `attention_mask` `[batch, seq]`."""

    @classmethod
    def param_shapes(cls, config):
        return cls.arch.param_shapes(config, decoder=False)

    def construct(self, input_ids=None, attention_mask=None, inputs_embeds=None, return_dict=True):
        out = BaseModelOutput(last_hidden_state=self._encoder_states(input_ids, attention_mask, inputs_embeds, None))
        return out if return_dict else out.to_tuple()


class T5ForConditionalGeneration(Seq2SeqGenerationMixin, _T5Base):
    """T5 with its language-model head: `logits` `[batch, target_seq, vocab]`. `labels` `[batch,
    target_seq]` give the mean cross-entropy over positions not labelled `-100` as `loss`, and, without
    decoder inputs, the decoder inputs (`_shift_right(labels)`). The head is `lm_head.weight` when the
    checkpoint stores one (v1.1 / Flan-T5), else `shared.weight`; decoder outputs are scaled by
    `d_model ** -0.5` first when `config.scale_decoder_outputs` (original T5). `generate` runs the
    encoder once, eagerly, then the decoder token by token: a `mindspore.jit` graph per step with `jit`
    True or "decode" (the same for both), eagerly with `jit=False`.

    Raises:
        ValueError: no decoder inputs and no labels, labels not shaped like the decoder inputs, or bad
            inputs (see `msfx.architectures.t5.forward`).
    """


    @classmethod
    def param_shapes(cls, config):
        stored = _CHECKPOINT_LM_HEAD.get()
        return cls.arch.param_shapes(config, lm_head=not config.tie_word_embeddings if stored is None else stored)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args,
                        **kwargs) -> "T5ForConditionalGeneration":
        """As `PreTrainedModel.from_pretrained`; the checkpoint decides whether the head is untied
        (it stores `lm_head.weight`), as in HF 5.x."""
        if kwargs.get("gguf_file") is not None:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model_dir = resolve_model_dir(pretrained_model_name_or_path, **{k: kwargs[k] for k in _HUB_KEYS if k in kwargs})
        reset = _CHECKPOINT_LM_HEAD.set(t5.checkpoint_has_lm_head(model_dir))
        try:
            return super().from_pretrained(model_dir, *args, **kwargs)
        finally:
            _CHECKPOINT_LM_HEAD.reset(reset)

    def construct(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                  encoder_outputs=None, inputs_embeds=None, decoder_inputs_embeds=None, labels=None,
                  return_dict=True):
        if labels is not None:
            labels = as_tensor(labels)
            target = decoder_input_ids if decoder_input_ids is not None else decoder_inputs_embeds
            target_shape = None if target is None else tuple(np.shape(target))[:2]
            if labels.ndim != 2 or (target_shape is not None and tuple(labels.shape) != target_shape):
                raise ValueError(f"labels must be [batch, target_seq] like the decoder inputs "
                                 f"{list(target_shape) if target_shape else ''}, got {list(labels.shape)}")
            if target is None:
                decoder_input_ids = self._shift_right(labels)
        t5._decoder_inputs(decoder_input_ids, decoder_inputs_embeds)
        encoded = self._encoder_states(input_ids, attention_mask, inputs_embeds, encoder_outputs)
        hidden = self._decode(encoded, attention_mask, decoder_input_ids, decoder_attention_mask,
                              decoder_inputs_embeds)
        logits = t5.lm_head(self.params, hidden, self.config)
        loss = None if labels is None else masked_cross_entropy(logits, labels)
        out = Seq2SeqLMOutput(loss=loss, logits=logits, encoder_last_hidden_state=encoded)
        return out if return_dict else out.to_tuple()

