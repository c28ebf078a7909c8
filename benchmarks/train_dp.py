"""Data-parallel training throughput: 1 process vs 2 `msrun` workers on the same global batch.

A random Llama (hidden 256, 4 layers, 4 heads, intermediate 688, vocab 8192, untied: 7.4M
parameters, float32) trains with `make_train_step(..., grad_reducer=data_parallel(zero_stage))`
(AdamW, clipping at 1.0) on random token batches of `config.batch` rows x `config.seq`:
- 1 process, the whole global batch;
- 2 workers under `msrun`, `batch / 2` rows each (plain DP, then ZeRO-1).
Each run does `config.warmup` steps (compiling), then `config.steps` timed ones; tokens/s = batch x
seq / median step. The communication share is the median time of the step's collectives alone
(the gradient AllReduce over the same buckets, and ZeRO-1's AllGather of the parameters, each a
compiled graph run on every worker) over the median step. Optimizer state bytes and the peak RSS
are per worker. The load average (1 min) is read before and after each run: the machine is shared.

Run: python benchmarks/train_dp.py [--config.batch=8] [--config.seq=128] [--config.steps=5]
[--config.warmup=2] (it starts `msrun` itself; an `ml_collections` config, `get_config()`).

Measured (steps=3, warmup=1, 2 cores shared with other jobs, load 7-19): 1 process 7.21 s/step
(142 tokens/s); 2 workers 2.85 s (360 tokens/s), collectives 0.75 s (26%); ZeRO-1 5.02 s (204
tokens/s), collectives 1.69 s (34%), AdamW state 28.1 against 56.1 MB per worker. Under load two
processes get about twice one process's CPU share: see README.md ("Data-parallel training with msrun").
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import mindspore as ms
import numpy as np
from absl import app
from mindspore import Tensor, ops
from ml_collections import ConfigDict, config_flags
from transformers import LlamaConfig

from msfx.architectures import llama as llama_arch
from msfx.jit import Graph
from msfx import LlamaForCausalLM
from msfx.params import flatten
from msfx.train import AdamW, make_train_step
from msfx.train.distributed import data_parallel, launch

SHAPE = dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)


def get_config() -> ConfigDict:
    """The options and their defaults; each one is set from the command line as `--config.NAME=VALUE`."""
    return ConfigDict(dict(batch=8, seq=128, steps=5, warmup=2))


def load() -> float:
    return os.getloadavg()[0]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def worker(batch: int, seq: int, steps: int, warmup: int, zero_stage: int, out: str) -> None:
    """One run (a single process or one `msrun` worker); worker 0 writes its figures to `out`."""
    dp = data_parallel(zero_stage)
    rank, world = (dp.rank, dp.world_size) if dp is not None else (0, 1)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    leaves, keys = flatten(dict(model.params))
    leaves = [Tensor(p.asnumpy()) for p in leaves]
    optimizer = AdamW(weight_decay=0.1)
    step = make_train_step(llama_arch, model.config, optimizer, keys, grad_reducer=dp)
    if dp is not None:
        dp.bind([tuple(p.shape) for p in leaves])
    state = optimizer.init(leaves if dp is None else dp.local(leaves))
    rng = np.random.default_rng(0)
    times = []
    for k in range(warmup + steps):
        ids = rng.integers(3, SHAPE["vocab_size"], (batch, seq))[rank::world]

        def one():
            nonlocal leaves, state
            loss, leaves, state, norm, _ = step(leaves, state, {"input_ids": ids, "labels": ids},
                                                Tensor(np.float32(1e-4)), Tensor(np.float32(k + 1)))
            norm.asnumpy()
        times.append(timed(one))
    comm = 0.0
    if dp is not None:  # the step's collectives alone, on gradient-shaped tensors
        reduce = Graph(lambda *g: tuple(dp.reduce(list(g), ops.zeros((), ms.float32))[0]), "bench_reduce")
        gather = Graph(lambda *p: tuple(dp.gather(dp.local(list(p)))), "bench_gather")
        collectives = [reduce] + ([gather] if zero_stage else [])
        samples = []
        for _ in range(3):
            samples.append(sum(timed(lambda: [t.asnumpy() for t in graph(*leaves)]) for graph in collectives))
        comm = statistics.median(samples[1:])
    median = statistics.median(times[warmup:])
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"workers": world, "zero_stage": zero_stage, "step_s": median, "compile_s": times[0] - median,
                       "tokens_per_s": batch * seq / median, "comm_s": comm, "comm_share": comm / median,
                       "opt_state_mb": sum(t.nbytes for t in state) / 2 ** 20,
                       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)


def main(batch: int = 8, seq: int = 128, steps: int = 5, warmup: int = 2) -> list[dict]:
    """The three runs, one after the other; prints and returns their figures."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers, zero in ((1, 0), (2, 0), (2, 1)):
            out = os.path.join(tmp, f"{workers}_{zero}.json")
            args = [f"--run_zero_stage={zero}", f"--config.batch={batch}", f"--config.seq={seq}",
                    f"--config.steps={steps}", f"--config.warmup={warmup}", f"--result_file={out}"]
            before = load()
            if workers == 1:
                subprocess.run([sys.executable, __file__, *args], check=True)
            else:
                launch(__file__, args, workers=workers, log_dir=os.path.join(tmp, f"log{zero}"), timeout=3600)
            result = {**json.loads(open(out).read()), "load_before": before, "load_after": load()}
            results.append(result)
            print(json.dumps(result), flush=True)
    return results


def _run(argv: list[str]) -> None:
    if argv[1:]:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --config.NAME=VALUE")
    if _WORKER.value is not None:
        worker(**_CONFIG.value, zero_stage=_WORKER.value, out=_OUT.value)
    else:
        main(**_CONFIG.value)


if __name__ == "__main__":
    from absl import flags
    _CONFIG = config_flags.DEFINE_config_dict("config", get_config(), "benchmark options (see get_config)")
    # not a prefix of an msrun option: its argparse takes abbreviations (`--worker` matched `--worker_num`)
    _WORKER = flags.DEFINE_integer("run_zero_stage", None, "internal: run one measurement with this zero_stage")
    _OUT = flags.DEFINE_string("result_file", None, "internal: where the worker writes its figures")
    app.run(_run)
