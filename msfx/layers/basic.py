"""Linear, embedding and activation functions on HF's parameter layouts."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import mindspore as ms
from mindspore import Tensor, ops

from msfx import kernels
from msfx.backend import lacks_bf16_kernels, lower_actor_threads
from msfx.layers.dropout import dropout

_MATMUL_T = ops.MatMul(transpose_b=True)


class LoraWeight(NamedTuple):
    """A frozen weight with a LoRA adapter (`msfx.peft`), in a parameter tree where the weight was:
    `linear` computes peft's unmerged `x @ base.T + scaling * (dropout(x) @ lora_A.T) @ lora_B.T`.

    Shapes: `base` as the weight it replaces (`[out, in]`; GPT-2's `Conv1D` `[in, out]`), `lora_A`
    `[r, in]`, `lora_B` `[out, r]`. `dtype` is the base weight's, as peft's `layer.weight`.
    """

    base: Tensor
    lora_A: Tensor
    lora_B: Tensor
    scaling: float
    dropout: float

    @property
    def dtype(self):
        return self.base.dtype

    def delta(self, x: Tensor) -> Tensor:
        """The adapter's term `scaling * (dropout(x) @ lora_A.T) @ lora_B.T`, `[..., out]`, in `x`'s
        dtype (computed in the adapter's, as peft casts `x` to it)."""
        h = dropout(x, self.dropout)
        h = h if h.dtype == self.lora_A.dtype else h.astype(self.lora_A.dtype)
        y = linear(linear(h, self.lora_A), self.lora_B) * self.scaling
        return y if y.dtype == x.dtype else y.astype(x.dtype)


def linear(x: Tensor, weight: Tensor | LoraWeight, bias: Tensor | None = None) -> Tensor:
    """`x @ weight.T + bias` with `weight` in HF/PyTorch layout `[out_features, in_features]`
    (a `LoraWeight` adds its adapter's term, as peft's `lora.Linear`).

    A 2-D `MatMul(transpose_b=True)` reads the weight transposed inside the kernel:
    `matmul(x, weight.T)` materializes the transpose on every call, and `ops.dense` took
    5 ms against 0.3 ms for a [1, 576] x [576, 1536] product on CPU (measured, MindSpore 2.10).
    Shapes: x `[..., in]` -> `[..., out]`.
    """
    if isinstance(weight, LoraWeight):
        return linear(x, weight.base, bias) + weight.delta(x)
    if lacks_bf16_kernels(x):
        y = _bfloat16_product(x.reshape(-1, x.shape[-1]), weight)
        # one rounding, as torch's addmm; `BiasAdd`: a broadcast `+` took 2 ms at [77, 5120] on CPU, it 0.2 ms
        y = y if bias is None else ops.bias_add(y, cast(bias, ms.float32))
        return cast(y, x.dtype).reshape(*x.shape[:-1], weight.shape[0])
    if x.dtype == ms.float32 and _in_product_kernel(x, weight):
        y = kernels.linear(x.reshape(-1, x.shape[-1]), weight)
        y = y if x.ndim == 2 else y.reshape(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    if x.ndim == 2:  # the decoder keeps activations 2-D: no reshapes around each product
        y = _MATMUL_T(x, weight)
    else:
        y = _MATMUL_T(x.reshape(-1, x.shape[-1]), weight).reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


def _bfloat16_product(x: Tensor, weight: Tensor) -> Tensor:
    """float32 `x @ weight.T` for bfloat16 `x` `[m, in]` (eager: exact products summed in float32, as torch's CPU
    bfloat16 `linear` before its rounding). A bfloat16 `weight` multiplies in `kernels.linear`, with `x` as it is
    where the CPU has AVX512-BF16 and `x` has more than `kernels.DOT_ROWS` rows (a 2-layer T5-XXL-shaped
    77-token forward 3.4 s -> 1.3 s from this alone against widening both to float32 for `MatMul`, measured),
    else widened; without the kernels, or for another weight dtype, both are widened for `MatMul`."""
    if weight.dtype != ms.bfloat16 or not kernels.available():
        return _MATMUL_T(cast(x, ms.float32), cast(weight, ms.float32))
    lower_actor_threads()
    if x.shape[0] > kernels.DOT_ROWS and kernels.bf16_dot(x, [weight]):
        return kernels.linear(x, weight)
    return kernels.linear(cast(x, ms.float32), weight)


def cast(x: Tensor, dtype) -> Tensor:
    """`x.astype(dtype)`, between bfloat16 and float32 in one vectorized kernel where `kernels.available()`
    (`kernels.cast`: MindSpore 2.10's CPU `Cast` took 4 ms for 77 x 10240 bfloat16 values, the kernel ~0.15 ms)."""
    if x.dtype == dtype:
        return x
    if {x.dtype, dtype} == {ms.bfloat16, ms.float32} and kernels.available():
        return kernels.cast(x, dtype)
    return x.astype(dtype)


def transposed(x: Tensor, perm: tuple[int, ...]) -> Tensor:
    """`x.transpose(*perm)`; a bfloat16 `x` on CPU is permuted as float32 (exact both ways): MindSpore 2.10 copied
    a permuted bfloat16 view into contiguous memory at 2.5 ms for a [77, 64, 64] head split, float32 at ~0.05 ms."""
    if lacks_bf16_kernels(x) and kernels.available():
        return cast(cast(x, ms.float32).transpose(*perm), ms.bfloat16)
    return x.transpose(*perm)


def add(x: Tensor, y: Tensor) -> Tensor:
    """`x + y`; two bfloat16 tensors on CPU are added in float32 and rounded once, as torch's bfloat16 add
    (MindSpore 2.10's CPU bfloat16 `Add` took 6 ms for 77 x 4096 values, this ~0.5 ms). Shapes broadcast."""
    if x.dtype == y.dtype == ms.bfloat16 and kernels.available() and lacks_bf16_kernels(x):
        return cast(cast(x, ms.float32) + cast(y, ms.float32), ms.bfloat16)
    return x + y


def mul(x: Tensor, y: Tensor) -> Tensor:
    """`x * y`, as `add` for two bfloat16 tensors on CPU."""
    if x.dtype == y.dtype == ms.bfloat16 and kernels.available() and lacks_bf16_kernels(x):
        return cast(cast(x, ms.float32) * cast(y, ms.float32), ms.bfloat16)
    return x * y


def linears(x: Tensor, params: Sequence[dict]) -> tuple[Tensor, ...]:
    """`linear(x, p["weight"], p.get("bias"))` for each `p` of `params` (q, k and v): one product kernel op
    for all of them where the products run in `msfx.kernels` (a decode step pays ~10-20 µs per op)."""
    weights = [p["weight"] for p in params]
    if not _fusable(x, weights):
        return tuple(linear(x, p["weight"], p.get("bias")) for p in params)
    ys = kernels.linear(x.reshape(-1, x.shape[-1]), *weights)
    ys = (ys,) if len(weights) == 1 else ys
    ys = ys if x.ndim == 2 else [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys]
    return tuple(y if p.get("bias") is None else y + p["bias"] for y, p in zip(ys, params))


def _fusable(x: Tensor, weights: Sequence) -> bool:
    """Whether `weights` (plain tensors of one dtype) multiply float32 `x` in one product kernel op."""
    if x.dtype != ms.float32 or any(not isinstance(w, Tensor) or w.dtype != weights[0].dtype for w in weights):
        return False
    return _in_product_kernel(x, weights[0])


def _in_product_kernel(x: Tensor, weight: Tensor) -> bool:
    """Whether float32 `x` times `weight` runs in `kernels.linear`: half-precision weights whenever widening;
    float32 ones for one row (batch-1 decode: SmolLM2 +10%) or a prompt's `kernels.DOT_ROWS` to
    `kernels.MAX_FLOAT32_ROWS` rows (packed panels: 1.2-2x MindSpore's `MatMul` at 40 rows); at 2-8 rows and
    above 128 `MatMul` was as fast or faster (measured)."""
    rows = math.prod(x.shape[:-1])
    if weight.dtype == ms.float32:
        return (rows == 1 or kernels.DOT_ROWS < rows <= kernels.MAX_FLOAT32_ROWS) and kernels.active()
    return kernels.widening()


def scaled(x: Tensor, factor: float) -> Tensor:
    """`x * factor` for a Python float, rounded once to `x`'s dtype: torch multiplies a half-precision
    tensor by a float in float32, MindSpore rounds the float to the tensor's dtype first (48% of
    bfloat16 products by 0.3 differed from torch's; exact for powers of two). Shapes: any."""
    if x.dtype == ms.float32:
        return x * factor
    return x if factor == 1.0 else cast(cast(x, ms.float32) * factor, x.dtype)


def embedding(ids: Tensor, weight: Tensor) -> Tensor:
    """Rows of `weight` `[vocab, hidden]` for integer `ids` `[...]` -> `[..., hidden]` (in float32 for
    a half-precision `weight` inside `kernels.enabled(widening=True)`)."""
    if weight.dtype != ms.float32 and kernels.widening():
        return kernels.embedding(ids, weight)
    if lacks_bf16_kernels(weight):  # exact; `Tensor.view(int16)` would avoid the copy but cannot be traced
        if kernels.available():  # the rows alone widened: casting T5-XXL's whole table took 0.7 s a forward
            return cast(kernels.embedding(ids, weight), weight.dtype)
        return ops.gather(weight.astype(ms.float32), ids, 0).astype(weight.dtype)
    return ops.gather(weight, ids, 0)


def tanh(x: Tensor) -> Tensor:
    """tanh computed in float32 (cast back to `x`'s dtype) as `sign(x) (1 - e^-2|x|) / (1 + e^-2|x|)`:
    MindSpore 2.10's CPU Tanh kernel is off by up to 1e-4 in float32 (measured against float64 on
    [-5, 5]), this form by 1.5e-7."""
    m = ops.expm1(-2.0 * ops.abs(x.astype(ms.float32)))
    y = ops.sign(x.astype(ms.float32)) * -m / (2.0 + m)
    return y if x.dtype == ms.float32 else y.astype(x.dtype)


def _gelu_tanh(x: Tensor) -> Tensor:
    # HF's NewGELUActivation / PytorchGELUTanh, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as
    # MindSpore's fused kernel: within 5e-7 of torch's, where the formula over CPU Tanh is not (see `tanh`)
    return ops.gelu(x, approximate="tanh")


ACT2FN: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": ops.silu,
    "swish": ops.silu,
    "gelu": lambda x: ops.gelu(x, approximate="none"),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": lambda x: x * ops.sigmoid(1.702 * x),
    "relu": ops.relu,
}


def _quick_gelu_steps(x: Tensor, r: Callable[[Tensor], Tensor]) -> Tensor:
    return r(x * r(ops.sigmoid(r(1.702 * x))))


def _new_gelu_steps(x: Tensor, r: Callable[[Tensor], Tensor]) -> Tensor:
    cube = r(r(x * x) * x)  # torch.pow(x, 3.0) multiplies twice, rounding each product
    inner = r(math.sqrt(2.0 / math.pi) * r(x + r(0.044715 * cube)))
    return r(r(0.5 * x) * r(1.0 + r(tanh(inner))))


# HF's activations that torch evaluates op by op (`QuickGELUActivation`, `NewGELUActivation`), each op
# rounding to bfloat16: float32 ops with rounding `r` after each; one rounding at the end differed
# from torch's bfloat16 output on ~40% of elements (measured on 2e5 normal(0, 3) values; now none)
_STEPWISE = {"quick_gelu": _quick_gelu_steps, "gelu_new": _new_gelu_steps}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation HF calls `name` (`config.hidden_act`). Without bfloat16 kernels (CPU) it
    computes in float32 and rounds where torch's bfloat16 run rounds (see `_STEPWISE`).

    Raises:
        ValueError: `name` is not one of `ACT2FN`.
    """
    if name not in ACT2FN:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACT2FN)}")
    fn = ACT2FN[name]

    def in_float32(x: Tensor) -> Tensor:
        if name in kernels.STEPWISE and kernels.available():
            return kernels.stepwise_activation(x, name)
        if name in _STEPWISE:
            return cast(_STEPWISE[name](cast(x, ms.float32), lambda y: cast(cast(y, x.dtype), ms.float32)), x.dtype)
        return cast(fn(cast(x, ms.float32)), x.dtype)

    return lambda x: in_float32(x) if lacks_bf16_kernels(x) else fn(x)


def gated_mlp(x: Tensor, p: dict, hidden_act: str, fused: bool = False) -> Tensor:
    """Llama's SwiGLU-style MLP: `down_proj(act(gate_proj(x)) * up_proj(x))`, `act` HF's `hidden_act`.

    `p` holds `gate_proj`, `up_proj`, `down_proj` sub-dicts with `weight` (and optional `bias`),
    or with `fused`, `gate_up_proj` (gate rows first, then up: Phi-3's layout) and `down_proj`.
    In a compiled float32 inference step, `silu(gate) * up` is one fused kernel (`msfx.kernels`), and where
    the products run in the kernels too, gate, up and silu are one op (`kernels.gated_linear`).
    """
    if not fused and hidden_act in ("silu", "swish") and p["gate_proj"].get("bias") is None and \
            p["up_proj"].get("bias") is None and _fusable(x, [p["gate_proj"]["weight"], p["up_proj"]["weight"]]):
        h = kernels.gated_linear(x.reshape(-1, x.shape[-1]), p["gate_proj"]["weight"], p["up_proj"]["weight"])
        h = h if x.ndim == 2 else h.reshape(*x.shape[:-1], h.shape[-1])
        return linear(h, p["down_proj"]["weight"], p["down_proj"].get("bias"))
    if fused:
        gate, up = ops.chunk(linear(x, p["gate_up_proj"]["weight"], p["gate_up_proj"].get("bias")), 2, -1)
    else:
        gate = linear(x, p["gate_proj"]["weight"], p["gate_proj"].get("bias"))
        up = linear(x, p["up_proj"]["weight"], p["up_proj"].get("bias"))
    if hidden_act in ("silu", "swish") and gate.dtype == ms.float32 and kernels.active():
        h = kernels.silu_mul(gate, up)
    else:
        h = activation(hidden_act)(gate) * up
    return linear(h, p["down_proj"]["weight"], p["down_proj"].get("bias"))
