"""Numerical parity of msfx's Llama with HF transformers (PyTorch) as the oracle.

Every model is a tiny random HF PyTorch Llama (`conftest.make_hf_llama`: initializer_range 0.2,
random norm weights, eager attention) saved to disk and loaded into msfx. In float32 msfx must
match torch within 1e-4 (max abs) on logits and every hidden state: attention variants (MHA,
GQA, explicit head_dim, biases, tied head), every `rope_parameters` type, left-padded batches,
the loss, the functional core and its `mindspore.jit` trace, KV-cache decoding and `generate`,
bfloat16/float16 weights, the base model and the sequence classifier, and HF's output
conventions. Each rope case also checks that it changes the numbers, so it could fail.

Run with `-s` to see the table of measured max abs diffs printed at the end of the module.
"""
from __future__ import annotations

import types

import mindspore as ms
import numpy as np
import pytest
import torch
import transformers
from mindspore import Parameter, Tensor

import msfx
from msfx import KVCache, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel, kernels
from msfx.architectures import llama as llama_arch
from msfx.decode.generate import left_padding_positions
from msfx.jit import call_in_fresh_thread
from msfx.layers.rotary import rope_frequencies
from msfx.params import flatten, unflatten

from conftest import TINY, left_padded, random_ids
from oracle import Diffs, assert_close, hf_run, max_abs_diff, ms_ids, to_np

TOL = 1e-4          # float32 max abs diff against torch
LOSS_RTOL = 1e-5    # float32 loss, relative
PAD = TINY["pad_token_id"]
DIFFS = Diffs("msfx vs HF torch, measured max abs diffs:")
_print_measured_diffs = DIFFS.report()


# ---------------------------------------------------------------- helpers

def randomize_biases(model, path, seed: int = 0) -> None:
    """HF initializes Linear biases to zero, which would make a bias test vacuous: draw them
    at random and save the checkpoint again."""
    gen = torch.Generator().manual_seed(seed)
    biases = [p for name, p in model.named_parameters() if name.endswith(".bias")]
    with torch.no_grad():
        for p in biases:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    if biases:
        model.save_pretrained(path)


def hf_with_rope(model, rope_parameters: dict):
    """A copy of HF `model` (same weights) whose config uses `rope_parameters` instead."""
    config = transformers.LlamaConfig.from_dict({**model.config.to_dict(), "rope_parameters": rope_parameters})
    config._attn_implementation = "eager"
    other = transformers.LlamaForCausalLM(config).eval()
    other.load_state_dict(model.state_dict())
    return other


def base_inv_freq(theta: float, dim: int) -> np.ndarray:
    return 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


# ---------------------------------------------------------------- 1. logits and every hidden state

