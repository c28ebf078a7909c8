"""msfx's one `mindspore.jit` boundary: every compiled graph (decode steps, seq2seq decode steps,
training and evaluation steps) is a `Graph`.

MindSpore 2.10's trace-mode `jit` needs four things around it, each owned here:
- a unique function name per graph: trace mode caches graphs under the function's name and
  `id()`; once a closure is freed a new one can get the same id and silently run the old graph
  with the old closure's constants (seen in the test suite);
- tracing on a fresh thread: it walks `inspect.stack()` and fails on frames without source
  (`python -m` runs under frozen `runpy`);
- a cheap tensor repr during calls: it formats every argument into a debug string on each call
  (350 of 480 ms per SmolLM2 decode step went to printing the weights);
- counting: `traces` (the Python body's runs) and `compiles` (distinct input signatures seen).
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools
import threading
from typing import Callable, Hashable, Iterator

import mindspore as ms
from mindspore import Parameter
from mindspore.common.tensor import Tensor

_GRAPH_IDS = itertools.count()

_HOST_READS = contextvars.ContextVar("msfx_host_reads", default=True)


@contextlib.contextmanager
def no_host_reads() -> Iterator[None]:
    """Within: model code reads no tensor values on the host (range checks, pad positions, label
    shifts are skipped or computed in the graph). For code that `mindspore.jit` traces in trace
    mode, where a value read on the host is baked into the graph as a constant of the first call;
    the caller checks the inputs on the host beforehand. Per thread (a context variable)."""
    token = _HOST_READS.set(False)
    try:
        yield
    finally:
        _HOST_READS.reset(token)


def host_reads_allowed() -> bool:
    """False inside `no_host_reads()`."""
    return _HOST_READS.get()


@contextlib.contextmanager
def cheap_tensor_repr():
    """Tensors and Parameters print as a placeholder within (see the module docstring)."""
    saved = [(cls, cls.__dict__["__str__"], cls.__dict__["__repr__"]) for cls in (Tensor, Parameter)]
    for cls, _, _ in saved:
        cls.__str__ = cls.__repr__ = lambda self: "Tensor"
    try:
        yield
    finally:
        for cls, str_, repr_ in saved:
            cls.__str__, cls.__repr__ = str_, repr_


def call_in_fresh_thread(fn, *args):
    """`fn(*args)` run on a new thread, whose stack holds only this call (tracing needs source for
    every frame); an exception is re-raised on the caller's thread."""
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


class Graph:
    """`fn` compiled with `mindspore.jit(capture_mode="trace")` under a unique name (or run eagerly
    with `jit` False); `wrap` (e.g. `lambda f: mindspore.value_and_grad(f, ...)`) is applied to the
    compiled function, and calls go to its result.

    `fn` must take flat positional tensors (jit keys tensors inside containers by identity) and must
    not raise while tracing (an exception in a trace hangs the process at exit): callers validate first.

    `traces` counts the runs of `fn`'s Python body (while tracing, or every eager call); `compiles`
    the distinct `signature`s called with (0 when eager).
    """

    def __init__(self, fn: Callable, name: str, jit: bool = True, wrap: Callable | None = None):
        self.jit, self.traces, self.signatures = jit, 0, set()

        def body(*args):
            self.traces += 1
            return fn(*args)

        body.__name__ = body.__qualname__ = f"msfx_{name}_{next(_GRAPH_IDS)}"
        compiled = ms.jit(body, capture_mode="trace") if jit else body
        self._call = compiled if wrap is None else wrap(compiled)

    @property
    def compiles(self) -> int:
        return len(self.signatures)

    def __call__(self, *args, signature: Hashable | None = None):
        """`fn(*args)`, compiled. `signature`: a key of what decides the graph (the input shapes); the
        first call per signature traces, on a fresh thread, later ones run directly. None: any call may
        trace (every call runs on a fresh thread, none is counted)."""
        with cheap_tensor_repr():
            if not self.jit or signature in self.signatures:
                return self._call(*args)
            out = call_in_fresh_thread(self._call, *args)
        if signature is not None:
            self.signatures.add(signature)
        return out
