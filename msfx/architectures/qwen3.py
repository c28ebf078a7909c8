"""Qwen3 (`transformers.models.qwen3.modeling_qwen3`) as pure functions.

Llama with a per-head RMSNorm on q and k before the rotation (`q_norm`, `k_norm`),
`attention_bias` on all four projections, and sliding windows as Qwen2. Everything else is
`msfx.architectures.llama`, switched by the `DecoderSpec` registered here.
"""
from __future__ import annotations

from transformers import Qwen3Config

from msfx.architectures import llama
from msfx.architectures.llama import (TIED_KEYS, cache_lengths, forward, init_params, lm_head, model_forward,
                                      param_shapes, step_inputs)

MODEL_TYPE = "qwen3"
CONFIG_CLASS = Qwen3Config
__all__ = ["CONFIG_CLASS", "MODEL_TYPE", "TIED_KEYS", "cache_lengths", "forward", "init_params", "lm_head", "load",
           "model_forward", "param_shapes", "step_inputs"]


def spec(config) -> llama.DecoderSpec:
    return llama.DecoderSpec(qkv_bias=config.attention_bias, o_bias=config.attention_bias,
                             qk_norm=True, sliding_windows=llama.sliding_windows(config))


llama.SPECS[MODEL_TYPE] = spec
load = llama.loader(__name__)
