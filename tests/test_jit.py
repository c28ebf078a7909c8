"""msfx.jit.Graph: the one mindspore.jit boundary (unique names, fresh-thread tracing, counts)."""
from __future__ import annotations

import gc

import numpy as np
from mindspore import Tensor

from msfx.jit import Graph


def _scaled(factor: float):
    def fn(x):
        return x * factor
    return fn


def test_counts_traces_and_signatures():
    graph = Graph(_scaled(2.0), "test_scaled")
    x, y = Tensor(np.ones((2, 3), np.float32)), Tensor(np.ones((4, 3), np.float32))
    for t in (x, x, y, x):
        np.testing.assert_array_equal(graph(t, signature=t.shape).asnumpy(), 2 * t.asnumpy())
    assert graph.compiles == 2 and graph.traces == 2  # one graph per shape, traced once each
    eager = Graph(_scaled(2.0), "test_scaled", jit=False)
    eager(x, signature=x.shape)
    eager(x, signature=x.shape)
    assert eager.compiles == 0 and eager.traces == 2


def test_recreated_closures_do_not_reuse_a_freed_graph():
    """Trace-mode jit keys graphs by function name and id(): a new closure of a freed one must still
    run its own constants (the unique names keep them apart)."""
    x = Tensor(np.ones((2, 2), np.float32))
    for factor in (1.0, 2.0, 3.0, 4.0):
        graph = Graph(_scaled(factor), "test_recreated")
        np.testing.assert_array_equal(graph(x, signature=x.shape).asnumpy(), factor * x.asnumpy())
        del graph
        gc.collect()
