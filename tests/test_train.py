"""msfx.train against PyTorch / transformers as the oracle.

A tiny random HF PyTorch Llama (`conftest.make_hf_llama`: initializer_range 0.2, random norm
weights, eager attention) is saved and loaded into msfx. Checked: 5 jit-compiled AdamW steps
(HF's decay / no-decay groups, linear warmup schedule, clipping at 1.0) against `torch.optim.AdamW`
+ `transformers.get_scheduler` + `clip_grad_norm_`; gradient accumulation 4 x 2 against one batch of
8; every schedule's factors against `transformers.get_scheduler`; SGD with momentum against
`torch.optim.SGD`; and that the step compiles once. Run with `-s` to see the measured differences.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
import torch
import transformers
from mindspore import Tensor

import msfx
from msfx.architectures import llama as llama_arch
from msfx.params import flatten
from msfx.train import SCHEDULES, SGD, AdamW, decay_mask, get_schedule, make_train_step, warmup_steps_for

from conftest import TINY, make_hf_llama

LOSS_RTOL = 1e-5
PARAM_TOL = 1e-5
BATCH, SEQ, STEPS, LR = 2, 8, 5, 1e-3


def make_batch(rows: int, seed: int) -> dict[str, np.ndarray]:
    """Right-padded rows of random ids; labels are the ids with -100 on padding and on a few
    random prompt tokens, so the valid-token count differs from row to row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY["vocab_size"], (rows, SEQ))
    mask = np.ones_like(ids)
    labels = ids.copy()
    for r in range(rows):
        pad = int(rng.integers(0, 4))
        if pad:
            ids[r, -pad:], mask[r, -pad:], labels[r, -pad:] = TINY["pad_token_id"], 0, -100
        labels[r, :int(rng.integers(0, 3))] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def torch_batch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).long() for k, v in batch.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """`(torch_model, msfx params)`: the same random weights."""
    model, path = make_hf_llama(tmp_path_factory.mktemp("train"), seed=0)
    return model, msfx.llama.load(path)


def torch_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.named_parameters()}


def adamw_groups(model, weight_decay: float) -> list[dict]:
    """HF Trainer's two parameter groups (`Trainer.get_decay_parameter_names` needs no Trainer state)."""
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]


def test_adamw_linear_warmup_clipping_matches_torch(tiny):
    """(a) 5 steps: losses within 1e-5 relative, every parameter within 1e-5; (e) one compile."""
    import copy
    model, params = tiny
    model = copy.deepcopy(model).train()
    leaves, keys = flatten(dict(params))
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    assert decay_mask(keys) == tuple(k in decay for k in keys)

    batches = [make_batch(BATCH, seed) for seed in range(STEPS)]
    opt = torch.optim.AdamW(adamw_groups(model, 0.1), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    sched = transformers.get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=STEPS)
    torch_losses, torch_norms = [], []
    for batch in batches:
        loss = model(**torch_batch(batch)).loss
        loss.backward()
        torch_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        opt.step()
        sched.step()
        opt.zero_grad()
        torch_losses.append(float(loss.detach()))

    optimizer = AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    step = make_train_step(llama_arch, params.config, optimizer, keys, max_grad_norm=1.0)
    schedule = get_schedule("linear", 2, STEPS)
    state = optimizer.init(leaves)
    losses, norms = [], []
    for k, batch in enumerate(batches):
        lr = Tensor(np.float32(LR * schedule(k)))
        loss, leaves, state, norm, _ = step(leaves, state, batch, lr, Tensor(np.float32(k + 1)))
        losses.append(float(loss.asnumpy()))
        norms.append(float(norm.asnumpy()))
    assert step.compiles == 1 and step.traces == {"loss": 1, "update": 1}

    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(losses, torch_losses))
    norm_rel = max(abs(a - b) / abs(b) for a, b in zip(norms, torch_norms))
    expected = torch_state(model)
    param_diff = max(float(np.abs(leaf.asnumpy() - expected[key]).max()) for leaf, key in zip(leaves, keys))
    moved = max(float(np.abs(leaf.asnumpy() - p.asnumpy()).max()) for leaf, p in zip(leaves, flatten(dict(params))[0]))
    print(f"\nAdamW x{STEPS}: loss rel {loss_rel:.2g}, grad-norm rel {norm_rel:.2g}, param max abs {param_diff:.2g} "
          f"(params moved up to {moved:.2g}); losses {np.round(losses, 4)}, grad norms {np.round(norms, 3)}")
    assert min(torch_norms) > 1.0  # clipping was active on every step
    assert moved > 100 * PARAM_TOL
    assert loss_rel < LOSS_RTOL and norm_rel < LOSS_RTOL
    assert param_diff < PARAM_TOL


