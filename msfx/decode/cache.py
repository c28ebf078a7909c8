"""Explicit key/value cache state for decoder-only attention.

The cache is a value, not hidden module state: functions take a `KVCache` and return the
updated one. Per layer it holds preallocated buffers `[batch, kv_heads, max_len, head_dim]`;
HF's `cache_position` (`[seq]` int, the slots being written) says where new entries go.
"""
from __future__ import annotations

from typing import NamedTuple

import mindspore as ms
from mindspore import Tensor, ops

from msfx.backend import lacks_bf16_kernels


class KVCache(NamedTuple):
    """Per-layer key and value buffers, each `[batch, kv_heads, length, head_dim]`: `max_len` slots,
    or fewer for a sliding-window layer, whose buffer is a ring of the last `length` positions
    (slot `position % length`; see `write_ring`)."""

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]

    @classmethod
    def init(cls, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
             dtype=ms.float32, lengths: tuple[int, ...] | None = None) -> "KVCache":
        """Zero-filled buffers for `num_layers` layers, `max_len` slots each unless `lengths` gives
        each layer's (ring buffers for sliding-window layers)."""
        lengths = lengths or (max_len,) * num_layers
        shapes = [(batch, kv_heads, n, head_dim) for n in lengths]
        return cls(tuple(ops.zeros(shape, dtype) for shape in shapes),
                   tuple(ops.zeros(shape, dtype) for shape in shapes))

    @property
    def max_len(self) -> int:
        """Slots of the full-length buffers: the positions the cache can hold."""
        return max(k.shape[2] for k in self.keys)

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


def write_ring(buffer: Tensor, new: Tensor, cache_position: Tensor) -> Tensor:
    """`buffer` `[b, h, ring, d]`, a ring of the last `ring` positions, with `new` `[b, h, seq, d]`
    (at positions `cache_position` `[seq]`, consecutive) written at slots `position % ring`; of a
    `new` longer than the ring only its last `ring` entries stay."""
    ring, s = buffer.shape[2], new.shape[2]
    if s > ring:
        new, cache_position = new[:, :, s - ring:], cache_position[s - ring:]
    return write_cache(buffer, new, ops.floor_mod(cache_position.astype(ms.int32), ring))
