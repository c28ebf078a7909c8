"""Qwen3 (`transformers.models.qwen3.modeling_qwen3`) as pure functions.

Llama with a per-head RMSNorm on q and k before the rotation (`q_norm`, `k_norm`),
`attention_bias` on all four projections, and sliding windows as Qwen2. Everything else is
`msfx.architectures.llama`, switched by the `DecoderSpec` of its record in
`msfx.families`.
"""
from __future__ import annotations

from msfx.architectures.llama import (cache_lengths, forward, init_params, lm_head, loader, model_forward, param_shapes,
                                      step_inputs)

MODEL_TYPE = "qwen3"
__all__ = ["MODEL_TYPE", "cache_lengths", "forward", "init_params", "lm_head", "load", "model_forward", "param_shapes",
           "step_inputs"]

load = loader(MODEL_TYPE)
