"""Qwen2 / Qwen2.5 (`transformers.models.qwen2.modeling_qwen2`) as pure functions.

Llama with biases on the q/k/v projections (not o) and sliding-window attention on the layers
`config.layer_types` marks (from `use_sliding_window` and `max_window_layers`). Everything else
is `msfx.architectures.llama`, switched by the `DecoderSpec` of its record in
`msfx.families`.
"""
from __future__ import annotations

from msfx.architectures.llama import (cache_lengths, forward, init_params, lm_head, loader, model_forward, param_shapes,
                                      step_inputs)

MODEL_TYPE = "qwen2"
__all__ = ["MODEL_TYPE", "cache_lengths", "forward", "init_params", "lm_head", "load", "model_forward", "param_shapes",
           "step_inputs"]

load = loader(MODEL_TYPE)
