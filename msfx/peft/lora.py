"""LoRA as a transformation of a parameter tree (the tree keyed as the HF checkpoint).

An adapted module's node holds its frozen `weight` (and `bias`) plus peft's `lora_A` / `lora_B`
nodes: `{"weight": W, "lora_A": {"weight": A}, "lora_B": {"weight": B}}`. Before a forward,
`with_adapters` puts a `msfx.layers.basic.LoraWeight` where the weight was, which `linear` (and
GPT-2's `conv1d`) turn into peft's unmerged product, so no architecture knows about adapters.
`merged_weight` folds an adapter into its weight (`merge_and_unload`, generation).
"""
from __future__ import annotations

import math
import re
from typing import Callable

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from msfx.layers.basic import LoraWeight
from msfx.peft.config import DEFAULT_TARGETS, LoraConfig

# HF's `Conv1D` modules (weight stored `[in, out]`: peft's `fan_in_fan_out`) by model type
CONV1D_MODULES = {"gpt2": ("c_attn", "c_proj", "c_fc")}
# embedding tables by their HF names: peft adapts them with other keys (`lora_embedding_A`), msfx not at all
EMBEDDINGS = ("embed_tokens", "wte", "wpe", "shared", "word_embeddings", "position_embeddings",
              "token_type_embeddings", "token_embedding", "position_embedding", "relative_attention_bias")
OUTPUT_LAYERS = ("lm_head",)  # what "all-linear" leaves out, as peft


def matches(patterns: list[str] | str | None, name: str) -> bool:
    """peft's `check_target_module_exists`: a regex string must match the whole dotted module name,
    a list entry must equal it or end it after a dot."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_targets(linear_modules: list[str], config: LoraConfig, model_type: str) -> list[str]:
    """The HF module names among `linear_modules` (every module with a 2-D weight) that `config`
    adapts.

    Raises:
        ValueError: no default `target_modules` for `model_type`, an embedding named, or no module matched.
    """
    patterns = config.target_modules
    if patterns is None:
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(f"Please specify `target_modules` in `peft_config`: peft has no default for {model_type!r}")
        patterns = DEFAULT_TARGETS[model_type]
    if patterns == "all-linear":
        found = [m for m in linear_modules if m.rsplit(".", 1)[-1] not in EMBEDDINGS + OUTPUT_LAYERS]
    else:
        found = [m for m in linear_modules if matches(patterns, m)]
    found = [m for m in found if not matches(config.exclude_modules, m)]
    embeddings = [m for m in found if m.rsplit(".", 1)[-1] in EMBEDDINGS]
    if embeddings:
        raise ValueError(f"target_modules names embedding tables {embeddings[:3]}: msfx applies LoRA to linear "
                         "layers only")
    if not found:
        raise ValueError(f"Target modules {patterns} not found in the base model. Please check the target modules "
                         f"and try again (linear modules look like {linear_modules[:3]})")
    return found


def adapter_shapes(weight_shape: tuple[int, int], r: int, conv1d: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """`(lora_A, lora_B)` shapes `([r, in], [out, r])` for a weight `[out, in]` (`[in, out]` for a Conv1D)."""
    out_features, in_features = weight_shape[::-1] if conv1d else weight_shape
    return (r, in_features), (out_features, r)


def init_adapter(weight_shape: tuple[int, int], config: LoraConfig, conv1d: bool,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Initial float32 `(lora_A, lora_B)` as peft's `reset_lora_parameters`: A Kaiming-uniform with
    a = sqrt(5) (bound `1 / sqrt(in)`, torch's `nn.Linear` init) or N(0, 1/r) ("gaussian"), B zeros;
    with `init_lora_weights=False` B is drawn like A (the adapter changes the outputs)."""
    a_shape, b_shape = adapter_shapes(weight_shape, config.r, conv1d)
    if config.init_lora_weights == "gaussian":
        a = rng.normal(0.0, 1.0 / config.r, a_shape)
    else:
        bound = 1.0 / math.sqrt(a_shape[1])
        a = rng.uniform(-bound, bound, a_shape)
    b = rng.uniform(-1.0, 1.0, b_shape) / math.sqrt(config.r) if config.init_lora_weights is False \
        else np.zeros(b_shape)
    return a.astype(np.float32), b.astype(np.float32)


def adapt(tree, targets: frozenset[str], make_weight: Callable[[dict, str], object], path: str = ""):
    """`tree` with each node at a `targets` path (dotted, in the tree's keys) holding
    `make_weight(node, path)` as its `weight` instead of `weight`, `lora_A`, `lora_B`; the rest of
    the tree shared, not copied."""
    if isinstance(tree, dict):
        if path in targets:
            rest = {k: v for k, v in tree.items() if k not in ("lora_A", "lora_B")}
            return {**rest, "weight": make_weight(tree, path)}
        return {k: adapt(v, targets, make_weight, f"{path}.{k}" if path else k) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [adapt(v, targets, make_weight, f"{path}.{i}") for i, v in enumerate(tree)]
    return tree


def lora_weight(node: dict, scaling: float, dropout: float) -> LoraWeight:
    """An adapted node's `LoraWeight` (what `linear` reads in the forward)."""
    return LoraWeight(node["weight"], node["lora_A"]["weight"], node["lora_B"]["weight"], scaling, dropout)


def merged_weight(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float, conv1d: bool) -> Tensor:
    """`weight + scaling * B @ A` (transposed for a Conv1D weight), computed in float32, in `weight`'s
    dtype (peft's `get_delta_weight`)."""
    delta = ops.matmul(lora_b.astype(ms.float32), lora_a.astype(ms.float32)) * scaling
    return (weight.astype(ms.float32) + (delta.T if conv1d else delta)).astype(weight.dtype)
