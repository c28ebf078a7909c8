"""Mistral (`transformers.models.mistral.modeling_mistral`) as pure functions.

Llama with sliding-window attention on every layer (`config.sliding_window` cache slots; None:
full attention). Everything else is `msfx.architectures.llama`, switched by the `DecoderSpec` of its
record in `msfx.families`.
"""
from __future__ import annotations

from msfx.architectures.llama import (cache_lengths, forward, init_params, lm_head, loader, model_forward, param_shapes,
                                      step_inputs)

MODEL_TYPE = "mistral"
__all__ = ["MODEL_TYPE", "cache_lengths", "forward", "init_params", "lm_head", "load", "model_forward", "param_shapes",
           "step_inputs"]

load = loader(MODEL_TYPE)
