"""msfx.Trainer's edges against `transformers.Trainer` (PyTorch) as the oracle: the final metrics
(keys and HF's sample count), `train_sampling_strategy`, the warning naming the arguments msfx
ignores, and dropout in training (mask statistics, eval / generate untouched, exact resume).
"""
from __future__ import annotations

import warnings

import mindspore as ms
import numpy as np
import pytest
import torch
import transformers
from mindspore import Tensor
from transformers.trainer_pt_utils import get_length_grouped_indices

import msfx
from msfx.jit import call_in_fresh_thread
from msfx.layers.dropout import dropout, dropout_rng, step_key
from msfx.train import trainer as trainer_module

from conftest import make_hf_llama
from test_bert import make_hf_bert
from test_gpt2 import make_hf_gpt2
from test_llama_family import FAMILIES, make_hf
from test_t5 import TINY as T5_TINY
from test_trainer import RESUMABLE_RUN, args_for, assert_same_run, lm_rows, run_child, tiny_llama  # noqa: F401 (a fixture)


def _sample_counts(monkeypatch) -> dict:
    """Records the `num_samples` each Trainer hands `speed_metrics` for its "train" metrics."""
    seen = {}
    for name, module in (("hf", transformers.trainer), ("ms", trainer_module)):
        original = module.speed_metrics

        def spy(split, start, num_samples=None, num_steps=None, num_tokens=None, _name=name, _original=original):
            if split == "train":
                seen[_name] = num_samples
            return _original(split, start, num_samples=num_samples, num_steps=num_steps, num_tokens=num_tokens)

        monkeypatch.setattr(module, "speed_metrics", spy)
    return seen


@pytest.mark.parametrize("schedule", [dict(num_train_epochs=2), dict(max_steps=5)])
def test_final_metrics_match_hf(tiny_llama, tmp_path, monkeypatch, schedule):
    """10 rows in batches of 4 (the last batch has 2): HF counts the schedule's samples (rows x
    epochs, or max_steps x batch), not steps x batch; the metrics hold `epoch` and `total_flos`."""
    _, path = tiny_llama
    rows, seen = lm_rows(10), _sample_counts(monkeypatch)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(path)
    theirs = transformers.Trainer(model=hf_model, args=transformers.TrainingArguments(
        **args_for(tmp_path / "hf", **schedule)), train_dataset=rows).train()
    ours = msfx.Trainer(model=msfx.LlamaForCausalLM.from_pretrained(path), args=msfx.TrainingArguments(
        **args_for(tmp_path / "ms", **schedule)), train_dataset=rows).train()
    assert sorted(ours.metrics) == sorted(theirs.metrics)
    assert seen["ms"] == seen["hf"] and ours.metrics["epoch"] == theirs.metrics["epoch"]
    assert ours.global_step == theirs.global_step


def _pad_collator(rows: list[dict], width: int = 8) -> dict:
    """Pads to one width: a single compiled shape."""
    ids = np.array([row["input_ids"] + [0] * (width - len(row["input_ids"])) for row in rows])
    mask = np.array([[1] * len(row["input_ids"]) + [0] * (width - len(row["input_ids"])) for row in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100)}


def _trained_order(path, tmp_path, rows, **overrides) -> list[int]:
    """The row indices an msfx Trainer trains on, in order (2 epochs of batches of 2)."""
    trainer = msfx.Trainer(model=msfx.LlamaForCausalLM.from_pretrained(path), args=msfx.TrainingArguments(
        **args_for(tmp_path, per_device_train_batch_size=2, num_train_epochs=2, logging_steps=100, **overrides)),
        train_dataset=rows, data_collator=_pad_collator)
    seen, batch = [], trainer._batch
    trainer._batch = lambda dataset, indices, training: (seen.extend(int(i) for i in indices),
                                                         batch(dataset, indices, training))[1]
    trainer.train()
    return seen


