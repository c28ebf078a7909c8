"""Qwen3-MoE (`transformers.models.qwen3_moe.modeling_qwen3_moe`) as pure functions.

Qwen3 with a sparse mixture of experts (`mlp.gate` router, `mlp.experts.N.{gate,up,down}_proj`
of `moe_intermediate_size`; top `num_experts_per_tok`, renormalized when `norm_topk_prob`; see
`msfx.layers.moe`) on every `decoder_sparse_step`-th layer not in `mlp_only_layers`, a dense
MLP elsewhere. Everything else is `msfx.architectures.llama`, switched by the `DecoderSpec`
registered here.
"""
from __future__ import annotations

from transformers import Qwen3MoeConfig

from msfx.architectures import llama
from msfx.architectures.llama import (TIED_KEYS, cache_lengths, forward, init_params, lm_head, model_forward,
                                      param_shapes, step_inputs)

MODEL_TYPE = "qwen3_moe"
CONFIG_CLASS = Qwen3MoeConfig
__all__ = ["CONFIG_CLASS", "MODEL_TYPE", "TIED_KEYS", "cache_lengths", "forward", "init_params", "lm_head", "load",
           "model_forward", "param_shapes", "step_inputs"]


def spec(config) -> llama.DecoderSpec:
    return llama.DecoderSpec(
        qkv_bias=config.attention_bias, o_bias=config.attention_bias, qk_norm=True,
        sliding_windows=llama.sliding_windows(config), moe="mlp",
        sparse_layers=tuple(i not in config.mlp_only_layers and config.num_experts > 0
                            and (i + 1) % config.decoder_sparse_step == 0 for i in range(config.num_hidden_layers)),
        num_experts=config.num_experts, top_k=config.num_experts_per_tok,
        expert_intermediate=config.moe_intermediate_size, normalize_top_k=config.norm_topk_prob)


llama.SPECS[MODEL_TYPE] = spec
load = llama.loader(__name__)
