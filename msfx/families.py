"""The families msfx supports: one `Family` record per HF `model_type`, in one table (`FAMILIES`).

The Auto classes (`msfx.models.auto`), `msfx`'s exports, the README's model table
(`scripts/update_readme_table.py`) and the family tests iterate this table; the loaders and
generation read a family's rules from its record (`family(model_type)`). A family is found by its
`model_type`; its modules are imported by name when first used, and nothing registers itself at
import. A Llama-like family that differs from Llama by switches is one record here (its
`DecoderSpec`) plus one test row.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import transformers

from msfx.architectures.decoder_spec import (AttentionSpec, DecoderSpec, MLPSpec, ModuleNames, MoESpec, NormSpec,
                                            RopeSpec, sliding_windows)

_LLAMA_TIED = (("lm_head.weight", "model.embed_tokens.weight"),)
_CAUSAL = ("Model", "ForCausalLM", "ForSequenceClassification")
_CAUSAL_AUTO = ("AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification")


@dataclass(frozen=True)
class Family:
    """One HF `model_type`: where its code is and the rules the loaders and generation apply to it.

    `auto`: (Auto class name, msfx class name) pairs, HF's names (a test checks them against
    transformers' auto mappings). `classes`: the module defining those classes; None for a
    Llama-like family, whose classes `msfx.models.llama.family_classes` builds over `core`.
    `spec`: config -> `DecoderSpec` (Llama-like families only). `base_prefix`: HF's
    `base_model_prefix` (the default of `msfx.params.load_params`'s `prefix`). `tied_keys`: HF's
    `_tied_weights_keys` as (head, embedding) pairs, tied under `tie_word_embeddings`.
    `base_keys`: the base model's key prefixes where it has no single `base_prefix` (CLIP, T5).
    `optional_keys`: base-model key prefixes a checkpoint may lack (BERT's pooler).
    `keep_in_fp32`: HF's `_keep_in_fp32_modules` (kept float32 in a float16 load).
    `ring_cache`: sliding-window layers keep a ring buffer (`core.cache_lengths`).
    `cache_refill_length`: config -> the cached tokens at which generation recomputes the cache
    (Phi-3's switch to the long LongRoPE factors; see `msfx.decode.generate.DecodeState`).
    """

    model_type: str
    config_class: type
    auto: tuple[tuple[str, str], ...]
    core: str = "msfx.architectures.llama"
    classes: str | None = None
    spec: Callable[..., DecoderSpec] | None = None
    base_prefix: str = "model"
    base_keys: tuple[str, ...] = ()
    optional_keys: tuple[str, ...] = ()
    tied_keys: tuple[tuple[str, str], ...] = _LLAMA_TIED
    keep_in_fp32: tuple[str, ...] = ()
    ring_cache: bool = False
    cache_refill_length: Callable[..., int] | None = None
    moe_outputs: bool = False  # the causal LM returns router logits and the load-balancing loss

    @property
    def arch(self) -> ModuleType:
        """The functional core module (`param_shapes`, `forward`, `step_inputs`, ...)."""
        return importlib.import_module(self.core)

    def class_named(self, name: str) -> type:
        """The msfx class `name` of this family (one of `auto`'s)."""
        if self.classes is None:
            from msfx.models.llama import family_classes
            return family_classes(self)[name]
        return getattr(importlib.import_module(self.classes), name)

    def auto_class(self, auto: str) -> type | None:
        """The class the Auto class named `auto` picks for this family, or None."""
        name = dict(self.auto).get(auto)
        return None if name is None else self.class_named(name)


def _encoder_auto(prefix: str, text_encoding: bool = True) -> tuple[tuple[str, str], ...]:
    """An encoder family's HF classes `{prefix}Model`, `...ForMaskedLM`, `...ForSequenceClassification`,
    `...ForTokenClassification`, `...ForQuestionAnswering` by Auto class (`{prefix}Model` also for
    `AutoModelForTextEncoding` with `text_encoding`)."""
    return (("AutoModel", prefix + "Model"), ("AutoModelForMaskedLM", prefix + "ForMaskedLM"),
            ("AutoModelForSequenceClassification", prefix + "ForSequenceClassification"),
            ("AutoModelForTokenClassification", prefix + "ForTokenClassification"),
            ("AutoModelForQuestionAnswering", prefix + "ForQuestionAnswering"),
            *((("AutoModelForTextEncoding", prefix + "Model"),) if text_encoding else ()))


def _llama_like(model_type: str, config_class: type, spec: Callable[..., DecoderSpec], prefix: str,
                names: tuple[str, ...] | None = None, **rules) -> Family:
    """A Llama-like family: HF's `{prefix}Model`, `{prefix}ForCausalLM`,
    `{prefix}ForSequenceClassification` (or `names`, the first of them where HF has fewer) over
    `msfx.architectures.llama`."""
    names = names or tuple(prefix + suffix for suffix in _CAUSAL)
    return Family(model_type, config_class, tuple(zip(_CAUSAL_AUTO, names)), spec=spec, ring_cache=True, **rules)


def _biases(config) -> AttentionSpec:
    """Llama's `attention_bias`: biases on all four attention projections."""
    return AttentionSpec(qkv_bias=config.attention_bias, o_bias=config.attention_bias)


def llama_spec(config) -> DecoderSpec:
    return DecoderSpec(_biases(config), MLPSpec(bias=config.mlp_bias))


def qwen2_spec(config) -> DecoderSpec:
    """Biases on q/k/v (not o); sliding windows on the layers `layer_types` marks."""
    return DecoderSpec(AttentionSpec(qkv_bias=True, sliding_windows=sliding_windows(config)))


def qwen3_spec(config) -> DecoderSpec:
    """A per-head RMSNorm on q and k before the rotation; `attention_bias` on all four projections."""
    return DecoderSpec(_biases(config)._replace(qk_norm="head", sliding_windows=sliding_windows(config)))


def mistral_spec(config) -> DecoderSpec:
    return DecoderSpec(AttentionSpec(sliding_windows=sliding_windows(config)))


def phi_spec(config) -> DecoderSpec:
    """Phi-1/2: one LayerNorm feeding attention and MLP side by side, biases everywhere (the
    lm_head too), attention output `dense`, a plain `fc1` / `fc2` MLP, partial rotary; with
    `qk_layernorm` a LayerNorm on each head's q and k."""
    attention = AttentionSpec(qkv_bias=True, o_bias=True, qk_norm="head_layer" if config.qk_layernorm else None)
    return DecoderSpec(attention, MLPSpec(bias=True, plain=("fc1", "fc2")),
                       NormSpec("shared", kind="layer", eps=config.layer_norm_eps, branches_first=True),
                       RopeSpec(partial_default=True),
                       names=ModuleNames(o="dense", final_norm="final_layernorm"), lm_head_bias=True,
                       resid_pdrop=config.resid_pdrop, embed_pdrop=config.embd_pdrop)


def phi3_spec(config) -> DecoderSpec:
    """Fused `qkv_proj` (q | k | v rows) and `gate_up_proj` (gate | up rows), partial rotary."""
    return DecoderSpec(AttentionSpec(fused_qkv="blocks", sliding_windows=sliding_windows(config)),
                       MLPSpec(fused_gate_up=True), rope=RopeSpec(partial_default=True),
                       resid_pdrop=config.resid_pdrop)


def phi3_refill_length(config) -> int:
    """HF's `Phi3ForCausalLM.prepare_inputs_for_generation` drops its cache when the sequence
    reaches `original_max_position_embeddings + 1` tokens, so that keys rotated with LongRoPE's
    short factors are rotated again (with the long ones once a position passes that length)."""
    return config.original_max_position_embeddings


def gemma_spec(config) -> DecoderSpec:
    """Gemma's RMSNorm (`1 + weight`) and embeddings scaled by `sqrt(hidden_size)`."""
    return DecoderSpec(_biases(config), norms=NormSpec(offset=1.0), embed_scale=True)


def gemma2_spec(config) -> DecoderSpec:
    """Gemma's RMSNorm (`1 + weight`), scaled embeddings, sandwich norms, `query_pre_attn_scalar`,
    tanh soft-capping, the tanh-GELU `hidden_activation`."""
    attention = _biases(config)._replace(sliding_windows=sliding_windows(config),
                                         scale=config.query_pre_attn_scalar ** -0.5,
                                         softcap=config.attn_logit_softcapping)
    return DecoderSpec(attention, MLPSpec(hidden_act=config.hidden_activation), NormSpec("sandwich", 1.0),
                       embed_scale=True, final_softcap=config.final_logit_softcapping)


def gemma3_spec(config) -> DecoderSpec:
    """Gemma 2's, plus a per-head RMSNorm on q and k and rotary parameters per layer type."""
    spec = gemma2_spec(config)
    return spec._replace(attention=spec.attention._replace(qk_norm="head"), rope=RopeSpec(by_layer_type=True))


def granite_spec(config) -> DecoderSpec:
    """Llama with `attention_multiplier` as the attention scale, the embeddings times
    `embedding_multiplier`, the residual branches times `residual_multiplier`, the logits divided by
    `logits_scaling`."""
    return llama_spec(config)._replace(
        attention=_biases(config)._replace(scale=config.attention_multiplier),
        embedding_multiplier=config.embedding_multiplier, residual_multiplier=config.residual_multiplier,
        logits_scaling=config.logits_scaling)


def gpt_neox_spec(config) -> DecoderSpec:
    """LayerNorms, one `attention.query_key_value` holding each head's q | k | v, a plain MLP,
    partial rotary; with `use_parallel_residual`, attention and MLP side by side."""
    return DecoderSpec(AttentionSpec(qkv_bias=config.attention_bias, o_bias=config.attention_bias, fused_qkv="heads"),
                       MLPSpec(bias=True, plain=("dense_h_to_4h", "dense_4h_to_h")),
                       NormSpec("parallel" if config.use_parallel_residual else "pre", kind="layer",
                                eps=config.layer_norm_eps, branches_first=True),
                       RopeSpec(partial_default=True),
                       names=ModuleNames("embed_in", "attention", "query_key_value", "dense", "final_layer_norm",
                                         "embed_out"),
                       resid_pdrop=config.hidden_dropout, embed_pdrop=config.hidden_dropout)


def mixtral_spec(config) -> DecoderSpec:
    """Mistral with a sparse mixture of experts (`block_sparse_moe`, experts `w1`/`w3`/`w2`) on every layer."""
    return mistral_spec(config)._replace(moe=MoESpec(
        "block_sparse_moe", (True,) * config.num_hidden_layers, config.num_local_experts,
        config.num_experts_per_tok, config.intermediate_size, expert_names=("w1", "w3", "w2"), float32_weights=True))


def qwen3_moe_spec(config) -> DecoderSpec:
    """Qwen3 with a sparse MLP on every `decoder_sparse_step`-th layer not in `mlp_only_layers`."""
    sparse = tuple(i not in config.mlp_only_layers and config.num_experts > 0
                   and (i + 1) % config.decoder_sparse_step == 0 for i in range(config.num_hidden_layers))
    return qwen3_spec(config)._replace(moe=MoESpec(
        "mlp", sparse, config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
        normalize_top_k=config.norm_topk_prob))


def olmo_spec(config) -> DecoderSpec:
    """Parameter-free LayerNorms (eps 1e-5, HF's `OlmoLayerNorm`); q, k, v clamped to `clip_qkv`;
    float32 rotary tables."""
    return DecoderSpec(_biases(config)._replace(clip_qkv=config.clip_qkv),
                       norms=NormSpec(kind="parameter_free", eps=1e-5), rope=RopeSpec(float32_tables=True))


def olmo2_spec(config) -> DecoderSpec:
    """Norms on the attention and MLP outputs only, scaled in float32; RMSNorm on q and k over the
    whole projection; float32 rotary tables."""
    return DecoderSpec(_biases(config)._replace(qk_norm="projection"),
                       norms=NormSpec("post", scale_in_float32=True), rope=RopeSpec(float32_tables=True))


def smollm3_spec(config) -> DecoderSpec:
    """Rotary skipped on the layers `no_rope_layers` marks 0; windows only with `use_sliding_window`."""
    windows = sliding_windows(config) if config.use_sliding_window else ()
    return DecoderSpec(_biases(config)._replace(sliding_windows=windows), MLPSpec(bias=config.mlp_bias),
                       rope=RopeSpec(layers=tuple(bool(use) for use in config.no_rope_layers)))


def stablelm_spec(config) -> DecoderSpec:
    """LayerNorms, partial rotary, `use_qkv_bias`; with `use_parallel_residual` one norm feeding
    attention and MLP side by side (as Phi); with `qk_layernorm` each head's own LayerNorm on q and k
    (StableLM 2 12B). Training dropout: HF's `hidden_dropout` (on the MLP output only) is not applied."""
    return DecoderSpec(AttentionSpec(qkv_bias=config.use_qkv_bias,
                                     qk_norm="per_head_layer" if config.qk_layernorm else None),
                       norms=NormSpec("shared" if config.use_parallel_residual else "pre", kind="layer",
                                      eps=config.layer_norm_eps),
                       rope=RopeSpec(partial_default=True))


def starcoder2_spec(config) -> DecoderSpec:
    """LayerNorms (`norm_epsilon`), `use_bias` on every projection, a plain `c_fc` / `c_proj` MLP,
    sliding windows."""
    return DecoderSpec(AttentionSpec(qkv_bias=config.use_bias, o_bias=config.use_bias,
                                     sliding_windows=sliding_windows(config)),
                       MLPSpec(bias=config.use_bias, plain=("c_fc", "c_proj")),
                       NormSpec(kind="layer", eps=config.norm_epsilon),
                       resid_pdrop=config.residual_dropout, embed_pdrop=config.embedding_dropout)


_ALL = (
    Family("bart", transformers.BartConfig, (("AutoModel", "BartModel"),
                                             ("AutoModelForSeq2SeqLM", "BartForConditionalGeneration"),
                                             ("AutoModelForSequenceClassification", "BartForSequenceClassification"),
                                             ("AutoModelForQuestionAnswering", "BartForQuestionAnswering")),
           core="msfx.architectures.bart", classes="msfx.models.bart",
           # older checkpoints also store both stacks' embeddings tied to `model.shared.weight`
           optional_keys=("model.encoder.embed_tokens.", "model.decoder.embed_tokens."),
           tied_keys=(("lm_head.weight", "model.shared.weight"),)),
    Family("bert", transformers.BertConfig, (("AutoModel", "BertModel"), ("AutoModelForMaskedLM", "BertForMaskedLM"),
                                             ("AutoModelForSequenceClassification", "BertForSequenceClassification"),
                                             ("AutoModelForTokenClassification", "BertForTokenClassification"),
                                             ("AutoModelForQuestionAnswering", "BertForQuestionAnswering"),
                                             ("AutoModelForTextEncoding", "BertModel")),
           core="msfx.architectures.bert", classes="msfx.models.bert", base_prefix="bert",
           # HF's `add_pooling_layer`: `BertForMaskedLM` has no pooler, `BertModel` gets a fresh one
           optional_keys=("bert.pooler.",), tied_keys=()),
    Family("clip", transformers.CLIPConfig, (("AutoModel", "CLIPModel"),
                                             ("AutoModelForZeroShotImageClassification", "CLIPModel")),
           core="msfx.architectures.clip", classes="msfx.models.clip", base_prefix="clip",
           base_keys=("text_model.", "vision_model.", "text_projection.", "visual_projection.", "logit_scale"),
           tied_keys=()),
    Family("clip_text_model", transformers.CLIPTextConfig, (("AutoModel", "CLIPTextModel"),
                                                            ("AutoModelForTextEncoding", "CLIPTextModel")),
           core="msfx.architectures.clip", classes="msfx.models.clip", base_prefix="text_model", tied_keys=()),
    Family("clip_vision_model", transformers.CLIPVisionConfig, (("AutoModel", "CLIPVisionModel"),),
           core="msfx.architectures.clip", classes="msfx.models.clip", base_prefix="vision_model", tied_keys=()),
    Family("dinov2", transformers.Dinov2Config, (("AutoModel", "Dinov2Model"),
                                                 ("AutoModelForImageClassification", "Dinov2ForImageClassification")),
           core="msfx.architectures.dinov2", classes="msfx.models.dinov2", base_prefix="dinov2", tied_keys=()),
    Family("distilbert", transformers.DistilBertConfig, _encoder_auto("DistilBert"), core="msfx.architectures.bert",
           classes="msfx.models.bert", base_prefix="distilbert", tied_keys=()),
    Family("gpt2", transformers.GPT2Config, (("AutoModel", "GPT2Model"), ("AutoModelForCausalLM", "GPT2LMHeadModel"),
                                             ("AutoModelForSequenceClassification", "GPT2ForSequenceClassification")),
           core="msfx.architectures.gpt2", classes="msfx.models.gpt2", base_prefix="transformer",
           tied_keys=(("lm_head.weight", "transformer.wte.weight"),)),
    _llama_like("gemma", transformers.GemmaConfig, gemma_spec, "Gemma"),
    _llama_like("gemma2", transformers.Gemma2Config, gemma2_spec, "Gemma2"),
    _llama_like("gemma3_text", transformers.Gemma3TextConfig, gemma3_spec, "Gemma3",
                ("Gemma3TextModel", "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification")),
    _llama_like("gpt_neox", transformers.GPTNeoXConfig, gpt_neox_spec, "GPTNeoX", base_prefix="gpt_neox",
                tied_keys=(("embed_out.weight", "gpt_neox.embed_in.weight"),)),
    _llama_like("granite", transformers.GraniteConfig, granite_spec, "Granite", ("GraniteModel", "GraniteForCausalLM")),
    Family("llama", transformers.LlamaConfig, tuple(zip(_CAUSAL_AUTO, ("LlamaModel", "LlamaForCausalLM",
                                                                       "LlamaForSequenceClassification"))),
           classes="msfx.models.llama", spec=llama_spec, ring_cache=True),
    Family("llava", transformers.LlavaConfig, (("AutoModelForImageTextToText", "LlavaForConditionalGeneration"),),
           core="msfx.architectures.llava", classes="msfx.models.llava",
           base_prefix="", base_keys=("vision_tower.", "multi_modal_projector.", "language_model.model."),
           tied_keys=(("language_model.lm_head.weight", "language_model.model.embed_tokens.weight"),)),
    Family("mbart", transformers.MBartConfig, (("AutoModel", "MBartModel"),
                                               ("AutoModelForSeq2SeqLM", "MBartForConditionalGeneration"),
                                               ("AutoModelForSequenceClassification", "MBartForSequenceClassification"),
                                               ("AutoModelForQuestionAnswering", "MBartForQuestionAnswering")),
           core="msfx.architectures.bart", classes="msfx.models.bart",
           optional_keys=("model.encoder.embed_tokens.", "model.decoder.embed_tokens."),
           tied_keys=(("lm_head.weight", "model.shared.weight"),)),
    _llama_like("mistral", transformers.MistralConfig, mistral_spec, "Mistral"),
    _llama_like("mixtral", transformers.MixtralConfig, mixtral_spec, "Mixtral", moe_outputs=True),
    Family("modernbert", transformers.ModernBertConfig, _encoder_auto("ModernBert", text_encoding=False),
           core="msfx.architectures.modernbert", classes="msfx.models.modernbert", base_prefix="model", tied_keys=()),
    _llama_like("olmo", transformers.OlmoConfig, olmo_spec, "Olmo"),
    _llama_like("olmo2", transformers.Olmo2Config, olmo2_spec, "Olmo2"),
    _llama_like("phi", transformers.PhiConfig, phi_spec, "Phi"),
    _llama_like("phi3", transformers.Phi3Config, phi3_spec, "Phi3", cache_refill_length=phi3_refill_length),
    _llama_like("qwen2", transformers.Qwen2Config, qwen2_spec, "Qwen2"),
    _llama_like("qwen3", transformers.Qwen3Config, qwen3_spec, "Qwen3"),
    _llama_like("qwen3_moe", transformers.Qwen3MoeConfig, qwen3_moe_spec, "Qwen3Moe", moe_outputs=True),
    Family("siglip", transformers.SiglipConfig, (("AutoModel", "SiglipModel"),
                                                 ("AutoModelForImageClassification", "SiglipForImageClassification"),
                                                 ("AutoModelForZeroShotImageClassification", "SiglipModel")),
           core="msfx.architectures.siglip", classes="msfx.models.siglip", base_prefix="siglip",
           base_keys=("text_model.", "vision_model.", "logit_scale", "logit_bias"), tied_keys=()),
    # HF's auto mappings have no class for a SigLIP text tower; `msfx.SiglipTextModel` loads it
    Family("siglip_text_model", transformers.SiglipTextConfig, (),
           core="msfx.architectures.siglip", classes="msfx.models.siglip", base_prefix="text_model", tied_keys=()),
    Family("siglip_vision_model", transformers.SiglipVisionConfig, (("AutoModel", "SiglipVisionModel"),),
           core="msfx.architectures.siglip", classes="msfx.models.siglip", base_prefix="vision_model", tied_keys=()),
    Family("roberta", transformers.RobertaConfig, _encoder_auto("Roberta"), core="msfx.architectures.bert",
           classes="msfx.models.bert", base_prefix="roberta", optional_keys=("roberta.pooler.",), tied_keys=()),
    _llama_like("smollm3", transformers.SmolLM3Config, smollm3_spec, "SmolLM3"),
    _llama_like("stablelm", transformers.StableLmConfig, stablelm_spec, "StableLm"),
    _llama_like("starcoder2", transformers.Starcoder2Config, starcoder2_spec, "Starcoder2"),
    Family("t5", transformers.T5Config, (("AutoModel", "T5Model"),
                                         ("AutoModelForSeq2SeqLM", "T5ForConditionalGeneration"),
                                         ("AutoModelForTextEncoding", "T5EncoderModel")),
           core="msfx.architectures.t5", classes="msfx.models.t5", base_prefix="transformer",
           base_keys=("shared.", "encoder.", "decoder."),
           # older checkpoints also store the embeddings tied to `shared.weight`, and a cross-attention
           # position bias no block reads; HF ignores them when loading
           optional_keys=("encoder.embed_tokens.", "decoder.embed_tokens.",
                          "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias."),
           # `wo` overflows float16 in large T5s (HF's `_keep_in_fp32_modules`)
           keep_in_fp32=("wo",), tied_keys=()),
    Family("vit", transformers.ViTConfig, (("AutoModel", "ViTModel"),
                                           ("AutoModelForImageClassification", "ViTForImageClassification")),
           core="msfx.architectures.vit", classes="msfx.models.vit", base_prefix="vit",
           # HF's `add_pooling_layer`: `ViTForImageClassification` has no pooler, `ViTModel` gets a fresh one
           optional_keys=("vit.pooler.",), tied_keys=()),
    Family("whisper", transformers.WhisperConfig, (("AutoModel", "WhisperModel"),
                                                   ("AutoModelForSpeechSeq2Seq", "WhisperForConditionalGeneration")),
           core="msfx.architectures.whisper", classes="msfx.models.whisper",
           tied_keys=(("proj_out.weight", "model.decoder.embed_tokens.weight"),)),
    Family("xlm-roberta", transformers.XLMRobertaConfig, _encoder_auto("XLMRoberta"), core="msfx.architectures.bert",
           classes="msfx.models.bert", base_prefix="roberta", optional_keys=("roberta.pooler.",), tied_keys=()),
)

FAMILIES: dict[str, Family] = {f.model_type: f for f in _ALL}


def family(model_type: str) -> Family:
    """The record of `model_type`.

    Raises:
        ValueError: a model_type msfx does not support (the supported ones named).
    """
    if model_type not in FAMILIES:
        raise ValueError(f"msfx does not support model_type {model_type!r}; supported model types: "
                         f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]