HEAD_DIM = TINY["hidden_size"] // TINY["num_attention_heads"]  # 16
_rng = np.random.default_rng(1234)
SHORT_FACTOR = _rng.uniform(1.0, 4.0, HEAD_DIM // 2).round(4).tolist()
LONG_FACTOR = _rng.uniform(1.0, 4.0, HEAD_DIM // 2).round(4).tolist()
LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, short_factor=SHORT_FACTOR, long_factor=LONG_FACTOR,
                original_max_position_embeddings=16)

# (overrides, sequence length). Each rope type is given in transformers 5's `rope_parameters`
# form (rope_type + rope_theta + the type's keys), which LlamaConfig stores as given
# (`standardize_rope_params` only fills in missing defaults).
CASES = {
    "mha": (dict(), 16),
    "gqa": (dict(num_attention_heads=8, num_key_value_heads=2), 16),
    "head_dim_32": (dict(head_dim=32), 16),  # 4 heads x 32 = 128 != hidden 64
    "tied": (dict(tie_word_embeddings=True), 16),
    "attention_bias": (dict(attention_bias=True), 16),
    "mlp_bias": (dict(mlp_bias=True), 16),
    "rope_default": (dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0)), 16),
    "rope_linear": (dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)), 16),
    # dynamic NTK only rescales beyond max_position_embeddings: 24 tokens > 16
    "rope_dynamic": (dict(max_position_embeddings=16,
                          rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)), 24),
    # llama3 bands: high-frequency (wavelength < original / high_freq_factor) kept, low-frequency
    # (> original / low_freq_factor) divided by `factor`, medium smoothed. The shortest RoPE
    # wavelength is 2*pi, so original=16 with high_freq_factor=4 (threshold 4) would leave the
    # high band empty whatever rope_theta: original=32 (thresholds 8 and 32) with rope_theta=100
    # (wavelengths 6.3, 11.2, 19.9, 35.3, ...) puts wavelengths in all three bands (asserted below).
    "rope_llama3": (dict(rope_parameters=dict(rope_type="llama3", rope_theta=100.0, factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=32)), 40),
    # yarn: max_position_embeddings / original = factor (no mismatch warning); rope_theta=100
    # makes the correction ramp span dims 0..2, so inv_freq mixes extrapolated, interpolated and
    # blended frequencies (asserted below).
    "rope_yarn": (dict(max_position_embeddings=64,
                       rope_parameters=dict(rope_type="yarn", rope_theta=100.0, factor=4.0,
                                            original_max_position_embeddings=16)), 24),
    # longrope: long factors once max(position_ids) + 1 > original (16), short factors up to it;
    # factor = max_position_embeddings / original = 4 gives attention scaling sqrt(1 + ln 4 / ln 16)
    "rope_longrope_long": (dict(max_position_embeddings=64, rope_parameters=LONGROPE), 24),
    "rope_longrope_short": (dict(max_position_embeddings=64, rope_parameters=LONGROPE), 16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_every_hidden_state_match_hf(hf_llama, case):
    overrides, seq = CASES[case]
    torch_model, path = hf_llama(**overrides)
    randomize_biases(torch_model, path)
    config = torch_model.config
    if "bias" in case:
        assert any(name.endswith(".bias") for name, _ in torch_model.named_parameters())
    ids = random_ids(2, seq, seed=1)
    expected = hf_run(torch_model, ids, output_hidden_states=True)

    model = LlamaForCausalLM.from_pretrained(path)
    assert model.config.rope_parameters == config.rope_parameters  # survives config.json
    out = model(ms_ids(ids), output_hidden_states=True)

    assert_close(out.logits, expected.logits, TOL, f"{case}: logits", DIFFS)
    assert len(out.hidden_states) == len(expected.hidden_states) == config.num_hidden_layers + 1
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, expected.hidden_states)):
        assert_close(ours, theirs, TOL, f"{case}: hidden_states[{i}]", DIFFS)

    if case.startswith("rope_"):
        # msfx's host-side frequencies equal the ones HF's rotary module used in this forward
        # (`inv_freq` after HF's dynamic / longrope update for these positions)
        rope = config.rope_parameters
        inv_freq, scaling = rope_frequencies(model.config, seq)
        np.testing.assert_allclose(inv_freq, to_np(torch_model.model.rotary_emb.inv_freq), rtol=1e-6)
        assert scaling == pytest.approx(torch_model.model.rotary_emb.attention_scaling, rel=1e-7)
        dim = config.head_dim
        ratio = to_np(torch_model.model.rotary_emb.inv_freq) / base_inv_freq(rope["rope_theta"], dim)
        if rope["rope_type"] == "llama3":  # kept (1), divided by factor (1/8) and smoothed in between
            assert np.isclose(ratio, 1).any() and np.isclose(ratio, 1 / 8).any()
            assert ((ratio > 1 / 8 + 1e-3) & (ratio < 1 - 1e-3)).any()
        if rope["rope_type"] == "yarn":  # extrapolated (1), interpolated (1/4) and blended
            assert np.isclose(ratio, 1).any() and np.isclose(ratio, 1 / 4).any()
            assert ((ratio > 1 / 4 + 1e-3) & (ratio < 1 - 1e-3)).any()
        if rope["rope_type"] == "longrope":
            factors = LONG_FACTOR if seq > 16 else SHORT_FACTOR
            np.testing.assert_allclose(1 / ratio, factors, rtol=1e-5)
            assert scaling == pytest.approx(np.sqrt(1 + np.log(4) / np.log(16)))
        if rope["rope_type"] != "default":
            # the case really changes the numbers: torch with default rope (same weights and
            # rope_theta) differs, so a model ignoring the rope type would fail above
            default = hf_with_rope(torch_model, dict(rope_type="default", rope_theta=rope["rope_theta"]))
            changed = max_abs_diff(hf_run(default, ids).logits, expected.logits)
            DIFFS[f"{case}: torch default-rope vs this rope (must be > 1e-3)"] = changed
            assert changed > 1e-3


