"""Mistral (`transformers.models.mistral.modeling_mistral`) as pure functions.

Llama with sliding-window attention on every layer (`config.sliding_window` cache slots; None:
full attention). Everything else is `msfx.architectures.llama`, switched by the `DecoderSpec`
registered here.
"""
from __future__ import annotations

from transformers import MistralConfig

from msfx.architectures import llama
from msfx.architectures.llama import (TIED_KEYS, cache_lengths, forward, init_params, lm_head, model_forward,
                                      param_shapes, step_inputs)

MODEL_TYPE = "mistral"
CONFIG_CLASS = MistralConfig
__all__ = ["CONFIG_CLASS", "MODEL_TYPE", "TIED_KEYS", "cache_lengths", "forward", "init_params", "lm_head", "load",
           "model_forward", "param_shapes", "step_inputs"]


def spec(config) -> llama.DecoderSpec:
    return llama.DecoderSpec(sliding_windows=llama.sliding_windows(config))


llama.SPECS[MODEL_TYPE] = spec
load = llama.loader(__name__)
