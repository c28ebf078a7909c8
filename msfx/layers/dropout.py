"""Dropout (torch's `nn.functional.dropout`: zero each element with probability `rate`, scale the
rest by `1 / (1 - rate)`), active only inside `dropout_rng(key)`.

Outside that context (evaluation, generation, a plain forward) and at rate 0, `dropout` returns
its input: the graph holds no extra op. Inside, the mask is a counter-based hash (murmur3's
32-bit finalizer) of `(key, call site, element index)`, built from integer ops that run eagerly
and inside `mindspore.jit`: the key is a 0-d int32 input of the compiled graph, so each step draws
a fresh mask from the same graph, and a run's randomness is a function of its seed and step count
(restored with them on resume). MindSpore 2.10's own dropout kernels are no fit: `DropoutExt`
(tensor seed and offset) has no CPU kernel, and `ops.Dropout` keeps per-op state that a
checkpoint cannot restore. The hash's integer ops have no gradient, so the mask is built under
`stop_gradient` (without it `value_and_grad` fails on `fake_bprop`, measured).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

_STREAM = contextvars.ContextVar("msfx_dropout_stream", default=None)
_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1  # Knuth's multiplicative hash constant
_M1, _M2 = 0x85EBCA6B, 0xC2B2AE35  # murmur3 fmix32's multipliers


class _Stream:
    """The key of the current step and the number of dropout sites seen so far in this trace."""

    def __init__(self, key: Tensor):
        self.key, self.sites = key, 0


@contextlib.contextmanager
def dropout_rng(key: Tensor) -> Iterator[None]:
    """Within: `dropout` is applied, with masks drawn from `key` (0-d int32 Tensor; `step_key`
    gives one per step). Per thread (a context variable)."""
    token = _STREAM.set(_Stream(key))
    try:
        yield
    finally:
        _STREAM.reset(token)


def step_key(seed: int, step: int) -> Tensor:
    """The 0-d int32 dropout key of `step` (any int, e.g. `global_step * micro_batches + i`) in a
    run seeded `seed`."""
    return Tensor(_int32(_fmix_int(_fmix_int(seed & _MASK32) ^ (step & _MASK32))))


def dropout(x: Tensor, rate: float) -> Tensor:
    """`x` with each element zeroed with probability `rate` and the rest scaled by `1 / (1 - rate)`
    inside `dropout_rng` (torch's `nn.functional.dropout(x, rate, training=True)`); `x` itself
    outside it or at `rate` 0. Same shape and dtype.

    Raises:
        ValueError: `rate` outside [0, 1].
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {rate}")
    stream = _STREAM.get()
    if stream is None or rate == 0.0:
        return x
    if rate == 1.0:
        return x * 0
    stream.sites += 1
    keep = ops.stop_gradient(_uniform(stream.key, stream.sites, x.shape) >= rate)
    return x * keep.astype(x.dtype) * (1.0 / (1.0 - rate))


def _uniform(key: Tensor, site: int, shape: tuple[int, ...]) -> Tensor:
    """float32 numbers in [0, 1) on a 2^-24 grid, one per element of `shape`."""
    index, stride = None, 1
    for axis in reversed(range(len(shape))):  # the flat element index, from one small constant per axis
        steps = (np.arange(shape[axis], dtype=np.int64) * stride & _MASK32).astype(np.uint32).astype(np.int32)
        steps = Tensor(steps.reshape([-1] + [1] * (len(shape) - 1 - axis)))
        index, stride = steps if index is None else index + steps, stride * shape[axis]
    site_key = _fmix(ops.stop_gradient(key) + Tensor(_int32(site * _GOLDEN)))
    bits = _fmix(index * Tensor(_int32(_GOLDEN)) + site_key)
    return _shr(bits, 8).astype(ms.float32) * (1.0 / 2 ** 24)


def _shr(h: Tensor, n: int) -> Tensor:
    """Logical right shift of int32 (`bitwise_right_shift` sign-extends)."""
    return ops.bitwise_and(ops.bitwise_right_shift(h, Tensor(np.int32(n))), Tensor(np.int32((1 << (32 - n)) - 1)))


def _fmix(h: Tensor) -> Tensor:
    """murmur3's fmix32 on int32 (wrapping multiplication, as MindSpore's CPU Mul)."""
    h = ops.bitwise_xor(h, _shr(h, 16)) * Tensor(_int32(_M1))
    h = ops.bitwise_xor(h, _shr(h, 13)) * Tensor(_int32(_M2))
    return ops.bitwise_xor(h, _shr(h, 16))


def _fmix_int(h: int) -> int:
    """fmix32 on a Python int in [0, 2^32), for the host-side key."""
    h ^= h >> 16
    h = h * _M1 & _MASK32
    h ^= h >> 13
    h = h * _M2 & _MASK32
    return h ^ h >> 16


def _int32(value: int) -> np.int32:
    """`value` mod 2^32 as the int32 with the same bits."""
    return np.uint32(value & _MASK32).astype(np.int32)
