"""Training throughput, msfx's compiled train step vs HF transformers + PyTorch, in one process.

A random Llama-shaped checkpoint (hidden 768, 12 layers, 12 heads, 4 kv heads, intermediate 2048,
vocab 32000, untied head: 125M parameters, float32) is built with PyTorch, saved, and loaded by msfx,
so both start from the same weights. Both then train on the same random token batches (labels = the
ids, no padding) with the same step:
- torch: `model(input_ids, labels=labels).loss.backward()`, `clip_grad_norm_(1.0)`, AdamW
  (`fused=True`, HF Trainer's default `adamw_torch_fused`) with HF's decay / no-decay groups;
- msfx: `make_train_step(llama, config, AdamW(...), keys, max_grad_norm=1.0)` (a jit-compiled
  loss + grad graph and a jit-compiled clip + AdamW graph).
Each side first runs `config.warmup` steps (msfx's first call compiles: its time minus a median step is
the compile time), then `config.steps` timed steps, the two alternating step by step so that both see the
same load on a shared machine. tokens/s = batch * seq / median step seconds (both read the loss on the
host every step; msfx also the gradient norm, so its update graph has finished). The losses of the
first `config.check` steps are compared (relative difference) to show both did the same work. The peak RSS
is the process's (both frameworks), also as it stood before msfx's first step.

Run: python benchmarks/train.py [--config.batch=8] [--config.seq=128] [--config.steps=5] [--config.warmup=2]
[--config.layers=12] [--config.check=3] (an `ml_collections` config, `get_config()`; `--help` shows it).
Needs the `test` extra (torch) and about 13 GB of free memory at the default size (18 GB before the kernels).

Measured on 2 CPU cores shared with other jobs (MindSpore 2.10, torch 2.13, transformers 5.24,
batch 8 x seq 128); the load average moves the ratio, since torch slowed down more.
With the fused kernels (`msfx.kernels.adamw`, `sum_squares`), 4 layers (74M parameters,
`--config.layers=4 --config.steps=3`), each pair run back to back with `MSFX_KERNELS=0` first:
- quiet (load 0.2 -> 1.5; AdamW kernel only): off: torch 1.95 s/step, msfx 2.68 s (0.73x), compile
  22.9 s, peak RSS 9.4 GB; on: torch 2.24 s, msfx 1.85 s (1.21x), compile 9.5 s, peak RSS 6.7 GB.
- loaded (load 3.4 -> 4.5; both kernels): off: torch 7.22 s, msfx 5.02 s (1.44x: torch collapsed),
  compile 31.0 s, 9.7 GB; on: torch 3.22 s, msfx 3.38 s (0.95x), compile 8.1 s, 6.9 GB.
- losses within 1.8e-7 of torch's in every run, the same to the printed digits with and without.
- the update graph alone (median of 4 steps): 1.49 s off (load 2.3), 0.36 s with the AdamW kernel
  (load 3.5), 0.32 s with both (load 2.7), against torch's clip + fused AdamW 0.09-0.13 s.
12 layers (125M parameters, `--config.steps=3`), quiet (load 0.45 -> 1.47), 2026-12-06: torch 4.18 s/step
(245 tokens/s), msfx 3.85 s (266 tokens/s): 1.09x; compile 22.6 s; peak RSS 12.3 GB; losses within 1.8e-7.
Before the kernel, 12 layers:
- load ~2 (`--config.steps=3`): torch 4.50 s/step (228 tokens/s), msfx 8.58 s (119 tokens/s): 0.52x;
  msfx compile 32.8 s; losses of the first 3 steps within 1.8e-7 relative.
- load 3.4 -> 5.3 (defaults): torch 16.98 s (60.3 tokens/s), msfx 21.61 s (47.4 tokens/s): 0.79x;
  compile 43.4 s; peak RSS 17.1 GB (4.5 GB before msfx's first step); losses within 1.8e-7.
Where msfx's step goes (same process, interleaved, load ~4-5): the loss + grad graph 14.2 s against
torch's forward + backward 13.6 s; the clip + AdamW graph 6.4 s against torch's clip + fused AdamW
1.2 s, and most of the memory (about 16 parameter-sized buffers).
"""
from __future__ import annotations

import os
import resource
import statistics
import tempfile
import time
from typing import Callable

import numpy as np
import torch
import transformers
from absl import app
from mindspore import Tensor
from ml_collections import ConfigDict, config_flags

import msfx
from msfx.architectures import llama as llama_arch
from msfx.params import flatten
from msfx.train import AdamW, make_train_step

VOCAB = 32000
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, 0.1, 1.0


