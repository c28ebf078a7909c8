"""msfx.Trainer against `transformers.Trainer` (PyTorch) as the oracle, and its checkpoints.

Checked: 5 steps of a tiny random Llama (AdamW with weight decay, linear warmup, clipping, 2 x 4
gradient accumulation) log the same losses, gradient norms and learning rates as HF's Trainer and
end with the same parameters; a tiny Llama overfits 8 examples; sequence classification reaches
100% on a separable set; T5 trains through the same compiled step; bf16 and fp16 make progress and
fp16 overflow steps are skipped and counted; evaluation, best-model tracking, early stopping and
rotation follow HF; a run killed with SIGKILL (between steps, and in the middle of a save) resumes
to bit-identical parameters and losses; bad datasets and damaged checkpoints give clear errors.
Run with `-s` to see the measured differences.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from mindspore import Tensor
from safetensors.numpy import load_file

import msfx
from msfx.errors import CorruptCheckpointError
from msfx.train import SGD, AdamW, TrainStep, make_train_step
from msfx.architectures import llama as llama_arch
from msfx.params import flatten

from conftest import TINY, make_hf_llama

SEQ = 8


def lm_rows(count: int, seed: int = 0, vocab: int = TINY["vocab_size"]) -> list[dict]:
    """Rows of random ids (no padding); the first two labels of each row are ignored."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        ids = rng.integers(3, vocab, SEQ)
        labels = ids.copy()
        labels[:2] = -100
        rows.append({"input_ids": ids.tolist(), "attention_mask": [1] * SEQ, "labels": labels.tolist()})
    return rows


def args_for(tmp_path, **overrides) -> dict:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-3,
                logging_steps=1, report_to="none", save_strategy="no", optim="adamw_torch", disable_tqdm=True,
                use_cpu=True)
    return {**base, **overrides}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """`(torch_model, path)` of a tiny random HF Llama."""
    return make_hf_llama(tmp_path_factory.mktemp("trainer"), seed=0)


def test_matches_hf_trainer(tiny_llama, tmp_path):
    """Same weights, same 8 rows, 2 x 4 accumulation (each update sees every row, so the shuffles
    cannot differ), AdamW + weight decay + linear warmup + clipping at 1.0, 5 updates."""
    torch_model, path = tiny_llama
    torch_model = transformers.LlamaForCausalLM.from_pretrained(path)
    torch_model.config._attn_implementation = "eager"
    rows = lm_rows(8)
    common = dict(gradient_accumulation_steps=2, max_steps=5, warmup_steps=2, weight_decay=0.1, max_grad_norm=1.0)
    hf = transformers.Trainer(model=torch_model, args=transformers.TrainingArguments(**args_for(tmp_path / "hf",
                                                                                               **common)),
                              train_dataset=rows)
    hf.train()
    ours = msfx.Trainer(model=msfx.LlamaForCausalLM.from_pretrained(path),
                        args=msfx.TrainingArguments(**args_for(tmp_path / "ms", **common)), train_dataset=rows)
    ours.train()
    theirs = [h for h in hf.state.log_history if "loss" in h]
    mine = [h for h in ours.state.log_history if "loss" in h]
    assert [h["step"] for h in mine] == [h["step"] for h in theirs] == [1, 2, 3, 4, 5]
    loss_rel = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(mine, theirs))
    norm_rel = max(abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] for a, b in zip(mine, theirs))
    lr_diff = max(abs(a["learning_rate"] - b["learning_rate"]) for a, b in zip(mine, theirs))
    expected = {k: v.detach().numpy() for k, v in torch_model.named_parameters()}
    got = {k: p.asnumpy() for k, p in zip(flatten(dict(ours.model.params))[1], ours.model.weights)}
    param_diff = max(float(np.abs(got[k] - expected[k]).max()) for k in expected)
    print(f"\nTrainer vs HF Trainer x5: loss rel {loss_rel:.2g}, grad-norm "
          f"rel {norm_rel:.2g}, lr diff {lr_diff:.2g}, param max abs {param_diff:.2g}")
    assert loss_rel < 1e-5 and norm_rel < 1e-5 and lr_diff < 1e-12
    assert param_diff < 1e-5
    assert ours._step.traces == {"loss": 1, "update": 1}


