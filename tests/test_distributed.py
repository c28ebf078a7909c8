"""Data-parallel `msfx.Trainer` under `msrun` (2 CPU workers) against one process.

Checked (tiny random Llama, 20 rows whose label counts differ, AdamW + weight decay + clipping, 4
updates; the third global window holds 4 rows, so worker 1 has no micro-batch there):
- 2 workers x per-device batch 4 log the same losses and end with the same parameters as one
  process with batch 8 (<= 1e-5 relative; the 8-row gradient is one matmul's sum over rows, the
  workers' two 4-row sums are added after, so the last bits differ), and bit for bit as one process
  with batch 4 x 2 accumulation steps (the same sums in the same order); one process with batch 4
  alone (half the global batch) differs (the negative control);
- ZeRO-1 gives plain DP's numbers bit for bit with half the optimizer state per worker, and its
  2-worker checkpoint resumes in one process;
- an fp16 overflow on one worker skips the step on both (one process with worker 0's data applies it);
- (slow) a worker SIGKILLed after a checkpoint fails the job with its log tail, and
  `resume_from_checkpoint` ends bit for bit like the uninterrupted run; bf16 / fp16 Trainer runs
  under msrun equal one process with batch 4 x 2 (2 updates; fp16 skips the first on both workers).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from msfx.train.distributed import MsrunError, launch

from conftest import make_hf_llama

WORKER = Path(__file__).with_name("dp_worker.py")
COMMON = dict(max_steps=4, rows=20)
TIMEOUT = 900  # seconds per job: a loaded 2-core machine (load ~20) took 400 s for two fp16 runs


def single(model: Path, specs: list[dict]) -> None:
    """The runs in one plain process."""
    done = subprocess.run([sys.executable, str(WORKER), str(model), json.dumps(specs)], capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]


def distributed(model: Path, specs: list[dict], log_dir: Path) -> None:
    """The runs under msrun with 2 workers (a worker that fails or hangs fails the test with the log tails)."""
    launch(WORKER, [model, json.dumps(specs)], workers=2, log_dir=log_dir, timeout=TIMEOUT)


def result(out: Path) -> dict:
    return dict(np.load(out / "result.npz"))


def params(res: dict) -> dict:
    return {k: v for k, v in res.items() if k.startswith("p.")}


def max_rel(a: dict, b: dict) -> float:
    """The largest difference of the parameters, relative to each tensor's largest magnitude."""
    return max(float(np.abs(a[k] - b[k]).max() / np.abs(a[k]).max()) for k in params(a))


def assert_identical(a: dict, b: dict) -> None:
    np.testing.assert_array_equal(a["loss"], b["loss"])
    for k in params(a):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_hf_llama(tmp_path_factory.mktemp("dp_model"), seed=0)[1]


