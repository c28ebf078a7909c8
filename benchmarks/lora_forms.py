"""LoRA's two in-graph forms, timed on SmolLM2-135M's layer shapes (hidden 576, MLP 1536, 9 / 3 heads;
`layers` of them, a 2048-token vocab so the head does not dominate), one compiled train step (loss,
backward, AdamW) per call on `batch` x `seq` tokens, r=16 on every linear layer:

- `unmerged`: what msfx runs, peft's `x @ W.T + s * (x @ A.T) @ B.T` (`msfx.layers.basic.LoraWeight`);
- `merged`: the layers read `W + s * B @ A`, built in the graph each step (the gradient of the whole
  `W'` is then computed and projected onto A and B);
- `full`: full fine-tuning of the same model, for scale.

    python benchmarks/lora_forms.py [--config.forms=unmerged,merged,full --config.layers=4]

Prints the first call (trace + compile + step) and the median of the later steps. Options are an
`ml_collections` config (`get_config()`; `--help` shows it).
"""
from __future__ import annotations

import time

import mindspore as ms
import numpy as np
import transformers
from absl import app
from ml_collections import ConfigDict, config_flags

from msfx.models.llama import LlamaForCausalLM
from msfx.params import flatten
from msfx.peft import LoraConfig, get_peft_model
from msfx.peft.lora import adapt, merged_weight
from msfx.train import AdamW, TrainStep
from msfx.train.step import causal_lm_items

FORMS = ("unmerged", "merged", "full")


def get_config() -> ConfigDict:
    return ConfigDict(dict(forms="unmerged,merged,full", layers=4, batch=8, seq=128, steps=6, r=16))


def time_form(form: str, config: ConfigDict) -> list[float]:
    """Seconds per call of the compiled train step (the first includes tracing and compiling)."""
    model_config = transformers.LlamaConfig(vocab_size=2048, hidden_size=576, intermediate_size=1536,
                                            num_hidden_layers=config.layers, num_attention_heads=9,
                                            num_key_value_heads=3, tie_word_embeddings=True)
    model = base = LlamaForCausalLM(model_config)
    if form != "full":
        model = get_peft_model(base, LoraConfig(r=config.r, lora_alpha=2 * config.r, target_modules="all-linear",
                                                init_lora_weights=False))
    params, keys = flatten(dict(model.params))
    trains = [p.requires_grad for p in params]

    def loss_fn(tree, batch, num_items):
        if form == "merged":
            tree = adapt(tree, model._targets, lambda node, path: merged_weight(
                node["weight"], node["lora_A"]["weight"], node["lora_B"]["weight"], model.scaling, False))
            with base.using_params(tree):
                return base(**batch, num_items_in_batch=num_items).loss
        with model.using_params(tree):
            return model(**batch, num_items_in_batch=num_items).loss

    step = TrainStep(loss_fn, [k for k, t in zip(keys, trains) if t], AdamW(), count_items=causal_lm_items,
                     frozen_keys=[k for k, t in zip(keys, trains) if not t])
    leaves = [ms.Tensor(p.asnumpy()) for p, t in zip(params, trains) if t]
    frozen = [ms.Tensor(p.asnumpy()) for p, t in zip(params, trains) if not t]
    state = step.optimizer.init(leaves)
    ids = np.random.default_rng(0).integers(0, 2048, (config.batch, config.seq)).astype(np.int32)
    times = []
    for i in range(config.steps):
        start = time.perf_counter()
        out = step(leaves, state, {"input_ids": ids, "labels": ids}, 1e-4, i + 1, frozen_leaves=frozen)
        float(out.loss.asnumpy())
        times.append(time.perf_counter() - start)
        leaves, state = out.params, out.opt_state
    return times


def main(config: ConfigDict) -> None:
    forms = config.forms.split(",")
    unknown = [f for f in forms if f not in FORMS]
    if unknown or config.steps < 3:
        raise ValueError(f"forms must be among {FORMS} (got {unknown}) and steps >= 3 (got {config.steps})")
    for form in forms:
        times = time_form(form, config)
        print(f"{form:>8}: first call {times[0]:.1f} s, then median {np.median(times[2:]):.3f} s per step "
              f"({' '.join(f'{t:.2f}' for t in times[1:])})", flush=True)


def _run(argv: list[str]) -> None:
    if argv[1:]:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --config.NAME=VALUE")
    main(_CONFIG.value)


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_dict("config", get_config(), "benchmark options (see get_config)")
    app.run(_run)