def test_train_sampling_strategies(tiny_llama, tmp_path):
    """"sequential" trains in dataset order (it was shuffled); "group_by_length" orders each epoch as
    HF's `get_length_grouped_indices` over the epoch's permutation; "random" is that permutation."""
    _, path = tiny_llama
    rng = np.random.default_rng(3)
    rows = [{"input_ids": rng.integers(3, 99, int(n)).tolist()} for n in rng.integers(2, 9, 8)]
    assert _trained_order(path, tmp_path / "seq", rows, train_sampling_strategy="sequential") == [*range(8)] * 2
    random_order = _trained_order(path, tmp_path / "rnd", rows, seed=5)
    permutations = [np.random.default_rng([5, epoch]).permutation(8) for epoch in range(2)]
    assert random_order == [int(i) for p in permutations for i in p]
    grouped = _trained_order(path, tmp_path / "len", rows, seed=5, train_sampling_strategy="group_by_length",
                             gradient_accumulation_steps=2)
    lengths = [len(row["input_ids"]) for row in rows]
    assert grouped == [i for p in permutations for i in trainer_module.length_grouped_indices(lengths, 4, p)]
    assert lengths[grouped[0]] == max(lengths)


class _ColumnDataset(list):
    """A `datasets.Dataset` stand-in: rows by index, columns by name, `column_names`."""

    column_names = ["input_ids", "length"]

    def __getitem__(self, key):
        return [row[key] for row in self] if isinstance(key, str) else super().__getitem__(key)


def test_group_by_length_reads_the_length_column_or_refuses(tiny_llama, tmp_path):
    _, path = tiny_llama
    rows = _ColumnDataset({"input_ids": [5] * n, "length": 10 - n} for n in range(1, 6))

    def lengths(dataset, **overrides):
        args = msfx.TrainingArguments(**args_for(tmp_path, train_sampling_strategy="group_by_length", **overrides))
        return msfx.Trainer(model=msfx.LlamaForCausalLM.from_pretrained(path), args=args)._row_lengths(dataset)

    assert lengths(rows) == [9, 8, 7, 6, 5]
    assert lengths(rows, length_column_name="n") == [1, 2, 3, 4, 5]  # no such column: the input_ids' lengths
    with pytest.raises(ValueError, match="'input_ids' key"):
        lengths([{"text": "a"}])


@pytest.mark.parametrize("size, batch", [(40, 2), (1000, 4), (7, 4)])
def test_length_grouped_indices_match_hf(size, batch):
    lengths = np.random.default_rng(size).integers(1, 50, size).tolist()
    permutation = torch.randperm(size, generator=torch.Generator().manual_seed(11)).numpy()
    expected = get_length_grouped_indices(lengths, batch, generator=torch.Generator().manual_seed(11))
    assert trainer_module.length_grouped_indices(lengths, batch, permutation) == expected


def test_ignored_arguments_warn_and_unknown_ones_fail(tiny_llama, tmp_path):
    _, path = tiny_llama
    model = msfx.LlamaForCausalLM.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults and every honoured argument: no warning
        msfx.Trainer(model=model, args=msfx.TrainingArguments(**args_for(tmp_path, train_sampling_strategy="sequential",
                                                                         bf16=True, eval_delay=1)))
    args = msfx.TrainingArguments(**args_for(tmp_path, label_smoothing_factor=0.1, dataloader_num_workers=2))
    with pytest.warns(UserWarning, match="ignores these TrainingArguments: label_smoothing_factor, "
                                         "dataloader_num_workers$"):
        trainer = msfx.Trainer(model=model, args=args, train_dataset=lm_rows(4))
    with pytest.warns(UserWarning, match="ignore_keys"):
        trainer.evaluate(lm_rows(2), ignore_keys=["past_key_values"])
    with pytest.warns(UserWarning, match="ignore_keys"):
        trainer.predict(lm_rows(2), ignore_keys=["past_key_values"])
    with pytest.raises(TypeError, match="unexpected keyword"):
        trainer.train(resume_from_checkpint=True)
    with pytest.raises(ValueError, match="train_sampling_strategy='batch_rebalance'"):
        msfx.Trainer(model=model, args=msfx.TrainingArguments(**args_for(tmp_path,
                                                                         train_sampling_strategy="batch_rebalance")))


# ------------------------------------------------------------------------------------------- dropout

def _zero_rate_bound(rate: float, n: int) -> float:
    return 3 * (rate * (1 - rate) / n) ** 0.5