def test_overfits_eight_examples(tiny_llama, tmp_path):
    _, path = tiny_llama
    model = msfx.LlamaForCausalLM.from_pretrained(path)
    args = msfx.TrainingArguments(**args_for(tmp_path, num_train_epochs=60, learning_rate=1e-2, logging_steps=10))
    trainer = msfx.Trainer(model=model, args=args, train_dataset=lm_rows(8, seed=1))
    trainer.train()
    final = trainer.evaluate(lm_rows(8, seed=1))["eval_loss"]
    print(f"\noverfit: eval loss {final:.4f} after {trainer.state.global_step} steps")
    assert final < 0.05


def separable_rows(count: int, seed: int) -> list[dict]:
    """Label 0 rows are drawn from ids 3..12, label 1 rows from 13..22 (held-out rows are new
    combinations of the same ids)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        label = i % 2
        low, high = (13, 23) if label else (3, 13)
        rows.append({"input_ids": rng.integers(low, high, SEQ).tolist(), "attention_mask": [1] * SEQ, "label": label})
    return rows


def test_sequence_classification_reaches_100_percent(tmp_path):
    _, path = make_hf_llama(tmp_path / "cls", seed=3, cls_name="LlamaForSequenceClassification", num_labels=2)
    model = msfx.LlamaForSequenceClassification.from_pretrained(path)

    def accuracy(prediction: transformers.EvalPrediction) -> dict:
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    args = msfx.TrainingArguments(**args_for(tmp_path, num_train_epochs=3, learning_rate=1e-2, eval_strategy="epoch",
                                             per_device_eval_batch_size=8))
    trainer = msfx.Trainer(model=model, args=args, train_dataset=separable_rows(32, 0),
                           eval_dataset=separable_rows(16, 1), compute_metrics=accuracy)
    before = trainer.evaluate()["eval_accuracy"]
    trainer.train()
    held_out = trainer.predict(separable_rows(16, 2))
    accuracy_held_out = float((held_out.predictions.argmax(-1) == held_out.label_ids).mean())
    evals = [h["eval_accuracy"] for h in trainer.state.log_history if "eval_accuracy" in h]
    print(f"\nclassification: eval accuracy {before} before, by epoch {evals}, held-out {accuracy_held_out}")
    assert before < 0.8 and len(evals) == 3 and accuracy_held_out == 1.0
    assert held_out.metrics["test_accuracy"] == 1.0 and "test_loss" in held_out.metrics


def test_t5_trains_through_the_compiled_step(tmp_path):
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1)
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    model = msfx.T5ForConditionalGeneration.from_pretrained(tmp_path / "t5")
    rng = np.random.default_rng(0)
    rows = [{"input_ids": rng.integers(2, 64, 6).tolist(), "attention_mask": [1] * 6,
             "labels": rng.integers(2, 64, 4).tolist()} for _ in range(8)]
    before = msfx.Trainer(model=model, args=msfx.TrainingArguments(**args_for(tmp_path))).evaluate(rows)["eval_loss"]
    args = msfx.TrainingArguments(**args_for(tmp_path, num_train_epochs=60, learning_rate=1e-2, logging_steps=20))
    trainer = msfx.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    after = trainer.evaluate(rows)["eval_loss"]
    # the eager forward of the trained wrapper agrees with the compiled evaluation
    batch = {k: Tensor(np.array([r[k] for r in rows], np.int32)) for k in rows[0]}
    eager = float(model(**batch).loss.asnumpy())
    print(f"\nT5 overfit: loss {before:.3f} -> {after:.4f} (eager {eager:.4f}); traces {trainer._step.traces}")
    assert after < 0.05 and abs(eager - after) < 1e-5
    assert trainer._step.traces == {"loss": 1, "update": 1}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_makes_progress(tiny_llama, tmp_path, precision):
    _, path = tiny_llama
    model = msfx.LlamaForCausalLM.from_pretrained(path)
    args = msfx.TrainingArguments(**args_for(tmp_path, num_train_epochs=10, learning_rate=1e-2, **{precision: True}))
    trainer = msfx.Trainer(model=model, args=args, train_dataset=lm_rows(8, seed=1))
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"\n{precision}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, skipped {out.metrics.get('train_skipped_steps')}")
    assert losses[-1] < 0.5 * losses[0]
    assert model.weights[0].dtype == msfx.LlamaForCausalLM.from_pretrained(path).weights[0].dtype
    if precision == "fp16":
        assert "train_skipped_steps" in out.metrics


def test_fp16_overflow_skips_the_update(tiny_llama):
    """A loss scale so large that the float16 gradients overflow: the update is skipped (leaves
    and moments unchanged), counted, and the scale halves, as torch's GradScaler."""
    _, path = tiny_llama
    params = msfx.llama.load(path)
    leaves, keys = flatten(dict(params))
    optimizer = AdamW()
    step = make_train_step(llama_arch, params.config, optimizer, keys, mixed_precision="fp16")
    step.scaler.scale = 2.0 ** 60
    batch = {k: np.array([r[k] for r in lm_rows(4)]) for k in ("input_ids", "labels")}
    state = optimizer.init(leaves)
    result = step(leaves, state, batch, 1e-3, 1)
    assert not result.applied and step.scaler.skipped_steps == 1 and step.scaler.scale == 2.0 ** 59
    assert all(np.array_equal(a.asnumpy(), b.asnumpy()) for a, b in zip(result.params, leaves))
    assert all(not b.asnumpy().any() for b in result.opt_state)
    step.scaler.scale = 2.0 ** 10
    result = step(leaves, state, batch, 1e-3, 1)
    assert result.applied and np.isfinite(float(result.loss.asnumpy())) and step.traces["update"] == 1


