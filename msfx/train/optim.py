"""AdamW, SGD and global-norm clipping as pure functions over lists of tensor leaves.

Leaves are the flattened parameter tree (`msfx.params.flatten`); an optimizer's state is a flat
list of tensors too, so a `mindspore.jit` step can take and return everything positionally.
Scalar hyperparameters are static (Python floats baked into the graph); the learning rate and
the step count are 0-d tensors so that changing them does not recompile.

Follows `torch.optim.AdamW` / `torch.optim.SGD` (single-tensor path), `torch.nn.utils.clip_grad_norm_`,
and `transformers.Trainer.get_decay_parameter_names` for which parameters are decayed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from msfx import kernels

# HF's `Trainer.get_decay_parameter_names` patterns, matched against the lower-cased dotted name.
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
# HF also exempts every parameter of an `nn.LayerNorm` by type; keys carry no types, and GPT-2's
# `ln_1` / `ln_2` / `ln_f` are the LayerNorms whose names the patterns above miss.
_LAYERNORM_NAMES = (r"(?:^|\.)ln_(?:\d+|f)\.",)


def decay_mask(keys: Sequence[str]) -> tuple[bool, ...]:
    """Per dotted parameter key, True where HF's Trainer applies weight decay (not biases, not norms)."""
    patterns = [re.compile(p) for p in NO_DECAY_PATTERNS + _LAYERNORM_NAMES]
    return tuple(not any(p.search(key.lower()) for p in patterns) for key in keys)


def _f32(x: Tensor) -> Tensor:
    return x if x.dtype == ms.float32 else x.astype(ms.float32)


def clip_coefficient(grads: Sequence[Tensor], max_norm: float | None) -> tuple[Tensor | None, Tensor]:
    """The factor `torch.nn.utils.clip_grad_norm_(params, max_norm)` multiplies every gradient by.

    The total norm is the 2-norm of the per-tensor 2-norms (as if all gradients were one vector);
    the factor is `min(max_norm / (total + 1e-6), 1)`. Returns `(factor, total)`, float32 0-d; the
    factor is None for `max_norm` None or <= 0 (HF's Trainer skips clipping then). The optimizers
    take it as `grad_scale`, so the clipped gradients are never stored. With the CPU kernels the
    squares are summed by `msfx.kernels.sum_squares` in float64 (the ops' float32 sums agree to ~1e-7).
    """
    grads = [_f32(g) for g in grads]
    if kernels.available() and all(g.size for g in grads):  # one pass each: 24 vs 78 ms for 83M (measured)
        squares = kernels.sum_squares(grads)
    else:  # rows first: a whole-tensor ReduceSum is slow on MindSpore's CPU backend (165 vs 38 ms for a
        # [32000, 768] gradient, measured), and the squares are summed without a sqrt per tensor
        squares = ops.stack([(g * g).sum(-1).sum() if g.ndim > 1 else (g * g).sum() for g in grads])
    total = ops.sqrt(squares.sum())
    if not max_norm or max_norm <= 0:
        return None, total
    return ops.clamp(max_norm / (total + 1e-6), max=1.0), total


def clip_by_global_norm(grads: Sequence[Tensor], max_norm: float | None) -> tuple[list[Tensor], Tensor]:
    """`torch.nn.utils.clip_grad_norm_(params, max_norm)` on gradient tensors: the gradients (float32)
    times `clip_coefficient`'s factor, and the float32 0-d total norm before clipping. `max_norm` None
    or <= 0 leaves the gradients as they are but still measures the norm."""
    coef, total = clip_coefficient(grads, max_norm)
    grads = [_f32(g) for g in grads]
    return (grads if coef is None else [g * coef for g in grads]), total


