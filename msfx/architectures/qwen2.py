"""Qwen2 / Qwen2.5 (`transformers.models.qwen2.modeling_qwen2`) as pure functions.

Llama with biases on the q/k/v projections (not o) and sliding-window attention on the layers
`config.layer_types` marks (from `use_sliding_window` and `max_window_layers`). Everything else
is `msfx.architectures.llama`, switched by the `DecoderSpec` registered here.
"""
from __future__ import annotations

from transformers import Qwen2Config

from msfx.architectures import llama
from msfx.architectures.llama import (TIED_KEYS, cache_lengths, forward, init_params, lm_head, model_forward,
                                      param_shapes, step_inputs)

MODEL_TYPE = "qwen2"
CONFIG_CLASS = Qwen2Config
__all__ = ["CONFIG_CLASS", "MODEL_TYPE", "TIED_KEYS", "cache_lengths", "forward", "init_params", "lm_head", "load",
           "model_forward", "param_shapes", "step_inputs"]


def spec(config) -> llama.DecoderSpec:
    return llama.DecoderSpec(qkv_bias=True, sliding_windows=llama.sliding_windows(config))


llama.SPECS[MODEL_TYPE] = spec
load = llama.loader(__name__)
