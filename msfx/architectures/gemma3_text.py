"""Gemma 3's text model (`gemma3_text`, `transformers.models.gemma3.modeling_gemma3`) as pure functions.

Gemma 2's decoder (see `msfx.architectures.gemma2`) plus a per-head RMSNorm on q and k, and
rotary parameters per layer type (`rope_parameters["sliding_attention"]` for the local layers,
`["full_attention"]` for the global ones); soft-capping only where the config sets it.
Everything else is `msfx.architectures.llama`, switched by the `DecoderSpec` registered here.
"""
from __future__ import annotations

from transformers import Gemma3TextConfig

from msfx.architectures import gemma2, llama
from msfx.architectures.llama import (TIED_KEYS, cache_lengths, forward, init_params, lm_head, model_forward,
                                      param_shapes, step_inputs)

MODEL_TYPE = "gemma3_text"
CONFIG_CLASS = Gemma3TextConfig
__all__ = ["CONFIG_CLASS", "MODEL_TYPE", "TIED_KEYS", "cache_lengths", "forward", "init_params", "lm_head", "load",
           "model_forward", "param_shapes", "step_inputs"]


def spec(config) -> llama.DecoderSpec:
    return gemma2.spec(config)._replace(qk_norm=True, rope_by_layer_type=True)


llama.SPECS[MODEL_TYPE] = spec
load = llama.loader(__name__)
