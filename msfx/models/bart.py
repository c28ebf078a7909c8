"""HF-named BART and mBART classes: `BartModel`, `BartForConditionalGeneration`,
`BartForSequenceClassification`, `BartForQuestionAnswering` and their `MBart...` twins (the same code; `msfx.architectures.bart.SPECS`
holds the difference).

Each forwards to `msfx.architectures.bart`; see `transformers.models.bart.modeling_bart` and
`...mbart.modeling_mbart` for the behaviour they reproduce (dropout only in training). Hidden states and
attentions are not returned.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from mindspore import Tensor
from transformers.utils import ModelOutput

from msfx.architectures import bart
from msfx.generation import Seq2SeqGenerationMixin
from msfx.inputs import check_token_ids
from msfx.modeling import PreTrainedModel, as_tensor, masked_cross_entropy, sequence_classification_loss, token_ids
from msfx.models.t5 import Seq2SeqLMOutput, Seq2SeqModelOutput


@dataclass
class Seq2SeqSequenceClassifierOutput(ModelOutput):
    """HF's `Seq2SeqSequenceClassifierOutput`: `loss` (with `labels`), `logits` `[batch, num_labels]`,
    `encoder_last_hidden_state` `[batch, source_seq, d_model]`."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: Any = None
    decoder_hidden_states: tuple | None = None
    decoder_attentions: tuple | None = None
    cross_attentions: tuple | None = None
    encoder_last_hidden_state: Tensor | None = None
    encoder_hidden_states: tuple | None = None
    encoder_attentions: tuple | None = None


def _host(x) -> np.ndarray:
    return x.asnumpy() if isinstance(x, Tensor) else np.asarray(x)


class _BartBase(PreTrainedModel):
    arch = bart
    model_type = "bart"
    base_model_prefix = bart.PREFIX
    _head: str | None = None  # `bart.param_shapes`' head

    @classmethod
    def param_shapes(cls, config):
        return bart.param_shapes(config, head=cls._head)

    def _run(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs,
             inputs_embeds, decoder_inputs_embeds) -> bart.BartModelOutput:
        """`bart.model_forward` on the wrapper's inputs: decoder inputs shifted from `input_ids` when none are
        given (HF's `BartModel`), `encoder_outputs` (an output object or a tuple) reused when given.

        Raises:
            ValueError: no decoder inputs and no `input_ids`; bad inputs (see `bart.model_forward`).
        """
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if input_ids is None:
                raise ValueError("If no `decoder_input_ids` or `decoder_inputs_embeds` are passed, `input_ids` cannot "
                                 "be `None`. Please pass either `input_ids` or `decoder_input_ids` or "
                                 "`decoder_inputs_embeds`.")
            decoder_input_ids = bart.shift_tokens_right(check_token_ids(input_ids, self.config.vocab_size), self.config)
        encoded = None
        if encoder_outputs is not None:
            encoded = encoder_outputs[0] if isinstance(encoder_outputs, (tuple, list)) else \
                encoder_outputs.last_hidden_state
        vocab = self.config.vocab_size
        return bart.model_forward(self.params, token_ids(input_ids, vocab), as_tensor(attention_mask),
                                  token_ids(decoder_input_ids, vocab), as_tensor(decoder_attention_mask),
                                  encoder_hidden_states=encoded, config=self.config, inputs_embeds=inputs_embeds,
                                  decoder_inputs_embeds=decoder_inputs_embeds, check_ids=False)


@dataclass
class Seq2SeqQuestionAnsweringModelOutput(ModelOutput):
    """HF's `Seq2SeqQuestionAnsweringModelOutput`: `loss` (with start and end positions), `start_logits` /
    `end_logits` `[batch, seq]`, `encoder_last_hidden_state` `[batch, source_seq, d_model]`."""

    loss: Tensor | None = None
    start_logits: Tensor | None = None
    end_logits: Tensor | None = None
    cache: Any = None
    decoder_hidden_states: tuple | None = None
    decoder_attentions: tuple | None = None
    cross_attentions: tuple | None = None
    encoder_last_hidden_state: Tensor | None = None
    encoder_hidden_states: tuple | None = None
    encoder_attentions: tuple | None = None


class BartModel(_BartBase):
    """The encoder-decoder without a head: `last_hidden_state` (the decoder's) `[batch, target_seq, d_model]`
    and `encoder_last_hidden_state` `[batch, source_seq, d_model]`.

    Inputs (arrays, lists or Tensors): `input_ids` / `attention_mask` `[batch, source_seq]`,
    `decoder_input_ids` `[batch, target_seq]` (default: `input_ids` shifted right, as HF),
    `decoder_attention_mask`, `encoder_outputs` (reuse an encoder result).

    Raises:
        ValueError: no decoder inputs and no `input_ids`, more tokens than `max_position_embeddings`, bad ids
            or masks (see `msfx.architectures.bart.model_forward`).
    """

    def state_tree(self) -> dict:
        return self.params["model"]  # HF saves the base model without the `model.` prefix

    def construct(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                  encoder_outputs=None, inputs_embeds=None, decoder_inputs_embeds=None, return_dict=True):
        out = self._run(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs,
                        inputs_embeds, decoder_inputs_embeds)
        out = Seq2SeqModelOutput(last_hidden_state=out.last_hidden_state,
                                 encoder_last_hidden_state=out.encoder_last_hidden_state)
        return out if return_dict else out.to_tuple()


