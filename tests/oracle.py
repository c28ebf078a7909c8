"""The HF + PyTorch oracle's shared pieces: tiny seeded checkpoints with random norms and biases,
the max-abs-diff assertion, and the per-module table of measured diffs (printed with `-s`)."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Tensor


def to_np(x) -> np.ndarray:
    """A MindSpore / torch tensor or array as numpy (half precision widened to float32)."""
    if isinstance(x, Tensor):
        return (x.astype(ms.float32) if x.dtype in (ms.float16, ms.bfloat16) else x).asnumpy()
    if isinstance(x, torch.Tensor):
        return x.detach().float().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x)


def ms_ids(ids) -> Tensor:
    """Token ids as an int32 MindSpore tensor."""
    return Tensor(np.asarray(ids, np.int32))


def hf_run(model, ids, attention_mask=None, **kwargs):
    """The torch model's output on numpy ids (and mask), without autograd."""
    with torch.no_grad():
        mask = None if attention_mask is None else torch.tensor(attention_mask)
        return model(torch.tensor(ids), attention_mask=mask, **kwargs)


class Diffs(dict):
    """Measured max abs diffs of one test module, `{what: largest diff}`; `report()` makes the module's
    autouse fixture that prints them under `title` when the module ends."""

    def __init__(self, title: str):
        super().__init__()
        self.title = title

    def report(self):
        @pytest.fixture(scope="module", autouse=True)
        def _print_measured_diffs():
            yield
            width = max(map(len, self), default=0)
            print(f"\n\n{self.title}")
            for name, value in self.items():
                print(f"  {name:<{width}}  {value:.3g}")

        return _print_measured_diffs


def abs_error(got, expected, what: str = "") -> np.ndarray:
    """`|got - expected|` in float64; the shapes must be equal (no broadcasting)."""
    a, b = to_np(got).astype(np.float64), to_np(expected).astype(np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    return np.abs(a - b)


def max_abs_diff(got, expected) -> float:
    return float(abs_error(got, expected).max())


def assert_close(got, expected, atol: float, what: str, diffs: Diffs | None = None) -> float:
    """Assert `max |got - expected| <= atol` (float64, shapes equal); the report names `what`, the
    diff and the index where it is largest. Records the diff in `diffs`; returns it."""
    error = abs_error(got, expected, what)
    diff = float(error.max())
    if diffs is not None:  # a name measured again (a parametrized fixture) keeps its largest diff
        diffs[what] = max(diff, diffs.get(what, diff))  # diff first: a NaN stays NaN
    where = np.unravel_index(int(np.argmax(error)), error.shape) if error.size else ()
    assert diff <= atol, f"{what}: max abs diff {diff:.3g} > {atol:.3g} at {tuple(map(int, where))}"
    return diff


def is_norm(name: str) -> bool:
    """A normalization parameter under HF's names (`input_layernorm`, `LayerNorm`, `layer_norm`, GPT-2's `ln_f`)."""
    return "norm" in name or ".ln_" in name or name.startswith("ln_")


def randomize_norms(model: torch.nn.Module, biases: bool = False) -> None:
    """Norm weights from U(0.5, 1.5) and, with `biases`, every bias from N(0, 0.2), drawn from torch's
    global generator: HF initializes them to ones and zeros, which would hide a missed scale or bias."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if biases and name.endswith("bias"):
                p.normal_(0.0, 0.2)
            elif is_norm(name):
                p.uniform_(0.5, 1.5)


def save_tiny(cls, config, path, seed: int = 0, biases: bool = False):
    """`cls(config)` built after `torch.manual_seed(seed)` with eager attention, in eval mode, its norms
    (and biases) randomized (`randomize_norms`), saved to `path`. Returns `(torch_model, path)`."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = cls(config).eval()
    randomize_norms(model, biases)
    model.save_pretrained(path)
    return model, path
