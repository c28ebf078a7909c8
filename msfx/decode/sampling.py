"""Multinomial sampling of the next token on the host (HF's `do_sample=True` token selection).

HF draws with `torch.multinomial(softmax(scores))` from torch's global generator; msfx draws
from a `numpy.random.Generator`, so samples are reproducible for a given seed but are not the
same tokens torch would draw.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np


def make_rng(seed: int | None = None) -> np.random.Generator:
    """The generator for one `generate` call: from `seed`, else from MindSpore's global seed
    (`mindspore.set_seed`), else fresh OS entropy. With a seed every call that draws the same
    way reproduces the same tokens (unlike torch's global generator, whose state advances from
    call to call)."""
    if seed is None:
        seed = ms.get_seed()
    return np.random.default_rng(seed)


def sample_tokens(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token id per row drawn from `softmax(scores)`.

    scores: float `[batch, vocab]` processed logits; -inf entries are never drawn.
    Returns int64 `[batch]`.

    Raises:
        ValueError: a row with no finite-probability token (all -inf, nan or +inf scores).
    """
    scores = np.asarray(scores, np.float64)
    top = scores.max(-1, keepdims=True)
    if not np.isfinite(top).all() or np.isnan(scores).any():
        raise ValueError("probability tensor contains either `inf`, `nan` or element < 0 (a row of scores is all -inf, "
                         "or holds nan / +inf)")
    probs = np.exp(scores - top)  # exp(-inf) = 0
    cdf = np.cumsum(probs, -1)
    u = rng.random(scores.shape[0])[:, None] * cdf[:, -1:]  # uniform in [0, total)
    # the first index whose cumulative mass exceeds u has positive probability (the cdf rises
    # there); should rounding make u reach the total, the last positive-probability token
    last = probs.shape[-1] - 1 - np.argmax(probs[:, ::-1] > 0, -1)
    return np.minimum((cdf <= u).sum(-1), last).astype(np.int64)