def test_dropout_mask_statistics_and_determinism():
    """Inside `dropout_rng`: each element zeroed with probability `rate` (within 3 sigma), the rest
    scaled by 1 / (1 - rate); two sites independent; the same key the same masks, eager and under jit,
    a new key new masks without a new trace. Outside it, or at rate 0: the input itself (no op)."""
    x = Tensor(np.ones((4, 8, 32, 32), np.float32))
    n = x.size
    assert dropout(x, 0.5) is x
    with dropout_rng(step_key(0, 1)):
        assert dropout(x, 0.0) is x
        masks = {rate: dropout(x, rate).asnumpy() for rate in (0.1, 0.5)}
        again = dropout(x, 0.1).asnumpy()
    for rate, y in masks.items():
        assert abs((y == 0).mean() - rate) < _zero_rate_bound(rate, n), rate
        np.testing.assert_allclose(y[y != 0], 1 / (1 - rate), rtol=1e-6)
    both = ((masks[0.1] == 0) & (again == 0)).mean()  # two sites: independent masks
    assert abs(both - 0.01) < _zero_rate_bound(0.01, n)

    traces = []

    def masked(x, key):
        traces.append(1)
        with dropout_rng(key):
            return dropout(x, 0.3)

    compiled, run = ms.jit(masked, capture_mode="trace"), call_in_fresh_thread  # traced on a fresh thread (msfx.jit)
    first, second = (run(compiled, x, step_key(0, s)).asnumpy() for s in (1, 2))
    np.testing.assert_array_equal(first, masked(x, step_key(0, 1)).asnumpy())
    assert len(traces) == 2 and (first != second).mean() > 0.3  # one trace, then the eager call
    grad = run(ms.grad(compiled, grad_position=0), x, step_key(0, 1)).asnumpy()
    np.testing.assert_array_equal(grad, first)  # d(x * mask / (1 - p)) / dx
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout(x, 1.5)


def _hf_family(tmp_path, family: str, knobs: dict):
    """`(torch model in train mode, msfx model, inputs)` of a tiny random `family` with dropout `knobs`."""
    if family in ("bert", "bert_cls"):
        cls = "BertForSequenceClassification" if family == "bert_cls" else "BertForMaskedLM"
        torch_model, path = make_hf_bert(tmp_path, cls, **knobs)
    elif family == "gpt2":
        torch_model, path = make_hf_gpt2(tmp_path, **knobs)
    elif family == "llama":
        torch_model, path = make_hf_llama(tmp_path, **knobs)
    elif family == "phi3":
        config_cls, model_cls, overrides = FAMILIES["phi3"]
        FAMILIES["phi3_dropout"] = (config_cls, model_cls, {**overrides, **knobs})
        try:
            torch_model, path = make_hf(tmp_path, "phi3_dropout")
        finally:
            del FAMILIES["phi3_dropout"]
    else:
        torch.manual_seed(0)
        config = transformers.T5Config(**T5_TINY, **knobs)
        config._attn_implementation = "eager"
        torch_model = transformers.T5ForConditionalGeneration(config)
        torch_model.save_pretrained(tmp_path)
        path = tmp_path
    ours = getattr(msfx, type(torch_model).__name__).from_pretrained(path)
    ids = np.random.default_rng(1).integers(3, 99, (2, 8))
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if family == "t5":
        inputs["decoder_input_ids"] = ids[:, :5]
    return torch_model.train(), ours, inputs


DROPOUT_SITES = [("bert", "hidden_dropout_prob"), ("bert", "attention_probs_dropout_prob"),
                 ("bert_cls", "classifier_dropout"), ("gpt2", "embd_pdrop"), ("gpt2", "attn_pdrop"),
                 ("gpt2", "resid_pdrop"), ("t5", "dropout_rate"), ("llama", "attention_dropout"),
                 ("phi3", "resid_pdrop")]


