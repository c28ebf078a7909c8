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
             (kernels.gated_linear, (x, w, Tensor(np.ones((4, 5), np.float32))), "the same rows"),
             (kernels.gated_linear, tuple(t[:, :4].astype(ms.bfloat16) for t in (x, w, w)), "x must be float32")]
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


BF16_DOT = kernels.available() and kernels._has_bf16_dot()


@pytest.mark.skipif(not BF16_DOT, reason="no AVX512-BF16")
def test_bfloat16_inputs_times_bfloat16_weights():
    """Eager bfloat16 products (HF's bfloat16 models): every remainder of the 16-row groups and of the 5-group
    blocks (1-100 rows, 160, 181), outputs not a multiple of the 4-column tiles, several weights in one op,
    against float64 sums of the same bfloat16 values; odd depths are refused by name."""
    rng = np.random.default_rng(5)
    weights = [Tensor(rng.standard_normal((n, 38)).astype(np.float32)).astype(ms.bfloat16) for n in (7, 9, 33)]
    wide = [w.astype(ms.float32).asnumpy().astype(np.float64) for w in weights]
    for rows in (*range(1, 101), 160, 181):
        x = Tensor(rng.standard_normal((rows, 38)).astype(np.float32)).astype(ms.bfloat16)
        xw = x.astype(ms.float32).asnumpy().astype(np.float64)
        for got, w in zip(kernels.linear(x, *weights), wide):
            assert got.dtype == ms.float32
            np.testing.assert_allclose(got.asnumpy(), xw @ w.T, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="even k"):
        kernels.linear(Tensor(np.ones((9, 5), np.float32)).astype(ms.bfloat16),
                       Tensor(np.ones((3, 5), np.float32)).astype(ms.bfloat16))


def test_eager_bfloat16_layers_match_mindspore_ops_and_their_gradients():
    """`linear` on bfloat16 inputs (kernel products, widened inputs for <= 8 rows), `add`, `mul`, `transposed`,
    `embedding` and `cast` give MindSpore's own bfloat16 results; `linear`'s gradients are those of widening
    both operands for `MatMul`."""
    from mindspore import ops

    from msfx.layers import basic

    rng = np.random.default_rng(6)
    w = Tensor(rng.standard_normal((24, 64)).astype(np.float32)).astype(ms.bfloat16)
    for rows in (3, 40):
        x = Tensor(rng.standard_normal((rows, 64)).astype(np.float32)).astype(ms.bfloat16)
        want = ops.matmul(x.astype(ms.float32), w.astype(ms.float32).T).astype(ms.bfloat16)
        np.testing.assert_allclose(basic.linear(x, w).astype(ms.float32).asnumpy(),
                                   want.astype(ms.float32).asnumpy(), rtol=8e-3)
        got = ms.grad(lambda x, w: basic.linear(x, w).astype(ms.float32).sum(), (0, 1))(x, w)
        ref = ms.grad(lambda x, w: ops.matmul(x.astype(ms.float32), w.astype(ms.float32).T).sum(), (0, 1))(x, w)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a.astype(ms.float32).asnumpy(), b.astype(ms.float32).asnumpy())
    a, b = (Tensor(rng.standard_normal((5, 7, 8)).astype(np.float32)).astype(ms.bfloat16) for _ in range(2))
    wide = a.astype(ms.float32).asnumpy()
    for ours, theirs in ((basic.add(a, b), (a + b).astype(ms.float32).asnumpy()),
                         (basic.mul(a, b), (a * b).astype(ms.float32).asnumpy()),
                         (basic.transposed(a, (1, 0, 2)), wide.transpose(1, 0, 2)),
                         (basic.embedding(Tensor(np.array([[3, 1]], np.int32)), a[0]), wide[0][[[3, 1]]])):
        assert ours.dtype == ms.bfloat16
        np.testing.assert_array_equal(ours.astype(ms.float32).asnumpy(), theirs)


def test_cast_rounds_as_torch():
    """Every bfloat16 bit pattern widens exactly; float32 values (ties, NaN, infinities, the largest finite ones,
    denormals) round to torch's bfloat16 bits."""
    import torch

    every = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)
    wide = kernels.cast(Tensor(every).astype(ms.bfloat16), ms.float32).asnumpy()
    nan = np.isnan(every)
    np.testing.assert_array_equal(wide[~nan].view(np.uint32), every[~nan].view(np.uint32))
    assert np.isnan(wide[nan]).all()
    rng = np.random.default_rng(7)
    finite = every[np.isfinite(every)]
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 100, finite + finite * 2 ** -8,  # ties
                        np.array([np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-40, -1e-45], np.float32)])
    ours = kernels.cast(Tensor(x), ms.bfloat16)
    assert ours.dtype == ms.bfloat16
    theirs = torch.from_numpy(x).bfloat16().view(torch.int16).numpy()
    got = kernels.cast(ours, ms.float32).asnumpy().view(np.uint32) >> 16
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan].astype(np.uint16), theirs[~nan].view(np.uint16))
    assert np.isnan(kernels.cast(ours, ms.float32).asnumpy()[nan]).all()


