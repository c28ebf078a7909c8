"""Phi-3 (`transformers.models.phi3.modeling_phi3`) as pure functions.

Llama with fused projections (`qkv_proj`: q | k | v rows; `gate_up_proj`: gate | up rows),
partial rotary and longrope scaling from `rope_parameters`, and `config.sliding_window`.
Everything else is `msfx.architectures.llama`, switched by the `DecoderSpec` of its record in
`msfx.families`.
"""
from __future__ import annotations

from msfx.architectures.llama import (cache_lengths, forward, init_params, lm_head, loader, model_forward, param_shapes,
                                      step_inputs)

MODEL_TYPE = "phi3"
__all__ = ["MODEL_TYPE", "cache_lengths", "forward", "init_params", "lm_head", "load", "model_forward", "param_shapes",
           "step_inputs"]

load = loader(MODEL_TYPE)
