"""Normalization layers, computed in float32 as HF does and cast back to the input dtype."""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, ops

from msfx import kernels
from msfx.backend import lacks_bf16_kernels
from msfx.layers.basic import cast


def rms_norm(x: Tensor, weight: Tensor, eps: float, offset: float = 0.0, scale_in_float32: bool = False) -> Tensor:
    """RMSNorm (Zhang & Sennrich 2019) as HF's `LlamaRMSNorm`.

    `x` `[..., hidden]` is normalized in float32, cast back to its dtype, then scaled by
    `weight` `[hidden]`. With `offset` (Gemma: 1.0) the scale is `offset + weight`, applied in
    float32 before the cast, as HF's `Gemma2RMSNorm`; `scale_in_float32` does that for `weight`
    (HF's `Olmo2RMSNorm`). In a compiled float32 inference step: one fused kernel (`msfx.kernels`).
    """
    if x.dtype == ms.float32 and weight.dtype == ms.float32 and not offset and kernels.active():
        return kernels.rms_norm(x, weight, eps)
    if offset or scale_in_float32:
        h = cast(x, ms.float32)
        h = h * ops.rsqrt(ops.mean(h * h, -1, keep_dims=True) + eps) * (offset + cast(weight, ms.float32))
        return cast(h, x.dtype)
    if x.dtype == ms.float32:  # skip two no-op casts: each op costs ~10 us in a compiled CPU step
        return weight * (x * ops.rsqrt(ops.mean(x * x, -1, keep_dims=True) + eps))
    if weight.dtype == x.dtype and lacks_bf16_kernels(x) and kernels.available():
        return kernels.rms_norm_bf16(x, weight, eps)
    h = cast(x, ms.float32)
    h = h * ops.rsqrt(ops.mean(h * h, -1, keep_dims=True) + eps)
    return weight * cast(h, x.dtype)


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm (Ba et al. 2016) over the last axis, `torch.nn.LayerNorm` semantics; with no
    `weight` the parameter-free norm (OLMo's `F.layer_norm(x, shape, None, None)`).

    In bfloat16 / float16 the scale and shift are applied in float32 too and the result rounded once,
    as PyTorch's CPU kernel does (rounding after the normalization and again after each of them
    doubled the distance to torch's bfloat16 outputs: 2 ulps against 1 on a 3-layer CLIP tower, and
    a 2-layer DistilBERT's error against float32 was 2.6x torch-bf16's).
    """
    if (lacks_bf16_kernels(x) and weight is not None and bias is not None and weight.dtype == bias.dtype == x.dtype
            and kernels.available()):
        return kernels.layer_norm_bf16(x, weight, bias, eps)
    h = cast(x, ms.float32)
    mean = ops.mean(h, -1, keep_dims=True)
    centered = h - mean
    h = centered * ops.rsqrt(ops.mean(centered * centered, -1, keep_dims=True) + eps)
    if weight is not None:
        h = h * cast(weight, ms.float32)
    if bias is not None:
        h = h + cast(bias, ms.float32)
    return cast(h, x.dtype)  # no-op casts skipped: ~10 us each in a compiled step