# ---------------------------------------------------------------- 2. left-padded batch

@pytest.mark.parametrize("config_case", ["mha", "gqa"])
@pytest.mark.parametrize("positions", ["default", "from_mask"])
def test_left_padded_batch_matches_hf_at_real_tokens(hf_llama, config_case, positions):
    torch_model, path = hf_llama(**CASES[config_case][0])
    ids, mask = left_padded(3, 12, pads=[0, 3, 7], seed=2)
    # "default": HF's and msfx's default positions 0..seq-1 (padding counted);
    # "from_mask": generation-style positions cumsum(mask) - 1 (padding skipped)
    position_ids = None if positions == "default" else left_padding_positions(mask).astype(np.int64)
    expected = hf_run(torch_model, ids, mask, output_hidden_states=True,
                      position_ids=None if position_ids is None else torch.tensor(position_ids))
    model = LlamaForCausalLM.from_pretrained(path)
    out = model(ms_ids(ids), attention_mask=mask, position_ids=position_ids, output_hidden_states=True)
    real = mask.astype(bool)  # pad query rows attend to nothing: garbage in both, not compared
    name = f"left-padded {config_case} positions={positions}"
    assert_close(to_np(out.logits)[real], to_np(expected.logits)[real], TOL, f"{name}: logits", DIFFS)
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, expected.hidden_states)):
        assert_close(to_np(ours)[real], to_np(theirs)[real], TOL, f"{name}: hidden_states[{i}]", DIFFS)
    # and each row equals that row alone without padding (the mask really removes the pads)
    if positions == "from_mask":
        for row in range(3):
            alone = model(ms_ids(ids[row:row + 1, real[row]])).logits
            assert_close(to_np(out.logits)[row, real[row]], to_np(alone)[0], TOL, f"{name}: row {row} vs unpadded",
                         DIFFS)


# ---------------------------------------------------------------- 3. loss

@pytest.mark.parametrize("padded", [False, True])
def test_labels_loss_matches_hf(hf_llama, padded):
    torch_model, path = hf_llama()
    if padded:
        ids, mask = left_padded(3, 12, pads=[0, 2, 5], seed=3)
    else:
        ids, mask = random_ids(3, 12, seed=3), None
    labels = ids.copy()
    labels[0, 3:6] = -100
    labels[2, -1] = -100
    if mask is not None:
        labels[mask == 0] = -100
    expected = hf_run(torch_model, ids, mask, labels=torch.tensor(labels))
    out = LlamaForCausalLM.from_pretrained(path)(ms_ids(ids), attention_mask=mask, labels=labels)
    ours, theirs = float(to_np(out.loss)), float(expected.loss)
    DIFFS[f"loss padded={padded} (relative)"] = abs(ours - theirs) / abs(theirs)
    assert ours == pytest.approx(theirs, rel=LOSS_RTOL, abs=0)


# ---------------------------------------------------------------- 4. functional core and jit

