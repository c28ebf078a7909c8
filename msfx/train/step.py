"""A whole training step (forward, backward, gradient accumulation, clipping, update) as two graphs
compiled once each with `mindspore.jit`, over flat positional tensors.

- the loss graph: `(*param_leaves, num_items, inv_freq, input_ids, attention_mask, labels) -> loss`,
  differentiated by `mindspore.value_and_grad` from outside (MindSpore builds and caches its
  backward graph with it);
- the update graph: `(lr, step, *param_leaves, *opt_state_leaves, *grads of each micro-batch)
  -> (grad_norm, *new_param_leaves, *new_opt_state_leaves)`: sum, clip, optimizer.

Why not one graph: `mindspore.value_and_grad` called inside a trace-mode `jit` runs the backward
eagerly while tracing and bakes the gradients in as constants (measured, MindSpore 2.10: every
later call reused the first step's gradients), while the gradient of a trace-compiled function is
a compiled backward graph. `mindspore.jit` keys tensors inside containers by identity and Python
scalars by value, so everything is passed as positional tensors (the learning rate and step count
as 0-d tensors): feeding the new leaves back in reuses both graphs. `value_and_grad` differentiates
with respect to positional leaves (it does not see through dicts); the tree is rebuilt from them
inside the loss.

Gradient accumulation follows HF's Trainer: the window's `accumulate` micro-batches are the rows of
one batch, each micro-batch's summed loss is divided by the valid-token count of the whole window
(`num_items_in_batch`), and their gradients are summed before one clip and update, so the result
equals one step on the whole window as a single batch.
"""
from __future__ import annotations

import inspect
import itertools
from types import ModuleType
from typing import Mapping, Sequence

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor

from msfx.decode.step import cheap_tensor_repr, call_in_fresh_thread
from msfx.layers.rotary import rope_frequencies
from msfx.params.tree import unflatten
from msfx.train.losses import IGNORE_INDEX, causal_lm_loss_fn
from msfx.train.optim import AdamW, SGD, clip_by_global_norm, decay_mask

_STEP_IDS = itertools.count()


def _as_int32(x) -> np.ndarray:
    return (x.asnumpy() if isinstance(x, Tensor) else np.asarray(x)).astype(np.int32)


def _as_f32(x) -> Tensor:
    if isinstance(x, Tensor):
        return x if x.dtype == ms.float32 else x.astype(ms.float32)
    return Tensor(np.float32(x))


