"""Linear, embedding and activation functions on HF's parameter layouts."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, NamedTuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from msfx.layers.dropout import dropout

_MATMUL_T = ops.MatMul(transpose_b=True)
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


def lacks_bf16_kernels(x: Tensor) -> bool:
    """True for a bfloat16 `x` on MindSpore's CPU backend, whose kernels (2.10) have no bfloat16
    MatMul, BatchMatMul, Gather, SiLU or TensorScatterElements. There those ops compute in
    float32 and round the result to bfloat16, as PyTorch's CPU bfloat16 kernels do. (Eager only:
    the CPU graph compiler lacks even a bfloat16 Reshape, so `jit` steps cannot run bf16 there.)"""
    return x.dtype == ms.bfloat16 and ms.get_context("device_target") == "CPU"


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
        y = _MATMUL_T(x.reshape(-1, x.shape[-1]).astype(ms.float32), weight.astype(ms.float32))
        y = y if bias is None else y + bias.astype(ms.float32)  # one rounding, as torch's addmm
        return y.astype(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
    if x.ndim == 2:  # the decoder keeps activations 2-D: no reshapes around each product
        y = _MATMUL_T(x, weight)
    else:
        y = _MATMUL_T(x.reshape(-1, x.shape[-1]), weight).reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


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


def embedding(ids: Tensor, weight: Tensor) -> Tensor:
    """Rows of `weight` `[vocab, hidden]` for integer `ids` `[...]` -> `[..., hidden]`."""
    if lacks_bf16_kernels(weight):  # exact; `Tensor.view(int16)` would avoid the copy but cannot be traced
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


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation HF calls `name` (`config.hidden_act`).

    Raises:
        ValueError: `name` is not one of `ACT2FN`.
    """
    if name not in ACT2FN:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACT2FN)}")
    fn = ACT2FN[name]
    return lambda x: fn(x.astype(ms.float32)).astype(x.dtype) if lacks_bf16_kernels(x) else fn(x)


def gated_mlp(x: Tensor, p: dict, act: Callable[[Tensor], Tensor]) -> Tensor:
    """Llama's SwiGLU-style MLP: `down_proj(act(gate_proj(x)) * up_proj(x))`.

    `p` holds `gate_proj`, `up_proj`, `down_proj` sub-dicts with `weight` (and optional `bias`),
    or `gate_up_proj` (gate rows first, then up: Phi-3's fused layout) and `down_proj`.
    """
    if "gate_up_proj" in p:
        gate, up = ops.chunk(linear(x, p["gate_up_proj"]["weight"], p["gate_up_proj"].get("bias")), 2, -1)
    else:
        gate = linear(x, p["gate_proj"]["weight"], p["gate_proj"].get("bias"))
        up = linear(x, p["up_proj"]["weight"], p["up_proj"].get("bias"))
    return linear(act(gate) * up, p["down_proj"]["weight"], p["down_proj"].get("bias"))