@dataclass(frozen=True)
class AdamW:
    """`torch.optim.AdamW` with HF `TrainingArguments` defaults (betas 0.9 / 0.999, eps 1e-8,
    weight decay 0.0). State: the first moments of every leaf, then the second moments, float32.
    Weight decay is decoupled (`p *= 1 - lr * weight_decay`) and applied only where `decay` is True."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def slots(self) -> tuple[str, ...]:
        """The state's names, one block of leaves each, as torch's state dict keys."""
        return ("exp_avg", "exp_avg_sq")

    def init(self, leaves: Sequence[Tensor]) -> list[Tensor]:
        """Zero moments: `2 * len(leaves)` float32 tensors shaped like the leaves."""
        zeros = [ops.zeros(tuple(p.shape), ms.float32) for p in leaves]
        return zeros + [ops.zeros(tuple(p.shape), ms.float32) for p in leaves]

    def update(self, leaves: Sequence[Tensor], grads: Sequence[Tensor], state: Sequence[Tensor], lr: Tensor,
               step: Tensor, decay: Sequence[bool],
               grad_scale: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """One update. `lr`: 0-d float32; `step`: 0-d, the number of this update (1 for the first, as
        torch's `state["step"]` after its increment); `grad_scale`: 0-d float32 every gradient is first
        multiplied by (`clip_coefficient`'s factor), None for 1. Returns `(new_leaves, new_state)`; leaves
        keep their dtype, the arithmetic is float32.

        float32 leaves on CPU take one fused kernel each (`msfx.kernels.adamw`, the same numbers bit for
        bit) where the library is built: the ~12 elementwise ops per leaf took 5x as long (measured)."""
        b1, b2 = self.betas
        n = len(leaves)
        # torch computes the bias corrections in Python doubles; 1 - 0.999 ** t in float32 loses ~5e-5
        # relative, so these scalars are float64 too.
        t, lr64 = step.astype(ms.float64), lr.astype(ms.float64)
        step_size = (lr64 / (1.0 - ops.pow(Tensor(b1, ms.float64), t))).astype(ms.float32)
        bc2_sqrt = ops.sqrt(1.0 - ops.pow(Tensor(b2, ms.float64), t)).astype(ms.float32)
        shrink = (1.0 - lr64 * self.weight_decay).astype(ms.float32)
        fused = _fused_scalars(self, step_size, bc2_sqrt, shrink, grad_scale)
        new_leaves, new_m, new_v = [], [], []
        for p, g, m, v, decayed in zip(leaves, grads, state[:n], state[n:], decay):
            if fused and p.dtype == g.dtype == ms.float32 and p.size:
                p, m, v = kernels.adamw(p, g, m, v, fused[bool(decayed and self.weight_decay)])
                new_leaves.append(p)
                new_m.append(m)
                new_v.append(v)
                continue
            g, p32 = _f32(g), _f32(p)
            if grad_scale is not None:
                g = g * grad_scale
            if decayed and self.weight_decay:
                p32 = p32 * shrink
            m = m + (g - m) * (1.0 - b1)  # torch's exp_avg.lerp_(grad, 1 - beta1)
            v = v * b2 + g * g * (1.0 - b2)
            p32 = p32 - step_size * (m / (ops.sqrt(v) / bc2_sqrt + self.eps))
            new_leaves.append(p32 if p.dtype == ms.float32 else p32.astype(p.dtype))
            new_m.append(m)
            new_v.append(v)
        return new_leaves, new_m + new_v


def _fused_scalars(opt: AdamW, step_size: Tensor, bc2_sqrt: Tensor, shrink: Tensor,
                   grad_scale: Tensor | None) -> dict[bool, Tensor] | None:
    """`kernels.adamw`'s float32 `[8]` scalars for undecayed (False) and decayed (True) leaves, or None
    where the kernels are not built or the backend is not the CPU. The constants are rounded to float32
    as MindSpore rounds a Python float multiplying a float32 tensor."""
    if not kernels.available():
        return None
    b1, b2 = opt.betas
    one = Tensor(np.float32(1.0))
    rest = [Tensor(np.float32(c)) for c in (1.0 - b1, b2, 1.0 - b2, opt.eps)]
    scale = one if grad_scale is None else grad_scale
    return {decayed: ops.stack([step_size, bc2_sqrt, shrink if decayed else one, scale, *rest])
            for decayed in (False, True)}


@dataclass(frozen=True)
class SGD:
    """`torch.optim.SGD`: L2 weight decay added to the gradient (where `decay` is True), momentum
    with dampening and optional Nesterov. State: one float32 momentum buffer per leaf (none without
    momentum); the first update stores the gradient itself, as torch does."""

    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self):
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def slots(self) -> tuple[str, ...]:
        """The state's names, one block of leaves each, as torch's state dict keys."""
        return ("momentum_buffer",) if self.momentum else ()

    def init(self, leaves: Sequence[Tensor]) -> list[Tensor]:
        """Zero momentum buffers (float32, shaped like the leaves), or `[]` without momentum."""
        return [ops.zeros(tuple(p.shape), ms.float32) for p in leaves] if self.momentum else []

    def update(self, leaves: Sequence[Tensor], grads: Sequence[Tensor], state: Sequence[Tensor], lr: Tensor,
               step: Tensor, decay: Sequence[bool],
               grad_scale: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """One update; arguments and result as `AdamW.update`."""
        first = step <= 1
        new_leaves, new_state = [], []
        for i, (p, g, decayed) in enumerate(zip(leaves, grads, decay)):
            d_p, p32 = _f32(g), _f32(p)
            if grad_scale is not None:
                d_p = d_p * grad_scale
            if decayed and self.weight_decay:
                d_p = d_p + p32 * self.weight_decay
            if self.momentum:
                buf = ops.where(first, d_p, state[i] * self.momentum + d_p * (1.0 - self.dampening))
                new_state.append(buf)
                d_p = d_p + buf * self.momentum if self.nesterov else buf
            p32 = p32 - lr * d_p
            new_leaves.append(p32 if p.dtype == ms.float32 else p32.astype(p.dtype))
        return new_leaves, new_state
