"""HF-named Llama classes: `LlamaModel`, `LlamaForCausalLM`, `LlamaForSequenceClassification`.

Each forwards to its `arch` module (`msfx.architectures.llama`; the Llama-like families' classes
subclass these: `family_classes`); see `transformers.models.llama.modeling_llama` for the
behaviour they reproduce. Arguments take HF 5.25's names and order; `cache` (or `past_key_values`)
and `use_cache` run HF's manual decode loop over an msfx `KVCache` (see `msfx.modeling.past_cache`).
"""
from __future__ import annotations

import functools

from msfx.architectures import llama
from msfx.generation import GenerationMixin
from msfx.layers.basic import linear
from msfx.layers.moe import load_balancing_loss
from msfx.modeling import (BaseModelOutputWithPast, CausalLMOutputWithPast, MoeCausalLMOutputWithPast, PreTrainedModel,
                           SequenceClassifierOutputWithPast, as_tensor, lm_logits_and_loss, last_token_logits,
                           past_cache, sequence_classification_loss, token_ids)


class _LlamaBase(PreTrainedModel):
    arch = llama
    model_type = llama.MODEL_TYPE

    def _backbone(self, input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states, cache=None,
                  use_cache=None) -> llama.DecoderOutput:
        """The decoder stack; its `cache` is the grown past cache (see `msfx.modeling.past_cache`) or
        this call's keys and values, or None when the call returns none."""
        cache, cache_position, returns_cache = past_cache(self.config, cache, use_cache,
                                                          input_ids if inputs_embeds is None else inputs_embeds)
        out = self.arch.model_forward(self.params, token_ids(input_ids, self.config.vocab_size),
                                      as_tensor(attention_mask), as_tensor(position_ids), cache, cache_position,
                                      inputs_embeds=inputs_embeds, config=self.config,
                                      output_hidden_states=bool(output_hidden_states), check_ids=False)
        return out if returns_cache else out._replace(cache=None)


class LlamaModel(_LlamaBase):
    """The bare decoder stack; outputs `last_hidden_state` `[batch, seq, hidden]`."""

    @classmethod
    def param_shapes(cls, config):
        return {k: v for k, v in cls.arch.param_shapes(config).items() if k.startswith(cls.base_model_prefix + ".")}

    def state_tree(self) -> dict:
        return self.params[self.base_model_prefix]  # HF saves the base model without its prefix

    def construct(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                  use_cache=None, output_hidden_states=None, return_dict=True):
        out = self._backbone(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states, cache,
                             use_cache)
        out = BaseModelOutputWithPast(last_hidden_state=out.last_hidden_state, cache=out.cache,
                                      hidden_states=out.hidden_states)
        return out if return_dict else out.to_tuple()


class LlamaForCausalLM(GenerationMixin, _LlamaBase):
    """Llama with its language-model head. `logits` `[batch, seq, vocab]`; `labels` `[batch, seq]`
    gives HF's shifted cross-entropy (`-100` ignored) as `loss`."""

    accepts_loss_kwargs = True  # `num_items_in_batch=` normalizes the loss (HF Trainer's gradient accumulation)

    def construct(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                  labels=None, use_cache=None, logits_to_keep: int = 0, output_hidden_states=None, return_dict=True,
                  num_items_in_batch=None):
        out = self._backbone(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states, cache,
                             use_cache)
        logits, loss = lm_logits_and_loss(self.arch, self.params, self.config, out.last_hidden_state, labels,
                                          logits_to_keep, num_items_in_batch)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)
        return out if return_dict else out.to_tuple()


class MoeForCausalLM(LlamaForCausalLM):
    """A mixture-of-experts family's `...ForCausalLM` (HF's Mixtral / Qwen3-MoE heads): as
    `LlamaForCausalLM`, and with `output_router_logits` (default `config.output_router_logits`)
    also each sparse layer's `router_logits` `[batch * seq, experts]` and the load-balancing
    `aux_loss`, added to `loss` times `config.router_aux_loss_coef` when `labels` are given."""

    def construct(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                  labels=None, use_cache=None, output_router_logits=None, logits_to_keep: int = 0,
                  output_hidden_states=None, return_dict=True, num_items_in_batch=None):
        out = self._backbone(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states, cache,
                             use_cache)
        logits, loss = lm_logits_and_loss(self.arch, self.params, self.config, out.last_hidden_state, labels,
                                          logits_to_keep, num_items_in_batch)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        aux_loss = router_logits = None
        if output_router_logits:
            router_logits = out.router_logits
            moe = llama.spec_of(self.config).moe
            aux_loss = load_balancing_loss(router_logits, moe.num_experts, moe.top_k, as_tensor(attention_mask))
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
        result = MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits, cache=out.cache,
                                           hidden_states=out.hidden_states, router_logits=router_logits)
        return result if return_dict else result.to_tuple()


class LlamaForSequenceClassification(_LlamaBase):
    """Llama with a linear `score` head read at each row's last non-padding token
    (`config.pad_token_id`); `logits` `[batch, num_labels]`. `labels` give HF's regression,
    single-label or multi-label loss by `config.problem_type`."""

    @classmethod
    def param_shapes(cls, config):
        shapes = {k: v for k, v in cls.arch.param_shapes(config).items() if k.startswith(cls.base_model_prefix + ".")}
        shapes["score.weight"] = (config.num_labels, config.hidden_size)
        return shapes

    def construct(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                  labels=None, use_cache=None, output_hidden_states=None, return_dict=True):
        out = self._backbone(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states, cache,
                             use_cache)
        logits = linear(out.last_hidden_state, self.params["score"]["weight"])
        pooled = last_token_logits(logits, input_ids, self.config.pad_token_id, self.config.vocab_size)
        loss = None if labels is None else sequence_classification_loss(pooled, as_tensor(labels, None), self.config)
        out = SequenceClassifierOutputWithPast(loss=loss, logits=pooled, cache=out.cache,
                                               hidden_states=out.hidden_states)
        return out if return_dict else out.to_tuple()


@functools.cache
def family_classes(family) -> dict[str, type]:
    """The HF-named classes of the Llama-like `family` (a `msfx.families.Family` with no `classes`
    module), by name: its `AutoModel`, `AutoModelForCausalLM` and `AutoModelForSequenceClassification`
    classes subclass Llama's (`MoeForCausalLM` for the causal LM with `family.moe_outputs`), over
    `family.arch`. Built once per family, so `isinstance` holds across calls."""
    causal = MoeForCausalLM if family.moe_outputs else LlamaForCausalLM
    bases = {"AutoModel": LlamaModel, "AutoModelForCausalLM": causal,
             "AutoModelForSequenceClassification": LlamaForSequenceClassification}
    classes = {}
    for auto, name in family.auto:
        doc = f"HF's `{name}`: as `{bases[auto].__name__}`, over `{family.core}` (`{family.model_type}`)."
        classes[name] = type(name, (bases[auto],), {"arch": family.arch, "model_type": family.model_type,
                                                    "base_model_prefix": family.base_prefix, "__doc__": doc,
                                                    "__module__": "msfx", "__qualname__": name})
    return classes