@pytest.mark.parametrize("family, knob", DROPOUT_SITES)
def test_dropout_sites_match_hf_at_rate_one(tmp_path, family, knob):
    """At rate 1 dropout zeroes its input whatever the mask, so HF in training mode is deterministic:
    msfx under `dropout_rng` matches it, which checks each family's sites one knob at a time. Outside
    `dropout_rng` (evaluation, generation) the logits equal HF's in eval mode and are identical to
    the model's with the rate at 0."""
    zero = {name: 0.0 for f, name in DROPOUT_SITES if f == family and name != "classifier_dropout"}
    torch_model, ours, inputs = _hf_family(tmp_path, family, {**zero, knob: 1.0})
    with torch.no_grad():
        expected = torch_model(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
        evaluated = torch_model.eval()(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
    with dropout_rng(step_key(0, 1)):
        trained = ours(**inputs).logits.asnumpy()
    assert np.abs(trained - expected).max() < 1e-4
    assert np.abs(evaluated - expected).max() > 1e-2  # the knob changes HF's training forward
    plain = ours(**inputs).logits.asnumpy()
    assert np.abs(plain - evaluated).max() < 1e-4
    setattr(ours.config, knob, 0.0)
    np.testing.assert_array_equal(ours(**inputs).logits.asnumpy(), plain)


def test_generate_ignores_dropout(tmp_path):
    """GPT-2 with every dropout at 0.5: greedy generation equals HF's (eval mode), eager and compiled."""
    torch_model, path = make_hf_gpt2(tmp_path, embd_pdrop=0.5, attn_pdrop=0.5, resid_pdrop=0.5)
    ids = np.random.default_rng(2).integers(3, 99, (2, 6))
    with torch.no_grad():
        expected = torch_model.eval().generate(torch.tensor(ids), max_new_tokens=6, do_sample=False).numpy()
    model = msfx.GPT2LMHeadModel.from_pretrained(path)
    for jit in (False, True):
        np.testing.assert_array_equal(np.asarray(model.generate(ids, max_new_tokens=6, jit=jit)), expected)


def test_trainer_applies_dropout_and_evaluates_without(tmp_path):
    """Tiny GPT-2 with dropout 0.1 trained by msfx.Trainer: the losses differ from the same run at rate 0
    (the switch works) and from a run with another seed (the masks follow the seed); `evaluate` sees no
    dropout (its loss equals the model's plain forward, twice the same)."""
    def run(seed, rate):
        _, path = make_hf_gpt2(tmp_path / f"{seed}-{rate}", embd_pdrop=rate, attn_pdrop=rate, resid_pdrop=rate)
        trainer = msfx.Trainer(model=msfx.GPT2LMHeadModel.from_pretrained(path), train_dataset=lm_rows(8),
                               args=msfx.TrainingArguments(**args_for(tmp_path / f"o{seed}-{rate}", max_steps=3,
                                                                      seed=seed)))
        trainer.train()
        return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]

    trainer, losses = run(0, 0.1)
    _, no_dropout = run(0, 0.0)
    _, other_seed = run(1, 0.1)
    assert losses != no_dropout and losses != other_seed
    first, second = (trainer.evaluate(lm_rows(4, seed=9))["eval_loss"] for _ in range(2))
    rows = lm_rows(4, seed=9)
    batch = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    assert first == second and abs(first - float(trainer.model(**batch).loss.asnumpy())) < 1e-5


def test_sigkill_and_resume_is_exact_with_dropout(tmp_path):
    """`RESUMABLE_RUN` of test_trainer on a Llama with attention_dropout 0.3: killed after step 5
    (checkpoint-4 saved) and resumed, it ends bit-identical to the straight run. Its first loss is not
    the plain forward's loss on the first window (which it equals without dropout): dropout is on."""
    _, path = make_hf_llama(tmp_path / "model", attention_dropout=0.3)
    script = tmp_path / "run.py"
    script.write_text(RESUMABLE_RUN)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert run_child(script, path, straight, -1, -1, 0) == 0
    assert run_child(script, path, interrupted, 5, -1, 0) == -9
    assert run_child(script, path, interrupted, -1, -1, 1) == 0
    losses = assert_same_run(straight, interrupted)
    rng = np.random.default_rng(0)  # the script's rows; the first window: 2 x 2 rows of epoch 0 with seed 7
    rows = [rng.integers(3, 99, 8) for _ in range(12)]
    window = np.stack([rows[i] for i in np.random.default_rng([7, 0]).permutation(12)[:4]])
    plain = msfx.LlamaForCausalLM.from_pretrained(path)(input_ids=window, labels=window).loss
    assert abs(losses[0][1] - float(plain.asnumpy())) > 1e-3
