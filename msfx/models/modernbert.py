"""HF-named ModernBERT classes: `ModernBertModel`, `ModernBertForMaskedLM`,
`ModernBertForSequenceClassification`, `ModernBertForTokenClassification`,
`ModernBertForQuestionAnswering`.

Each forwards to `msfx.architectures.modernbert`; see `transformers.models.modernbert.modeling_modernbert`
for the behaviour they reproduce. The heads run the shared prediction `head` (dense, activation, norm),
dropout (`classifier_dropout`) and a linear `classifier` (the masked LM: the `decoder`).
"""
from __future__ import annotations

import numpy as np
from mindspore import Tensor

from msfx.architectures import modernbert
from msfx.layers.basic import linear
from msfx.layers.dropout import dropout
from msfx.modeling import (BaseModelOutput, MaskedLMOutput, PreTrainedModel, QuestionAnsweringModelOutput,
                           SequenceClassifierOutput, TokenClassifierOutput, as_tensor, masked_cross_entropy,
                           question_answering_loss, sequence_classification_loss, split_span_logits)


class _ModernBertBase(PreTrainedModel):
    arch = modernbert
    model_type = modernbert.MODEL_TYPE
    base_model_prefix = modernbert.PREFIX

    @classmethod
    def param_shapes(cls, config):
        h = config.hidden_size
        return cls.arch.param_shapes(config, with_head=True) | {"classifier.weight": (config.num_labels, h),
                                                                "classifier.bias": (config.num_labels,)}

    def _encode(self, input_ids, attention_mask, position_ids, inputs_embeds,
                output_hidden_states) -> modernbert.ModernBertOutput:
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return self.arch.model_forward(self.params, as_tensor(input_ids), as_tensor(attention_mask),
                                       as_tensor(position_ids), config=self.config, inputs_embeds=inputs_embeds,
                                       output_hidden_states=bool(output_hidden_states))

    def _classify(self, hidden):
        """`classifier(dropout(head(hidden)))`."""
        h = dropout(self.arch.prediction_head(self.params, hidden, self.config), self.config.classifier_dropout)
        return linear(h, self.params["classifier"]["weight"], self.params["classifier"]["bias"])


class ModernBertModel(_ModernBertBase):
    """The encoder: `last_hidden_state` `[batch, seq, hidden]` (after `final_norm`), `hidden_states`
    with `output_hidden_states=True`. Inputs: `input_ids` `[batch, seq]`, `attention_mask`
    `[batch, seq]` (1 real, 0 padding), `position_ids` (default `0..seq-1`).
    Raises ValueError on bad inputs (see `msfx.architectures.modernbert.model_forward`)."""

    @classmethod
    def param_shapes(cls, config):
        return cls.arch.param_shapes(config)

    def state_tree(self) -> dict:
        return self.params["model"]  # HF saves the base model without the `model.` prefix

    def construct(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                  output_hidden_states=None, return_dict=True):
        out = self._encode(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states)
        out = BaseModelOutput(last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states)
        return out if return_dict else out.to_tuple()


class ModernBertForMaskedLM(_ModernBertBase):
    """ModernBERT with the prediction head and `decoder` (tied to the token embeddings unless
    `tie_word_embeddings` is False): `logits` `[batch, seq, vocab]`; `labels` `[batch, seq]` give the
    mean cross-entropy over those not `-100`. With `config.sparse_prediction` and `labels`, HF's
    sparse output: logits `[labelled tokens, vocab]` of the tokens whose label is not
    `sparse_pred_ignore_index`, in row order."""

    @classmethod
    def param_shapes(cls, config):
        return cls.arch.param_shapes(config, with_head=True, with_decoder=True)

    def construct(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                  output_hidden_states=None, return_dict=True):
        out = self._encode(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states)
        hidden, labels = out.last_hidden_state, as_tensor(labels)
        if self.config.sparse_prediction and labels is not None:  # host-side pick, as HF's boolean index
            keep = np.flatnonzero(labels.asnumpy().reshape(-1) != self.config.sparse_pred_ignore_index)
            keep = Tensor(keep.astype(np.int32))
            hidden, labels = hidden.reshape(-1, hidden.shape[-1])[keep], labels.reshape(-1)[keep]
        logits = self.arch.mlm_head(self.params, hidden, self.config)
        loss = None if labels is None else masked_cross_entropy(logits, labels)
        out = MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return out if return_dict else out.to_tuple()


class ModernBertForSequenceClassification(_ModernBertBase):
    """ModernBERT pooled by `classifier_pooling` ("cls" or "mean" over the real tokens), then the
    head: `logits` `[batch, num_labels]`; `labels` give HF's loss by `config.problem_type`."""

    def construct(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                  output_hidden_states=None, return_dict=True):
        out = self._encode(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states)
        logits = self._classify(self.arch.pool(out.last_hidden_state, as_tensor(attention_mask), self.config))
        loss = None if labels is None else sequence_classification_loss(logits, as_tensor(labels, None), self.config)
        out = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return out if return_dict else out.to_tuple()


class ModernBertForTokenClassification(_ModernBertBase):
    """ModernBERT with the head on every token: `logits` `[batch, seq, num_labels]`; `labels`
    `[batch, seq]` give the mean cross-entropy over those not `-100`."""

    def construct(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                  output_hidden_states=None, return_dict=True):
        out = self._encode(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states)
        logits = self._classify(out.last_hidden_state)
        loss = None if labels is None else masked_cross_entropy(logits, as_tensor(labels))
        out = TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return out if return_dict else out.to_tuple()


class ModernBertForQuestionAnswering(_ModernBertBase):
    """ModernBERT with the head giving `start_logits` and `end_logits` `[batch, seq]`;
    `start_positions` / `end_positions` `[batch]` give HF's loss."""

    def construct(self, input_ids=None, attention_mask=None, position_ids=None, start_positions=None,
                  end_positions=None, output_hidden_states=None, return_dict=True):
        out = self._encode(input_ids, attention_mask, position_ids, None, output_hidden_states)
        start, end = split_span_logits(self._classify(out.last_hidden_state))
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = question_answering_loss(start, end, as_tensor(start_positions), as_tensor(end_positions))
        out = QuestionAnsweringModelOutput(loss=loss, start_logits=start, end_logits=end,
                                           hidden_states=out.hidden_states)
        return out if return_dict else out.to_tuple()
