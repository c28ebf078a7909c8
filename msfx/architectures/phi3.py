"""Phi-3 (`transformers.models.phi3.modeling_phi3`) as pure functions.

Llama with fused projections (`qkv_proj`: q | k | v rows; `gate_up_proj`: gate | up rows),
partial rotary and longrope scaling from `rope_parameters`, and `config.sliding_window`.
Everything else is `msfx.architectures.llama`, switched by the `DecoderSpec` registered here.
"""
from __future__ import annotations

from transformers import Phi3Config

from msfx.architectures import llama
from msfx.architectures.llama import (TIED_KEYS, cache_lengths, forward, init_params, lm_head, model_forward,
                                      param_shapes, step_inputs)
from msfx.layers.rotary import PARTIAL_DEFAULT_ROPE

MODEL_TYPE = "phi3"
CONFIG_CLASS = Phi3Config
__all__ = ["CONFIG_CLASS", "MODEL_TYPE", "TIED_KEYS", "cache_lengths", "cache_refill_length", "forward", "init_params",
           "lm_head", "load", "model_forward", "param_shapes", "step_inputs"]


def cache_refill_length(config) -> int:
    """The cached tokens at which generation recomputes the whole cache with the next token: HF's
    `Phi3ForCausalLM.prepare_inputs_for_generation` drops its cache when the sequence reaches
    `original_max_position_embeddings + 1` tokens, so that keys rotated with LongRoPE's short factors
    are rotated again (with the long ones once a position passes that length)."""
    return config.original_max_position_embeddings


def spec(config) -> llama.DecoderSpec:
    return llama.DecoderSpec(fused_projections=True, sliding_windows=llama.sliding_windows(config),
                             resid_pdrop=config.resid_pdrop)


llama.SPECS[MODEL_TYPE] = spec
PARTIAL_DEFAULT_ROPE.add(MODEL_TYPE)  # Phi-3's default rope honours `partial_rotary_factor`
load = llama.loader(__name__)