class BartForConditionalGeneration(Seq2SeqGenerationMixin, _BartBase):
    """BART with its language-model head (`model.shared`, or `lm_head` when untied, plus `final_logits_bias`):
    `logits` `[batch, target_seq, vocab]`. `labels` `[batch, target_seq]` give the mean cross-entropy
    (-100 ignored) and, without decoder inputs, the decoder inputs (`shift_tokens_right(labels)`).
    `generate` runs the encoder once, eagerly, then the decoder from `decoder_start_token_id` (eos for
    BART; mBART's checkpoints name a language code) token by token, with the checkpoint's
    `forced_bos_token_id` / `forced_eos_token_id`: a `mindspore.jit` graph per step with `jit` True or
    "decode", eagerly with `jit=False`.

    Raises:
        ValueError: labels not `[batch, target_seq]` like the decoder inputs, or as `BartModel`.
    """

    _head = "lm"
    _learned_positions = True  # the decoder's position table ends at `max_position_embeddings`

    def construct(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                  encoder_outputs=None, inputs_embeds=None, decoder_inputs_embeds=None, labels=None,
                  return_dict=True):
        if labels is not None:
            labels = _host(labels)
            target = decoder_input_ids if decoder_input_ids is not None else decoder_inputs_embeds
            target_shape = None if target is None else tuple(np.shape(target))[:2]
            if labels.ndim != 2 or (target_shape is not None and labels.shape != target_shape):
                raise ValueError(f"labels must be [batch, target_seq] like the decoder inputs "
                                 f"{list(target_shape) if target_shape else ''}, got {list(labels.shape)}")
            if target is None:
                decoder_input_ids = bart.shift_tokens_right(labels, self.config)
        out = self._run(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs,
                        inputs_embeds, decoder_inputs_embeds)
        logits = bart.lm_head(self.params, out.last_hidden_state, self.config)
        loss = None if labels is None else masked_cross_entropy(logits, Tensor(labels.astype(np.int32)))
        out = Seq2SeqLMOutput(loss=loss, logits=logits, encoder_last_hidden_state=out.encoder_last_hidden_state)
        return out if return_dict else out.to_tuple()


class BartForSequenceClassification(_BartBase):
    """BART with HF's classification head on the decoder's hidden state at each row's last eos token of
    `input_ids`: `logits` `[batch, num_labels]`; `labels` give the loss by `config.problem_type` (as HF).

    Raises:
        NotImplementedError: `inputs_embeds` without `input_ids` (as HF: the eos positions come from the ids).
        ValueError: a row without eos, rows with different eos counts, or as `BartModel`.
    """

    _head = "classification"

    def construct(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                  encoder_outputs=None, inputs_embeds=None, decoder_inputs_embeds=None, labels=None,
                  return_dict=True):
        if input_ids is None:
            raise NotImplementedError(f"Passing input embeddings is currently not supported for {type(self).__name__}")
        ids = check_token_ids(input_ids, self.config.vocab_size)
        out = self._run(ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs,
                        inputs_embeds, decoder_inputs_embeds)
        logits = bart.classification_logits(self.params, out.last_hidden_state, ids, self.config)
        loss = None if labels is None else sequence_classification_loss(logits, as_tensor(labels, None), self.config)
        out = Seq2SeqSequenceClassifierOutput(loss=loss, logits=logits,
                                              encoder_last_hidden_state=out.encoder_last_hidden_state)
        return out if return_dict else out.to_tuple()


class BartForQuestionAnswering(_BartBase):
    """BART with HF's span head (`qa_outputs`) on the decoder's hidden states: `start_logits` / `end_logits`
    `[batch, seq]`; `start_positions` and `end_positions` (int `[batch]`) give HF's loss, the mean of the two
    cross-entropies with positions clamped to `[0, seq]` and `seq` ignored.

    Raises:
        ValueError: as `BartModel`.
    """

    _head = "question_answering"

    def construct(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                  encoder_outputs=None, start_positions=None, end_positions=None, inputs_embeds=None,
                  decoder_inputs_embeds=None, return_dict=True):
        out = self._run(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs,
                        inputs_embeds, decoder_inputs_embeds)
        start, end = bart.span_logits(self.params, out.last_hidden_state)
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start.shape[1]
            positions = [Tensor(np.clip(_host(p).reshape(-1), 0, ignored).astype(np.int32))
                         for p in (start_positions, end_positions)]
            loss = (masked_cross_entropy(start, positions[0], ignored)
                    + masked_cross_entropy(end, positions[1], ignored)) / 2
        out = Seq2SeqQuestionAnsweringModelOutput(loss=loss, start_logits=start, end_logits=end,
                                                  encoder_last_hidden_state=out.encoder_last_hidden_state)
        return out if return_dict else out.to_tuple()


class MBartModel(BartModel):
    """mBART's `BartModel` (pre-norm layers, final layer norms); as `BartModel`."""

    model_type = "mbart"


class MBartForConditionalGeneration(BartForConditionalGeneration):
    """mBART's `BartForConditionalGeneration`; `labels` shift after each row's language code, as HF's mBART.
    Pass the target language as `forced_bos_token_id` (HF's mBART-50 checkpoints) or `decoder_start_token_id`."""

    model_type = "mbart"


class MBartForSequenceClassification(BartForSequenceClassification):
    """mBART's `BartForSequenceClassification`; as that class."""

    model_type = "mbart"


class MBartForQuestionAnswering(BartForQuestionAnswering):
    """mBART's `BartForQuestionAnswering`; as that class."""

    model_type = "mbart"
