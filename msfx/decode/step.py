"""jit-compiled forward steps over flat tensor leaves.

`mindspore.jit` keys tensors inside container arguments by identity, so a cache fed back as a
tuple of new tensors would recompile on every call; flat positional tensors are keyed by shape
and dtype only. A compiled step therefore takes `(input_ids, attention_mask, position_ids,
cache_position, inv_freq, *param_leaves, *cache_leaves)` and returns `(last_logits_float32,
*cache_leaves)`. Positions are tensors, never Python ints (an int argument recompiles per
value). One graph is compiled per distinct input shape: one decode step per (batch, cache
length). The float32 cast happens inside the graph: an eager op on a compiled step's output
made the following steps 2-4x slower (measured, MindSpore 2.10 CPU).
"""
from __future__ import annotations

import contextlib
import itertools
import threading
from types import ModuleType

import mindspore as ms
from mindspore import Parameter
from mindspore.common.tensor import Tensor

from msfx.decode.cache import KVCache, reorder_cache
from msfx.params.tree import flatten, unflatten


@contextlib.contextmanager
def cheap_tensor_repr():
    """MindSpore 2.10's trace-mode `jit` formats every argument and result into a debug f-string
    on each call, even with debug logging off; for a model's weights that printing cost more
    than the step itself (350 of 480 ms per SmolLM2 decode step). Tensors print as a
    placeholder while a compiled step runs."""
    saved = [(cls, cls.__dict__["__str__"], cls.__dict__["__repr__"]) for cls in (Tensor, Parameter)]
    for cls, _, _ in saved:
        cls.__str__ = cls.__repr__ = lambda self: "Tensor"
    try:
        yield
    finally:
        for cls, str_, repr_ in saved:
            cls.__str__, cls.__repr__ = str_, repr_


def call_in_fresh_thread(fn, *args):
    """Run `fn(*args)` on a new thread. Trace-mode compilation walks `inspect.stack()` and
    fails on frames without source (`python -m` runs under frozen `runpy`); a fresh thread's
    stack holds only this call."""
    result = {}

    def target():
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # re-raised on the caller's thread
            result["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


_STEP_IDS = itertools.count()


class CompiledStep:
    """The architecture's `forward` (last-position logits + cache) compiled with `mindspore.jit`.

    Called with `beam_idx` (int32 `[batch]`), the step first gathers the cache rows by it (beam
    search's reordering), inside the same graph. `compiles` counts the distinct input signatures
    seen, i.e. the graphs built (0 when `jit` is False).
    """

    def __init__(self, arch: ModuleType, params: dict, config, jit: bool = True):
        self.arch = arch
        self.leaves, keys = flatten(dict(params))
        n = len(self.leaves)
        self.signatures: set = set()

        def step(input_ids, attention_mask, position_ids, cache_position, inv_freq, *leaves):
            tree = unflatten(leaves[:n], keys)
            out = arch.forward(tree, input_ids, attention_mask, position_ids, KVCache.from_leaves(leaves[n:]),
                               cache_position, inv_freq, config=config, logits_to_keep=1, check_ids=False)
            logits = out.logits  # [batch, 1, vocab]: a reshape, where `[:, -1]` took ~1.5 ms (CPU StridedSlice)
            logits = logits.reshape(logits.shape[0], logits.shape[2])
            return (logits if logits.dtype == ms.float32 else logits.astype(ms.float32), *out.cache.leaves())

        def reordered_step(beam_idx, input_ids, attention_mask, position_ids, cache_position, inv_freq, *leaves):
            cache = reorder_cache(KVCache.from_leaves(leaves[n:]), beam_idx)
            return step(input_ids, attention_mask, position_ids, cache_position, inv_freq, *leaves[:n],
                        *cache.leaves())

        # Trace-mode jit caches graphs under the function's name and id(): once a step is freed,
        # a new closure can get the same id and silently run the old graph with the old config's
        # constants (seen in the test suite). A unique name per step keeps the keys apart.
        for fn in (step, reordered_step):
            fn.__name__ = fn.__qualname__ = f"msfx_{fn.__name__}_{next(_STEP_IDS)}"
        self.jit = jit
        self._fn = ms.jit(step, capture_mode="trace") if jit else step
        self._reordered_fn = ms.jit(reordered_step, capture_mode="trace") if jit else reordered_step

    @property
    def compiles(self) -> int:
        return len(self.signatures)

    def __call__(self, input_ids, attention_mask, position_ids, cache_position, inv_freq, cache: KVCache,
                 beam_idx: Tensor | None = None):
        signature = (tuple(input_ids.shape), tuple(attention_mask.shape), tuple(cache.keys[0].shape),
                     beam_idx is not None)
        args = (input_ids, attention_mask, position_ids, cache_position, inv_freq, *self.leaves, *cache.leaves())
        fn = self._fn
        if beam_idx is not None:
            fn, args = self._reordered_fn, (beam_idx, *args)
        with cheap_tensor_repr():
            if not self.jit or signature in self.signatures:
                logits, *leaves = fn(*args)
            else:
                logits, *leaves = call_in_fresh_thread(fn, *args)
                self.signatures.add(signature)
        return logits, KVCache.from_leaves(leaves)
