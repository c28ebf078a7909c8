"""Qwen3-MoE (`transformers.models.qwen3_moe.modeling_qwen3_moe`) as pure functions.

Qwen3 with a sparse mixture of experts (`mlp.gate` router, `mlp.experts.N.{gate,up,down}_proj`
of `moe_intermediate_size`; top `num_experts_per_tok`, renormalized when `norm_topk_prob`; see
`msfx.layers.moe`) on every `decoder_sparse_step`-th layer not in `mlp_only_layers`, a dense
MLP elsewhere. Everything else is `msfx.architectures.llama`, switched by the `DecoderSpec` of its
record in `msfx.families`.
"""
from __future__ import annotations

from msfx.architectures.llama import (cache_lengths, forward, init_params, lm_head, loader, model_forward, param_shapes,
                                      step_inputs)

MODEL_TYPE = "qwen3_moe"
__all__ = ["MODEL_TYPE", "cache_lengths", "forward", "init_params", "lm_head", "load", "model_forward", "param_shapes",
           "step_inputs"]

load = loader(MODEL_TYPE)
