"""Shared fixtures: tiny random HF PyTorch Llama checkpoints (the oracle) saved to temp dirs."""
from __future__ import annotations

import numpy as np
import pytest

TINY = dict(vocab_size=99, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128, initializer_range=0.2, rms_norm_eps=1e-5,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def make_hf_llama(tmp_path, seed: int = 0, cls_name: str = "LlamaForCausalLM", **overrides):
    """Build a tiny `transformers` (PyTorch) Llama with random weights *and* random norm
    weights (so a missed scale shows), save it to `tmp_path`, return `(torch_model, path)`."""
    import transformers

    from oracle import save_tiny

    config = transformers.LlamaConfig(**{**TINY, **overrides})
    return save_tiny(getattr(transformers, cls_name), config, tmp_path, seed)


@pytest.fixture(scope="session", autouse=True)
def msfx_cache(tmp_path_factory):
    """msfx's cache (GGUF files converted to safetensors) in a directory of this test session, for
    this process and the processes tests start, instead of the user's `~/.cache/msfx`."""
    import os

    os.environ["MSFX_CACHE_DIR"] = str(tmp_path_factory.mktemp("msfx_cache"))
    return os.environ["MSFX_CACHE_DIR"]


@pytest.fixture
def hf_llama(tmp_path):
    """Factory: `hf_llama(**config_overrides) -> (torch_model, path)`."""
    counter = iter(range(100))

    def build(seed: int = 0, cls_name: str = "LlamaForCausalLM", **overrides):
        return make_hf_llama(tmp_path / f"m{next(counter)}", seed, cls_name, **overrides)

    return build


def random_ids(batch: int, seq: int, vocab: int = TINY["vocab_size"], seed: int = 0, low: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, vocab, (batch, seq))


def left_padded(batch: int, seq: int, pads, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ids with `pads[i]` pad tokens on the left of row i, and the attention mask."""
    ids = random_ids(batch, seq, seed=seed)
    mask = np.ones_like(ids, dtype=np.int64)
    for row, n in enumerate(pads):
        ids[row, :n] = TINY["pad_token_id"]
        mask[row, :n] = 0
    return ids, mask