def test_functional_forward_equals_wrapper_and_jit_trace_equals_eager(hf_llama):
    torch_model, path = hf_llama(num_attention_heads=8, num_key_value_heads=2)
    ids, mask = left_padded(3, 10, pads=[0, 2, 4], seed=4)
    params = msfx.llama.load(path)
    eager = msfx.llama.forward(params, ms_ids(ids))
    wrapper = LlamaForCausalLM.from_pretrained(path)(ms_ids(ids))
    assert np.array_equal(to_np(eager.logits), to_np(wrapper.logits))
    assert eager.hidden_states is None and eager.cache.max_len == ids.shape[1]  # this call's keys and values
    assert_close(eager.logits, hf_run(torch_model, ids).logits, TOL, "functional forward vs torch", DIFFS)

    # mindspore.jit in trace mode over flat tensor leaves (as msfx.decode.step does); the rotary
    # frequencies are an input since positions are not known on the host inside the graph
    leaves, keys = flatten(dict(params))
    config = params.config
    inv_freq = Tensor(rope_frequencies(config, ids.shape[1])[0])

    def logits_fn(input_ids, attention_mask, freqs, *weights):
        return msfx.llama.forward(unflatten(weights, keys), input_ids, attention_mask, inv_freq=freqs,
                                  config=config).logits

    compiled = ms.jit(logits_fn, capture_mode="trace")
    args = (ms_ids(ids), Tensor(mask.astype(np.int32)), inv_freq, *leaves)
    reference = msfx.llama.forward(params, ms_ids(ids), Tensor(mask.astype(np.int32))).logits
    first = call_in_fresh_thread(compiled, *args)   # traces and compiles
    second = call_in_fresh_thread(compiled, *args)  # runs the compiled graph
    real = mask.astype(bool)
    assert_close(first, reference, 1e-5, "jit trace (1st call) vs eager", DIFFS)
    assert_close(second, reference, 1e-5, "jit trace (2nd call) vs eager", DIFFS)
    assert_close(to_np(second)[real], to_np(hf_run(torch_model, ids, mask).logits)[real], TOL,
                 "jit trace vs torch (real tokens)", DIFFS)


# ---------------------------------------------------------------- 5. KV-cache decoding

GENERATE_CASES = {
    "mha": dict(),
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2),
    # decoding crosses original_max_position_embeddings (16): the step that reaches it switches
    # from short to long factors for new tokens while cached keys keep theirs, as in HF
    "longrope": dict(max_position_embeddings=64, rope_parameters=LONGROPE),
}


