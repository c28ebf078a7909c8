"""msfx.kernels: each fused CPU kernel against a numpy reference (eager and inside jit), the compiled
decode step with and without them, and the fallback without a compiler."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from msfx import kernels
from msfx.decode.step import graph_weights
from msfx.jit import Graph

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler")
MIN = np.finfo(np.float32).min


def both(fn, *args):
    """`fn(*args)` eagerly and in a trace-mode jit graph, as numpy."""
    compiled = Graph(fn, "kernel_test")
    return [tuple(t.asnumpy() for t in out) if isinstance(out, tuple) else out.asnumpy()
            for out in (fn(*args), compiled(*args))]


def test_rms_norm_and_silu_mul():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 40)).astype(np.float32), rng.standard_normal(40).astype(np.float32)
    for got in both(lambda x, w: kernels.rms_norm(x, w, 1e-5), Tensor(x), Tensor(w)):
        np.testing.assert_allclose(got, w * (x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5)), atol=1e-6)
    g, u = rng.standard_normal((2, 50)).astype(np.float32), rng.standard_normal((2, 50)).astype(np.float32)
    for got in both(kernels.silu_mul, Tensor(g), Tensor(u)):
        np.testing.assert_allclose(got, g / (1 + np.exp(-g)) * u, atol=1e-6)


def _rotate(x, cos, sin, rd):
    xr = x[..., :rd]
    rotated = np.concatenate([-xr[..., rd // 2:], xr[..., :rd // 2]], -1)
    return np.concatenate([xr * cos + rotated * sin, x[..., rd:]], -1)


def test_rope_cache_write_and_attention_match_numpy():
    """Partial rotary (6 of 8 channels), grouped heads (6 over 2), padding, a fully masked query row."""
    rng = np.random.default_rng(1)
    b, s, heads, kv, d, slots, rd = 2, 3, 6, 2, 8, 10, 6
    q, k, v = (rng.standard_normal((b * s, n * d)).astype(np.float32) for n in (heads, kv, kv))
    angles = np.tile(rng.standard_normal((b, 1, s, rd // 2)), 2).astype(np.float32)
    cos, sin = np.cos(angles), np.sin(angles)
    keys, values = (rng.standard_normal((b, kv, slots, d)).astype(np.float32) for _ in range(2))
    position = np.array([4, 5, 6], np.int32)
    heads_of = lambda y, n: y.reshape(b, s, n, d).transpose(0, 2, 1, 3)  # noqa: E731
    want_q = _rotate(heads_of(q, heads), cos, sin, rd)
    want_k, want_v = keys.copy(), values.copy()
    want_k[:, :, position], want_v[:, :, position] = _rotate(heads_of(k, kv), cos, sin, rd), heads_of(v, kv)
    inputs = [Tensor(a) for a in (q, k, v, cos, sin, keys, values, position)]
    for got in both(kernels.rope_cache_write, *inputs):
        for a, want in zip(got, (want_q, want_k, want_v)):
            np.testing.assert_allclose(a, want, atol=1e-6)

    mask = np.ones((b, slots), bool)
    mask[1, :2] = False
    allowed = (np.arange(slots)[None] <= position[:, None])[None] & mask[:, None]
    bias = np.where(allowed, 0, MIN).astype(np.float32)
    bias[0, 0] = MIN  # every key masked: HF's softmax averages them all
    scores = np.einsum("bhsd,bhtd->bhst", want_q, np.repeat(want_k, heads // kv, 1)) * d ** -0.5 + bias[:, None]
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.einsum("bhst,bhtd->bhsd", probs, np.repeat(want_v, heads // kv, 1)).transpose(0, 2, 1, 3)
    for got in both(lambda *a: kernels.cache_attention(*a, d ** -0.5), Tensor(want_q.astype(np.float32)),
                    Tensor(want_k), Tensor(want_v), Tensor(bias.reshape(b, 1, 1, s, slots))):
        np.testing.assert_allclose(got, want.reshape(b * s, heads * d), atol=1e-6)


@pytest.mark.parametrize("dtype", [ms.float32, ms.bfloat16, ms.float16])
def test_linear_and_embedding_widen_the_weights_exactly(dtype):
    """Products for 1-9 input rows (every dot-product tile shape) and 9-40 (packed panels, every remainder of 8
    rows), 7 outputs (not a multiple of 4) and 37 inputs (not of 16), panels past the first (71 outputs) and
    depths past the first (600 inputs), and embedding rows, against numpy on the weights widened to float32."""
    rng = np.random.default_rng(2)
    weight = Tensor(rng.standard_normal((7, 37)).astype(np.float32)).astype(dtype)
    wide = weight.astype(ms.float32).asnumpy()
    for rows in (*range(1, 26), 40):
        x = rng.standard_normal((rows, 37)).astype(np.float32)
        for got in both(kernels.linear, Tensor(x), weight):
            np.testing.assert_allclose(got, x @ wide.T, atol=1e-5)
    deep = Tensor(rng.standard_normal((71, 600)).astype(np.float32)).astype(dtype)
    x = rng.standard_normal((19, 600)).astype(np.float32)
    for got in both(kernels.linear, Tensor(x), deep):
        np.testing.assert_allclose(got, x @ deep.astype(ms.float32).asnumpy().T, atol=1e-4)
    for ids in (np.array([[6, 0], [3, 3]], np.int64), np.array([1, 5], np.int32)):
        for got in both(kernels.embedding, Tensor(ids), weight):
            np.testing.assert_array_equal(got, wide[ids])
    with pytest.raises(RuntimeError):
        kernels.embedding(Tensor(np.array([7], np.int32)), weight).asnumpy()


@pytest.mark.parametrize("dtype", [ms.float32, ms.bfloat16, ms.float16])
def test_products_of_several_weights_in_one_op(dtype):
    """q, k and v in one op: each output equals its own product bit for bit (outputs of 7, 9 and 17 rows,
    split over the workers end to end); `gated_linear` is `silu_mul` of the gate and up products (to an ulp:
    the exponential may be vectorised differently)."""
    rng = np.random.default_rng(4)
    weights = [Tensor(rng.standard_normal((n, 37)).astype(np.float32)).astype(dtype) for n in (7, 9, 17)]
    for rows in (1, 2, 3, 8, 9, 21):
        x = Tensor(rng.standard_normal((rows, 37)).astype(np.float32))
        alone = [kernels.linear(x, w).asnumpy() for w in weights]
        for got in both(kernels.linear, x, *weights):
            for a, want in zip(got, alone):
                np.testing.assert_array_equal(a, want)
        up = (weights[1].astype(ms.float32) * 0.5).astype(dtype)  # x up^T = (x gate^T) / 2, exactly
        want = kernels.silu_mul(Tensor(alone[1]), Tensor(alone[1] * 0.5)).asnumpy()
        for got in both(kernels.gated_linear, x, weights[1], up):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_products_refuse_wrong_shapes_and_dtypes_by_name():
    x, w = Tensor(np.ones((9, 5), np.float32)), Tensor(np.ones((3, 5), np.float32))
    cases = [(kernels.linear, (x, Tensor(np.ones((3, 4), np.float32))), "each weight must be \\[n, 5\\]"),
             (kernels.linear, (x, Tensor(np.ones(5, np.float32))), "each weight"),
             (kernels.linear, (x, Tensor(np.ones((3, 5), np.int32))), "each weight"),
             (kernels.linear, (x, w, w.astype(ms.float16)), "the same for all"),
             (kernels.linear, (x, w, w, w, w, w), "1 to 4 weights"),
             (kernels.linear, (x.astype(ms.float16), w), "x must be float32"),
             (kernels.linear, (Tensor(np.ones(5, np.float32)), w), "x must be float32 \\[m, k\\]"),
             (kernels.gated_linear, (x, w, Tensor(np.ones((4, 5), np.float32))), "the same rows")]
    for fn, args, message in cases:
        with pytest.raises(ValueError, match=message):
            fn(*args)


def test_compiled_decode_with_and_without_kernels(monkeypatch):
    """The same greedy tokens and last logits with the kernels as with MindSpore's ops; a perturbed
    kernel changes them (the kernels are on the compiled path)."""
    import transformers
    from msfx.architectures import llama
    from msfx.decode.step import CompiledStep
    from msfx.decode.generate import new_cache

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    params = llama.init_params(config, seed=3)
    ids = Tensor(np.array([[5, 9, 2, 7]], np.int32))
    mask, position = Tensor(np.ones((1, 8), np.int32)), Tensor(np.arange(4, dtype=np.int32)[None])

    def logits():
        step = CompiledStep(llama, params, config)
        out, _ = step(ids, mask, position, Tensor(np.arange(4, dtype=np.int32)),
                      llama.step_inputs(config)(position.asnumpy()), new_cache(config, 1, 8, ms.float32))
        return out.asnumpy()

    fused = logits()
    monkeypatch.setattr(kernels, "active", lambda: False)
    plain = logits()
    np.testing.assert_allclose(fused, plain, atol=1e-5)
    monkeypatch.undo()
    original = kernels.silu_mul
    monkeypatch.setattr(kernels, "silu_mul", lambda g, u: original(g, u) * 1.5)
    assert np.abs(logits() - plain).max() > 1e-3


def test_graph_weights_share_the_leaves_memory():
    leaves = [Tensor(np.arange(6, dtype=np.float32).reshape(2, 3)), Tensor(np.ones(4, np.float16))]
    weights = graph_weights(leaves)
    assert [w.data_ptr() for w in weights] == [leaf.data_ptr() for leaf in leaves]
    assert not any(w.requires_grad for w in weights)


def test_no_compiler_means_no_kernels(monkeypatch):
    kernels.library.cache_clear()
    try:
        monkeypatch.setenv("CXX", "/nonexistent/c++")
        assert kernels.library() is None and not kernels.available()
        with kernels.enabled():
            assert not kernels.active()
    finally:
        kernels.library.cache_clear()
        monkeypatch.delenv("CXX")
        assert kernels.available()
