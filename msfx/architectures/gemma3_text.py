"""Gemma 3's text model (`gemma3_text`, `transformers.models.gemma3.modeling_gemma3`) as pure functions.

Gemma 2's decoder (see `msfx.architectures.gemma2`) plus a per-head RMSNorm on q and k, and
rotary parameters per layer type (`rope_parameters["sliding_attention"]` for the local layers,
`["full_attention"]` for the global ones); soft-capping only where the config sets it.
Everything else is `msfx.architectures.llama`, switched by the `DecoderSpec` registered here.
"""
from __future__ import annotations

from transformers import Gemma3TextConfig

from msfx.architectures import llama
from msfx.architectures.llama import cache_lengths, forward, init_params, lm_head, model_forward, param_shapes

MODEL_TYPE = "gemma3_text"
CONFIG_CLASS = Gemma3TextConfig
__all__ = ["CONFIG_CLASS", "MODEL_TYPE", "cache_lengths", "forward", "init_params", "lm_head", "load", "model_forward",
           "param_shapes"]


def spec(config) -> llama.DecoderSpec:
    return llama.DecoderSpec(
        qkv_bias=config.attention_bias, o_bias=config.attention_bias, sliding_windows=llama.sliding_windows(config),
        norm_offset=1.0, embed_scale=True, sandwich_norms=True, attn_scale=config.query_pre_attn_scalar ** -0.5,
        attn_softcap=config.attn_logit_softcapping, final_softcap=config.final_logit_softcapping,
        hidden_act=config.hidden_activation,
        qk_norm=True, rope_by_layer_type=True)


llama.SPECS[MODEL_TYPE] = spec
load = llama.loader(__name__)
