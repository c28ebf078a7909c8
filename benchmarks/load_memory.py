"""Loading the big text encoders of image generation on a 24 GiB machine: peak memory and time.

Writes a random bfloat16 checkpoint with the exact tensor names and shapes of
- `t5`: the T5-v1.1-XXL encoder as DeepFloyd/t5-v1_1-xxl's `T5EncoderModel` (d_model 4096, 24 layers,
  d_ff 10240 gated-gelu, 64 heads x d_kv 64, vocab 32128: 4.76 B parameters, 9.5 GB), and
- `clip`: a CLIP ViT-bigG/14-shaped text tower with its projection (`CLIPTextModelWithProjection`: hidden
  1280, 32 layers, 20 heads, intermediate 5120, vocab 49408, 77 positions, gelu: 0.69 B, 1.4 GB),
sharded (2 GB shards and an index json, as `save_pretrained` writes them). The names are those HF's
`save_pretrained` writes for a tiny model of the same layout; the shapes come from the full-size model built
on torch's meta device. The file is written tensor by tensor from a pool of random bfloat16 values (normal,
std `1/sqrt(fan_in)`; norm weights 1, biases 0), so the writer never holds a tensor, let alone the model.

Then, strictly one after another, each in a fresh child process:
1. msfx: `from_pretrained(dir, dtype="bfloat16")`: load seconds and peak RSS (`ru_maxrss` of the child)
   divided by the checkpoint's bytes (target <= 1.15), then two forwards on a 77-token prompt (seconds: the first
   pages in torch's memory-mapped weights, the second is steady), the output saved beside the checkpoint;
2. HF + torch: `from_pretrained(dir, dtype=torch.bfloat16)` of the same files: the same figures.
The report gives msfx/torch ratios of load time and peak RSS. Not run in CI (too large).

    python benchmarks/load_memory.py --config.which=both [--config.dir=/tmp/scratch]

The checkpoint directory is deleted at the end (`--config.keep` keeps it). Options are an `ml_collections`
config (`get_config()`; `--help` shows it).
"""
from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app
from ml_collections import ConfigDict, config_dict, config_flags

SHARD_BYTES = 2 * 10 ** 9
PROMPT_TOKENS = 77
POOL = 1 << 22  # random bfloat16 values the writer draws its tensors from


def _configs() -> dict:
    import transformers

    t5 = transformers.T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                               num_decoder_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                               relative_attention_num_buckets=32, tie_word_embeddings=False, dtype="bfloat16")
    clip = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                       num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                                       hidden_act="gelu", projection_dim=1280, pad_token_id=1, bos_token_id=49406,
                                       eos_token_id=49407, dtype="bfloat16")
    return {"t5": (t5, "T5EncoderModel"), "clip": (clip, "CLIPTextModelWithProjection")}


def _tiny(config, which: str):
    """The same layout (layer count, activation, projection) with small widths: only its key names are used."""
    config = config.__class__(**config.to_dict())
    if which == "t5":
        config.update(dict(vocab_size=64, d_model=8, d_kv=2, d_ff=16, num_heads=4))
    else:
        config.update(dict(vocab_size=64, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                           projection_dim=8))
    return config


def checkpoint_layout(which: str) -> tuple[object, dict[str, tuple[int, ...]]]:
    """`(config, {key: shape})` in file order: the keys HF's `save_pretrained` writes for a tiny model
    of the layout, with their full-size shapes (from the model built on the meta device).

    Raises:
        RuntimeError: a saved key the full-size model lacks (the two layouts disagree).
    """
    import torch
    import transformers
    from safetensors import safe_open

    config, cls_name = _configs()[which]
    cls = getattr(transformers, cls_name)
    with tempfile.TemporaryDirectory() as tiny_dir:
        cls(_tiny(config, which)).save_pretrained(tiny_dir)
        keys = []
        for path in sorted(Path(tiny_dir).glob("*.safetensors")):
            with safe_open(path, "pt") as f:
                keys += list(f.keys())
    with torch.device("meta"):
        full = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
    if set(keys) - set(full):
        raise RuntimeError(f"saved keys missing from the full-size model: {sorted(set(keys) - set(full))}")
    return config, {k: full[k] for k in sorted(keys)}


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _write_tensor(f, key: str, shape: tuple[int, ...], pool: np.ndarray, rng: np.random.Generator) -> None:
    """Stream one tensor's bytes: norm weights 1, biases 0, others pool values scaled by 1/sqrt(fan_in)
    (scaling in bfloat16 bits would be costly; the pool is drawn at each of the few fan-ins instead)."""
    count = math.prod(shape)
    if "norm" in key and key.endswith("weight"):
        f.write(np.full(count, 0x3F80, np.uint16).tobytes())  # 1.0
        return
    if key.endswith("bias"):
        f.write(np.zeros(count, np.uint16).tobytes())
        return
    start = int(rng.integers(0, POOL))
    while count:
        n = min(count, POOL - start)
        f.write(pool[start:start + n].tobytes())
        count -= n
        start = 0