def test_best_model_early_stopping_and_rotation(tiny_llama, tmp_path):
    _, path = tiny_llama
    model = msfx.LlamaForCausalLM.from_pretrained(path)
    seen = []

    class Recorder(transformers.TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen.append(("evaluate", state.global_step))

        def on_save(self, args, state, control, **kwargs):
            seen.append(("save", state.global_step))

    # a learning rate this high makes the held-out loss rise after a few steps: early stopping fires
    args = msfx.TrainingArguments(**args_for(tmp_path, max_steps=40, learning_rate=5e-2, eval_strategy="steps",
                                             eval_steps=2, save_strategy="steps", save_steps=2, save_total_limit=1,
                                             load_best_model_at_end=True, metric_for_best_model="loss"))
    trainer = msfx.Trainer(model=model, args=args, train_dataset=lm_rows(8, seed=1), eval_dataset=lm_rows(8, seed=5),
                           callbacks=[Recorder, transformers.EarlyStoppingCallback(early_stopping_patience=2)])
    trainer.train()
    state = trainer.state
    kept = sorted(p.name for p in Path(args.output_dir).iterdir())
    best = Path(state.best_model_checkpoint).name
    print(f"\nbest {best} (eval loss {state.best_metric:.4f}), stopped at {state.global_step}, kept {kept}")
    assert state.global_step < 40  # stopped early
    assert ("evaluate", 2) in seen and ("save", 2) in seen
    assert best in kept and f"checkpoint-{state.global_step}" in kept and len(kept) <= 2
    # the model holds the best checkpoint's weights
    stored = load_file(str(Path(state.best_model_checkpoint) / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    assert np.array_equal(model.params["model"]["layers"][0]["mlp"]["up_proj"]["weight"].asnumpy(), stored[key])
    saved_state = json.loads((Path(args.output_dir) / f"checkpoint-{state.global_step}" /
                              "trainer_state.json").read_text())
    assert saved_state["best_model_checkpoint"] == state.best_model_checkpoint
    assert "EarlyStoppingCallback" in saved_state["stateful_callbacks"]


RESUMABLE_RUN = textwrap.dedent("""
    import json, os, signal, sys
    import numpy as np
    import msfx
    from msfx.train import checkpoint
    from msfx.train.trainer import TrainerCallback

    path, out, kill_at, kill_in_save, resume = sys.argv[1:6]
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(12):
        ids = rng.integers(3, 99, 8)
        rows.append({"input_ids": ids.tolist(), "labels": ids.tolist()})

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)

    write_checkpoint = checkpoint.write_checkpoint
    def write_then_die(output_dir, step, write):
        if step == int(kill_in_save):  # every file of the checkpoint written, not yet renamed into place
            def write_and_kill(tmp):
                write(tmp)
                os.kill(os.getpid(), signal.SIGKILL)
            return write_checkpoint(output_dir, step, write_and_kill)
        return write_checkpoint(output_dir, step, write)
    checkpoint.write_checkpoint = write_then_die

    args = msfx.TrainingArguments(output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                  max_steps=8, learning_rate=5e-3, warmup_steps=2, weight_decay=0.1,
                                  logging_steps=1, save_strategy="steps", save_steps=2, report_to="none",
                                  disable_tqdm=True, seed=7)
    trainer = msfx.Trainer(model=msfx.LlamaForCausalLM.from_pretrained(path), args=args, train_dataset=rows,
                           callbacks=[Kill])
    trainer.train(resume_from_checkpoint=True if resume == "1" else None)
    trainer.save_model(os.path.join(out, "final"))
    with open(os.path.join(out, "losses.json"), "w") as f:
        json.dump([[h["step"], h["loss"], h["grad_norm"]] for h in trainer.state.log_history if "loss" in h], f)
""")


def run_child(script: Path, *args) -> int:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=env, capture_output=True,
                          timeout=600).returncode


def assert_same_run(straight: Path, interrupted: Path) -> list:
    """Both runs of `RESUMABLE_RUN` end with bit-identical weights and the same 8 logged losses
    (returned)."""
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(interrupted / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    losses = json.loads((straight / "losses.json").read_text())
    assert json.loads((interrupted / "losses.json").read_text()) == losses and len(losses) == 8
    return losses


def test_sigkill_and_resume_is_exact(tiny_llama, tmp_path):
    """3 epochs of 12 rows (2 x 2 accumulation: 3 updates per epoch), saving every 2 updates. The
    interrupted run is killed inside the save of checkpoint-4 (all files written, not renamed), resumed
    from checkpoint-2, killed again after step 7 (checkpoint-6 saved), and resumed to the end."""
    _, path = tiny_llama
    script = tmp_path / "run.py"
    script.write_text(RESUMABLE_RUN)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert run_child(script, path, straight, -1, -1, 0) == 0
    assert run_child(script, path, interrupted, -1, 4, 0) == -9
    left = sorted(p.name for p in interrupted.iterdir())
    assert left[0].startswith(".tmp-checkpoint-4-") and left[1:] == ["checkpoint-2"]
    assert run_child(script, path, interrupted, 7, -1, 1) == -9
    assert sorted(p.name for p in interrupted.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert run_child(script, path, interrupted, -1, -1, 1) == 0
    assert_same_run(straight, interrupted)


def test_bad_datasets_and_checkpoints(tiny_llama, tmp_path):
    _, path = tiny_llama
    model = msfx.LlamaForCausalLM.from_pretrained(path)
    args = msfx.TrainingArguments(**args_for(tmp_path, max_steps=2, save_strategy="steps", save_steps=1))
    rows = lm_rows(4)
    cases = [([{k: v for k, v in r.items() if k != "labels"} for r in rows], ValueError, "no 'labels'"),
             ([{k: v for k, v in r.items() if k != "input_ids"} for r in rows], ValueError, "no 'input_ids'"),
             ([{**r, "input_ids": [x + 0.5 for x in r["input_ids"]]} for r in rows], ValueError, "integer"),
             ([{**r, "input_ids": [500] * SEQ} for r in rows], ValueError, "token id 500"),
             ([{**r, "labels": [1000] * SEQ} for r in rows], ValueError, "label 1000"),
             ([], ValueError, "non-empty train_dataset"),
             ([[1, 2, 3]] * 4, TypeError, "rows must be dicts")]
    for dataset, error, match in cases:
        with pytest.raises(error, match=match):
            msfx.Trainer(model=model, args=args, train_dataset=dataset).train()
    with pytest.raises(ValueError, match="No valid checkpoint"):
        msfx.Trainer(model=model, args=args, train_dataset=rows).train(resume_from_checkpoint=True)
    msfx.Trainer(model=model, args=args, train_dataset=rows).train()
    out = Path(args.output_dir)
    with open(out / "checkpoint-2" / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CorruptCheckpointError, match="model.safetensors has 1000 bytes"):
        msfx.Trainer(model=model, args=args, train_dataset=rows).train(resume_from_checkpoint=out / "checkpoint-2")
    (out / "checkpoint-1" / "manifest.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="no manifest.json"):
        msfx.Trainer(model=model, args=args, train_dataset=rows).train(resume_from_checkpoint=out / "checkpoint-1")
    assert sorted(p.name for p in (out / "checkpoint-2").iterdir())  # nothing was deleted
    with pytest.raises(ValueError, match="eval_dataset"):
        msfx.Trainer(model=model, args=msfx.TrainingArguments(**args_for(tmp_path, eval_strategy="steps")))
    with pytest.raises(TypeError, match="msfx models"):
        msfx.Trainer(model=object())


def test_train_step_mean_loss_heads_accumulate(tmp_path):
    """A head with a mean loss (classification): two micro-batches of 4 give the gradient of one
    batch of 8 (each micro-batch's mean over the window's 2 micro-batches).

    Compared through plain SGD at lr 1, whose update is the gradient itself: AdamW's first update
    is lr * g / (|g| + eps), which turns fp32 summation noise in gradients near eps into parameter
    differences of ~1e-6 whatever the accumulation rule (measured 2.3e-6 with transformers 5.25)."""
    _, path = make_hf_llama(tmp_path / "cls", seed=3, cls_name="LlamaForSequenceClassification", num_labels=3)
    model = msfx.LlamaForSequenceClassification.from_pretrained(path)
    rows = separable_rows(8, 0)
    batch = {"input_ids": np.array([r["input_ids"] for r in rows]), "labels": np.array([r["label"] for r in rows])}
    trainer = msfx.Trainer(model=model, args=msfx.TrainingArguments(**args_for(tmp_path)))
    grads, losses = [], []
    for accumulate in (1, 2):
        step = TrainStep(trainer._loss_fn, trainer._keys, SGD(), accumulate=accumulate, max_grad_norm=None)
        result = step(trainer._leaves, [], batch, 1.0, 1)
        grads.append([p.asnumpy() - q.asnumpy() for p, q in zip(trainer._leaves, result.params)])
        losses.append(float(result.loss.asnumpy()))
    grad_diff = max(float(np.abs(a - b).max()) for a, b in zip(*grads))
    grad_max = max(float(np.abs(g).max()) for g in grads[0])
    print(f"\nmean-loss head, accumulate 2x4 vs 8: loss diff {abs(losses[0] - losses[1]):.2g}, "
          f"gradient max abs diff {grad_diff:.2g} (largest gradient {grad_max:.2g})")
    assert grad_max > 1e-2  # the step did move the weights
    assert abs(losses[0] - losses[1]) < 1e-6 and grad_diff < 1e-6


def test_collator_tokenizer_and_hf_reload(tiny_llama, tmp_path):
    """The README's pattern: tokenized rows with a text column, `DataCollatorForLanguageModeling(mlm=False,
    return_tensors="np")`, the tokenizer as `processing_class` (saved with checkpoints); `save_model`
    writes a directory that HF PyTorch loads with the same logits."""
    from test_generate_outputs import tiny_tokenizer

    _, path = tiny_llama
    tokenizer = tiny_tokenizer()
    texts = [" ".join(f"w{(7 * i + j) % 90}" for j in range(3 + i % 4)) for i in range(12)]
    rows = [{"text": t, **tokenizer(t)} for t in texts]
    model = msfx.LlamaForCausalLM.from_pretrained(path)
    args = msfx.TrainingArguments(**args_for(tmp_path, max_steps=6, save_strategy="steps", save_steps=3,
                                             learning_rate=1e-2))
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False, return_tensors="np",
                                                            pad_to_multiple_of=8)
    trainer = msfx.Trainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                           data_collator=collator)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] and trainer._step.traces["loss"] == 1  # one padded shape, one graph
    assert (Path(args.output_dir) / "checkpoint-6" / "tokenizer.json").is_file()
    trainer.save_model(tmp_path / "final")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "final", attn_implementation="eager")
    ids = tokenizer(texts[:2], padding=True, return_tensors="np")
    with torch.no_grad():
        expected = reloaded(**{k: torch.from_numpy(v) for k, v in ids.items()}).logits.numpy()
    got = model(**{k: Tensor(v.astype(np.int32)) for k, v in ids.items()}).logits.asnumpy()
    print(f"\nafter training, HF PyTorch reload of save_model: logits max abs diff {np.abs(got - expected).max():.2g}")
    assert np.abs(got - expected).max() < 1e-4


def test_mis_shaped_labels_are_refused_before_tracing(tiny_llama, tmp_path):
    _, path = tiny_llama
    args = msfx.TrainingArguments(**args_for(tmp_path, max_steps=1))
    longer = [{**r, "labels": r["labels"] + [5]} for r in lm_rows(4)]
    with pytest.raises(ValueError, match=r"labels have shape \[4, 9\], expected like input_ids \[4, 8\]"):
        msfx.Trainer(model=msfx.LlamaForCausalLM.from_pretrained(path), args=args, train_dataset=longer).train()
    _, cls_path = make_hf_llama(tmp_path / "cls", seed=3, cls_name="LlamaForSequenceClassification", num_labels=2)
    model = msfx.LlamaForSequenceClassification.from_pretrained(cls_path)
    wrong = [{**r, "label": [0.5, 0.5, 0.5]} for r in separable_rows(4, 0)]
    for run in (lambda t: t.train(), lambda t: t.evaluate(wrong)):
        with pytest.raises(ValueError, match=r"labels have shape \[4, 3\], expected \[batch\] or"):
            run(msfx.Trainer(model=model, args=args, train_dataset=wrong))


def test_window_without_labels_and_save_best(tiny_llama, tmp_path):
    """A window whose labels are all -100 leaves the weights finite (zero loss and gradients, as HF);
    `save_strategy="best"` saves exactly when the evaluation metric improves."""
    _, path = tiny_llama
    model = msfx.LlamaForCausalLM.from_pretrained(path)
    unlabeled = [{**r, "labels": [-100] * SEQ} for r in lm_rows(4)]
    trainer = msfx.Trainer(model=model, args=msfx.TrainingArguments(**args_for(tmp_path, max_steps=2)),
                           train_dataset=unlabeled)
    trainer.train()
    assert all(np.isfinite(w.asnumpy()).all() for w in model.weights)
    args = msfx.TrainingArguments(**args_for(tmp_path, max_steps=4, learning_rate=5e-2, save_strategy="best",
                                             eval_strategy="steps", eval_steps=1, metric_for_best_model="loss",
                                             load_best_model_at_end=True))
    trainer = msfx.Trainer(model=msfx.LlamaForCausalLM.from_pretrained(path), args=args,
                           train_dataset=lm_rows(8, seed=1), eval_dataset=lm_rows(8, seed=5))
    trainer.train()
    best = trainer.state.best_global_step
    assert best and trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best}")
    assert (Path(args.output_dir) / f"checkpoint-{best}").is_dir()
