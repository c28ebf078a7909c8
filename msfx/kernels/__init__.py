"""Fused CPU kernels for compiled inference and training steps: C++ (`cpu_kernels.cc`) run by
`mindspore.ops.Custom(func_type="aot")` inside `jit` graphs.

A compiled CPU step pays ~10-20 µs per op whatever its size (MindSpore 2.10), and a SmolLM2
decode step spent about as long in ~60 small ops per layer as in its matrix products. These
kernels do a layer's rotary, cache write, attention, RMSNorm and SwiGLU product in 5 ops. `linear`
and `embedding` read bfloat16 / float16 weights and compute in float32 (`enabled(widening=True)`):
MindSpore 2.10's CPU graphs have no bfloat16 kernels, and half the bytes per token makes decoding
faster than in float32.

The library is compiled once per source and machine with the system's C++ compiler (`$CXX`, else
`g++`) into `cache_dir()/kernels/`. Without a compiler, or with `MSFX_KERNELS=0`, `available()` is
False and the model code runs its MindSpore ops instead (same numbers to ~1e-7). The float32 model kernels
run only inside `enabled()`, which compiled inference steps enter: they have no gradient. Eager bfloat16
code (HF's bfloat16 models, op by op: MindSpore 2.10's CPU has no bfloat16 graphs) uses the differentiable
ones wherever `available()`: `linear` (bfloat16 inputs with AVX512-BF16), `embedding`, `cast`,
`stepwise_activation`, `rms_norm_bf16`, `layer_norm_bf16`. The optimizer's kernels (`adamw`, `sum_squares`)
run in the training step's update graph wherever `available()` (`msfx.train.optim`): the update is not
differentiated.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
# no errno: sqrt vectorises; no trapping math: selects between computed values vectorise (the activations' loops)
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC")
MAX_QUERIES = 64  # longer inputs (prompts) attend with MindSpore's batched products: the kernel loops per query
DOT_ROWS = 8  # products of up to this many rows run as dot-product tiles, of more as packed panels (cpu_kernels.cc)
MAX_FLOAT32_ROWS = 128  # float32 products of more rows run in MindSpore's MatMul, ~10% faster at 192-320 rows

_ENABLED = contextvars.ContextVar("msfx_kernels", default=False)
_WIDENING = contextvars.ContextVar("msfx_kernels_widening", default=False)
_log = logging.getLogger(__name__)


@contextlib.contextmanager
def enabled(widening: bool = False) -> Iterator[None]:
    """Within (per thread): float32 inference code uses the kernels where `available()`. With `widening`,
    it computes in float32 over half-precision matrices, which `linear` and `embedding` here widen exactly; the
    caller gives every other weight in float32 (`msfx.decode.step.CompiledStep`)."""
    tokens = _ENABLED.set(True), _WIDENING.set(widening)
    try:
        yield
    finally:
        _WIDENING.reset(tokens[1])
        _ENABLED.reset(tokens[0])


def active() -> bool:
    """Inside `enabled()` with the library built."""
    return _ENABLED.get() and available()


def widening() -> bool:
    """Inside `enabled(widening=True)` with the library built."""
    return _WIDENING.get() and active()


def available() -> bool:
    """The backend is MindSpore's CPU (the kernels read and write host memory) and the library is built."""
    import mindspore as ms

    return ms.get_context("device_target") == "CPU" and library() is not None


@functools.cache
def library() -> str | None:
    """Path of the compiled kernel library, building it on first use; None without a compiler, if the
    build fails (logged once) or with `MSFX_KERNELS=0`."""
    if os.environ.get("MSFX_KERNELS", "1") == "0":
        return None
    wanted = os.environ.get("CXX", "g++")
    compiler = shutil.which(wanted)
    if compiler is None:
        _log.warning("msfx: C++ compiler %r ($CXX, else g++) not found; compiled steps run without fused kernels "
                     "(slower)", wanted)
        return None
    from msfx.params.gguf import cache_dir

    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS, platform.processor(), _cpu_flags())).encode())
    path = cache_dir() / "kernels" / f"msfx_kernels_{key.hexdigest()[:16]}.so"
    if path.exists():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # built aside, then renamed: atomic for other processes
        built = Path(tmp) / path.name
        result = subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE)], capture_output=True, text=True)
        if result.returncode != 0:
            _log.warning("msfx: building the fused kernels failed; compiled steps run without them:\n%s",
                         result.stderr[-2000:])
            return None
        os.replace(built, path)
    return str(path)