def test_fused_adamw_equals_op_path(tiny, monkeypatch):
    """The fused AdamW and sum-of-squares kernels (`msfx.kernels`) give the op path's leaves, moments
    and gradient norms to ~1e-7 over 3 compiled steps with weight decay and clipping; every leaf takes
    the fused update."""
    from msfx import kernels

    if not kernels.available():
        pytest.skip("the fused kernels are not built (no C++ compiler or MSFX_KERNELS=0)")
    _, params = tiny
    leaves, keys = flatten(dict(params))
    optimizer = AdamW(weight_decay=0.1)
    calls, fused_adamw = [], kernels.adamw
    monkeypatch.setattr(kernels, "adamw", lambda *args: calls.append(args[0].shape) or fused_adamw(*args))
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(kernels, "available", lambda fused=fused: fused)
        step = make_train_step(llama_arch, params.config, optimizer, keys, max_grad_norm=1.0)
        current, state, norms = leaves, optimizer.init(leaves), []
        for k in range(3):
            out = step(current, state, make_batch(BATCH, k), Tensor(np.float32(LR)), Tensor(np.float32(k + 1)))
            current, state = out.params, out.opt_state
            norms.append(float(out.grad_norm.asnumpy()))
        results[fused] = norms, [t.asnumpy() for t in (*current, *state)]
    assert len(calls) == len(leaves)  # one trace, one kernel per leaf
    assert min(results[True][0]) > 1.0  # clipping was active on every step
    # the kernels sum the squared norms in float64: the norms, and so the clip factors, differ by ~1 ulp
    norm_rel = max(abs(a - b) / b for a, b in zip(*(results[f][0] for f in (True, False))))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(results[True][1], results[False][1]))
    print(f"\nfused vs op path: grad-norm rel {norm_rel:.2g}, leaves and moments max abs {diff:.2g}")
    assert norm_rel < 1e-6 and diff < 1e-7


def test_fused_adamw_update_clip_factor_and_dtypes(monkeypatch):
    """Eager `AdamW.update`: fused and op paths equal with a clip factor and decayed / undecayed leaves;
    the factor changes the result (negative control); a float16 leaf keeps the op path and its dtype."""
    from msfx import kernels
    from msfx.train.optim import clip_coefficient

    if not kernels.available():
        pytest.skip("the fused kernels are not built (no C++ compiler or MSFX_KERNELS=0)")
    rng = np.random.default_rng(0)
    shapes = [(40, 30), (30,), (7, 3)]
    leaves = [Tensor(rng.normal(size=s).astype(np.float32)) for s in shapes]
    leaves[2] = leaves[2].astype(ms.float16)
    grads = [Tensor(rng.normal(size=s).astype(np.float32) * 2) for s in shapes]
    optimizer = AdamW(weight_decay=0.1)
    state = [Tensor(rng.normal(size=s).astype(np.float32) * 0.1) for s in shapes]
    state += [Tensor(rng.random(s).astype(np.float32) * 0.01) for s in shapes]
    coef, _ = clip_coefficient(grads, 1.0)
    lr, t = Tensor(np.float32(1e-2)), Tensor(np.float32(3))

    def update(fused, scale):
        monkeypatch.setattr(kernels, "available", lambda: fused)
        new, new_state = optimizer.update(leaves, grads, state, lr, t, (True, False, True), grad_scale=scale)
        return new, [x.asnumpy() for x in (*new, *new_state)]

    new, fused = update(True, coef)
    _, ops_path = update(False, coef)
    _, unclipped = update(True, None)
    assert float(coef.asnumpy()) < 0.5 and new[2].dtype == ms.float16
    for a, b in zip(fused, ops_path):
        np.testing.assert_array_equal(a, b)
    assert all(np.abs(a - b).max() > 1e-4 for a, b in zip(fused[:2], unclipped[:2]))


