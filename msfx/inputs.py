"""The input checks every model's forward and `generate` run first, on the host, before any
compiled code (an error raised while `mindspore.jit` traces leaves the process unable to exit)."""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor

from msfx.jit import host_reads_allowed


def check_model_inputs(config, input_ids: Tensor | None, inputs_embeds: Tensor | None, attention_mask: Tensor | None,
                       position_ids: Tensor | None = None, keys: int | None = None,
                       check_ids: bool = True) -> tuple[int, int]:
    """The checks every model's forward runs first; returns `(batch, seq)`. Static (shapes and
    dtypes), so they also run while `jit` traces; `check_ids` also reads the ids on the host to
    check their range.

    `attention_mask` must be `[batch, keys]` (`keys` defaults to `seq`; with a KV cache, its
    length) and `position_ids` `[batch, seq]` or `[1, seq]`.

    Raises:
        ValueError: none or both of `input_ids` / `inputs_embeds`, non-integer or non-2-D ids,
            out-of-range ids, an empty sequence, a mis-shaped mask or positions.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.dtype not in (ms.int32, ms.int64):
            kind = f"{input_ids.dtype} {list(input_ids.shape)}" if isinstance(input_ids, Tensor) else type(input_ids)
            raise ValueError(f"input_ids must be an int32/int64 mindspore Tensor [batch, seq], got {kind}")
        b, s = input_ids.shape
        if check_ids and host_reads_allowed():
            check_token_ids(input_ids, config.vocab_size)
    else:
        b, s = inputs_embeds.shape[0], inputs_embeds.shape[1]
    if s == 0:
        raise ValueError("the input sequence is empty (length 0)")
    keys = s if keys is None else keys
    if attention_mask is not None and tuple(attention_mask.shape) != (b, keys):
        what = "the sequence length" if keys == s else "the cache length"
        raise ValueError(f"attention_mask has shape {list(attention_mask.shape)}, expected [batch, keys] = "
                         f"[{b}, {keys}] ({what})")
    if position_ids is not None and tuple(position_ids.shape) not in ((b, s), (1, s)):
        raise ValueError(f"position_ids has shape {list(position_ids.shape)}, expected [{b}, {s}] or [1, {s}]")
    return b, s


def check_token_ids(input_ids, vocab_size: int) -> np.ndarray:
    """`input_ids` (Tensor or array; 1-D taken as one row) as an int numpy array `[batch, seq]`.

    Raises:
        ValueError: an empty sequence or batch, a non-integer or non-2-D input, or an id
            outside `[0, vocab_size)` (named).
    """
    ids = input_ids.asnumpy() if isinstance(input_ids, Tensor) else np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim == 2 and ids.shape[1] == 0:
        raise ValueError("input_ids is empty (sequence length 0): give at least one token")
    if ids.ndim == 2 and ids.shape[0] == 0:
        raise ValueError("input_ids is an empty batch (0 rows): give at least one sequence")
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integer [batch, seq], got {ids.dtype} {list(ids.shape)}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids.max() if ids.max() >= vocab_size else ids.min()
        raise ValueError(f"token id {bad} in input_ids is out of range for vocab_size {vocab_size}")
    return ids
