"""HF-named classes of BERT and the encoders written as its diff: `Bert...`, `Roberta...`,
`XLMRoberta...` and `DistilBert...` `Model`, `ForMaskedLM`, `ForSequenceClassification`,
`ForTokenClassification` and `ForQuestionAnswering`.

Each forwards to `msfx.architectures.bert` (the config's `EncoderSpec` picks the family's keys and
positions); see `transformers.models.{bert,roberta,xlm_roberta,distilbert}` for the behaviour they
reproduce (dropout only in training: `msfx.layers.dropout`). RoBERTa's classes are BERT's with
RoBERTa's heads; XLM-RoBERTa's are RoBERTa's under HF's names; DistilBERT's take no token types.
"""
from __future__ import annotations

from mindspore import ops

from msfx.architectures import bert
from msfx.layers.basic import linear, tanh
from msfx.layers.dropout import dropout
from msfx.modeling import (BaseModelOutputWithPooling, MaskedLMOutput, PreTrainedModel, QuestionAnsweringModelOutput,
                           SequenceClassifierOutput, TokenClassifierOutput, as_tensor, masked_cross_entropy,
                           question_answering_loss, sequence_classification_loss, split_span_logits)


def _linear_shapes(name: str, out: int, inp: int) -> dict[str, tuple[int, ...]]:
    return {name + ".weight": (out, inp), name + ".bias": (out,)}


def _dense(x, p: dict):
    return linear(x, p["weight"], p["bias"])


class _BertBase(PreTrainedModel):
    arch = bert
    model_type = bert.MODEL_TYPE
    base_model_prefix = bert.PREFIX

    @property
    def encoder_spec(self) -> bert.EncoderSpec:
        return bert.spec_of(self.config)

    def _encode(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                output_hidden_states) -> bert.BertOutput:
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return self.arch.model_forward(self.params, as_tensor(input_ids), as_tensor(attention_mask),
                                       as_tensor(token_type_ids), as_tensor(position_ids), config=self.config,
                                       inputs_embeds=inputs_embeds, output_hidden_states=bool(output_hidden_states))

    @classmethod
    def _body_shapes(cls, config, with_pooler: bool = False):
        return cls.arch.param_shapes(config, with_pooler=with_pooler)


class BertModel(_BertBase):
    """The encoder with its pooler: `last_hidden_state` `[batch, seq, hidden]`, `pooler_output`
    `[batch, hidden]` (tanh dense on [CLS]), `hidden_states` with `output_hidden_states=True`.

    Inputs (arrays, lists or Tensors): `input_ids` `[batch, seq]`, `attention_mask` `[batch, seq]`
    (1 real, 0 padding), `token_type_ids` (default zeros), `position_ids` (default `0..seq-1`).
    Raises ValueError on bad inputs (see `msfx.architectures.bert.model_forward`).
    """

    def state_tree(self) -> dict:
        return self.params[self.base_model_prefix]  # HF saves the base model without its prefix

    def _result(self, out: bert.BertOutput, return_dict: bool):
        out = BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=out.pooler_output,
                                         hidden_states=out.hidden_states)
        return out if return_dict else out.to_tuple()

    def construct(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                  inputs_embeds=None, output_hidden_states=None, return_dict=True):
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_hidden_states)
        return self._result(out, return_dict)


class BertForMaskedLM(_BertBase):
    """BERT with its masked-language-model head (no pooler, as HF): `logits` `[batch, seq, vocab]`;
    `labels` `[batch, seq]` give the mean cross-entropy over positions not labelled `-100` as `loss`.
    The decoder is tied to the word embeddings unless `config.tie_word_embeddings` is False."""

    @classmethod
    def param_shapes(cls, config):
        return cls.arch.param_shapes(config, with_pooler=False, with_mlm_head=True)

    def _result(self, out: bert.BertOutput, labels, return_dict: bool):
        logits = self.arch.mlm_head(self.params, out.last_hidden_state, self.config)
        loss = None if labels is None else masked_cross_entropy(logits, as_tensor(labels))
        out = MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return out if return_dict else out.to_tuple()

    def construct(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                  inputs_embeds=None, labels=None, output_hidden_states=None, return_dict=True):
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_hidden_states)
        return self._result(out, labels, return_dict)


