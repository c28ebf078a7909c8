"""Gemma 2 (`transformers.models.gemma2.modeling_gemma2`) as pure functions.

Llama with Gemma's RMSNorm (`1 + weight`), embeddings scaled by sqrt(hidden_size), norms on
the attention and MLP outputs as well as their inputs, `query_pre_attn_scalar` for the
attention scale, tanh soft-capping of attention scores and final logits, the tanh-GELU
`hidden_activation`, and sliding-window attention on alternate layers (`layer_types`).
Everything else is `msfx.architectures.llama`, switched by the `DecoderSpec` of its record in
`msfx.families`.
"""
from __future__ import annotations

from msfx.architectures.llama import (cache_lengths, forward, init_params, lm_head, loader, model_forward, param_shapes,
                                      step_inputs)

MODEL_TYPE = "gemma2"
__all__ = ["MODEL_TYPE", "cache_lengths", "forward", "init_params", "lm_head", "load", "model_forward", "param_shapes",
           "step_inputs"]

load = loader(MODEL_TYPE)