def test_gradient_accumulation_equals_one_batch(tiny):
    """(b) 4 micro-batches of 2 give the update of one batch of 8 (HF's token-count normalization)."""
    _, params = tiny
    leaves, keys = flatten(dict(params))
    batch = make_batch(8, seed=42)
    optimizer = AdamW(weight_decay=0.1)
    lr, first = Tensor(np.float32(LR)), Tensor(np.float32(1))
    results = {}
    for accumulate in (1, 4):
        step = make_train_step(llama_arch, params.config, optimizer, keys, accumulate=accumulate)
        state = optimizer.init(leaves)
        results[accumulate] = step(leaves, state, batch, lr, first)
        assert step.compiles == 1 and step.traces == {"loss": 1, "update": 1}
    (loss1, leaves1, state1, norm1, _), (loss4, leaves4, state4, norm4, _) = results[1], results[4]
    moment_diff = max(float(np.abs(a.asnumpy() - b.asnumpy()).max()) for a, b in zip(state1, state4))
    # AdamW's first update is lr * g / (|g| + eps): where |g| is within ~100 eps of zero, fp32 noise
    # in the gradient sum moves the update by up to lr, so those elements are left to the moment check.
    first_moments = state1[:len(leaves1)]  # 0.1 * g on the first step
    param_diff = max(float(np.abs(a.asnumpy() - b.asnumpy())[np.abs(m.asnumpy()) > 1e-7].max(initial=0.0))
                     for a, b, m in zip(leaves1, leaves4, first_moments))
    loss_rel = abs(float(loss1.asnumpy()) - float(loss4.asnumpy())) / float(loss1.asnumpy())
    norm_rel = abs(float(norm1.asnumpy()) - float(norm4.asnumpy())) / float(norm1.asnumpy())
    print(f"\naccumulate 4x2 vs 8: loss rel {loss_rel:.2g}, param max abs {param_diff:.2g}, "
          f"moment max abs {moment_diff:.2g}, grad norms {float(norm1.asnumpy()):.6f} / {float(norm4.asnumpy()):.6f}")
    # Adam's first update is nearly scale-free, so the loss, the gradient norm and the first moments
    # (0.1 * gradient) are what catch a wrong normalization; the parameters are what the issue asks.
    assert loss_rel < LOSS_RTOL and norm_rel < LOSS_RTOL
    assert moment_diff < 1e-7
    assert param_diff < PARAM_TOL


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_matches_transformers(name):
    """(c) the factor of each HF schedule over 20 steps, warmup 3."""
    total, warmup, lr = 20, 3, 0.1
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    kwargs = {"num_cycles": 3} if name == "cosine_with_restarts" else {}
    sched = transformers.get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total,
                                       scheduler_specific_kwargs=kwargs)
    ours = get_schedule(name, warmup, total, lr_init=lr, **kwargs)
    for k in range(total + 2):
        assert ours(k) * lr == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), k
        opt.step()
        sched.step()


def test_warmup_steps_and_bad_names():
    args = transformers.TrainingArguments(output_dir="unused", warmup_steps=0.15, report_to=[])
    assert warmup_steps_for(20, 0.15) == args.get_warmup_steps(20) == 3
    assert warmup_steps_for(20, 4) == 4 and warmup_steps_for(20, warmup_ratio=0.1) == 2
    with pytest.raises(ValueError, match="unknown lr schedule"):
        get_schedule("cosine_annealing", 0, 10)
    with pytest.raises(ValueError, match="num_training_steps"):
        get_schedule("linear", 2)


def test_sgd_momentum_matches_torch(tiny):
    """(d) two SGD steps (momentum, dampening, weight decay on the decay group) equal torch's."""
    import copy
    model, params = tiny
    model = copy.deepcopy(model).train()
    leaves, keys = flatten(dict(params))
    batches = [make_batch(BATCH, seed) for seed in (7, 8)]
    groups = adamw_groups(model, 0.01)
    opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9, dampening=0.1)
    for batch in batches:
        model(**torch_batch(batch)).loss.backward()
        opt.step()
        opt.zero_grad()
    optimizer = SGD(momentum=0.9, dampening=0.1, weight_decay=0.01)
    step = make_train_step(llama_arch, params.config, optimizer, keys, max_grad_norm=None)
    state = optimizer.init(leaves)
    for k, batch in enumerate(batches):
        _, leaves, state, _, _ = step(leaves, state, batch, Tensor(np.float32(0.05)), Tensor(np.float32(k + 1)))
    expected = torch_state(model)
    param_diff = max(float(np.abs(leaf.asnumpy() - expected[key]).max()) for leaf, key in zip(leaves, keys))
    print(f"\nSGD x2: param max abs {param_diff:.2g}")
    assert step.compiles == 1 and step.traces == {"loss": 1, "update": 1}
    assert param_diff < PARAM_TOL


def test_bad_batches(tiny):
    _, params = tiny
    leaves, keys = flatten(dict(params))
    step = make_train_step(llama_arch, params.config, AdamW(), keys, accumulate=4)
    good = make_batch(8, 0)
    lr, first = Tensor(np.float32(LR)), Tensor(np.float32(1))
    with pytest.raises(KeyError, match="labels"):
        step(leaves, [], {"input_ids": good["input_ids"]}, lr, first)
    with pytest.raises(ValueError, match="accumulate=4"):
        step(leaves, [], {k: v[:6] for k, v in good.items()}, lr, first)
    with pytest.raises(ValueError, match="shape"):
        step(leaves, [], {**good, "labels": good["labels"][:, 1:]}, lr, first)
    with pytest.raises(ValueError, match="accumulate must be"):
        make_train_step(llama_arch, params.config, AdamW(), keys, accumulate=0)
    assert step.compiles == 0


def test_native_loop_example_learns():
    """`examples/native_loop.py`: `mindspore.value_and_grad` over `model.trainable_params()` with
    `mindspore.nn.AdamWeightDecay` trains the wrapper (its Parameters are updated in place)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "native_loop.py"
    spec = importlib.util.spec_from_file_location("native_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    losses = module.main(steps=6)
    assert losses[-1] < 0.6 * losses[0]