@pytest.fixture(scope="module")
def runs(model, tmp_path_factory) -> Path:
    """Every default-suite run: 3 single-process runs, then one msrun job of 3 runs."""
    root = tmp_path_factory.mktemp("dp_runs")
    single(model, [dict(out=str(root / "b8"), per_device_train_batch_size=8, **COMMON),
                   dict(out=str(root / "b4x2"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                        **COMMON),
                   dict(out=str(root / "b4"), per_device_train_batch_size=4, **COMMON),
                   dict(fp16_overflow=str(root / "fp16_single"))])
    distributed(model, [dict(out=str(root / "dp"), per_device_train_batch_size=4, **COMMON),
                        dict(out=str(root / "zero1"), per_device_train_batch_size=4, zero_stage=1,
                             save_strategy="steps", save_steps=2, **COMMON),
                        dict(fp16_overflow=str(root / "fp16"))], root / "logs")
    return root


def test_two_workers_match_one_process(runs):
    dp, b8, b4x2, b4 = (result(runs / name) for name in ("dp", "b8", "b4x2", "b4"))
    loss_rel = float(np.abs(dp["loss"] - b8["loss"]).max() / np.abs(b8["loss"]).max())
    print(f"\n2 workers x 4 vs 1 process x 8: losses {loss_rel:.2e}, parameters {max_rel(dp, b8):.2e} relative")
    assert len(dp["loss"]) == 4
    assert loss_rel <= 1e-5 and max_rel(dp, b8) <= 1e-5
    np.testing.assert_allclose(dp["grad_norm"], b8["grad_norm"], rtol=1e-5)
    assert_identical(dp, b4x2)
    assert max_rel(b4, b8) > 1e-3  # half the global batch: the comparison can fail


def test_zero1_matches_plain_dp(runs, model, tmp_path):
    dp, zero1 = result(runs / "dp"), result(runs / "zero1")
    assert_identical(zero1, dp)
    plain = [json.loads((runs / "dp" / f"opt_bytes_{r}.json").read_text()) for r in (0, 1)]
    sharded = [json.loads((runs / "zero1" / f"opt_bytes_{r}.json").read_text()) for r in (0, 1)]
    print(f"\noptimizer state per worker: plain DP {plain} bytes, ZeRO-1 {sharded} bytes")
    assert sum(sharded) == plain[0] and max(sharded) - min(sharded) <= 8 * 4  # halves, to a leaf's rounding
    # the checkpoint holds the full state: one process resumes the 2-worker run
    single(model, [dict(out=str(tmp_path / "one"), per_device_train_batch_size=8,
                        resume=str(runs / "zero1" / "checkpoint-2"), **COMMON)])
    resumed = result(tmp_path / "one")
    assert max_rel(resumed, zero1) <= 1e-5
    np.testing.assert_allclose(resumed["loss"], zero1["loss"], rtol=1e-5)


def test_fp16_overflow_skips_on_every_worker(runs):
    ranks = [json.loads((runs / "fp16" / f"fp16_{r}.json").read_text()) for r in (0, 1)]
    alone = json.loads((runs / "fp16_single" / "fp16_0.json").read_text())
    for r in ranks:
        assert r["applied"] == [False, True] and r["scale"] == 2.0 ** 15
    assert ranks[0]["w"] == ranks[1]["w"]
    assert alone["applied"] == [True, True]  # worker 0's own data does not overflow


@pytest.mark.slow
def test_sigkill_one_worker_then_resume(model, runs, tmp_path):
    out = tmp_path / "killed"
    spec = dict(out=str(out), per_device_train_batch_size=4, save_strategy="steps", save_steps=2, **COMMON)
    with pytest.raises(MsrunError) as failed:
        distributed(model, [dict(spec, die=[1, 3])], tmp_path / "logs_killed")
    assert "msrun exited with" in str(failed.value)  # not a timeout
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    distributed(model, [dict(spec, resume=True)], tmp_path / "logs_resumed")
    resumed, straight = result(out), result(runs / "dp")
    for k in params(straight):
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)
    # the resumed run's log holds the steps before the checkpoint (restored) and after it
    np.testing.assert_array_equal(resumed["loss"], straight["loss"])


@pytest.mark.slow
def test_mixed_precision_under_msrun(model, tmp_path):
    modes, short = [{"bf16": True}, {"fp16": True}], dict(COMMON, max_steps=2)  # float16 matmuls are slow on CPU
    single(model, [dict(out=str(tmp_path / f"one{i}"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                        **mode, **short) for i, mode in enumerate(modes)])
    distributed(model, [dict(out=str(tmp_path / f"dp{i}"), per_device_train_batch_size=4, **mode, **short)
                        for i, mode in enumerate(modes)], tmp_path / "logs")
    for i in range(len(modes)):
        assert_identical(result(tmp_path / f"dp{i}"), result(tmp_path / f"one{i}"))
    norms = result(tmp_path / "dp1")["grad_norm"]  # fp16: the first step overflows at scale 2^16 and is skipped
    assert not np.isfinite(norms[0]) and np.isfinite(norms[1])


def test_zero1_slices_cover_every_element_once():
    """The ZeRO-1 plan (no collective runs): 3 workers' segments tile the 21 flattened elements."""
    from msfx.train.distributed import DataParallel
    shapes = [(3, 4), (5,), (2, 2)]
    plans = [DataParallel(rank, 3, zero_stage=1).bind(shapes) for rank in range(3)]
    assert [p.segments for p in plans] == [[(0, 0, 7)], [(0, 7, 12), (1, 0, 2)], [(1, 2, 5), (2, 0, 4)]]
    assert plans[0].local_decay((True, False, True)) == (True,)
    assert plans[2].local_decay((True, False, True)) == (False, True)


def test_bad_zero_stage_is_refused():
    import msfx
    with pytest.raises(ValueError, match="zero_stage"):
        msfx.TrainingArguments(output_dir="unused", zero_stage=2)
