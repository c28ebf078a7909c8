"""jit-compiled forward steps over flat tensor leaves (`msfx.jit.Graph`).

`mindspore.jit` keys tensors inside container arguments by identity, so a cache fed back as a
tuple of new tensors would recompile on every call; flat positional tensors are keyed by shape
and dtype only. A compiled step therefore takes `(input_ids, attention_mask, position_ids,
cache_position, *step_inputs, *cache_leaves)` and returns `(last_logits_float32,
*cache_leaves)`; `step_inputs` are what the architecture's `step_inputs(config)` gives per call
(a rotary model's frequencies, nothing for GPT-2). Positions are tensors, never Python ints (an
int argument recompiles per value). One graph is compiled per distinct input shape: one decode
step per (batch, cache length). The weights are not arguments: they are the graphs' own
`Parameter`s, sharing the leaves' memory (`graph_weights`). The float32 cast happens inside the
graph: an eager op on a compiled step's output made the following steps 2-4x slower (measured,
MindSpore 2.10 CPU).
Steps are traced inside `msfx.kernels.enabled()`: float32 layers use the fused CPU kernels. A Llama-like
model in half precision on CPU computes in float32 over its half-precision matrices (`widens`).
"""
from __future__ import annotations

import itertools
from types import ModuleType

import mindspore as ms
from mindspore import Parameter
from mindspore.common.tensor import Tensor

from msfx import kernels
from msfx.decode.cache import KVCache, reorder_cache
from msfx.jit import Graph
from msfx.params.tree import flatten, unflatten


_STEP_IDS = itertools.count()


def graph_weights(leaves: list[Tensor]) -> list[Parameter]:
    """`leaves` as `Parameter`s sharing their memory, for a compiled graph to close over: each tensor
    argument of a compiled CPU call costs host and launch time (a SmolLM2 decode step took 25% longer
    with its 272 weights as arguments; measured, MindSpore 2.10). Unique names per call."""
    prefix = f"msfx_step{next(_STEP_IDS)}"
    # positional arguments and a fresh `Tensor` view: MindSpore 2.10's `Parameter` copies the data
    # unless its argument's reference count shows no other holder
    return [Parameter(Tensor(leaf), f"{prefix}_{i}", False) for i, leaf in enumerate(leaves)]


def widens(arch: ModuleType, params: dict, config) -> bool:
    """Whether this model's steps compute in float32 over its half-precision matrices, widened inside the
    product and embedding kernels (`kernels.enabled(widening=True)`): a Llama-like model without experts
    or adapters, with bfloat16 or float16 matrices, on MindSpore's CPU with the kernels built. MindSpore
    2.10's CPU graphs have no bfloat16 kernels, and its float16 ones decoded SmolLM2 at 5.4 tok/s against
    26.5 in float32 (measured); the widened step reads half the bytes of float32 weights."""
    from msfx.architectures import llama

    leaves, _ = flatten(dict(params))
    return (arch is llama and llama.spec_of(config).moe is None and all(isinstance(t, Tensor) for t in leaves)
            and any(t.ndim >= 2 and t.dtype in (ms.float16, ms.bfloat16) for t in leaves) and kernels.available())


class CompiledStep:
    """The architecture's `forward` (last-position logits + cache) compiled with `mindspore.jit`.

    Called with `beam_idx` (int32 `[batch]`), the step first gathers the cache rows by it (beam
    search's reordering), inside the same graph. `compiles` counts the distinct input signatures
    seen, i.e. the graphs built (0 when `jit` is False). With `embeds`, the step's first input is
    `inputs_embeds` `[batch, seq, hidden]` instead of ids (a multimodal prompt, `msfx.architectures.llava`).
    With `widening` (see `widens`), the step holds its vectors (norms, biases) in float32, computes in
    float32 and its cache is float32 (`dtype`).
    """

    def __init__(self, arch: ModuleType, params: dict, config, jit: bool = True, embeds: bool = False,
                 widening: bool = False):
        self.arch = arch
        self.leaves, keys = flatten(dict(params))
        if widening:
            self.leaves = [t if t.ndim >= 2 else t.astype(ms.float32) for t in self.leaves]
        weights = graph_weights(self.leaves) if jit else self.leaves
        n_cache = 2 * config.num_hidden_layers  # keys and values per layer (`generate.new_cache`)

        def step(input_ids, attention_mask, position_ids, cache_position, *rest):
            inputs, cache = rest[:len(rest) - n_cache], rest[len(rest) - n_cache:]
            tree = unflatten(weights, keys)
            ids, vectors = (None, input_ids) if embeds else (input_ids, None)
            with kernels.enabled(widening):
                out = arch.forward(tree, ids, attention_mask, position_ids, KVCache.from_leaves(cache),
                                   cache_position, *inputs, config=config, inputs_embeds=vectors, logits_to_keep=1,
                                   check_ids=False)
            logits = out.logits  # [batch, 1, vocab]: a reshape, where `[:, -1]` took ~1.5 ms (CPU StridedSlice)
            logits = logits.reshape(logits.shape[0], logits.shape[2])
            return (logits if logits.dtype == ms.float32 else logits.astype(ms.float32), *out.cache.leaves())

        def reordered_step(beam_idx, input_ids, attention_mask, position_ids, cache_position, *rest):
            cache = reorder_cache(KVCache.from_leaves(rest[-n_cache:]), beam_idx)
            return step(input_ids, attention_mask, position_ids, cache_position, *rest[:-n_cache], *cache.leaves())

        self.jit, self.dtype = jit, ms.float32 if widening else self.leaves[0].dtype  # the cache's
        self._graph, self._reordered = Graph(step, "step", jit), Graph(reordered_step, "reordered_step", jit)

    @property
    def compiles(self) -> int:
        return self._graph.compiles + self._reordered.compiles

    def __call__(self, input_ids, attention_mask, position_ids, cache_position, step_inputs: tuple, cache: KVCache,
                 beam_idx: Tensor | None = None):
        signature = (tuple(input_ids.shape), tuple(attention_mask.shape), tuple(cache.keys[0].shape))
        args = (input_ids, attention_mask, position_ids, cache_position, *step_inputs, *cache.leaves())
        if beam_idx is None:
            logits, *leaves = self._graph(*args, signature=signature)
        else:
            logits, *leaves = self._reordered(beam_idx, *args, signature=signature)
        return logits, KVCache.from_leaves(leaves)