@pytest.mark.parametrize("name", kernels.STEPWISE)
def test_stepwise_activations_give_torch_bfloat16_bits_and_gradients(name):
    """On every finite bfloat16 value: torch's bits (QuickGELU's below ~1e-30 aside, where torch's sigmoid
    underflows to 0 first); gradients as torch's float32 autograd to bfloat16 precision."""
    import torch
    from transformers.activations import ACT2FN

    every = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)
    every = every[np.isfinite(every)]
    x = Tensor(every).astype(ms.bfloat16)
    ours = kernels.stepwise_activation(x, name).astype(ms.float32).asnumpy()
    theirs = ACT2FN[name](torch.from_numpy(every).bfloat16()).float().numpy()
    differ = ours != theirs
    assert not (differ & (np.abs(theirs) > 1e-30)).any()
    small = Tensor(np.linspace(-6, 6, 97, dtype=np.float32)).astype(ms.bfloat16)
    grad = ms.grad(lambda v: kernels.stepwise_activation(v, name).astype(ms.float32).sum())(small)
    t = torch.tensor(small.astype(ms.float32).asnumpy(), requires_grad=True)
    ACT2FN[name](t).sum().backward()
    np.testing.assert_allclose(grad.astype(ms.float32).asnumpy(), t.grad.numpy(), rtol=8e-3, atol=1e-3)


def test_bfloat16_rms_norm_gives_torch_bits():
    """HF's T5LayerNorm in bfloat16 on bfloat16 and on float32 inputs (T5's float32 residual stream): torch's
    bits; gradients as torch's float32 autograd to bfloat16 precision."""
    import torch
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    rng = np.random.default_rng(8)
    norm = T5LayerNorm(96, 1e-6)
    norm.weight.data = torch.from_numpy(rng.standard_normal(96).astype(np.float32)).bfloat16()
    w = Tensor(norm.weight.data.float().numpy()).astype(ms.bfloat16)
    x = rng.standard_normal((13, 96)).astype(np.float32) * 3
    for xs in (Tensor(x).astype(ms.bfloat16), Tensor(x)):
        ours = kernels.rms_norm_bf16(xs, w, 1e-6)
        assert ours.dtype == ms.bfloat16
        theirs = torch.from_numpy(xs.astype(ms.float32).asnumpy())
        theirs = norm(theirs.bfloat16() if xs.dtype == ms.bfloat16 else theirs)
        np.testing.assert_array_equal(ours.astype(ms.float32).asnumpy(), theirs.float().detach().numpy())
    grads = ms.grad(lambda x, w: kernels.rms_norm_bf16(x, w, 1e-6).astype(ms.float32).sum(), (0, 1))(Tensor(x), w)
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w.astype(ms.float32).asnumpy(), requires_grad=True)
    (tw * (tx * torch.rsqrt(tx.pow(2).mean(-1, keepdim=True) + 1e-6))).sum().backward()
    np.testing.assert_allclose(grads[0].asnumpy(), tx.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads[1].astype(ms.float32).asnumpy(), tw.grad.numpy(), rtol=8e-3)


def test_actor_threads_get_the_lowest_priority():
    import os

    from msfx.backend import lower_actor_threads

    (Tensor(np.ones(3, np.float32)) * 2).asnumpy()  # MindSpore's runtime threads start with its first op
    lower_actor_threads()
    niced = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            if f.read().startswith("ActorThread"):
                niced.append(os.getpriority(os.PRIO_PROCESS, int(tid)))
    assert niced and all(n == 19 for n in niced)


def test_bfloat16_layer_norm_gives_torch_bits():
    """torch.nn.LayerNorm in bfloat16 (float32 statistics, one rounding): torch's bits on all but a few
    rounding ties of the float32 sums' order; gradients as torch's float32 autograd to bfloat16 precision."""
    import torch

    rng = np.random.default_rng(9)
    norm = torch.nn.LayerNorm(160, eps=1e-5)
    norm.weight.data = torch.from_numpy(rng.standard_normal(160).astype(np.float32))
    norm.bias.data = torch.from_numpy(rng.standard_normal(160).astype(np.float32))
    norm = norm.bfloat16()
    w, b = (Tensor(t.data.float().numpy()).astype(ms.bfloat16) for t in (norm.weight, norm.bias))
    x = (rng.standard_normal((2, 21, 160)) * 3 + 1).astype(np.float32)
    xs = Tensor(x).astype(ms.bfloat16)
    ours = kernels.layer_norm_bf16(xs, w, b, 1e-5)
    assert ours.dtype == ms.bfloat16 and ours.shape == xs.shape
    theirs = norm(torch.from_numpy(xs.astype(ms.float32).asnumpy()).bfloat16()).float().detach().numpy()
    ours = ours.astype(ms.float32).asnumpy()
    assert (ours != theirs).mean() < 0.01
    np.testing.assert_allclose(ours, theirs, rtol=8e-3, atol=8e-3)
    grads = ms.grad(lambda *a: kernels.layer_norm_bf16(*a, 1e-5).astype(ms.float32).sum(), (0, 1, 2))(xs, w, b)
    tx = torch.tensor(xs.astype(ms.float32).asnumpy(), requires_grad=True)
    tw, tb = (torch.tensor(t.astype(ms.float32).asnumpy(), requires_grad=True) for t in (w, b))
    torch.nn.functional.layer_norm(tx, (160,), tw, tb, 1e-5).sum().backward()
    for g, t in zip(grads, (tx, tw, tb)):
        np.testing.assert_allclose(g.astype(ms.float32).asnumpy(), t.grad.numpy(), rtol=8e-3, atol=2e-2)
