"""`DecoderSpec`: how a Llama-like family's decoder differs from Llama's (the switches
`msfx.architectures.llama` reads), and the helpers the family records in `msfx.families` build
theirs with. No model code here, so `msfx.families` imports it without the architectures."""
from __future__ import annotations

from typing import NamedTuple


class DecoderSpec(NamedTuple):
    """How a Llama-like family's decoder differs from Llama's."""

    qkv_bias: bool = False  # biases on q/k/v (Qwen2; Llama's `attention_bias` also on o)
    o_bias: bool = False
    mlp_bias: bool = False
    # RMSNorm on q and k before the rotation: "head" over each head's `head_dim` (Qwen3, Gemma 3),
    # "projection" over the whole projection before the split into heads (OLMo2), None: none
    qk_norm: str | None = None
    fused_projections: bool = False  # `qkv_proj` and `gate_up_proj` (Phi-3)
    sliding_windows: tuple = ()  # per layer: attention window in cache slots, or None (Mistral, Qwen2)
    partial_rotary_default: bool = False  # the default rope honours `partial_rotary_factor` (Phi-3)
    rotary_layers: tuple = ()  # per layer: False where the layer skips rotary (SmolLM3's `no_rope_layers`)
    post_norms: bool = False  # norms on the attention and MLP outputs instead of their inputs (OLMo2)
    # Gemma 2 / 3:
    norm_offset: float = 0.0  # RMSNorm scales by `offset + weight`
    embed_scale: bool = False  # embeddings times sqrt(hidden_size)
    sandwich_norms: bool = False  # attention and MLP outputs normed too; a pre-MLP norm of its own
    attn_scale: float | None = None  # instead of head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    hidden_act: str | None = None  # instead of `config.hidden_act`
    rope_by_layer_type: bool = False  # `rope_parameters` per layer type (Gemma 3)
    # sparse mixture of experts (Mixtral, Qwen3-MoE): see `msfx.layers.moe`
    moe: str | None = None  # the sparse MLP's module name: "block_sparse_moe" or "mlp"
    sparse_layers: tuple = ()  # per layer: True where the MLP is the sparse one
    expert_names: tuple = ("gate_proj", "up_proj", "down_proj")  # each expert's gate, up, down
    num_experts: int = 0
    top_k: int = 0
    expert_intermediate: int = 0
    normalize_top_k: bool = True
    resid_pdrop: float = 0.0  # training dropout on the attention and MLP outputs (Phi-3)


def sliding_windows(config) -> tuple:
    """Per-layer windows as HF 5.x sets them: `config.sliding_window` on the layers whose
    `layer_types` entry is "sliding_attention", or on every layer when the config has no
    `layer_types`; None (full attention) elsewhere."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    return tuple(window if kind == "sliding_attention" else None for kind in types)
