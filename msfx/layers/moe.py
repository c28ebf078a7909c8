"""Sparse mixture-of-experts MLPs (Shazeer et al. 2017; Mixtral, Qwen3-MoE) and their load-balancing loss.

Follows HF's `MixtralSparseMoeBlock` / `Qwen3MoeSparseMoeBlock` (transformers 5.x): a linear
router scores the experts per token, the top-k experts' gated MLP outputs are summed with the
softmax weights of those k (renormalized over them unless `normalize` is False). Every expert
runs on every token and unselected ones get weight 0: static shapes that `mindspore.jit`
compiles once, at `num_experts / top_k` times the selected experts' compute.
"""
from __future__ import annotations

from typing import Callable

import mindspore as ms
from mindspore import Tensor, ops

from msfx.layers.basic import linear


def route(router_logits: Tensor, top_k: int, normalize: bool) -> Tensor:
    """Dense routing weights float32 `[tokens, experts]`: the top-k softmax probabilities (over
    float32 `router_logits` `[tokens, experts]`), renormalized to sum to 1 when `normalize`, and 0
    for the other experts."""
    probs = ops.softmax(router_logits.astype(ms.float32), -1)
    top, index = ops.topk(probs, top_k)
    if normalize:
        top = top / top.sum(-1, keepdims=True)
    one_hot = ops.one_hot(index, probs.shape[-1], Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))
    return (one_hot * top.expand_dims(-1)).sum(1)


def sparse_moe(x: Tensor, p: dict, expert_names: tuple[str, str, str], top_k: int, normalize: bool,
               act: Callable[[Tensor], Tensor], float32_weights: bool = False) -> tuple[Tensor, Tensor]:
    """The MoE block on `x` `[tokens, hidden]`: returns `(y [tokens, hidden], router_logits [tokens, experts])`.

    `p` holds `gate.weight` `[experts, hidden]` (the router) and `experts` (a list of dicts or a
    dict keyed "0", "1", ...), each with the three projections named by `expert_names`
    (gate, up, down: `("w1", "w3", "w2")` for Mixtral, `("gate_proj", "up_proj", "down_proj")`
    for Qwen3-MoE). In half precision the weighted expert outputs are summed in float32 and rounded
    once, as HF's default `grouped_mm` experts; each product is rounded first unless
    `float32_weights` (HF's Mixtral keeps its float32 routing weights, Qwen3-MoE casts them to `x`'s dtype).
    """
    router_logits = linear(x, p["gate"]["weight"])
    half = x.dtype != ms.float32
    weights = route(router_logits, top_k, normalize)
    weights = weights if float32_weights else weights.astype(x.dtype)
    experts = p["experts"]
    experts = [experts[str(i)] for i in range(len(experts))] if isinstance(experts, dict) else experts
    gate, up, down = expert_names
    y = None
    for i, e in enumerate(experts):
        out = linear(act(linear(x, e[gate]["weight"])) * linear(x, e[up]["weight"]), e[down]["weight"])
        out = (out.astype(ms.float32) if half and float32_weights else out) * weights[:, i:i + 1]
        out = out.astype(ms.float32) if half and not float32_weights else out
        y = out if y is None else y + out
    return (y.astype(x.dtype) if half else y), router_logits


def load_balancing_loss(router_logits: tuple[Tensor, ...], num_experts: int, top_k: int,
                        attention_mask: Tensor | None = None) -> Tensor:
    """HF's `load_balancing_loss_func` (Switch Transformer eqs. 4-6): `num_experts * sum_e f_e P_e`
    over all layers' `router_logits` (each `[batch * seq, experts]`), where `f_e` is the fraction of
    top-k assignments to expert e and `P_e` its mean router probability; padding rows
    (`attention_mask` `[batch, seq]` 0) excluded. Returns a float32 scalar."""
    rows = router_logits[0].shape[0]
    mask = ops.ones((rows,), ms.float32) if attention_mask is None else \
        attention_mask.reshape(-1).astype(ms.float32)
    counts = ops.zeros((num_experts,), ms.float32)
    prob_sum = ops.zeros((num_experts,), ms.float32)
    for logits in router_logits:
        probs = ops.softmax(logits.astype(ms.float32), -1)
        _, index = ops.topk(probs, top_k)
        one_hot = ops.one_hot(index, num_experts, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))
        counts = counts + (one_hot.sum(1) * mask.expand_dims(-1)).sum(0)
        prob_sum = prob_sum + (probs * mask.expand_dims(-1)).sum(0)
    total = mask.sum() * len(router_logits)
    return (counts / total * (prob_sum / total)).sum() * num_experts
