"""The classic MindSpore training loop on an msfx model: the HF-named wrapper's weights are
`mindspore.Parameter`s, so `mindspore.value_and_grad(fn, None, model.trainable_params())` and a
`mindspore.nn` optimizer train it directly (PyNative mode, no compilation).

Trains a tiny random Llama to predict a fixed repeating token pattern for a few steps and prints
the loss, which falls. Run: `python examples/native_loop.py`.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from transformers import LlamaConfig

import msfx

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


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


if __name__ == "__main__":
    main()