def random_llama(directory: str, layers: int) -> transformers.LlamaForCausalLM:
    """The issue's ~100M Llama shape with seeded random weights, saved to `directory`."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                                      num_key_value_heads=4, intermediate_size=2048, vocab_size=VOCAB,
                                      max_position_embeddings=2048, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(directory)
    return model.train()


def random_batches(count: int, batch: int, seq: int) -> list[dict[str, np.ndarray]]:
    """Seeded random ids, each batch its own; the labels are the ids (every token counts)."""
    rng = np.random.default_rng(0)
    return [{"input_ids": ids, "labels": ids} for ids in (rng.integers(3, VOCAB, (batch, seq)) for _ in range(count))]


class TorchTrainer:
    """HF's Trainer step without the Trainer: loss, backward, clip, fused AdamW over its two groups."""

    def __init__(self, model: transformers.LlamaForCausalLM):
        self.model = model
        decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
        named = list(model.named_parameters())
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": WEIGHT_DECAY},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=1e-8, fused=True)

    def step(self, batch: dict[str, np.ndarray]) -> float:
        loss = self.model(**{k: torch.from_numpy(v) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


class MsfxTrainer:
    """msfx's compiled step, threading the parameter and optimizer-state leaves through."""

    def __init__(self, directory: str):
        params = msfx.llama.load(directory)
        leaves, keys = flatten(dict(params))
        # Plain Tensors, as the step returns them: given the loaded Parameters, its first call copies them
        # while they are still held here (0.5 GB more at the peak).
        self.leaves = [Tensor(leaf.asnumpy()) for leaf in leaves]
        optimizer = AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
        self.state = optimizer.init(self.leaves)
        self.train_step = make_train_step(llama_arch, params.config, optimizer, keys, max_grad_norm=MAX_GRAD_NORM)
        self.lr, self.count = Tensor(np.float32(LR)), 0
        self.num_parameters = sum(int(np.prod(leaf.shape)) for leaf in self.leaves)

    def step(self, batch: dict[str, np.ndarray]) -> float:
        self.count += 1
        out = self.train_step(self.leaves, self.state, batch, self.lr, Tensor(np.float32(self.count)))
        self.leaves, self.state = out.params, out.opt_state
        out.grad_norm.asnumpy()  # waits for the update graph too, not only for the loss
        return float(out.loss.asnumpy())


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def timed(step: Callable[[dict], float], batch: dict[str, np.ndarray]) -> tuple[float, float]:
    """`(loss, seconds)` of one step."""
    start = time.perf_counter()
    loss = step(batch)
    return loss, time.perf_counter() - start


def get_config() -> ConfigDict:
    """The options and their defaults; each one is set from the command line as `--config.NAME=VALUE`:
    `steps` timed steps per framework after `warmup` untimed ones (msfx's first one compiles), the
    losses of the first `check` steps compared."""
    return ConfigDict(dict(batch=8, seq=128, steps=5, warmup=2, layers=12, check=3))


def main(config: ConfigDict) -> None:
    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as directory:
        torch_trainer = TorchTrainer(random_llama(directory, config.layers))
        msfx_trainer = MsfxTrainer(directory)
    print(f"{msfx_trainer.num_parameters / 1e6:.0f}M parameters, float32, batch {config.batch} x seq {config.seq}, "
          f"{os.cpu_count()} CPU threads, load average {os.getloadavg()[0]:.2f}", flush=True)
    batches = random_batches(config.warmup + config.steps, config.batch, config.seq)
    losses: dict[str, list[float]] = {"torch": [], "msfx": []}
    seconds: dict[str, list[float]] = {"torch": [], "msfx": []}
    trainers = {"torch": torch_trainer, "msfx": msfx_trainer}
    for k, batch in enumerate(batches):
        for name, trainer in trainers.items():
            loss, took = timed(trainer.step, batch)
            losses[name].append(loss)
            seconds[name].append(took)
            if k == 0 and name == "torch":  # both models loaded, torch's optimizer state and activations in
                torch_peak_gb = peak_rss_gb()
        print(f"  step {k + 1:3d}: torch {seconds['torch'][-1]:6.2f} s  msfx {seconds['msfx'][-1]:6.2f} s  "
              f"loss {losses['torch'][-1]:.5f} / {losses['msfx'][-1]:.5f}", flush=True)
    step_s = {name: statistics.median(s[config.warmup:]) for name, s in seconds.items()}
    tokens = config.batch * config.seq
    compile_s = seconds["msfx"][0] - step_s["msfx"]
    rel = [abs(a - b) / abs(a) for a, b in zip(losses["torch"][:config.check], losses["msfx"][:config.check])]
    print(f"\n{'':6s} {'step s':>8s} {'tokens/s':>9s}   (median of {config.steps} steps after {config.warmup} warmup)")
    for name in trainers:
        print(f"{name:6s} {step_s[name]:8.3f} {tokens / step_s[name]:9.1f}")
    print(f"msfx/torch tokens/s ratio: {step_s['torch'] / step_s['msfx']:.2f}x")
    print(f"msfx compile: {compile_s:.1f} s (first call {seconds['msfx'][0]:.1f} s minus a median step)")
    print(f"peak RSS: {peak_rss_gb():.1f} GB; {torch_peak_gb:.1f} GB before msfx's first step; "
          f"load average now {os.getloadavg()[0]:.2f}")
    print(f"loss agreement, first {len(rel)} steps: max relative difference {max(rel, default=float('nan')):.2g}; "
          f"after {len(batches)} steps: {abs(losses['torch'][-1] - losses['msfx'][-1]) / losses['torch'][-1]:.2g}")


def _run(argv: list[str]) -> None:
    if argv[1:]:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --config.NAME=VALUE")
    main(_CONFIG.value)


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_dict("config", get_config(), "benchmark options (see get_config)")
    app.run(_run)
