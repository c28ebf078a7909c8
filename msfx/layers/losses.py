"""Cross-entropy losses of the LM and classification heads, as HF's.

Follows `transformers.loss.loss_utils.ForCausalLMLoss` / `fixed_cross_entropy`: labels are
shifted left by one (the last position gets `ignore_index`), cross-entropy is taken in float32,
and the sum over valid tokens is divided by `num_items_in_batch` when given (the valid-token
count of the whole gradient-accumulation window, as HF's Trainer passes it) or by this batch's
valid-token count otherwise. Summing the losses (and gradients) of the micro-batches of a window
normalized by the window's count gives exactly the loss of the window as one batch.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, ops

IGNORE_INDEX = -100


def shift_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """`[batch, seq]` int32: `labels[:, 1:]` with an `ignore_index` column appended (HF pads then shifts)."""
    labels = labels.astype(ms.int32)
    pad = ops.full((labels.shape[0], 1), ignore_index, dtype=ms.int32)
    return ops.concat((labels[:, 1:], pad), 1)


def count_items(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Float32 0-d count of the labels that take part in the causal-LM loss (`labels[:, 1:]` not
    ignored): HF Trainer's `num_items_in_batch` for these rows."""
    return (labels[:, 1:] != ignore_index).astype(ms.float32).sum()


def causal_lm_loss_sum(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Float32 0-d sum of next-token cross-entropies. `logits` `[batch, seq, vocab]` (any float
    dtype), `labels` `[batch, seq]` int, unshifted (the position-`t` label is the token at `t`)."""
    target = shift_labels(labels, ignore_index).reshape(-1)
    logits = logits.reshape(-1, logits.shape[-1])
    valid = target != ignore_index
    logp = ops.log_softmax(logits if logits.dtype == ms.float32 else logits.astype(ms.float32), -1)
    picked = ops.gather_elements(logp, 1, ops.where(valid, target, ops.zeros_like(target)).expand_dims(-1))
    return -(picked.squeeze(-1) * valid.astype(ms.float32)).sum()


def causal_lm_loss(logits: Tensor, labels: Tensor, num_items_in_batch: Tensor | float | None = None,
                   ignore_index: int = IGNORE_INDEX) -> Tensor:
    """HF's `ForCausalLMLoss`: the summed cross-entropy over `num_items_in_batch`, or the mean over
    this batch's valid tokens when None. A batch with no valid token gives NaN, as in HF."""
    total = causal_lm_loss_sum(logits, labels, ignore_index)
    return total / (count_items(labels, ignore_index) if num_items_in_batch is None else num_items_in_batch)



def masked_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean float32 cross-entropy of `logits` `[..., classes]` over the positions whose label
    (`[...]` int) is not `ignore_index` (HF's `CrossEntropyLoss()`; NaN when none is valid)."""
    valid = labels != ignore_index
    safe = ops.where(valid, labels, ops.zeros_like(labels))
    logp = ops.log_softmax(logits.astype(ms.float32), -1)
    picked = ops.gather_elements(logp, -1, safe.expand_dims(-1)).squeeze(-1)
    valid = valid.astype(ms.float32)
    return -(picked * valid).sum() / valid.sum()
