"""Learning-rate schedules by HF name, as plain functions of the step returning the LR factor.

Follows `transformers.optimization` (5.x): each schedule is the `lr_lambda` that HF wraps in a
`torch.optim.lr_scheduler.LambdaLR`, so the learning rate of update `k` (0-based, HF's
`state.global_step` before the update) is `learning_rate * schedule(k)`. Pass the result to the
train step as a 0-d float32 Tensor (a Python float argument would recompile per value).
"""
from __future__ import annotations

import math
from typing import Callable

Schedule = Callable[[int], float]

SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
             "inverse_sqrt")


def _warmup(step: int, warmup: int) -> float:
    return float(step) / float(max(1, warmup))


def warmup_steps_for(num_training_steps: int, warmup_steps: float = 0, warmup_ratio: float = 0.0) -> int:
    """The number of warmup steps as HF's `TrainingArguments.get_warmup_steps`: `warmup_steps` when
    >= 1; a value in `[0, 1)` is a ratio of `num_training_steps` (HF 5.x), rounded up; otherwise
    `warmup_ratio` (HF 4.x's separate argument), rounded up.

    Raises:
        ValueError: a negative count or ratio, or a ratio above 1.
    """
    if warmup_steps < 0 or not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_steps must be >= 0 and warmup_ratio in [0, 1]; got {warmup_steps}, {warmup_ratio}")
    if warmup_steps >= 1:
        return int(warmup_steps)
    return math.ceil(num_training_steps * (warmup_steps or warmup_ratio))


def get_schedule(name: str, num_warmup_steps: int = 0, num_training_steps: int | None = None, *,
                 num_cycles: float | None = None, lr_init: float | None = None, lr_end: float = 1e-7,
                 power: float = 1.0, timescale: int | None = None) -> Schedule:
    """The LR factor of `transformers.get_scheduler(name, ...)` as a function of the 0-based step.

    Args:
        name: one of `SCHEDULES`.
        num_warmup_steps: linear warmup from 0 over this many steps (see `warmup_steps_for`).
        num_training_steps: total updates; required by `linear`, `cosine`, `cosine_with_restarts`
            and `polynomial`.
        num_cycles: cosine waves (default 0.5: half a wave down to 0) or hard restarts (default 1).
        lr_init, lr_end, power: `polynomial` decays from `lr_init` (the optimizer's learning rate,
            required) to `lr_end` with this power; the factor is relative to `lr_init`.
        timescale: `inverse_sqrt`'s, default `num_warmup_steps or 10_000`.

    Raises:
        ValueError: an unknown name, a missing `num_training_steps` / `lr_init`, or
            `lr_end >= lr_init` (as HF).
    """
    w = num_warmup_steps
    if name == "constant":
        return lambda step: 1.0
    if name == "constant_with_warmup":
        return lambda step: _warmup(step, w) if step < w else 1.0
    if name == "inverse_sqrt":
        scale = timescale or w or 10_000

        def inverse_sqrt(step: int) -> float:
            if step < w:
                return _warmup(step, w)
            return 1.0 / math.sqrt((step + scale - w) / scale)
        return inverse_sqrt
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if num_training_steps is None:
        raise ValueError(f"the {name!r} schedule requires num_training_steps")
    total = num_training_steps

    def progress(step: int) -> float:
        return float(step - w) / float(max(1, total - w))

    if name == "linear":
        return lambda step: _warmup(step, w) if step < w else max(0.0, float(total - step) / float(max(1, total - w)))
    if name == "cosine":
        cycles = 0.5 if num_cycles is None else num_cycles

        def cosine(step: int) -> float:
            if step < w:
                return _warmup(step, w)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(cycles) * 2.0 * progress(step))))
        return cosine
    if name == "cosine_with_restarts":
        cycles = 1 if num_cycles is None else num_cycles

        def cosine_with_restarts(step: int) -> float:
            if step < w:
                return _warmup(step, w)
            done = progress(step)
            if done >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(cycles) * done) % 1.0))))
        return cosine_with_restarts
    if lr_init is None:
        raise ValueError("the 'polynomial' schedule requires lr_init (the optimizer's learning rate)")
    if not lr_init > lr_end:
        raise ValueError(f"lr_end ({lr_end}) must be smaller than initial lr ({lr_init})")

    def polynomial(step: int) -> float:
        if step < w:
            return _warmup(step, w)
        if step > total:
            return lr_end / lr_init
        remaining = 1 - (step - w) / (total - w)
        return ((lr_init - lr_end) * remaining ** power + lr_end) / lr_init
    return polynomial
