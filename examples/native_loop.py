"""The classic MindSpore training loop on an msfx model: the HF-named wrapper's weights are
`mindspore.Parameter`s, so `mindspore.value_and_grad(fn, None, model.trainable_params())` and a
`mindspore.nn` optimizer train it directly (PyNative mode, no compilation).

Trains a tiny random Llama to predict a fixed repeating token pattern for a few steps and prints
the loss, which falls. Run: `python examples/native_loop.py [--config.steps=8] [--config.learning_rate=1e-2]
[--config.seed=0]` (an `ml_collections` config, `get_config()`).
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from absl import app
from ml_collections import ConfigDict, config_flags
from transformers import LlamaConfig

import msfx

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def get_config() -> ConfigDict:
    """`main`'s arguments and their defaults; each one is set from the command line as `--config.NAME=VALUE`."""
    return ConfigDict(dict(steps=8, learning_rate=1e-2, seed=0))


def main(steps: int = 8, learning_rate: float = 1e-2, seed: int = 0) -> list[float]:
    """Train for `steps` AdamW updates on one batch; return the loss before each update."""
    model = msfx.LlamaForCausalLM(LlamaConfig(**TINY))
    rng = np.random.default_rng(seed)
    pattern = rng.integers(3, TINY["vocab_size"], 6)
    input_ids = ms.Tensor(np.tile(pattern, (4, 3)).astype(np.int32))  # [4, 18]: the pattern three times per row
    labels = input_ids  # HF convention: the model shifts the labels itself

    def loss_fn(input_ids, labels):
        return model(input_ids=input_ids, labels=labels).loss

    grad_fn = ms.value_and_grad(loss_fn, None, model.trainable_params())
    optimizer = ms.nn.AdamWeightDecay(model.trainable_params(), learning_rate=learning_rate, weight_decay=0.0)
    losses = []
    for step in range(steps):
        loss, grads = grad_fn(input_ids, labels)
        optimizer(grads)
        losses.append(float(loss.asnumpy()))
        print(f"step {step}: loss {losses[-1]:.4f}")
    return losses


def _run(argv: list[str]) -> None:
    if argv[1:]:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --config.NAME=VALUE")
    main(**_CONFIG.value)


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_dict("config", get_config(), "training options (see get_config)")
    app.run(_run)
