"""The causal-LM training loss over `(params, batch)` for the functional cores (the losses
themselves live in `msfx.layers.losses`)."""
from __future__ import annotations

from types import ModuleType
from typing import Callable, Mapping

from mindspore import Tensor

from msfx.layers.losses import IGNORE_INDEX, causal_lm_loss, causal_lm_loss_sum, count_items, shift_labels

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "causal_lm_loss_fn", "causal_lm_loss_sum", "count_items", "shift_labels"]


def causal_lm_loss_fn(arch: ModuleType, config, ignore_index: int = IGNORE_INDEX) -> Callable[..., Tensor]:
    """`loss(params, batch, num_items_in_batch=None) -> Tensor` for the causal-LM architecture
    module `arch` (Llama-like: `arch.forward(params, input_ids, attention_mask, config=...)`).

    `batch` maps `input_ids` `[batch, seq]`, `labels` `[batch, seq]` (-100 where ignored) and
    optionally `attention_mask` `[batch, seq]`; see `causal_lm_loss` for `num_items_in_batch`.

    Raises (when called):
        KeyError: `input_ids` or `labels` missing from the batch.
    """
    def loss(params: Mapping, batch: Mapping[str, Tensor], num_items_in_batch=None) -> Tensor:
        out = arch.forward(params, batch["input_ids"], batch.get("attention_mask"), config=config)
        return causal_lm_loss(out.logits, batch["labels"], num_items_in_batch, ignore_index)

    return loss