def counting_arch():
    """`msfx.architectures.llama` with `forward` counting its Python executions: a traced
    `mindspore.jit` step runs the Python once per (re)compile, an eager one once per call."""
    calls = []

    def forward(*args, **kwargs):
        calls.append(1)
        return llama_arch.forward(*args, **kwargs)

    members = {k: getattr(llama_arch, k) for k in dir(llama_arch) if not k.startswith("__")}
    return types.SimpleNamespace(**{**members, "forward": forward}), calls


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_kv_cache_generate_matches_hf_and_cached_logits_match_full_forward(hf_llama, case):
    torch_model, path = hf_llama(**GENERATE_CASES[case])
    prompt, max_new = 10, 10
    ids, mask = left_padded(3, prompt, pads=[0, 2, 5], seed=5)
    with torch.no_grad():
        hf = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=max_new,
                                  do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected = hf.sequences.numpy()
    new = expected.shape[1] - prompt
    assert new >= 2

    model = LlamaForCausalLM.from_pretrained(path)
    model.arch, calls = counting_arch()
    jitted = to_np(model.generate(ms_ids(ids), attention_mask=mask, max_new_tokens=max_new, jit=True))
    np.testing.assert_array_equal(jitted, expected)
    step = model._compiled_step(True)
    assert step.compiles == 2
    assert len(calls) == 2  # one trace of the prefill (prompt bucket) + one of the decode step for all steps
    calls.clear()
    eager = to_np(model.generate(ms_ids(ids), attention_mask=mask, max_new_tokens=max_new, jit=False))
    np.testing.assert_array_equal(eager, expected)
    assert len(calls) == new  # eager: prefill + new - 1 steps
    # a longer prompt in the same prompt and cache buckets reuses both graphs: no recompile
    calls.clear()
    longer, longer_mask = left_padded(3, prompt + 3, pads=[1, 0, 4], seed=6)
    with torch.no_grad():
        hf_longer = torch_model.generate(torch.tensor(longer), attention_mask=torch.tensor(longer_mask),
                                         max_new_tokens=max_new, do_sample=False)
    again = to_np(model.generate(ms_ids(longer), attention_mask=longer_mask, max_new_tokens=max_new, jit=True))
    np.testing.assert_array_equal(again, hf_longer.numpy())
    assert step.compiles == 2 and len(calls) == 0
    # jit="decode": an eager prefill (one call) and the same compiled decode step
    again = to_np(model.generate(ms_ids(longer), attention_mask=longer_mask, max_new_tokens=max_new, jit="decode"))
    np.testing.assert_array_equal(again, hf_longer.numpy())
    assert step.compiles == 2 and len(calls) == 1

    # The functional API over an explicit cache, as msfx.decode.generate does: prefill, then one
    # token per step with cache_position (its slot), position_ids (padding skipped) and the
    # attention mask over all cache slots. Each step's logits equal a full forward over the
    # whole generated sequence and HF's own per-step generation logits.
    params = msfx.llama.load(path)
    config = params.config
    full_mask = np.concatenate([mask, np.ones((3, new), mask.dtype)], 1)
    positions = left_padding_positions(full_mask)
    slots = 32
    key_mask = np.ones((3, slots), np.int32)
    key_mask[:, :prompt] = mask
    cache = KVCache.init(config.num_hidden_layers, 3, config.num_key_value_heads, slots, config.head_dim)
    out = msfx.llama.forward(params, ms_ids(expected[:, :prompt]), Tensor(key_mask), Tensor(positions[:, :prompt]),
                             cache, Tensor(np.arange(prompt, dtype=np.int32)), logits_to_keep=1)
    cached = [to_np(out.logits)[:, -1]]
    for t in range(prompt, prompt + new - 1):
        out = msfx.llama.forward(params, ms_ids(expected[:, t:t + 1]), Tensor(key_mask), Tensor(positions[:, t:t + 1]),
                                 out.cache, Tensor(np.array([t], np.int32)))
        assert out.cache.max_len == slots
        cached.append(to_np(out.logits)[:, -1])
    cached = np.stack(cached, 1)  # [3, new, vocab]: predictions for tokens prompt .. prompt + new - 1
    generated = expected[:, prompt:]
    is_eos = generated == TINY["eos_token_id"]
    finished = np.cumsum(is_eos, 1) - is_eos > 0  # after a row's eos HF and msfx emit padding
    np.testing.assert_array_equal(np.where(finished, generated, cached.argmax(-1)), generated)
    assert_close(cached, np.stack([to_np(x) for x in hf.logits], 1), TOL,
                 f"generate {case}: cached steps vs HF generate logits", DIFFS)
    if case != "longrope":  # longrope's cached keys keep the short factors by design (as HF)
        full = to_np(msfx.llama.forward(params, ms_ids(expected), Tensor(full_mask.astype(np.int32)),
                                        Tensor(positions)).logits)
        assert_close(cached[:, -1], full[:, -2], TOL, f"generate {case}: last cached step vs full forward", DIFFS)
        assert_close(cached, full[:, prompt - 1:-1], TOL, f"generate {case}: every cached step vs full forward", DIFFS)


# ---------------------------------------------------------------- 6. bfloat16 / float16