class TrainStep:
    """The compiled step made by `make_train_step`. `traces` counts how often each graph was traced
    (`{"loss": ..., "update": ...}`; the Python bodies run only while tracing, or on every call
    with `jit=False`); `compiles` is the number of loss graphs, one per batch shape."""

    def __init__(self, arch: ModuleType, config, optimizer: AdamW | SGD, keys: Sequence[str],
                 max_grad_norm: float | None, accumulate: int, jit: bool):
        self.config, self.optimizer, self.keys = config, optimizer, list(keys)
        self.accumulate, self.jit = accumulate, jit
        self.decay = decay_mask(self.keys)
        self.traces = {"loss": 0, "update": 0}
        self._signatures: set = set()
        self._inv_freq: dict[int, Tensor] = {}
        self._rotary = "inv_freq" in inspect.signature(arch.forward).parameters
        loss_fn = causal_lm_loss_fn(arch, config)
        n = len(self.keys)

        def leaf_loss(*args):
            """`(*param_leaves, num_items, inv_freq, input_ids, attention_mask, labels)` -> this
            micro-batch's share of the window's loss."""
            self.traces["loss"] += 1
            leaves, (num_items, inv_freq, input_ids, attention_mask, labels) = args[:n], args[n:]
            batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
            return loss_fn(unflatten(leaves, self.keys), batch, num_items,
                           inv_freq=inv_freq if self._rotary else None, check_ids=False)

        def update(lr, step, *args):
            """`(lr, step, *leaves, *state, *grads of micro-batch 1, ..., *grads of micro-batch k)`."""
            self.traces["update"] += 1
            n_state = len(args) - n - accumulate * n
            leaves, state, parts = args[:n], args[n:n + n_state], args[n + n_state:]
            grads = list(parts[:n])
            for i in range(1, accumulate):
                grads = [a + b for a, b in zip(grads, parts[i * n:(i + 1) * n])]
            grads, grad_norm = clip_by_global_norm(grads, max_grad_norm)
            new_leaves, new_state = optimizer.update(leaves, grads, state, lr, step, self.decay)
            return (grad_norm, *new_leaves, *new_state)

        # Trace-mode jit caches graphs under the function's name and id(); a unique name keeps a freed
        # step's graph from being reused by a new closure that happens to get the same id.
        uid = next(_STEP_IDS)
        for fn in (leaf_loss, update):
            fn.__name__ = fn.__qualname__ = f"msfx_train_{fn.__name__}_{uid}"
        self._loss = ms.jit(leaf_loss, capture_mode="trace") if jit else leaf_loss
        self._grad = ms.value_and_grad(self._loss, grad_position=tuple(range(n)))
        self._update = ms.jit(update, capture_mode="trace") if jit else update

    @property
    def compiles(self) -> int:
        return self.traces["loss"] if self.jit else 0

    def _rope_table(self, seq: int) -> Tensor:
        if not self._rotary:  # the argument is unused: a placeholder keeps the signature fixed
            return Tensor(np.zeros(1, np.float32))
        if seq not in self._inv_freq:
            self._inv_freq[seq] = Tensor(rope_frequencies(self.config, seq)[0])
        return self._inv_freq[seq]

    def __call__(self, param_leaves: Sequence[Tensor], opt_state_leaves: Sequence[Tensor],
                 batch: Mapping[str, Tensor | np.ndarray], lr: Tensor, step: Tensor
                 ) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
        """One update: `(loss, new_param_leaves, new_opt_state_leaves, grad_norm)`.

        Args:
            param_leaves: the flattened parameters, in the order of `keys` (plain Tensors).
            opt_state_leaves: the optimizer's state (`optimizer.init(param_leaves)` at first).
            batch: `input_ids` and `labels` `[accumulate * micro_batch, seq]` int (-100: ignored),
                optional `attention_mask` (default all ones); Tensors or numpy arrays.
            lr: 0-d float32 learning rate (`learning_rate * schedule(global_step)`).
            step: 0-d number of this update, 1 for the first (torch's `state["step"]`).

        Returns float32 0-d `loss` (the window's mean over its valid tokens, as HF's loss of the
        whole window) and `grad_norm` (before clipping).

        Raises:
            KeyError: `input_ids` or `labels` missing.
            ValueError: mis-shaped batch tensors, rows not a multiple of `accumulate`, or a wrong
                number of leaves.
        """
        for name in ("input_ids", "labels"):
            if name not in batch:
                raise KeyError(f"the batch has no {name!r} (it has {sorted(batch)})")
        input_ids, labels = _as_int32(batch["input_ids"]), _as_int32(batch["labels"])
        mask = batch.get("attention_mask")
        mask = np.ones_like(input_ids) if mask is None else _as_int32(mask)
        if input_ids.ndim != 2 or labels.shape != input_ids.shape or mask.shape != input_ids.shape:
            raise ValueError(f"input_ids, attention_mask and labels must share one [batch, seq] shape; got "
                             f"{input_ids.shape}, {mask.shape}, {labels.shape}")
        if input_ids.shape[0] % self.accumulate:
            raise ValueError(f"{input_ids.shape[0]} rows do not split into accumulate={self.accumulate} micro-batches")
        if len(param_leaves) != len(self.keys):
            raise ValueError(f"expected {len(self.keys)} parameter leaves, got {len(param_leaves)}")
        # Loaded leaves are `Parameter`s and the step returns plain Tensors; starting from Parameters
        # (or eager op outputs) the graphs traced again on the second call (measured), from host
        # copies they do not.
        param_leaves = [Tensor(t.asnumpy()) if isinstance(t, Parameter) else t for t in param_leaves]
        n = len(param_leaves)
        num_items = Tensor(np.float32((labels[:, 1:] != IGNORE_INDEX).sum()))  # the window's, as HF's Trainer
        inv_freq = self._rope_table(input_ids.shape[1])
        micro = input_ids.shape[0] // self.accumulate
        signature = (micro, input_ids.shape[1])
        # Tracing walks the Python stack and fails on frames without source (`python -m` runs under
        # frozen runpy); any call may trace (a new input kind does), so compiled calls run on a fresh thread.
        run = call_in_fresh_thread if self.jit else (lambda fn, *args: fn(*args))
        loss, grads = None, []
        with cheap_tensor_repr():
            for i in range(self.accumulate):
                rows = slice(i * micro, (i + 1) * micro)
                args = (*param_leaves, num_items, inv_freq, *(Tensor(t[rows]) for t in (input_ids, mask, labels)))
                part_loss, part_grads = run(self._grad, *args)
                loss = part_loss if loss is None else loss + part_loss
                grads.extend(part_grads)
            out = run(self._update, _as_f32(lr), _as_f32(step), *param_leaves, *opt_state_leaves, *grads)
        self._signatures.add(signature)
        return loss, list(out[1:1 + n]), list(out[1 + n:]), out[0]


def make_train_step(arch: ModuleType, config, optimizer: AdamW | SGD, keys: Sequence[str], *,
                    max_grad_norm: float | None = 1.0, accumulate: int = 1, jit: bool = True) -> TrainStep:
    """A causal-LM train step for the Llama-like architecture module `arch` (`msfx.architectures.llama`
    and the families sharing its `forward`).

    Args:
        config: the model's HF config.
        optimizer: `AdamW(...)` or `SGD(...)`; weight decay skips biases and norm weights (HF's
            `get_decay_parameter_names`).
        keys: the dotted parameter keys in leaf order (`msfx.params.flatten(params)[1]`); the
            leaves passed to the step must follow them.
        max_grad_norm: clip the global gradient norm to this (HF's default 1.0); None or 0: no clipping.
        accumulate: micro-batches per update (HF's `gradient_accumulation_steps`).
        jit: compile with `mindspore.jit` (False runs eagerly, for debugging).

    Returns a `TrainStep`: `step(param_leaves, opt_state_leaves, batch, lr, step) -> (loss,
    new_param_leaves, new_opt_state_leaves, grad_norm)`.

    Raises:
        ValueError: `accumulate` < 1.
    """
    if accumulate < 1:
        raise ValueError(f"accumulate must be >= 1, got {accumulate}")
    return TrainStep(arch, config, optimizer, keys, max_grad_norm, accumulate, jit)