class BertForSequenceClassification(_BertBase):
    """BERT with a linear `classifier` on the pooler output: `logits` `[batch, num_labels]`.
    `labels` give HF's regression, single-label or multi-label loss by `config.problem_type`
    (see `msfx.modeling.sequence_classification_loss`)."""

    @classmethod
    def param_shapes(cls, config):
        return cls._body_shapes(config, with_pooler=True) | _linear_shapes("classifier", config.num_labels,
                                                                           config.hidden_size)

    def _logits(self, out: bert.BertOutput):
        pooled = dropout(out.pooler_output, self.encoder_spec.head_dropout)
        return _dense(pooled, self.params["classifier"])

    def _result(self, out: bert.BertOutput, labels, return_dict: bool):
        logits = self._logits(out)
        loss = None if labels is None else sequence_classification_loss(logits, as_tensor(labels, None), self.config)
        out = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return out if return_dict else out.to_tuple()

    def construct(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                  inputs_embeds=None, labels=None, output_hidden_states=None, return_dict=True):
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_hidden_states)
        return self._result(out, labels, return_dict)


class BertForTokenClassification(_BertBase):
    """BERT (no pooler) with a linear `classifier` on every token: `logits` `[batch, seq, num_labels]`;
    `labels` `[batch, seq]` give the mean cross-entropy over those not `-100` (HF's)."""

    @classmethod
    def param_shapes(cls, config):
        return cls._body_shapes(config) | _linear_shapes("classifier", config.num_labels, config.hidden_size)

    def _result(self, out: bert.BertOutput, labels, return_dict: bool):
        hidden = dropout(out.last_hidden_state, self.encoder_spec.head_dropout)
        logits = _dense(hidden, self.params["classifier"])
        loss = None if labels is None else masked_cross_entropy(logits, as_tensor(labels))
        out = TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return out if return_dict else out.to_tuple()

    def construct(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                  inputs_embeds=None, labels=None, output_hidden_states=None, return_dict=True):
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_hidden_states)
        return self._result(out, labels, return_dict)


class BertForQuestionAnswering(_BertBase):
    """BERT (no pooler) with the span head `qa_outputs`: `start_logits` and `end_logits` `[batch, seq]`;
    `start_positions` / `end_positions` `[batch]` give HF's loss (see
    `msfx.modeling.question_answering_loss`)."""

    @classmethod
    def param_shapes(cls, config):
        return cls._body_shapes(config) | _linear_shapes("qa_outputs", config.num_labels, config.hidden_size)

    def _span_input(self, hidden):
        """What `qa_outputs` reads (DistilBERT drops out first)."""
        return hidden

    def _result(self, out: bert.BertOutput, start_positions, end_positions, return_dict: bool):
        start, end = split_span_logits(_dense(self._span_input(out.last_hidden_state), self.params["qa_outputs"]))
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = question_answering_loss(start, end, as_tensor(start_positions), as_tensor(end_positions))
        out = QuestionAnsweringModelOutput(loss=loss, start_logits=start, end_logits=end,
                                           hidden_states=out.hidden_states)
        return out if return_dict else out.to_tuple()

    def construct(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                  inputs_embeds=None, start_positions=None, end_positions=None, output_hidden_states=None,
                  return_dict=True):
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_hidden_states)
        return self._result(out, start_positions, end_positions, return_dict)


# ---------------------------------------------------------------- RoBERTa, XLM-RoBERTa

class RobertaModel(BertModel):
    """HF's `RobertaModel`: `BertModel` with RoBERTa's positions (counted past padding from
    `pad_token_id + 1`)."""

    model_type = base_model_prefix = "roberta"


class RobertaForMaskedLM(BertForMaskedLM):
    """HF's `RobertaForMaskedLM`: its `lm_head` (dense, exact GELU, `layer_norm`, decoder tied to the
    word embeddings unless `tie_word_embeddings` is False)."""

    model_type = base_model_prefix = "roberta"


class RobertaForSequenceClassification(BertForSequenceClassification):
    """HF's `RobertaForSequenceClassification`: no pooler; `classifier.dense`, tanh and
    `classifier.out_proj` on the first token (`<s>`)."""

    model_type = base_model_prefix = "roberta"

    @classmethod
    def param_shapes(cls, config):
        h = config.hidden_size
        return (cls._body_shapes(config) | _linear_shapes("classifier.dense", h, h)
                | _linear_shapes("classifier.out_proj", config.num_labels, h))

    def _logits(self, out: bert.BertOutput):
        head, rate = self.params["classifier"], self.encoder_spec.head_dropout
        x = tanh(_dense(dropout(out.last_hidden_state[:, 0], rate), head["dense"]))
        return _dense(dropout(x, rate), head["out_proj"])


class RobertaForTokenClassification(BertForTokenClassification):
    """HF's `RobertaForTokenClassification` (see `BertForTokenClassification`)."""

    model_type = base_model_prefix = "roberta"


class RobertaForQuestionAnswering(BertForQuestionAnswering):
    """HF's `RobertaForQuestionAnswering` (see `BertForQuestionAnswering`)."""

    model_type = base_model_prefix = "roberta"