def write_checkpoint(which: str, out_dir: Path) -> int:
    """Write config.json, the bf16 shards and the index into `out_dir`; returns the tensor bytes."""
    config, shapes = checkpoint_layout(which)
    rng = np.random.default_rng(0)
    pools: dict[int, np.ndarray] = {}
    shards: list[list[str]] = [[]]
    used = 0
    for key, shape in shapes.items():
        size = 2 * math.prod(shape)
        if shards[-1] and used + size > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, keys in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for key in keys:
            size = 2 * math.prod(shapes[key])
            header[key] = {"dtype": "BF16", "shape": list(shapes[key]), "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[key] = name
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(out_dir / name, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little"))
            f.write(encoded)
            for key in keys:
                fan_in = shapes[key][-1]
                if fan_in not in pools:
                    std = 1.0 if "embed" in key or "shared" in key else fan_in ** -0.5
                    pools[fan_in] = _bf16_bits(rng.normal(0.0, std, POOL))
                _write_tensor(f, key, shapes[key], pools[fan_in], rng)
    total = sum(2 * math.prod(s) for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out_dir)
    return total


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(which: str, impl: str, model_dir: str) -> dict:
    """Runs in the child process: load, then two forwards on a 77-token prompt. Peak RSS is read right
    after the load (before the forward's activations) and after the imports (the baseline)."""
    if impl == "msfx":
        import mindspore as ms

        import msfx
        cls = getattr(msfx, _configs()[which][1])
        dtype = "bfloat16"
    else:
        import torch
        import transformers
        cls = getattr(transformers, _configs()[which][1])
        dtype = torch.bfloat16
    baseline = _peak_rss_bytes()
    start = time.perf_counter()
    model = cls.from_pretrained(model_dir, dtype=dtype)
    load_s = time.perf_counter() - start
    peak = _peak_rss_bytes()
    ids = np.random.default_rng(0).integers(0, 32000, (1, PROMPT_TOKENS))
    ids[0, -1] = 49407 if which == "clip" else 1  # end of text
    times = []
    for _ in range(2):  # the first forward pages in torch's memory-mapped weights; the second is steady
        start = time.perf_counter()
        if impl == "msfx":
            out = model(input_ids=ms.Tensor(ids.astype(np.int32)))
            first = out[0].astype(ms.float32).asnumpy()
        else:
            with torch.inference_mode():
                out = model(input_ids=torch.tensor(ids))
            first = out[0].float().numpy()
        times.append(time.perf_counter() - start)
    np.save(Path(model_dir).parent / f"{which}_{impl}_out.npy", first)
    return {"load_s": load_s, "peak_rss": peak, "baseline_rss": baseline, "forward_s": times[0],
            "second_forward_s": times[1], "finite": bool(np.isfinite(first).all())}


def _run_child(which: str, impl: str, model_dir: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, f"--config.child={impl}", f"--config.which={which}",
                           f"--config.dir={model_dir}"], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(which: str, scratch: Path, keep: bool) -> dict:
    model_dir = scratch / f"{which}_bf16"
    start = time.perf_counter()
    total = write_checkpoint(which, model_dir)
    print(f"[{which}] wrote {total / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s: {model_dir}", flush=True)
    try:
        ours = _run_child(which, "msfx", model_dir)
        theirs = _run_child(which, "torch", model_dir)
    finally:
        if not keep:
            shutil.rmtree(model_dir)
    gib = 2 ** 30
    for name, r in (("msfx", ours), ("torch", theirs)):
        print(f"[{which}] {name:5s} load {r['load_s']:6.1f} s | peak RSS {r['peak_rss'] / gib:6.2f} GiB = "
              f"{r['peak_rss'] / total:.3f} x checkpoint ({(r['peak_rss'] - r['baseline_rss']) / total:.3f} x "
              f"above the {r['baseline_rss'] / gib:.2f} GiB after imports) | forward {PROMPT_TOKENS} tokens "
              f"{r['forward_s']:6.2f} s, again {r['second_forward_s']:6.2f} s | finite {r['finite']}", flush=True)
    a, b = (np.load(scratch / f"{which}_{impl}_out.npy") for impl in ("msfx", "torch"))
    print(f"[{which}] msfx/torch: load time {ours['load_s'] / theirs['load_s']:.2f}, peak RSS "
          f"{ours['peak_rss'] / theirs['peak_rss']:.2f}, forward {ours['forward_s'] / theirs['forward_s']:.2f}, "
          f"again {ours['second_forward_s'] / theirs['second_forward_s']:.2f} (speed: torch's time / msfx's "
          f"{theirs['second_forward_s'] / ours['second_forward_s']:.2f}x); msfx peak RSS / checkpoint "
          f"{ours['peak_rss'] / total:.3f} (target <= 1.15); outputs: max |msfx - torch| {np.abs(a - b).max():.3g} at "
          f"max |torch| {np.abs(b).max():.3g}; load average {os.getloadavg()[0]:.1f}", flush=True)
    return {"checkpoint_bytes": total, "msfx": ours, "torch": theirs}


def get_config() -> ConfigDict:
    """The options and their defaults; each one is set from the command line as `--config.NAME=VALUE`:
    `which` of "t5", "clip", "both"; `dir` the scratch directory for the checkpoint (default: a new one
    under /tmp); `keep` keeps the checkpoint; `child` ("msfx" or "torch") is set for the child processes."""
    return ConfigDict(dict(which="both", dir=config_dict.placeholder(str), keep=False,
                           child=config_dict.placeholder(str)))


def main(config: ConfigDict) -> None:
    """Raises:
        ValueError: `config.which` or `config.child` is not one of its choices."""
    if config.which not in ("t5", "clip", "both") or config.child not in (None, "msfx", "torch"):
        raise ValueError(f"config.which must be t5, clip or both (got {config.which!r}) and config.child "
                         f"msfx or torch (got {config.child!r})")
    if config.child:
        print(json.dumps(child(config.which, config.child, config.dir)))
        return
    scratch = Path(config.dir) if config.dir else Path(tempfile.mkdtemp(prefix="msfx_load_memory_"))
    for which in (("clip", "t5") if config.which == "both" else (config.which,)):
        measure(which, scratch, config.keep)


def _run(argv: list[str]) -> None:
    if argv[1:]:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --config.NAME=VALUE")
    main(_CONFIG.value)


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_dict("config", get_config(), "benchmark options (see get_config)")
    app.run(_run)
