"""Gemma 2 (`transformers.models.gemma2.modeling_gemma2`) as pure functions.

Llama with Gemma's RMSNorm (`1 + weight`), embeddings scaled by sqrt(hidden_size), norms on
the attention and MLP outputs as well as their inputs, `query_pre_attn_scalar` for the
attention scale, tanh soft-capping of attention scores and final logits, the tanh-GELU
`hidden_activation`, and sliding-window attention on alternate layers (`layer_types`).
Everything else is `msfx.architectures.llama`, switched by the `DecoderSpec` registered here.
"""
from __future__ import annotations

from transformers import Gemma2Config

from msfx.architectures import llama
from msfx.architectures.llama import (TIED_KEYS, cache_lengths, forward, init_params, lm_head, model_forward,
                                      param_shapes, step_inputs)

MODEL_TYPE = "gemma2"
CONFIG_CLASS = Gemma2Config
__all__ = ["CONFIG_CLASS", "MODEL_TYPE", "TIED_KEYS", "cache_lengths", "forward", "init_params", "lm_head", "load",
           "model_forward", "param_shapes", "step_inputs"]


def spec(config) -> llama.DecoderSpec:
    return llama.DecoderSpec(
        qkv_bias=config.attention_bias, o_bias=config.attention_bias, sliding_windows=llama.sliding_windows(config),
        norm_offset=1.0, embed_scale=True, sandwich_norms=True, attn_scale=config.query_pre_attn_scalar ** -0.5,
        attn_softcap=config.attn_logit_softcapping, final_softcap=config.final_logit_softcapping,
        hidden_act=config.hidden_activation)


llama.SPECS[MODEL_TYPE] = spec
load = llama.loader(__name__)