# Unit roundoff u of each format (half the machine epsilon): bf16 has 8 significand bits
# (u = 2^-8), fp16 11 (u = 2^-11).
UNIT_ROUNDOFF = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_logits_match_torch_in_the_same_dtype(hf_llama, dtype):
    torch_model, path = hf_llama()
    ids = random_ids(2, 16, seed=7)
    reference = to_np(hf_run(torch_model, ids).logits)  # float32
    # torch's own half-precision model: loaded with `dtype=` (`.to()` would also narrow the
    # rotary inv_freq buffer, which HF keeps in float32 and msfx computes in float32)
    torch_half = transformers.LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                               attn_implementation="eager").eval()
    theirs = hf_run(torch_half, ids).logits
    assert theirs.dtype == getattr(torch, dtype)
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    assert model.dtype == getattr(ms, dtype)
    ours = model(ms_ids(ids)).logits
    assert ours.dtype == getattr(ms, dtype)

    # Tolerance: both implementations round at the same points (HF's eager order: matmul outputs,
    # residual adds and norm outputs in half precision; norm statistics, softmax and rotary tables
    # in float32), so they differ only where accumulation order inside a reduction tips a
    # rounding, a few units of roundoff of the values involved, compounded over ~20 roundings in
    # 2 layers and the head. We allow 8 u * max|logit| (fp16: 0.028, bf16: 0.23 for logits of
    # ~7). Measured over 16 seeds/configs: msfx vs torch 2.8-7.0 u*max|logit| in fp16, 0-3.7 in
    # bf16 (0 here: the bf16 CPU fallback computes each op in float32 and rounds once, exactly
    # like torch's CPU kernels); torch's own half-precision error vs float32 is 6-13 u*max|logit|.
    scale = float(np.abs(reference).max())
    tol = 8 * UNIT_ROUNDOFF[dtype] * scale
    assert_close(ours, theirs, tol, f"{dtype}: msfx vs torch {dtype} (tol {tol:.3g})", DIFFS)
    # and msfx is no less accurate than torch itself: its distance from the float32 logits is at
    # most 3x torch's own half-precision error
    torch_error = max_abs_diff(theirs, reference)
    ours_error = max_abs_diff(ours, reference)
    DIFFS[f"{dtype}: torch {dtype} vs float32"] = torch_error
    DIFFS[f"{dtype}: msfx {dtype} vs float32"] = ours_error
    assert 0 < ours_error <= 3 * torch_error

    # greedy decoding over a half-precision KV cache gives torch's tokens; a compiled CPU step computes in
    # float32 over the half-precision weights (`msfx.decode.step.widens`): HF float32's tokens on them
    prompt, prompt_mask = left_padded(2, 8, pads=[0, 3], seed=11)
    wide = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    wide.load_state_dict({k: v.float() for k, v in torch_half.state_dict().items()})
    widened = ms.get_context("device_target") == "CPU" and kernels.available()
    for jit, oracle in [(False, torch_half), (True, wide if widened else torch_half)]:
        with torch.no_grad():
            expected = oracle.generate(torch.tensor(prompt), attention_mask=torch.tensor(prompt_mask),
                                       max_new_tokens=6, do_sample=False).numpy()
        tokens = model.generate(ms_ids(prompt), attention_mask=prompt_mask, max_new_tokens=6, jit=jit)
        np.testing.assert_array_equal(to_np(tokens), expected, err_msg=f"jit={jit}")


# ---------------------------------------------------------------- 7. base model, classifier

def test_llama_model_last_hidden_state_matches_hf(hf_llama):
    torch_model, path = hf_llama(num_attention_heads=8, num_key_value_heads=2)
    ids, mask = left_padded(3, 12, pads=[0, 4, 6], seed=8)
    expected = hf_run(torch_model.model, ids, mask, output_hidden_states=True)
    model = LlamaModel.from_pretrained(path)  # a causal-LM checkpoint; lm_head dropped as in HF
    assert "lm_head" not in model.params
    out = model(ms_ids(ids), attention_mask=mask, output_hidden_states=True)
    real = mask.astype(bool)
    assert out.last_hidden_state.shape == (3, 12, TINY["hidden_size"])
    assert_close(to_np(out.last_hidden_state)[real], to_np(expected.last_hidden_state)[real], TOL,
                 "LlamaModel last_hidden_state", DIFFS)
    assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    np.testing.assert_array_equal(to_np(out.hidden_states[-1]), to_np(out.last_hidden_state))


