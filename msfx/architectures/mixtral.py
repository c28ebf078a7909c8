"""Mixtral (`transformers.models.mixtral.modeling_mixtral`) as pure functions.

Mistral with a sparse mixture of experts in place of every MLP (`block_sparse_moe`: a router
`gate` and `num_local_experts` SwiGLU experts `w1` (gate), `w3` (up), `w2` (down); the top
`num_experts_per_tok` weights renormalized; see `msfx.layers.moe`). Everything else is
`msfx.architectures.llama`, switched by the `DecoderSpec` of its record in
`msfx.families`.
"""
from __future__ import annotations

from msfx.architectures.llama import (cache_lengths, forward, init_params, lm_head, loader, model_forward, param_shapes,
                                      step_inputs)

MODEL_TYPE = "mixtral"
__all__ = ["MODEL_TYPE", "cache_lengths", "forward", "init_params", "lm_head", "load", "model_forward", "param_shapes",
           "step_inputs"]

load = loader(MODEL_TYPE)
