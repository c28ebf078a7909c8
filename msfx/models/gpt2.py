"""HF-named GPT-2 classes: `GPT2Model`, `GPT2LMHeadModel`, `GPT2ForSequenceClassification`.

Each forwards to `msfx.architectures.gpt2`; see `transformers.models.gpt2.modeling_gpt2` for the
behaviour they reproduce. The base model's keys carry HF's `transformer.` prefix
(`base_model_prefix`); a checkpoint saved from `GPT2Model` (without it) loads into every class.
Arguments take HF 5.25's names and order (`input_ids, cache, attention_mask, token_type_ids, ...`);
`cache` (or `past_key_values`) and `use_cache` run HF's manual decode loop over an msfx `KVCache`
(see `msfx.modeling.past_cache`).
"""
from __future__ import annotations


from msfx.architectures import gpt2
from msfx.generation import GenerationMixin
from msfx.layers.basic import linear
from msfx.modeling import (BaseModelOutputWithPast, CausalLMOutputWithPast, PreTrainedModel,
                           SequenceClassifierOutputWithPast, as_tensor, lm_logits_and_loss, last_token_logits,
                           past_cache, sequence_classification_loss, token_ids)


class _GPT2Base(PreTrainedModel):
    arch = gpt2
    model_type = gpt2.MODEL_TYPE
    base_model_prefix = gpt2.BASE_MODEL_PREFIX

    @classmethod
    def _base_shapes(cls, config) -> dict[str, tuple]:
        return {k: v for k, v in cls.arch.param_shapes(config).items() if k.startswith(cls.base_model_prefix + ".")}

    def _backbone(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, output_hidden_states,
                  cache, use_cache):
        """`(last_hidden_state, hidden_states, cache)`: the cache grown (see `msfx.modeling.past_cache`)
        or this call's keys and values, or None when the call returns none."""
        cache, cache_position, returns_cache = past_cache(self.config, cache, use_cache,
                                                          input_ids if inputs_embeds is None else inputs_embeds)
        # check_ids: the ids again (cheap) and, on the host, any given positions against n_positions
        hidden, states, cache = self.arch.model_forward(
            self.params, token_ids(input_ids, self.config.vocab_size), as_tensor(attention_mask),
            as_tensor(position_ids), cache, cache_position, inputs_embeds=inputs_embeds,
            token_type_ids=as_tensor(token_type_ids), config=self.config,
            output_hidden_states=bool(output_hidden_states), check_ids=True)
        return hidden, states, cache if returns_cache else None


class GPT2Model(_GPT2Base):
    """The bare transformer (`wte` + `wpe`, the blocks, `ln_f`); outputs `last_hidden_state`
    `[batch, seq, hidden]`, and with `output_hidden_states` the embeddings and every block's output
    (the last after `ln_f`). A longer input than `config.n_positions` raises ValueError."""

    @classmethod
    def param_shapes(cls, config):
        return cls._base_shapes(config)

    def state_tree(self) -> dict:
        return self.params["transformer"]  # HF saves the base model without the `transformer.` prefix

    def construct(self, input_ids=None, cache=None, attention_mask=None, token_type_ids=None, position_ids=None,
                  inputs_embeds=None, use_cache=None, output_hidden_states=None, return_dict=True):
        hidden, states, cache = self._backbone(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                               output_hidden_states, cache, use_cache)
        out = BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache, hidden_states=states)
        return out if return_dict else out.to_tuple()


class GPT2LMHeadModel(GenerationMixin, _GPT2Base):
    """GPT-2 with its language-model head (tied to `wte` unless `tie_word_embeddings=False`).
    `logits` `[batch, seq, vocab]`; `labels` `[batch, seq]` gives HF's shifted cross-entropy
    (`-100` ignored) as `loss`."""

    accepts_loss_kwargs = True  # `num_items_in_batch=` normalizes the loss (HF Trainer's gradient accumulation)
    _learned_positions = True  # `wpe` has `n_positions` rows: generation may not go past them

    def construct(self, input_ids=None, cache=None, attention_mask=None, token_type_ids=None, position_ids=None,
                  inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0,
                  output_hidden_states=None, return_dict=True, num_items_in_batch=None):
        hidden, states, cache = self._backbone(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                               output_hidden_states, cache, use_cache)
        logits, loss = lm_logits_and_loss(self.arch, self.params, self.config, hidden, labels, logits_to_keep,
                                          num_items_in_batch)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache, hidden_states=states)
        return out if return_dict else out.to_tuple()


class GPT2ForSequenceClassification(_GPT2Base):
    """GPT-2 with a linear `score` head (no bias) read at each row's last non-padding token
    (`config.pad_token_id`; the last token when it is None or with `inputs_embeds`); `logits`
    `[batch, num_labels]`. `labels` give HF's regression, single-label or multi-label loss by
    `config.problem_type`.

    Raises:
        ValueError: a batch of more than one row without `config.pad_token_id` (as HF).
    """

    @classmethod
    def param_shapes(cls, config):
        return cls._base_shapes(config) | {"score.weight": (config.num_labels, config.hidden_size)}

    def construct(self, input_ids=None, cache=None, attention_mask=None, token_type_ids=None, position_ids=None,
                  inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None, return_dict=True):
        hidden, states, cache = self._backbone(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                               output_hidden_states, cache, use_cache)
        logits = linear(hidden, self.params["score"]["weight"])
        pooled = last_token_logits(logits, input_ids, self.config.pad_token_id, self.config.vocab_size)
        loss = None if labels is None else sequence_classification_loss(pooled, as_tensor(labels, None), self.config)
        out = SequenceClassifierOutputWithPast(loss=loss, logits=pooled, cache=cache, hidden_states=states)
        return out if return_dict else out.to_tuple()

