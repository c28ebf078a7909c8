"""A whole training step (forward, backward, gradient accumulation, clipping, update) as two graphs
compiled with `mindspore.jit`, over flat positional tensors.

- the loss graph: `(*param_leaves, num_items, loss_scale, *batch_tensors) -> loss`, differentiated
  by `mindspore.value_and_grad` from outside (MindSpore builds and caches its backward graph with
  it); one per batch shape;
- the update graph: `(lr, step, inv_scale, loss, *param_leaves, *opt_state_leaves, *grads of each
  micro-batch) -> (grad_norm, loss, *new_param_leaves, *new_opt_state_leaves)`: sum, unscale, clip,
  optimizer; one per micro-batch count.

Data parallel (`grad_reducer`, a `msfx.train.distributed.DataParallel` under `msrun`): each worker
runs the loss graph on its own micro-batches, normalized by the item count of the whole global
window (summed over the workers on the host), and the update graph sums the gradients and the loss
over the workers with AllReduce before the unscale, clip and update, so every worker applies the
update one process would apply to the global batch (with ZeRO-1 to its slice, then gathered).

Why not one graph: `mindspore.value_and_grad` called inside a trace-mode `jit` runs the backward
eagerly while tracing and bakes the gradients in as constants (measured, MindSpore 2.10: every
later call reused the first step's gradients), while the gradient of a trace-compiled function is
a compiled backward graph. `mindspore.jit` keys tensors inside containers by identity and Python
scalars by value, so everything is passed as positional tensors (the learning rate, step count and
loss scale as 0-d tensors): feeding the new leaves back in reuses both graphs. `value_and_grad`
differentiates with respect to positional leaves (it does not see through dicts); the tree is
rebuilt from them inside the loss, which runs under `no_host_reads()` (a value read on the host
while tracing would be baked into the graph).

Gradient accumulation follows HF's Trainer: each micro-batch's loss is normalized by a count taken
over the whole window (`num_items_in_batch`: the valid-token count for causal LMs, the number of
micro-batches for heads with a mean loss) and their gradients are summed before one clip and update,
so a causal LM's step equals one step on the whole window as a single batch.

Mixed precision (HF's `bf16` / `fp16` arguments): the leaves stay float32 (the master weights) and
the loss graph casts them to the compute dtype, so gradients arrive in float32. On MindSpore's CPU
backend, which has no bfloat16 kernels (2.10), `bf16` rounds the weights to bfloat16 and computes in
float32. `fp16` scales the loss dynamically (`LossScaler`, torch's `GradScaler` defaults) and skips
the update of a step whose gradients overflow.

Dropout (`dropout_seed`): the loss graph takes one more input, a 0-d int32 key per micro-batch drawn
from the seed and the step (`msfx.layers.dropout.step_key`), so the masks change every step without
a new trace and a resumed run draws the same ones.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Mapping, NamedTuple, Sequence

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, ops

from msfx.jit import Graph
from msfx.inputs import check_token_ids
from msfx.jit import no_host_reads
from msfx.layers.dropout import dropout_rng, step_key
from msfx.params.tree import unflatten
from msfx.train.losses import IGNORE_INDEX, causal_lm_loss_fn
from msfx.train.distributed import DataParallel
from msfx.train.optim import AdamW, SGD, clip_coefficient, decay_mask

MIXED_PRECISION = (None, "bf16", "fp16")

Batch = Mapping[str, "Tensor | np.ndarray"]
LossFn = Callable[[dict, dict, Tensor], Tensor]


@dataclass
class LossScaler:
    """Dynamic loss scaling for float16 training, as `torch.amp.GradScaler` with its defaults: the
    loss is multiplied by `scale`; a step whose gradients overflow is skipped and halves the scale,
    `growth_interval` good steps in a row double it."""

    scale: float = 2.0 ** 16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    growth_tracker: int = 0
    skipped_steps: int = 0

    def update(self, finite: bool) -> None:
        """After a step: `finite` is whether its gradients were all finite (the update was applied)."""
        if finite:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.scale *= self.growth_factor
                self.growth_tracker = 0
        else:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
            self.skipped_steps += 1

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: Mapping) -> None:
        for name, value in state.items():
            setattr(self, name, type(getattr(self, name))(value))


class StepResult(NamedTuple):
    """What a `TrainStep` call returns. `loss`: float32 0-d, the window's loss (unscaled);
    `grad_norm`: float32 0-d global norm of the window's gradients before clipping (inf/NaN when
    they overflowed); `applied`: False when an fp16 overflow skipped the update (the leaves and
    state come back unchanged)."""

    loss: Tensor
    params: list[Tensor]
    opt_state: list[Tensor]
    grad_norm: Tensor
    applied: bool


def batch_tensor(x) -> Tensor:
    """A batch entry as a Tensor: integer and boolean arrays as int32, floating ones as float32."""
    array = x.asnumpy() if isinstance(x, Tensor) else np.asarray(x)
    if array.dtype.kind in "iub":
        return Tensor(array.astype(np.int32))
    if array.dtype.kind == "f":
        return Tensor(array.astype(np.float32))
    raise TypeError(f"batch tensors must be integer, boolean or floating, got {array.dtype}")


def _as_f32(x) -> Tensor:
    if isinstance(x, Tensor):
        return x if x.dtype == ms.float32 else x.astype(ms.float32)
    return Tensor(np.float32(x))


def _compute_cast(mixed_precision: str | None) -> Callable[[Tensor], Tensor]:
    if mixed_precision is None:
        return lambda leaf: leaf
    if mixed_precision == "fp16":
        return lambda leaf: leaf.astype(ms.float16) if leaf.dtype == ms.float32 else leaf
    if ms.get_context("device_target") == "CPU":  # no bfloat16 kernels: bfloat16 weights, float32 compute
        return lambda leaf: leaf.astype(ms.bfloat16).astype(ms.float32) if leaf.dtype == ms.float32 else leaf
    return lambda leaf: leaf.astype(ms.bfloat16) if leaf.dtype == ms.float32 else leaf


class TrainStep:
    """A compiled training step over flat parameter leaves (see the module docstring).

    Args:
        loss_fn: `loss_fn(params_tree, batch, num_items) -> float32 0-d loss` of one micro-batch
            (`batch`: its tensors by name), normalized by `num_items` (a float32 0-d Tensor).
        keys: the dotted parameter keys in leaf order (`msfx.params.flatten(params)[1]`).
        optimizer: `AdamW(...)` or `SGD(...)`; weight decay skips biases and norm weights (HF's
            `get_decay_parameter_names`).
        count_items: a micro-batch's share of the window's `num_items` (numpy arrays by name);
            default 1 per micro-batch (a mean loss averaged over the window).
        check_batch: raises on a bad micro-batch (numpy arrays by name) before any tracing.
        max_grad_norm: clip the global gradient norm to this (HF's default 1.0); None or 0: no clipping.
        accumulate: micro-batches a single batch mapping is split into (HF's `gradient_accumulation_steps`).
        jit: compile with `mindspore.jit` (False runs eagerly, for debugging).
        mixed_precision: None, "bf16" or "fp16" (see the module docstring).
        dropout_seed: train with the models' dropout (`msfx.layers.dropout`), each micro-batch's masks
            drawn from this seed and the call's `dropout_step`; None: no dropout.
        grad_reducer: data parallel over `msrun` workers (`msfx.train.distributed.data_parallel()`):
            the step's batch is this worker's share of the global window; with its `zero_stage=1` the
            optimizer state is this worker's slice (`grad_reducer.local(leaves)` at `optimizer.init`).
        frozen_keys: the dotted keys of leaves the loss reads but that do not train (a LoRA model's base
            weights, `msfx.peft`), given to each call as `frozen_leaves`: no gradient, no optimizer state.

    `traces` counts how often each graph was traced (`{"loss": ..., "update": ...}`; the Python bodies
    run only while tracing, or on every call with `jit=False`); `compiles` is the number of loss
    graphs, one per batch shape. `scaler` is the fp16 `LossScaler` (None otherwise).

    Raises:
        ValueError: `accumulate` < 1 or an unknown `mixed_precision`.
    """

    def __init__(self, loss_fn: LossFn, keys: Sequence[str], optimizer: AdamW | SGD, *,
                 count_items: Callable[[dict], float] | None = None, check_batch: Callable[[dict], None] | None = None,
                 max_grad_norm: float | None = 1.0, accumulate: int = 1, jit: bool = True,
                 mixed_precision: str | None = None, dropout_seed: int | None = None,
                 grad_reducer: DataParallel | None = None, frozen_keys: Sequence[str] = ()):
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
        self.loss_fn, self.keys, self.optimizer = loss_fn, list(keys), optimizer
        self.count_items = count_items or (lambda batch: 1.0)
        self.check_batch, self.max_grad_norm = check_batch, max_grad_norm
        self.accumulate, self.jit, self.mixed_precision = accumulate, jit, mixed_precision
        self.scaler = LossScaler() if mixed_precision == "fp16" else None
        self.dropout_seed, self.frozen_keys = dropout_seed, list(frozen_keys)
        self.grad_reducer = grad_reducer
        self.decay = decay_mask(self.keys)
        self._cast = _compute_cast(mixed_precision)
        self._grads: dict[tuple[str, ...], Graph] = {}
        self._updates: dict[int, Graph] = {}

    @property
    def traces(self) -> dict[str, int]:
        return {"loss": sum(g.traces for g in self._grads.values()),
                "update": sum(g.traces for g in self._updates.values())}

    @property
    def compiles(self) -> int:
        return self.traces["loss"] if self.jit else 0

    def _grad_fn(self, names: tuple[str, ...]) -> Graph:
        """`value_and_grad` of the loss graph for micro-batches with these tensor names."""
        if names not in self._grads:
            n, k = len(self.keys) + len(self.frozen_keys), 3 if self.dropout_seed is not None else 2

            def leaf_loss(*args):
                """`(*param_leaves, *frozen_leaves, num_items, loss_scale[, dropout key], *batch tensors in
                `names` order)` -> scaled loss."""
                leaves, (num_items, scale, *key), tensors = args[:n], args[n:n + k], args[n + k:]
                with no_host_reads(), dropout_rng(key[0]) if key else contextlib.nullcontext():
                    tree = unflatten([self._cast(leaf) for leaf in leaves], self.keys + self.frozen_keys)
                    loss = self.loss_fn(tree, dict(zip(names, tensors)), num_items)
                return loss.astype(ms.float32) * scale

            self._grads[names] = Graph(leaf_loss, f"train_loss{len(self._grads)}", self.jit,
                                       wrap=lambda fn: ms.value_and_grad(fn, grad_position=tuple(range(len(self.keys)))))
        return self._grads[names]

    def _update_fn(self, parts: int) -> Graph:
        """The update graph for windows of `parts` micro-batches."""
        if parts not in self._updates:
            n, skip_overflow = len(self.keys), self.scaler is not None

            def update(lr, step, inv_scale, loss, *args):
                """`(lr, step, inv_scale, loss, *leaves, *state, *grads of micro-batch 1, ..., *grads of micro-batch k)`."""
                n_state = len(args) - n - parts * n
                leaves, state, grads_in = args[:n], args[n:n + n_state], args[n + n_state:]
                grads = list(grads_in[:n])
                for i in range(1, parts):
                    grads = [a + b for a, b in zip(grads, grads_in[i * n:(i + 1) * n])]
                dp, local, decay = self.grad_reducer, leaves, self.decay
                if dp is not None:  # an overflow on one worker is an inf in everyone's sum: all skip the step
                    grads, loss = dp.reduce(grads, loss)
                if skip_overflow:
                    grads = [g * inv_scale for g in grads]
                coef, grad_norm = clip_coefficient(grads, self.max_grad_norm)
                if dp is not None:  # ZeRO-1: this worker's slice only (plain data parallel: all of it)
                    grads, local, decay = dp.local(grads), dp.local(leaves), dp.local_decay(decay)
                new_local, new_state = self.optimizer.update(local, grads, state, lr, step, decay, grad_scale=coef)
                if skip_overflow:  # torch's GradScaler skips the optimizer step on inf/NaN gradients
                    finite = ops.isfinite(grad_norm)
                    new_local = [ops.where(finite, a, b) for a, b in zip(new_local, local)]
                    new_state = [ops.where(finite, a, b) for a, b in zip(new_state, state)]
                new_leaves = new_local if dp is None else dp.gather(new_local)
                return (grad_norm, loss, *new_leaves, *new_state)

            self._updates[parts] = Graph(update, f"train_update{parts}", self.jit)
        return self._updates[parts]

    def _micro_batches(self, batch: Batch | Sequence[Batch]) -> list[dict[str, np.ndarray]]:
        if isinstance(batch, Mapping):
            arrays = {k: (v.asnumpy() if isinstance(v, Tensor) else np.asarray(v)) for k, v in batch.items()}
            rows = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
            if len(rows) != 1 or 0 in rows:
                raise ValueError(f"batch tensors must share one non-empty leading batch dimension, got "
                                 f"{ {k: list(a.shape) for k, a in arrays.items()} }")
            (total,) = rows
            if total % self.accumulate:
                raise ValueError(f"{total} rows do not split into accumulate={self.accumulate} micro-batches")
            micro = total // self.accumulate
            parts = [{k: a[i * micro:(i + 1) * micro] for k, a in arrays.items()} for i in range(self.accumulate)]
        else:
            parts = [{k: (v.asnumpy() if isinstance(v, Tensor) else np.asarray(v)) for k, v in b.items()}
                     for b in batch]
        if not parts:
            raise ValueError("no micro-batch to train on")
        names = sorted(parts[0])
        for part in parts:
            if sorted(part) != names:
                raise ValueError(f"the micro-batches of one window must hold the same tensors; got {names} and "
                                 f"{sorted(part)}")
            if self.check_batch is not None:
                self.check_batch(part)
        return parts

    def __call__(self, param_leaves: Sequence[Tensor], opt_state_leaves: Sequence[Tensor],
                 batch: Batch | Sequence[Batch], lr: Tensor | float, step: Tensor | float,
                 dropout_step: int | None = None, frozen_leaves: Sequence[Tensor] = ()) -> StepResult:
        """One update.

        Args:
            param_leaves: the flattened parameters, in the order of `keys` (float32 master weights).
            opt_state_leaves: the optimizer's state (`optimizer.init(param_leaves)` at first).
            batch: one mapping of `[rows, ...]` tensors or numpy arrays, split into `accumulate`
                micro-batches by rows, or a sequence of micro-batch mappings (the window; their
                sequence lengths may differ).
            lr: 0-d float32 learning rate (`learning_rate * schedule(update_count)`).
            step: 0-d number of this update, 1 for the first (torch's `state["step"]`).
            dropout_step: picks the dropout masks with `dropout_seed` (default `step`): micro-batch `i`
                of a window of `k` draws from `dropout_step * k + i`.
            frozen_leaves: the leaves of `frozen_keys`, in their order.

        Raises:
            KeyError, ValueError, TypeError: a bad batch (see `check_batch`), rows not a multiple of
                `accumulate`, or a wrong number of leaves.
        """
        if len(param_leaves) != len(self.keys) or len(frozen_leaves) != len(self.frozen_keys):
            raise ValueError(f"expected {len(self.keys)} parameter and {len(self.frozen_keys)} frozen leaves, got "
                             f"{len(param_leaves)} and {len(frozen_leaves)}")
        dp = self.grad_reducer
        # under data parallel a worker may hold no micro-batch of the last window: it adds zero gradients
        parts = [] if dp is not None and not isinstance(batch, Mapping) and not batch else self._micro_batches(batch)
        items = sum(self.count_items(part) for part in parts)
        if dp is not None:
            dp.bind([tuple(p.shape) for p in param_leaves])
            items = dp.sum_host(items)
        # a window without a valid label: a zero loss and zero gradients (as HF), not 0 / 0 = NaN weights
        num_items = Tensor(np.float32(max(items, 1.0)))
        scale = 1.0 if self.scaler is None else self.scaler.scale
        # Loaded leaves are `Parameter`s and the step returns plain Tensors; starting from Parameters
        # (or eager op outputs) the graphs traced again on the second call (measured), from host
        # copies they do not.
        param_leaves = [Tensor(t.asnumpy()) if isinstance(t, Parameter) else t for t in param_leaves]
        n = len(param_leaves)
        loss, grads = Tensor(np.float32(0.0)), []
        if not parts:
            grads = [ops.zeros(tuple(p.shape), ms.float32) for p in param_leaves]
        if dropout_step is None:
            dropout_step = int(step.asnumpy() if isinstance(step, Tensor) else step)
        rank, world = (0, 1) if dp is None else (dp.rank, dp.world_size)
        draw = (dropout_step * world + rank) * len(parts)  # each worker its own masks
        names = tuple(sorted(parts[0])) if parts else ()
        for i, part in enumerate(parts):  # any call may trace (see above): each runs on a fresh thread
            tensors = [batch_tensor(part[name]) for name in names]
            key = [] if self.dropout_seed is None else [step_key(self.dropout_seed, draw + i)]
            part_loss, part_grads = self._grad_fn(names)(*param_leaves, *frozen_leaves, num_items, _as_f32(scale),
                                                         *key, *tensors)
            if isinstance(part_grads, Tensor):  # value_and_grad returns a lone gradient bare
                part_grads = (part_grads,)
            loss = part_loss if i == 0 else loss + part_loss
            grads.extend(part_grads)
        out = self._update_fn(max(len(parts), 1))(_as_f32(lr), _as_f32(step), _as_f32(1.0 / scale), loss,
                                                  *param_leaves, *opt_state_leaves, *grads)
        grad_norm, loss = out[0], out[1]
        applied = True
        if self.scaler is not None:
            loss = loss / scale
            applied = bool(np.isfinite(grad_norm.asnumpy()))
            self.scaler.update(applied)
        return StepResult(loss, list(out[2:2 + n]), list(out[2 + n:]), grad_norm, applied)


def causal_lm_items(batch: Mapping[str, np.ndarray]) -> float:
    """A causal-LM micro-batch's valid next-token targets: `labels[:, 1:] != -100` (HF Trainer's
    `num_items_in_batch` for models whose loss shifts the labels)."""
    return float((np.asarray(batch["labels"])[:, 1:] != IGNORE_INDEX).sum())


def check_causal_lm_batch(vocab_size: int) -> Callable[[Mapping[str, np.ndarray]], None]:
    """A `check_batch` for causal LMs: `input_ids` and `labels` present, `[batch, seq]` alike
    (with `attention_mask`), ids in `[0, vocab_size)`."""
    def check(batch: Mapping[str, np.ndarray]) -> None:
        for name in ("input_ids", "labels"):
            if name not in batch:
                raise KeyError(f"the batch has no {name!r} (it has {sorted(batch)})")
        ids = check_token_ids(batch["input_ids"], vocab_size)
        for name in ("labels", "attention_mask"):
            if name in batch and np.shape(batch[name]) != ids.shape:
                raise ValueError(f"input_ids, attention_mask and labels must share one [batch, seq] shape; got "
                                 f"input_ids {list(ids.shape)}, {name} {list(np.shape(batch[name]))}")
    return check


def make_train_step(arch: ModuleType, config, optimizer: AdamW | SGD, keys: Sequence[str], *,
                    max_grad_norm: float | None = 1.0, accumulate: int = 1, jit: bool = True,
                    mixed_precision: str | None = None, dropout_seed: int | None = None,
                    grad_reducer: DataParallel | None = None) -> TrainStep:
    """A causal-LM train step for the Llama-like architecture module `arch` (`msfx.architectures.llama`
    and the families sharing its `forward`): HF's shifted cross-entropy normalized by the window's
    valid-token count.

    Args:
        config: the model's HF config.
        optimizer, keys, max_grad_norm, accumulate, jit, mixed_precision, dropout_seed, grad_reducer: see
            `TrainStep`.

    Returns a `TrainStep`: `step(param_leaves, opt_state_leaves, batch, lr, step) -> StepResult`;
    the batch holds `input_ids` and `labels` `[batch, seq]` int (-100: ignored) and optionally
    `attention_mask`.

    Raises:
        ValueError: `accumulate` < 1.
    """
    return TrainStep(causal_lm_loss_fn(arch, config), keys, optimizer, count_items=causal_lm_items,
                     check_batch=check_causal_lm_batch(config.vocab_size), max_grad_norm=max_grad_norm,
                     accumulate=accumulate, jit=jit, mixed_precision=mixed_precision, dropout_seed=dropout_seed,
                     grad_reducer=grad_reducer)