@pytest.mark.parametrize("padding, labels_as", [("left", "numpy"), ("right", "numpy"), ("left", "tensor")])
def test_sequence_classification_logits_and_loss_match_hf(hf_llama, padding, labels_as):
    torch_model, path = hf_llama(cls_name="LlamaForSequenceClassification", num_labels=3)
    ids, mask = left_padded(3, 12, pads=[0, 3, 7], seed=9)
    if padding == "right":
        ids, mask = np.flip(ids, 1).copy(), np.flip(mask, 1).copy()
    labels = np.array([2, 0, 1])
    expected = hf_run(torch_model, ids, mask, labels=torch.tensor(labels))
    model = LlamaForSequenceClassification.from_pretrained(path)
    assert model.config.num_labels == 3 and model.config.pad_token_id == PAD
    out = model(ms_ids(ids), attention_mask=mask, labels=labels if labels_as == "numpy" else Tensor(labels))
    assert out.logits.shape == (3, 3)
    assert_close(out.logits, expected.logits, TOL, f"sequence classification {padding}-padded logits", DIFFS)
    ours, theirs = float(to_np(out.loss)), float(expected.loss)
    DIFFS[f"sequence classification {padding}-padded loss, {labels_as} labels (relative)"] = \
        abs(ours - theirs) / abs(theirs)
    assert ours == pytest.approx(theirs, rel=LOSS_RTOL, abs=0)
    if labels_as == "tensor":  # the bfloat16 classifier too (tolerance as in the half-precision test)
        torch_half = transformers.LlamaForSequenceClassification.from_pretrained(
            path, dtype=torch.bfloat16, attn_implementation="eager").eval()
        half = LlamaForSequenceClassification.from_pretrained(path, dtype="bfloat16")(ms_ids(ids), attention_mask=mask)
        assert half.logits.dtype == ms.bfloat16
        tol = 8 * UNIT_ROUNDOFF["bfloat16"] * float(np.abs(to_np(expected.logits)).max())
        assert_close(half.logits, hf_run(torch_half, ids, mask).logits, tol,
                     "sequence classification bfloat16 logits vs torch bfloat16", DIFFS)


# ---------------------------------------------------------------- 8. HF conventions

@pytest.mark.parametrize("tied", [False, True])
def test_outputs_and_parameters_follow_hf_conventions(hf_llama, tied):
    torch_model, path = hf_llama(tie_word_embeddings=tied)
    ids = random_ids(2, 9, seed=10)
    model = LlamaForCausalLM.from_pretrained(path)

    out = model(ms_ids(ids))
    assert isinstance(out.logits, Tensor) and out.logits.shape == (2, 9, TINY["vocab_size"])
    assert out.loss is None and out.hidden_states is None
    assert out[0] is out.logits  # None fields are skipped, as in HF's ModelOutput
    with_loss = model(ms_ids(ids), labels=ids)
    assert with_loss[0] is with_loss.loss and with_loss[1] is with_loss.logits
    as_tuple = model(ms_ids(ids), labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3  # loss, logits, cache (config.use_cache), as HF
    assert float(to_np(as_tuple[0])) == float(to_np(with_loss.loss))
    np.testing.assert_array_equal(to_np(as_tuple[1]), to_np(out.logits))
    hidden_tuple = model(ms_ids(ids), output_hidden_states=True, return_dict=False, use_cache=False)
    assert isinstance(hidden_tuple, tuple) and len(hidden_tuple) == 2
    assert len(hidden_tuple[1]) == TINY["num_hidden_layers"] + 1
    base = LlamaModel.from_pretrained(path)(ms_ids(ids), return_dict=False)
    assert isinstance(base, tuple) and base[0].shape == (2, 9, TINY["hidden_size"])

    # trainable_params: MindSpore Parameters named with the HF checkpoint keys, holding its values
    state = {k: v for k, v in torch_model.state_dict().items() if not (tied and k == "lm_head.weight")}
    params = model.trainable_params()
    assert all(isinstance(p, Parameter) and p.requires_grad for p in params)
    assert sorted(p.name for p in params) == sorted(state)
    for p in params:
        np.testing.assert_array_equal(p.asnumpy(), state[p.name].numpy(), err_msg=p.name)
    assert model.num_parameters() == sum(v.numel() for v in state.values())