class XLMRobertaModel(RobertaModel):
    """HF's `XLMRobertaModel`: RoBERTa's architecture (`model_type` "xlm-roberta")."""

    model_type = "xlm-roberta"


class XLMRobertaForMaskedLM(RobertaForMaskedLM):
    """HF's `XLMRobertaForMaskedLM` (see `RobertaForMaskedLM`)."""

    model_type = "xlm-roberta"


class XLMRobertaForSequenceClassification(RobertaForSequenceClassification):
    """HF's `XLMRobertaForSequenceClassification` (see `RobertaForSequenceClassification`)."""

    model_type = "xlm-roberta"


class XLMRobertaForTokenClassification(RobertaForTokenClassification):
    """HF's `XLMRobertaForTokenClassification` (see `BertForTokenClassification`)."""

    model_type = "xlm-roberta"


class XLMRobertaForQuestionAnswering(RobertaForQuestionAnswering):
    """HF's `XLMRobertaForQuestionAnswering` (see `BertForQuestionAnswering`)."""

    model_type = "xlm-roberta"


# ---------------------------------------------------------------- DistilBERT (HF's argument order, no token types)

class DistilBertModel(BertModel):
    """HF's `DistilBertModel`: BERT's post-LN layers under DistilBERT's names, no token types, no pooler."""

    model_type = base_model_prefix = "distilbert"

    def construct(self, input_ids=None, attention_mask=None, inputs_embeds=None, position_ids=None,
                  output_hidden_states=None, return_dict=True):
        out = self._encode(input_ids, attention_mask, None, position_ids, inputs_embeds, output_hidden_states)
        return self._result(out, return_dict)


class DistilBertForMaskedLM(BertForMaskedLM):
    """HF's `DistilBertForMaskedLM`: `vocab_transform`, `activation`, `vocab_layer_norm`, and
    `vocab_projector` tied to the word embeddings unless `tie_word_embeddings` is False."""

    model_type = base_model_prefix = "distilbert"

    def construct(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, position_ids=None,
                  output_hidden_states=None, return_dict=True):
        out = self._encode(input_ids, attention_mask, None, position_ids, inputs_embeds, output_hidden_states)
        return self._result(out, labels, return_dict)


class DistilBertForSequenceClassification(BertForSequenceClassification):
    """HF's `DistilBertForSequenceClassification`: `pre_classifier`, ReLU, dropout
    (`seq_classif_dropout`) and `classifier` on the first token."""

    model_type = base_model_prefix = "distilbert"

    @classmethod
    def param_shapes(cls, config):
        h = config.hidden_size
        return (cls._body_shapes(config) | _linear_shapes("pre_classifier", h, h)
                | _linear_shapes("classifier", config.num_labels, h))

    def _logits(self, out: bert.BertOutput):
        x = ops.relu(_dense(out.last_hidden_state[:, 0], self.params["pre_classifier"]))
        return _dense(dropout(x, self.config.seq_classif_dropout), self.params["classifier"])

    def construct(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, position_ids=None,
                  output_hidden_states=None, return_dict=True):
        out = self._encode(input_ids, attention_mask, None, position_ids, inputs_embeds, output_hidden_states)
        return self._result(out, labels, return_dict)


class DistilBertForTokenClassification(BertForTokenClassification):
    """HF's `DistilBertForTokenClassification` (dropout `config.dropout`, then `classifier`)."""

    model_type = base_model_prefix = "distilbert"

    def construct(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, position_ids=None,
                  output_hidden_states=None, return_dict=True):
        out = self._encode(input_ids, attention_mask, None, position_ids, inputs_embeds, output_hidden_states)
        return self._result(out, labels, return_dict)


class DistilBertForQuestionAnswering(BertForQuestionAnswering):
    """HF's `DistilBertForQuestionAnswering` (dropout `qa_dropout`, then `qa_outputs`).

    Raises:
        ValueError: `config.num_labels` other than 2 (as HF).
    """

    model_type = base_model_prefix = "distilbert"

    def __init__(self, config, params=None):
        if config.num_labels != 2:
            raise ValueError(f"config.num_labels should be 2, but it is {config.num_labels}")
        super().__init__(config, params)

    def _span_input(self, hidden):
        return dropout(hidden, self.config.qa_dropout)

    def construct(self, input_ids=None, attention_mask=None, inputs_embeds=None, start_positions=None,
                  end_positions=None, position_ids=None, output_hidden_states=None, return_dict=True):
        out = self._encode(input_ids, attention_mask, None, position_ids, inputs_embeds, output_hidden_states)
        return self._result(out, start_positions, end_positions, return_dict)
