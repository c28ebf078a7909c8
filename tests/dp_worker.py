"""A `msfx.Trainer` run for tests/test_distributed.py, started by `msrun` (N workers) or as one process.

`python dp_worker.py MODEL_DIR SPEC_JSON`: SPEC is a list of runs, each a dict of TrainingArguments
overrides plus `out` (a directory), `resume` (resume_from_checkpoint), `die` ([rank, step]: that
worker SIGKILLs itself at the end of that step) and `rows` (the dataset size). Worker 0 writes each
run's logged losses / gradient norms and the final parameters to `out/result.npz`, and every worker
its optimizer-state bytes to `out/opt_bytes_{rank}.json`. A run `{"fp16_overflow": out}` instead
trains a toy fp16 `TrainStep` whose first step overflows on worker 1 only (`out/fp16_{rank}.json`).
"""
import json
import os
import signal
import sys

import numpy as np
from mindspore import Tensor
from transformers import TrainerCallback

import msfx
from msfx.params import flatten
from msfx.train import SGD, TrainStep
from msfx.train.distributed import data_parallel

SEQ, VOCAB = 8, 99


def rows(count: int) -> list[dict]:
    """Random ids; a random number of leading labels ignored per row, so the workers' shards hold
    different token counts (the normalization must be global to match one process)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        ids = rng.integers(3, VOCAB, SEQ)
        labels = ids.copy()
        labels[:rng.integers(1, SEQ - 1)] = -100
        out.append({"input_ids": ids.tolist(), "attention_mask": [1] * SEQ, "labels": labels.tolist()})
    return out


class Die(TrainerCallback):
    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and int(os.environ.get("RANK_ID", 0)) == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)


def run(model_dir: str, spec: dict) -> None:
    spec = dict(spec)
    out, resume, die, count = spec.pop("out"), spec.pop("resume", None), spec.pop("die", None), spec.pop("rows", 16)
    args = msfx.TrainingArguments(**{**dict(output_dir=out, learning_rate=3e-3, logging_steps=1, report_to="none",
                                            save_strategy="no", optim="adamw_torch", disable_tqdm=True,
                                            weight_decay=0.1, max_grad_norm=1.0, seed=0), **spec})
    trainer = msfx.Trainer(model=msfx.LlamaForCausalLM.from_pretrained(model_dir), args=args,
                           train_dataset=rows(count), callbacks=[Die(*die)] if die else None)
    trainer.train(resume_from_checkpoint=resume)
    rank = trainer._dp.rank if trainer._dp is not None else 0
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"opt_bytes_{rank}.json"), "w") as f:
        json.dump(sum(t.nbytes for t in trainer._opt_state), f)
    if trainer.is_world_process_zero():
        history = [h for h in trainer.state.log_history if "loss" in h]
        leaves, keys = flatten(dict(trainer.model.params))
        np.savez(os.path.join(out, "result.npz"), loss=[h["loss"] for h in history],
                 grad_norm=[h["grad_norm"] for h in history], step=[h["step"] for h in history],
                 **{f"p.{k}": p.asnumpy() for k, p in zip(keys, leaves)})


def fp16_overflow(out: str) -> None:
    """Two fp16 steps of `sum((x * w[0])^2) * s`; worker 1's `s` is 1e4 in step 1, an overflow of the
    scaled fp16 gradient there only. Writes each step's `applied`, the loss scale and `w` after.
    (Elementwise: with a float16 matmul the toy's gradients came out inf on both workers, not investigated.)"""
    dp = data_parallel()
    rank = dp.rank if dp is not None else 0

    def loss_fn(tree, batch, num_items):
        w = tree["w"]
        y = (batch["x"].astype(w.dtype) * w[0]).astype(np.float32)
        return (y * y).sum() * batch["s"][0] / num_items

    step = TrainStep(loss_fn, ["w"], SGD(), mixed_precision="fp16", max_grad_norm=None, grad_reducer=dp)
    leaves, state, applied = [Tensor(np.full((4, 4), 0.01, np.float32))], [], []
    for i in (1, 2):
        s = 1e4 if (rank == 1 and i == 1) else 1.0
        batch = {"x": np.full((2, 4), 0.05 + rank, np.float32), "s": np.full((2,), s, np.float32)}
        result = step(leaves, state, batch, lr=0.01, step=i)
        applied.append(result.applied)
        leaves, state = result.params, result.opt_state
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"fp16_{rank}.json"), "w") as f:
        json.dump({"applied": applied, "scale": step.scaler.scale, "w": leaves[0].asnumpy().tolist()}, f)


if __name__ == "__main__":
    for one in json.loads(sys.argv[2]):
        fp16_overflow(one["fp16_overflow"]) if "fp16_overflow" in one else run(sys.argv[1], one)
