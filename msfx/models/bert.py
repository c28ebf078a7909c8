"""HF-named BERT classes: `BertModel`, `BertForMaskedLM`, `BertForSequenceClassification`.

Each forwards to `msfx.architectures.bert`; see `transformers.models.bert.modeling_bert` for the
behaviour they reproduce (dropout only in training: `msfx.layers.dropout`).
"""
from __future__ import annotations


from msfx.architectures import bert
from msfx.layers.basic import linear
from msfx.layers.dropout import dropout
from msfx.modeling import (BaseModelOutputWithPooling, MaskedLMOutput, PreTrainedModel, SequenceClassifierOutput,
                           as_tensor, masked_cross_entropy, sequence_classification_loss)


class _BertBase(PreTrainedModel):
    arch = bert
    model_type = bert.MODEL_TYPE
    base_model_prefix = bert.PREFIX

    def _encode(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                output_hidden_states) -> bert.BertOutput:
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return self.arch.model_forward(self.params, as_tensor(input_ids), as_tensor(attention_mask),
                                       as_tensor(token_type_ids), as_tensor(position_ids), config=self.config,
                                       inputs_embeds=inputs_embeds, output_hidden_states=bool(output_hidden_states))


class BertModel(_BertBase):
    """The encoder with its pooler: `last_hidden_state` `[batch, seq, hidden]`, `pooler_output`
    `[batch, hidden]` (tanh dense on [CLS]), `hidden_states` with `output_hidden_states=True`.

    Inputs (arrays, lists or Tensors): `input_ids` `[batch, seq]`, `attention_mask` `[batch, seq]`
    (1 real, 0 padding), `token_type_ids` (default zeros), `position_ids` (default `0..seq-1`).
    Raises ValueError on bad inputs (see `msfx.architectures.bert.model_forward`).
    """

    def state_tree(self) -> dict:
        return self.params["bert"]  # HF saves the base model without the `bert.` prefix

    def construct(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                  inputs_embeds=None, output_hidden_states=None, return_dict=True):
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_hidden_states)
        out = BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=out.pooler_output,
                                         hidden_states=out.hidden_states)
        return out if return_dict else out.to_tuple()


class BertForMaskedLM(_BertBase):
    """BERT with its masked-language-model head (no pooler, as HF): `logits` `[batch, seq, vocab]`;
    `labels` `[batch, seq]` give the mean cross-entropy over positions not labelled `-100` as `loss`.
    The decoder is tied to the word embeddings unless `config.tie_word_embeddings` is False."""

    @classmethod
    def param_shapes(cls, config):
        return cls.arch.param_shapes(config, with_pooler=False, with_mlm_head=True)

    def construct(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                  inputs_embeds=None, labels=None, output_hidden_states=None, return_dict=True):
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_hidden_states)
        logits = self.arch.mlm_head(self.params, out.last_hidden_state, self.config)
        loss = None if labels is None else masked_cross_entropy(logits, as_tensor(labels))
        out = MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return out if return_dict else out.to_tuple()


class BertForSequenceClassification(_BertBase):
    """BERT with a linear `classifier` on the pooler output: `logits` `[batch, num_labels]`.
    `labels` give HF's regression, single-label or multi-label loss by `config.problem_type`
    (see `msfx.modeling.sequence_classification_loss`)."""

    @classmethod
    def param_shapes(cls, config):
        return cls.arch.param_shapes(config) | {"classifier.weight": (config.num_labels, config.hidden_size),
                                                "classifier.bias": (config.num_labels,)}

    def construct(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                  inputs_embeds=None, labels=None, output_hidden_states=None, return_dict=True):
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_hidden_states)
        head, rate = self.params["classifier"], self.config.classifier_dropout
        pooled = dropout(out.pooler_output, self.config.hidden_dropout_prob if rate is None else rate)
        logits = linear(pooled, head["weight"], head["bias"])
        loss = None if labels is None else sequence_classification_loss(logits, as_tensor(labels, None), self.config)
        out = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return out if return_dict else out.to_tuple()

