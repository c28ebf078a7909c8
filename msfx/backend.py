"""What MindSpore's CPU backend lacks, probed in one place (the maths falls back around it)."""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor


def lacks_bf16_kernels(x: Tensor) -> bool:
    """True for a bfloat16 `x` on MindSpore's CPU backend, whose kernels (2.10) have no bfloat16
    MatMul, BatchMatMul, Gather, SiLU or TensorScatterElements. There those ops compute in
    float32 and round the result to bfloat16, as PyTorch's CPU bfloat16 kernels do. (Eager only:
    the CPU graph compiler lacks even a bfloat16 Reshape, so `jit` steps cannot run bf16 there.)"""
    return x.dtype == ms.bfloat16 and ms.get_context("device_target") == "CPU"
