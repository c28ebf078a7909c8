"""`DecoderSpec`: how a Llama-like family's decoder differs from Llama's, grouped by part
(attention, MLP, norms, rope, mixture of experts, module names); `msfx.architectures.llama` reads
only these switches. No model code here, so `msfx.families` imports it without the architectures."""
from __future__ import annotations

from typing import NamedTuple


class AttentionSpec(NamedTuple):
    qkv_bias: bool = False  # biases on q/k/v (Qwen2; Llama's `attention_bias` also on o)
    o_bias: bool = False
    # one fused projection: "blocks" holds q | k | v rows (Phi-3's `qkv_proj`), "heads" each head's
    # q | k | v rows in turn (GPT-NeoX's `query_key_value`); None: separate q, k, v projections
    fused_qkv: str | None = None
    # a norm on q and k before the rotation: RMSNorm `q_norm` / `k_norm` over each head's `head_dim`
    # ("head": Qwen3, Gemma 3) or over the whole projection before the split into heads
    # ("projection": OLMo2); LayerNorm `q_layernorm` / `k_layernorm` over each head ("head_layer":
    # Phi's `qk_layernorm`), or one without bias per head, `q_layernorm.norms.N` ("per_head_layer":
    # StableLM's); None: none
    qk_norm: str | None = None
    sliding_windows: tuple = ()  # per layer: attention window in cache slots, or None (Mistral, Qwen2)
    scale: float | None = None  # instead of head_dim ** -0.5 (Gemma's `query_pre_attn_scalar`)
    softcap: float | None = None  # `cap * tanh(scores / cap)` (Gemma 2)
    clip_qkv: float | None = None  # q, k, v clamped to [-clip, clip] after the projections (OLMo)


class MLPSpec(NamedTuple):
    bias: bool = False
    # a plain `down(act(up(x)))` with these (up, down) projection names instead of the gated MLP:
    # StarCoder2's ("c_fc", "c_proj"), Phi's ("fc1", "fc2"), GPT-NeoX's ("dense_h_to_4h", "dense_4h_to_h")
    plain: tuple | None = None
    fused_gate_up: bool = False  # one `gate_up_proj` with gate | up rows (Phi-3)
    hidden_act: str | None = None  # instead of `config.hidden_act` (Gemma's `hidden_activation`)


class NormSpec(NamedTuple):
    # "pre": on the attention and MLP inputs (Llama); "post": on their outputs instead (OLMo2);
    # "sandwich": on both, with a pre-MLP norm of its own (Gemma);
    # "parallel": attention and MLP both read the layer input, normed by `input_layernorm` and
    # `post_attention_layernorm`, and add to it together (GPT-NeoX); "shared": the same, one
    # `input_layernorm` feeding both (Phi, StableLM's `use_parallel_residual`)
    placement: str = "pre"
    offset: float = 0.0  # RMSNorm scales by `offset + weight` (Gemma: 1)
    # "rms": RMSNorm; "layer": LayerNorm with weight and bias (StarCoder2, Phi, GPT-NeoX, StableLM);
    # "parameter_free": LayerNorm with neither (OLMo)
    kind: str = "rms"
    eps: float | None = None  # instead of `config.rms_norm_eps`
    scale_in_float32: bool = False  # RMSNorm scales before the cast back, one rounding (OLMo2)
    # "parallel" / "shared": attention and MLP outputs summed before the residual is added (GPT-NeoX,
    # Phi; StableLM adds the attention output first), HF's rounding order in half precision
    branches_first: bool = False


class ModuleNames(NamedTuple):
    """The checkpoint's module names where they are not Llama's (`model.layers.N.self_attn.o_proj`);
    the base model's prefix is the family's `base_prefix` (GPT-NeoX: `gpt_neox`)."""

    embed: str = "embed_tokens"
    attention: str = "self_attn"
    qkv: str = "qkv_proj"  # the fused projection (`AttentionSpec.fused_qkv`)
    o: str = "o_proj"
    final_norm: str = "norm"
    lm_head: str = "lm_head"  # outside the base model (GPT-NeoX: "embed_out")


class RopeSpec(NamedTuple):
    partial_default: bool = False  # the default rope honours `partial_rotary_factor` (Phi-3)
    layers: tuple = ()  # per layer: False where the layer skips rotary (SmolLM3's `no_rope_layers`)
    by_layer_type: bool = False  # `rope_parameters` per layer type (Gemma 3)
    float32_tables: bool = False  # cos/sin stay float32: q, k rotate in float32, rounded once (OLMo, OLMo2)


class MoESpec(NamedTuple):
    """A sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE); see `msfx.layers.moe`."""

    module: str  # the sparse MLP's module name: "block_sparse_moe" or "mlp"
    sparse_layers: tuple  # per layer: True where the MLP is the sparse one
    num_experts: int
    top_k: int
    intermediate: int
    expert_names: tuple = ("gate_proj", "up_proj", "down_proj")  # each expert's gate, up, down
    normalize_top_k: bool = True
    float32_weights: bool = False  # routing weights stay float32 in the experts' products (Mixtral)


class DecoderSpec(NamedTuple):
    """How a Llama-like family's decoder differs from Llama's (defaults: Llama's)."""

    attention: AttentionSpec = AttentionSpec()
    mlp: MLPSpec = MLPSpec()
    norms: NormSpec = NormSpec()
    rope: RopeSpec = RopeSpec()
    moe: MoESpec | None = None
    names: ModuleNames = ModuleNames()
    embed_scale: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    # Granite's `embedding_multiplier`, `residual_multiplier` (on the attention and MLP outputs)
    # and `logits_scaling` (the logits divided by it)
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    final_softcap: float | None = None  # on the logits (Gemma 2)
    lm_head_bias: bool = False  # Phi
    resid_pdrop: float = 0.0  # training dropout on the attention and MLP outputs (Phi-3)
    embed_pdrop: float = 0.0  # training dropout on the embeddings (Phi, StarCoder2, GPT-NeoX)


def sliding_windows(config) -> tuple:
    """Per-layer windows as HF 5.x sets them: `config.sliding_window` on the layers whose
    `layer_types` entry is "sliding_attention", or on every layer when the config has no
    `layer_types`; None (full attention) elsewhere."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    return tuple(window if kind == "sliding_attention" else None for kind in types)
