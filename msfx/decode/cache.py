"""Explicit key/value cache state for decoder-only attention.

The cache is a value, not hidden module state: functions take a `KVCache` and return the
updated one. Per layer it holds preallocated buffers `[batch, kv_heads, max_len, head_dim]`;
HF's `cache_position` (`[seq]` int, the slots being written) says where new entries go.
"""
from __future__ import annotations

from typing import NamedTuple

import mindspore as ms
from mindspore import Tensor, ops

from msfx.layers.basic import lacks_bf16_kernels


class KVCache(NamedTuple):
    """Per-layer key and value buffers, each `[batch, kv_heads, max_len, head_dim]`."""

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]

    @classmethod
    def init(cls, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
             dtype=ms.float32) -> "KVCache":
        """Zero-filled buffers for `num_layers` layers."""
        shape = (batch, kv_heads, max_len, head_dim)
        return cls(tuple(ops.zeros(shape, dtype) for _ in range(num_layers)),
                   tuple(ops.zeros(shape, dtype) for _ in range(num_layers)))

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def leaves(self) -> tuple[Tensor, ...]:
        """Flat `(k0, v0, k1, v1, ...)`: the form jit-compiled steps take and return."""
        return tuple(t for kv in zip(self.keys, self.values) for t in kv)

    @classmethod
    def from_leaves(cls, leaves) -> "KVCache":
        return cls(tuple(leaves[0::2]), tuple(leaves[1::2]))


def write_cache(buffer: Tensor, new: Tensor, cache_position: Tensor) -> Tensor:
    """`buffer` `[b, h, max_len, d]` with `new` `[b, h, seq, d]` written at slots `cache_position` `[seq]`."""
    b, h, s, d = new.shape
    index = ops.broadcast_to(cache_position.astype(ms.int32).reshape(1, 1, s, 1), (b, h, s, d))
    if lacks_bf16_kernels(buffer):  # exact: bfloat16 values round-trip through float32
        return ops.tensor_scatter_elements(buffer.astype(ms.float32), index, new.astype(ms.float32),
                                           axis=2).astype(buffer.dtype)
    new = new if new.dtype == buffer.dtype else new.astype(buffer.dtype)
    return ops.tensor_scatter_elements(buffer, index, new, axis=2)


def reorder_cache(cache: KVCache, beam_idx: Tensor) -> KVCache:
    """`cache` with its batch rows gathered by `beam_idx` (int `[batch]`, source row per output row):
    beam search's per-step reordering (HF `Cache.reorder_cache`)."""
    def gather(buffer: Tensor) -> Tensor:
        if lacks_bf16_kernels(buffer):  # exact: bfloat16 values round-trip through float32
            return ops.gather(buffer.astype(ms.float32), beam_idx, 0).astype(buffer.dtype)
        return ops.gather(buffer, beam_idx, 0)

    return KVCache(tuple(gather(k) for k in cache.keys), tuple(gather(v) for v in cache.values))
