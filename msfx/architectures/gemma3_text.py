"""Gemma 3's text model (`gemma3_text`, `transformers.models.gemma3.modeling_gemma3`) as pure functions.

Gemma 2's decoder (see `msfx.architectures.gemma2`) plus a per-head RMSNorm on q and k, and
rotary parameters per layer type (`rope_parameters["sliding_attention"]` for the local layers,
`["full_attention"]` for the global ones); soft-capping only where the config sets it.
Everything else is `msfx.architectures.llama`, switched by the `DecoderSpec` of its record in
`msfx.families`.
"""
from __future__ import annotations

from msfx.architectures.llama import (cache_lengths, forward, init_params, lm_head, loader, model_forward, param_shapes,
                                      step_inputs)

MODEL_TYPE = "gemma3_text"
__all__ = ["MODEL_TYPE", "cache_lengths", "forward", "init_params", "lm_head", "load", "model_forward", "param_shapes",
           "step_inputs"]

load = loader(MODEL_TYPE)
