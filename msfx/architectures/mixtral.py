"""Mixtral (`transformers.models.mixtral.modeling_mixtral`) as pure functions.

Mistral with a sparse mixture of experts in place of every MLP (`block_sparse_moe`: a router
`gate` and `num_local_experts` SwiGLU experts `w1` (gate), `w3` (up), `w2` (down); the top
`num_experts_per_tok` weights renormalized; see `msfx.layers.moe`). Everything else is
`msfx.architectures.llama`, switched by the `DecoderSpec` registered here.
"""
from __future__ import annotations

from transformers import MixtralConfig

from msfx.architectures import llama
from msfx.architectures.llama import (TIED_KEYS, cache_lengths, forward, init_params, lm_head, model_forward,
                                      param_shapes, step_inputs)

MODEL_TYPE = "mixtral"
CONFIG_CLASS = MixtralConfig
__all__ = ["CONFIG_CLASS", "MODEL_TYPE", "TIED_KEYS", "cache_lengths", "forward", "init_params", "lm_head", "load",
           "model_forward", "param_shapes", "step_inputs"]


def spec(config) -> llama.DecoderSpec:
    return llama.DecoderSpec(
        sliding_windows=llama.sliding_windows(config), moe="block_sparse_moe",
        sparse_layers=(True,) * config.num_hidden_layers, expert_names=("w1", "w3", "w2"),
        num_experts=config.num_local_experts, top_k=config.num_experts_per_tok,
        expert_intermediate=config.intermediate_size)


llama.SPECS[MODEL_TYPE] = spec
load = llama.loader(__name__)