def _cpu_flags() -> str:
    # -march=native code is only valid on CPUs with the same instruction sets
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


@functools.cache
def _op(name: str, out_shape, out_dtype, bprop=None):
    from mindspore import ops

    return ops.Custom(f"{library()}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot", bprop=bprop)


def _first(*args):
    return args[0]


def _three(*args):
    return args[0], args[0], args[0]


def _rope_shapes(q, k, v, cos, sin, keys, values, position):
    return [cos[0], q[1] // keys[3], cos[2], keys[3]], keys, values


def _token_major(q, *args):
    return [q[0] * q[2], q[1] * q[3]]


def _scalar(value: float):
    from mindspore import Tensor

    return Tensor(np.array([value], np.float32))


def rms_norm(x, weight, eps: float):
    """`weight * (x * rsqrt(mean(x^2, -1) + eps))` for float32 `x` `[..., hidden]`, `weight` `[hidden]`."""
    return _op("MsfxRmsNorm", _first, _first)(x, weight, _scalar(eps))


def rms_norm_bf16(x, weight, eps: float):
    """HF's RMSNorm of a bfloat16 model as torch computes it: `weight * bf16(x * rsqrt(mean(x^2, -1) + eps))`,
    rounded to bfloat16, for `x` `[..., hidden]` float32 or bfloat16 and bfloat16 `weight` `[hidden]` -> bfloat16
    like `x` (one op for the ~9 MindSpore ops and their slow bfloat16 kernels). Differentiable."""
    return _op("MsfxRmsNormBf16", _first, _bfloat16, _rms_norm_bprop)(x, weight, _scalar(eps))


def _bfloat16(*dtypes):
    from mindspore import bfloat16

    return bfloat16


def _rms_norm_bprop(x, weight, eps, _, dy):
    """Gradients of `rms_norm_bf16` in float32 (the roundings' straight-through gradients)."""
    import mindspore as ms
    from mindspore import ops

    xf, wf, g = x.astype(ms.float32), weight.astype(ms.float32), dy.astype(ms.float32)
    inv = ops.rsqrt(ops.mean(xf * xf, -1, keep_dims=True) + eps)
    dn = g * wf
    dx = inv * (dn - xf * inv * inv * ops.mean(dn * xf, -1, keep_dims=True))
    dw = (g * xf * inv).reshape(-1, xf.shape[-1]).sum(0)
    return dx.astype(x.dtype), dw.astype(weight.dtype), ops.zeros_like(eps)


def layer_norm_bf16(x, weight, bias, eps: float):
    """`torch.nn.LayerNorm` of a bfloat16 model: bfloat16 `x` `[..., hidden]`, `weight` and `bias` `[hidden]` ->
    bfloat16 like `x`, computed in float32 and rounded once (one op for MindSpore's ~10, whose broadcasts took
    ~2 ms each at [77, 5120]). Differentiable."""
    return _op("MsfxLayerNormBf16", _first, _bfloat16, _layer_norm_bprop)(x, weight, bias, _scalar(eps))


def _layer_norm_bprop(x, weight, bias, eps, _, dy):
    """Gradients of `layer_norm_bf16` in float32 (the rounding's straight-through gradient)."""
    import mindspore as ms
    from mindspore import ops

    xf, g = x.astype(ms.float32), dy.astype(ms.float32)
    centered = xf - ops.mean(xf, -1, keep_dims=True)
    inv = ops.rsqrt(ops.mean(centered * centered, -1, keep_dims=True) + eps)
    n = centered * inv
    dn = g * weight.astype(ms.float32)
    dx = inv * (dn - ops.mean(dn, -1, keep_dims=True) - n * ops.mean(dn * n, -1, keep_dims=True))
    rows = x.shape[-1]
    dw, db = (g * n).reshape(-1, rows).sum(0), g.reshape(-1, rows).sum(0)
    return dx.astype(x.dtype), dw.astype(weight.dtype), db.astype(bias.dtype), ops.zeros_like(eps)


def _product_shapes(x, *weights):
    shapes = tuple([x[0], w[0]] for w in weights)
    return shapes[0] if len(shapes) == 1 else shapes


def _float32_each(x, *weights):
    from mindspore import float32

    return float32 if len(weights) == 1 else (float32,) * len(weights)


def linear(x, *weights):
    """`x @ w.T` for float32 `x` `[m, k]` and each of one to four `weights` `[n, k]` in float32, bfloat16 or
    float16 (one storage for all, widened exactly) -> float32 `[m, n]` each (a tuple for several), split over
    worker threads in one op (a decode step's matrix-vector products: q, k and v at once; a prompt's rows in
    packed panels). Where `bf16_dot(x, weights)`, `x` may be bfloat16 (AVX512-BF16's pairwise products, as
    torch's bfloat16 `linear` on CPU). Differentiable (`_linear_bprop`), so eager code may call it outside
    `enabled()`.

    Raises:
        ValueError: other dtypes or shapes than these (checked before the op, whose own error says only
            that the kernel failed).
    """
    _check_products(x, weights, 4, bf16_inputs=True)
    return _op("MsfxLinear", _product_shapes, _float32_each, _linear_bprop)(x, *weights)


def _linear_bprop(x, *args):
    """Gradients of `linear`: `dx = sum(dy w)`, `dw = dy^T x`, in float32 rounded to each input's dtype (the
    gradients of widening casts then `MatMul`)."""
    import mindspore as ms
    from mindspore import ops

    *weights, _, dys = args
    dys = dys if len(weights) > 1 else (dys,)
    dx = sum(ops.matmul(dy, w.astype(ms.float32)) for dy, w in zip(dys, weights))
    xf = x.astype(ms.float32)
    return (dx.astype(x.dtype), *(ops.matmul(dy.T, xf).astype(w.dtype) for dy, w in zip(dys, weights)))


def bf16_dot(x, weights) -> bool:
    """Whether `linear` takes this bfloat16 `x` `[m, k]` as it is: bfloat16 `weights`, even `k`, and the library
    built for a CPU with AVX512-BF16 (else widen `x` to float32 first)."""
    import mindspore as ms

    return (x.dtype == ms.bfloat16 and x.shape[-1] % 2 == 0 and all(w.dtype == ms.bfloat16 for w in weights)
            and _has_bf16_dot())


@functools.cache
def _has_bf16_dot() -> bool:
    import ctypes

    return library() is not None and ctypes.CDLL(library()).msfx_bf16_dot() == 1


def _check_products(x, weights, most: int, bf16_inputs: bool = False) -> None:
    import mindspore as ms

    storages = (ms.float32, ms.bfloat16, ms.float16)
    if x.ndim != 2 or not (x.dtype == ms.float32 or (bf16_inputs and bf16_dot(x, weights))):
        raise ValueError(f"x must be float32 [m, k] (or bfloat16 with bfloat16 weights and even k on a CPU with "
                         f"AVX512-BF16), got {x.dtype} {tuple(x.shape)}")
    if not 1 <= len(weights) <= most:
        raise ValueError(f"expected 1 to {most} weights, got {len(weights)}")
    for w in weights:
        if w.ndim != 2 or w.shape[1] != x.shape[1] or w.dtype not in storages or w.dtype != weights[0].dtype:
            raise ValueError(f"each weight must be [n, {x.shape[1]}] in one of float32, bfloat16, float16 (the same "
                             f"for all), got {[(str(v.dtype), tuple(v.shape)) for v in weights]}")


def gated_linear(x, gate, up):
    """`silu(x @ gate.T) * (x @ up.T)` (Llama's MLP before `down_proj`) for float32 `x` `[m, k]`, `gate` and
    `up` `[n, k]` as `linear`'s weights -> float32 `[m, n]`: `linear` then `silu_mul`'s numbers, in one op.

    Raises:
        ValueError: as `linear`, or `gate` and `up` of different lengths.
    """
    _check_products(x, (gate, up), 2)
    if gate.shape[0] != up.shape[0]:
        raise ValueError(f"gate and up must have the same rows, got {tuple(gate.shape)} and {tuple(up.shape)}")
    return _op("MsfxGatedLinear", _first_product, _float32)(x, gate, up)


def _first_product(x, gate, up):
    return [x[0], gate[0]]


def _rows_shape(ids, table):
    return [*ids, table[1]]


def _float32(*dtypes):
    from mindspore import float32

    return float32


def embedding(ids, table):
    """Rows `ids` (int32 or int64, any shape) of `table` `[vocab, hidden]` in float32, bfloat16 or float16,
    widened exactly to float32 -> `[*ids.shape, hidden]`. An id outside the table fails the op. Differentiable
    in `table`."""
    return _op("MsfxEmbedding", _rows_shape, _float32, _embedding_bprop)(ids, table)


def _embedding_bprop(ids, table, _, dy):
    import mindspore as ms
    from mindspore import ops

    rows = ops.unsorted_segment_sum(dy.reshape(-1, table.shape[1]), ids.reshape(-1), table.shape[0])
    return ops.zeros_like(ids), rows.astype(table.dtype)


def cast(x, dtype):
    """`x.astype(dtype)` between float32 and bfloat16 (any shape; torch's rounding to nearest even), one
    vectorized pass: MindSpore 2.10's CPU `Cast` took 4 ms for 77 x 10240 bfloat16 values. Differentiable."""
    return _op("MsfxCast", _first, _cast_dtype(dtype), _cast_bprop)(x)


@functools.cache
def _cast_dtype(dtype):
    return lambda _: dtype


STEPWISE = ("gelu_new", "quick_gelu")  # the activations `stepwise_activation` computes


def stepwise_activation(x, name: str):
    """HF's `NewGELUActivation` ("gelu_new") or `QuickGELUActivation` ("quick_gelu") on bfloat16 `x` (any shape),
    each op rounded to bfloat16 as torch's bfloat16 run rounds it (`msfx.layers.basic._STEPWISE`'s numbers, in one
    pass: the ~25 MindSpore ops took 30 ms for 77 x 10240 values). Differentiable (the float32 derivative)."""
    from mindspore import Tensor

    kind = Tensor(np.array([STEPWISE.index(name)], np.int32))
    return _op("MsfxStepwiseActivation", _first, _first, _stepwise_bprop(name))(x, kind)


@functools.cache
def _stepwise_bprop(name: str):
    """The gradient of `stepwise_activation` for `name`: the float32 derivative (one function per name, so that
    `_op` caches one op for each)."""
    import math

    import mindspore as ms
    from mindspore import ops

    def bprop(x, kind, _, dy):
        v = x.astype(ms.float32)
        if name == "quick_gelu":
            s = ops.sigmoid(1.702 * v)
            grad = s + 1.702 * v * s * (1 - s)
        else:
            c = math.sqrt(2.0 / math.pi)
            t = ops.tanh(c * (v + 0.044715 * v * v * v))
            grad = 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * c * (1 + 3 * 0.044715 * v * v)
        return (dy.astype(ms.float32) * grad).astype(x.dtype), ops.zeros_like(kind)

    return bprop


def _cast_bprop(x, _, dy):
    return (cast(dy, x.dtype),)


def silu_mul(gate, up):
    """`silu(gate) * up`, float32, same shapes."""
    return _op("MsfxSiluMul", _first, _first)(gate, up)


def rope_cache_write(q, k, v, cos, sin, keys, values, cache_position):
    """Rotary on `q` `[b * s, heads * d]` and `k` `[b * s, kv * d]` by `cos`, `sin` `[b, 1, s, rotary_dim]`,
    then `k` and `v` written at slots `cache_position` (int32 `[s]`) of copies of the caches `keys`,
    `values` `[b, kv, slots, d]`. Returns `(q [b, heads, s, d], keys, values)`, all float32."""
    return _op("MsfxRopeCacheWrite", _rope_shapes, _three)(q, k, v, cos, sin, keys, values, cache_position)


def cache_attention(q, keys, values, bias, scale: float):
    """`softmax(q keys^T * scale + bias) values`, float32, grouped-query heads, for `q` `[b, heads, s, d]`
    over `keys`, `values` `[b, kv, slots, d]` with the additive mask `bias` `[b or 1, 1, 1, s or 1, slots]`
    (`msfx.layers.attention.attention_bias`). Returns `[b * s, heads * d]`."""
    return _op("MsfxCacheAttention", _token_major, _first)(q, keys, values, bias, _scalar(scale))


def adamw(p, g, m, v, scalars):
    """One leaf's AdamW step (`msfx.train.optim.AdamW.update`'s arithmetic, bit for bit) on float32 `p`,
    `g`, `m`, `v` of one shape, `scalars` float32 `[8]`: step_size, bc2_sqrt, shrink, clip coefficient,
    1 - beta1, beta2, 1 - beta2, eps. Returns the new `(p, m, v)`; the inputs are not written."""
    return _op("MsfxAdamW", _three, _three)(p, g, m, v, scalars)


def _count(*tensors):
    return [len(tensors)]


def sum_squares(tensors):
    """`[sum(t * t) for t in tensors]` as float32 `[len(tensors)]` for float32 tensors of any shapes,
    each read once and summed in float64 (one op for all of them)."""
    return _op("MsfxSumSquares", _count, _first)(*tensors)
