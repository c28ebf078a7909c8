"""Parsing the `dtype` argument of `from_pretrained` / `load`."""
from __future__ import annotations

import mindspore as ms
import numpy as np

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16,
          "fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}
STORED = {"F32": ms.float32, "F16": ms.float16, "BF16": ms.bfloat16, "F64": ms.float32}

try:
    # MindSpore's numpy bfloat16 (2 bytes, the same bits as torch's): lets raw bfloat16 bits become a
    # Tensor by a dtype view, with no float32 copy. MindSpore leaves it out when the installed numpy
    # differs from the one it was built against.
    from mindspore.common.np_dtype import bfloat16 as NUMPY_BFLOAT16
except ImportError:
    NUMPY_BFLOAT16 = None


def parse_dtype(dtype) -> "ms.dtype | None":
    """`"float32"`/`"float16"`/`"bfloat16"` (or a MindSpore float dtype) -> MindSpore dtype;
    `"auto"` or None -> None (keep the checkpoint's dtype).

    Raises:
        ValueError: any other value, naming the accepted ones.
    """
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype in (ms.float32, ms.float16, ms.bfloat16):
        return dtype
    raise ValueError(f"unsupported dtype {dtype!r}; use 'auto', 'float32', 'float16' or 'bfloat16'")


def dtype_name(dtype) -> str:
    """`ms.bfloat16` -> `"bfloat16"` (the spelling HF configs use for `dtype`)."""
    return {ms.float32: "float32", ms.float16: "float16", ms.bfloat16: "bfloat16"}[dtype]


def to_numpy(tensor) -> tuple[np.ndarray, str]:
    """A MindSpore tensor as `(array, safetensors dtype)`; bfloat16 as raw bits (uint16)."""
    from msfx.params.safetensors_io import float32_to_bf16_bits

    if tensor.dtype == ms.bfloat16:
        if NUMPY_BFLOAT16 is not None:
            return tensor.asnumpy().view(np.uint16), "BF16"
        return float32_to_bf16_bits(tensor.astype(ms.float32).asnumpy()), "BF16"
    array = tensor.asnumpy()
    return array, {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}.get(array.dtype, "F32")
