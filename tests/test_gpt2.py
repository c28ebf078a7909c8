"""Numerical parity of msfx's GPT-2 with HF transformers (PyTorch) as the oracle.

Every model is a tiny random HF PyTorch GPT-2 (`make_hf_gpt2`: initializer_range 0.2, random
LayerNorm weights and random biases everywhere, eager attention) saved to disk and loaded into
msfx. In float32 msfx must match torch within 1e-4 (max abs) on logits and every hidden state
for `GPT2LMHeadModel` (tied and untied head, the attention-scaling switches, another MLP width
and activation, left padding, token types), `GPT2Model` and `GPT2ForSequenceClassification`
(with their losses); greedy `generate` token for token, eager and compiled, and beam search;
`save_pretrained` output must load in HF with identical logits; more tokens than `n_positions`
must raise a clear ValueError.

Run with `-s` to see the table of measured max abs diffs printed at the end of the module.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
import torch
import transformers
from mindspore import Tensor

import msfx
import msfx.families

from msfx.architectures import gpt2 as gpt2_arch
from msfx.decode.generate import left_padding_positions, new_cache
from msfx.models.gpt2 import GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model

from conftest import left_padded, random_ids
from oracle import Diffs, assert_close, hf_run, max_abs_diff, ms_ids, save_tiny, to_np

TOL = 1e-4          # float32 max abs diff against torch
LOSS_RTOL = 1e-5    # float32 loss, relative
TINY_GPT2 = dict(vocab_size=99, n_embd=64, n_layer=2, n_head=4, n_positions=48, initializer_range=0.2,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
DIFFS = Diffs("msfx GPT-2 vs HF torch, measured max abs diffs:")
_print_measured_diffs = DIFFS.report()


def make_hf_gpt2(path, cls_name: str = "GPT2LMHeadModel", seed: int = 0, **overrides):
    """A tiny `transformers` (PyTorch) GPT-2 with random weights, LayerNorm weights and biases
    (`oracle.save_tiny`), saved to `path`. Returns `(torch_model, path)`."""
    config = transformers.GPT2Config(**{**TINY_GPT2, **overrides})
    return save_tiny(getattr(transformers, cls_name), config, path, seed, biases=True)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """The default tiny `GPT2LMHeadModel` (tied head) and its directory, shared by the module."""
    return make_hf_gpt2(tmp_path_factory.mktemp("gpt2"))


# ---------------------------------------------------------------- 1. logits and every hidden state

# name -> (config overrides, the overrides that undo the case's switch, or None). Undoing the switch
# (same weights) must change torch's logits, so a model ignoring it would fail. In float32,
# `reorder_and_upcast_attn` only reorders the scaling (HF's upcast is a no-op there).
CASES = {
    "tied": (dict(), None),
    "untied": (dict(tie_word_embeddings=False), None),
    "inverse_layer_idx_and_upcast": (dict(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
                                     dict(scale_attn_by_inverse_layer_idx=False)),
    "unscaled_attention": (dict(scale_attn_weights=False), dict(scale_attn_weights=True)),
    "n_inner_exact_gelu": (dict(n_inner=96, activation_function="gelu"), dict(activation_function="gelu_new")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_every_hidden_state_match_hf(tmp_path, tied, case):
    overrides, undo = CASES[case]
    torch_model, path = tied if case == "tied" else make_hf_gpt2(tmp_path, **overrides)
    ids = random_ids(2, 16, seed=1)
    expected = hf_run(torch_model, ids, output_hidden_states=True)
    model = GPT2LMHeadModel.from_pretrained(path)
    out = model(ms_ids(ids), output_hidden_states=True)
    assert_close(out.logits, expected.logits, TOL, f"{case}: logits", DIFFS)
    assert len(out.hidden_states) == len(expected.hidden_states) == TINY_GPT2["n_layer"] + 1
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, expected.hidden_states)):
        assert_close(ours, theirs, TOL, f"{case}: hidden_states[{i}]", DIFFS)
    if case == "untied":
        assert "lm_head" in model.params
        assert not np.array_equal(to_np(model.params["lm_head"]["weight"]),
                                  to_np(model.params["transformer"]["wte"]["weight"]))
    if undo is not None:
        config = transformers.GPT2Config.from_dict({**torch_model.config.to_dict(), **undo})
        config._attn_implementation = "eager"
        other = transformers.GPT2LMHeadModel(config).eval()
        other.load_state_dict(torch_model.state_dict())
        changed = max_abs_diff(hf_run(other, ids).logits, expected.logits)
        DIFFS[f"{case}: torch with the switch undone vs this case (must be > 1e-3)"] = changed
        assert changed > 1e-3


def test_left_padded_batch_with_token_types_matches_hf_at_real_tokens(tied):
    torch_model, path = tied
    ids, mask = left_padded(3, 12, pads=[0, 3, 7], seed=2)
    types = np.random.default_rng(3).integers(0, 4, ids.shape)
    model = GPT2LMHeadModel.from_pretrained(path)
    real = mask.astype(bool)  # pad query rows attend to nothing: garbage in both, not compared
    # positions: HF's and msfx's default 0..seq-1 (padding counted), and generation's cumsum(mask) - 1
    for name, positions in (("default positions", None), ("positions from mask", left_padding_positions(mask))):
        pos = None if positions is None else positions.astype(np.int64)
        expected = hf_run(torch_model, ids, mask, output_hidden_states=True, token_type_ids=torch.tensor(types),
                          position_ids=None if pos is None else torch.tensor(pos))
        out = model(ids, attention_mask=mask, token_type_ids=types, position_ids=pos, output_hidden_states=True)
        assert_close(to_np(out.logits)[real], to_np(expected.logits)[real], TOL,
                     f"left-padded, token types, {name}: logits", DIFFS)
        for i, (ours, theirs) in enumerate(zip(out.hidden_states, expected.hidden_states)):
            assert_close(to_np(ours)[real], to_np(theirs)[real], TOL,
                         f"left-padded, token types, {name}: hidden_states[{i}]", DIFFS)
    # the mask really removes the pads: each row equals that row alone (positions from the mask)
    for row in range(3):
        alone = model(ids[row:row + 1, real[row]], token_type_ids=types[row:row + 1, real[row]]).logits
        assert_close(to_np(out.logits)[row, real[row]], to_np(alone)[0], TOL, f"left-padded row {row} vs unpadded",
                     DIFFS)


def test_labels_loss_matches_hf(tied):
    torch_model, path = tied
    ids, mask = left_padded(3, 12, pads=[0, 2, 5], seed=4)
    labels = np.where(mask == 0, -100, ids)
    labels[0, 3:6] = -100
    expected = hf_run(torch_model, ids, mask, labels=torch.tensor(labels))
    out = GPT2LMHeadModel.from_pretrained(path)(ids, attention_mask=mask, labels=labels)
    ours, theirs = float(to_np(out.loss)), float(expected.loss)
    DIFFS["causal LM loss (relative)"] = abs(ours - theirs) / abs(theirs)
    assert ours == pytest.approx(theirs, rel=LOSS_RTOL, abs=0)


# ---------------------------------------------------------------- 2. base model, classifier

def test_gpt2_model_matches_hf_from_lm_and_from_base_checkpoints(tmp_path, tied):
    torch_model, path = tied
    ids, mask = left_padded(3, 12, pads=[0, 4, 6], seed=5)
    real = mask.astype(bool)
    expected = hf_run(torch_model.transformer, ids, mask, output_hidden_states=True)
    torch_base, base_path = make_hf_gpt2(tmp_path / "base", "GPT2Model")  # keys without `transformer.`
    expected_base = hf_run(torch_base, ids, mask, output_hidden_states=True)
    for name, source, theirs in (("from LM checkpoint", path, expected), ("from GPT2Model checkpoint", base_path,
                                                                          expected_base)):
        model = GPT2Model.from_pretrained(source)
        assert set(model.params) == {"transformer"}
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        assert out.last_hidden_state.shape == (3, 12, TINY_GPT2["n_embd"])
        assert_close(to_np(out.last_hidden_state)[real], to_np(theirs.last_hidden_state)[real], TOL,
                     f"GPT2Model {name}: last_hidden_state", DIFFS)
        for i, (a, b) in enumerate(zip(out.hidden_states, theirs.hidden_states)):
            assert_close(to_np(a)[real], to_np(b)[real], TOL, f"GPT2Model {name}: hidden_states[{i}]", DIFFS)
    # saved without the prefix, as HF saves a GPT2Model: HF loads it with every key
    model.save_pretrained(tmp_path / "saved_base")
    reloaded, info = transformers.GPT2Model.from_pretrained(tmp_path / "saved_base", attn_implementation="eager",
                                                            output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    np.testing.assert_array_equal(to_np(hf_run(reloaded.eval(), ids, mask).last_hidden_state),
                                  to_np(expected_base.last_hidden_state))


@pytest.mark.parametrize("padding", ["left", "right"])
def test_sequence_classification_logits_and_loss_match_hf(tmp_path, padding):
    torch_model, path = make_hf_gpt2(tmp_path, "GPT2ForSequenceClassification", num_labels=3)
    ids, mask = left_padded(3, 12, pads=[0, 3, 7], seed=6)
    if padding == "right":
        ids, mask = np.flip(ids, 1).copy(), np.flip(mask, 1).copy()
    labels = np.array([2, 0, 1])
    expected = hf_run(torch_model, ids, mask, labels=torch.tensor(labels))
    model = GPT2ForSequenceClassification.from_pretrained(path)
    assert model.config.num_labels == 3 and sorted(model.params) == ["score", "transformer"]
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (3, 3)
    assert_close(out.logits, expected.logits, TOL, f"sequence classification {padding}-padded: logits", DIFFS)
    ours, theirs = float(to_np(out.loss)), float(expected.loss)
    DIFFS[f"sequence classification {padding}-padded: loss (relative)"] = abs(ours - theirs) / abs(theirs)
    assert ours == pytest.approx(theirs, rel=LOSS_RTOL, abs=0)


# ---------------------------------------------------------------- 3. generation

def test_greedy_generate_matches_hf_eager_and_compiled_and_cache_equals_full_forward(tied):
    torch_model, path = tied
    prompt, max_new = 10, 10
    ids, mask = left_padded(3, prompt, pads=[0, 2, 5], seed=7)
    with torch.no_grad():
        hf = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=max_new,
                                  do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected = hf.sequences.numpy()
    new = expected.shape[1] - prompt
    assert new >= 4
    model = GPT2LMHeadModel.from_pretrained(path)
    for jit in (False, True):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, jit=jit, output_logits=True,
                             return_dict_in_generate=True)
        np.testing.assert_array_equal(got.sequences, expected, err_msg=f"jit={jit}")
        assert_close(np.stack(got.logits, 1), np.stack([to_np(x) for x in hf.logits], 1), TOL,
                     f"generate jit={jit}: per-step logits vs HF", DIFFS)
    assert model._compiled_step(True).compiles == 2  # one prefill graph, one decode graph for every step

    # the functional core over an explicit cache, step by step: each step's logits equal a full
    # forward over the whole sequence (positions skipping the pads, as generation passes them)
    params = gpt2_arch.load(path)
    full_mask = np.concatenate([mask, np.ones((3, new), mask.dtype)], 1)
    positions = left_padding_positions(full_mask)
    slots = 32
    key_mask = np.ones((3, slots), np.int32)
    key_mask[:, :prompt] = mask
    cache = new_cache(params.config, 3, slots, ms.float32)  # as DecodeState builds it, via GPT2Config's aliases
    assert cache.keys[0].shape == (3, TINY_GPT2["n_head"], slots, TINY_GPT2["n_embd"] // TINY_GPT2["n_head"])
    out = gpt2_arch.forward(params, ms_ids(expected[:, :prompt]), Tensor(key_mask), Tensor(positions[:, :prompt]),
                            cache, Tensor(np.arange(prompt, dtype=np.int32)), logits_to_keep=1)
    cached = [to_np(out.logits)[:, -1]]
    for t in range(prompt, prompt + new - 1):
        out = gpt2_arch.forward(params, ms_ids(expected[:, t:t + 1]), Tensor(key_mask), Tensor(positions[:, t:t + 1]),
                                out.cache, Tensor(np.array([t], np.int32)))
        cached.append(to_np(out.logits)[:, -1])
    full = to_np(gpt2_arch.forward(params, ms_ids(expected), Tensor(full_mask.astype(np.int32)),
                                   Tensor(positions)).logits)
    assert_close(np.stack(cached, 1), full[:, prompt - 1:-1], 1e-5, "functional cached steps vs full forward", DIFFS)


def test_beam_search_matches_hf(tied):
    torch_model, path = tied
    ids, mask = left_padded(3, 7, pads=[0, 2, 4], seed=8)
    kwargs = dict(num_beams=3, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        expected = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs)
    got = GPT2LMHeadModel.from_pretrained(path).generate(ids, attention_mask=mask, jit=False, **kwargs)
    np.testing.assert_array_equal(got.sequences, expected.sequences.numpy())
    assert_close(got.sequences_scores, expected.sequences_scores, TOL, "beam search sequences_scores", DIFFS)


# ---------------------------------------------------------------- 4. saving, parameters, errors

@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_loads_in_hf_with_identical_logits(tmp_path, tied, tie):
    torch_model, path = tied if tie else make_hf_gpt2(tmp_path / "src", tie_word_embeddings=False)
    model = GPT2LMHeadModel.from_pretrained(path)
    model.save_pretrained(tmp_path / "saved")
    reloaded, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "saved", attn_implementation="eager",
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = random_ids(2, 9, seed=9)
    expected = to_np(hf_run(torch_model, ids).logits)
    np.testing.assert_array_equal(to_np(hf_run(reloaded.eval(), ids).logits), expected)
    assert_close(model(ids).logits, expected, TOL, f"saved (tied={tie}) then msfx logits vs torch", DIFFS)


def test_param_shapes_and_fresh_init_follow_hf(tmp_path, tied):
    torch_model, _ = tied
    state = torch_model.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items() if k != "lm_head.weight"}  # tied: not saved
    assert gpt2_arch.param_shapes(torch_model.config) == expected
    model = GPT2LMHeadModel(torch_model.config)  # fresh msfx weights, as HF's _init_weights draws them
    assert sorted(p.name for p in model.trainable_params()) == sorted(expected)
    flat = {p.name: to_np(p) for p in model.trainable_params()}
    assert np.all(flat["transformer.h.0.ln_1.weight"] == 1) and np.all(flat["transformer.h.0.attn.c_attn.bias"] == 0)
    std = TINY_GPT2["initializer_range"]
    assert np.std(flat["transformer.h.0.attn.c_attn.weight"]) == pytest.approx(std, rel=0.05)
    assert np.std(flat["transformer.h.0.mlp.c_proj.weight"]) == pytest.approx(std / 2, rel=0.05)  # / sqrt(2 n_layer)
    model.save_pretrained(tmp_path / "fresh")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "fresh", attn_implementation="eager").eval()
    ids = random_ids(2, 9, seed=10)
    assert_close(model(ids).logits, hf_run(reloaded, ids).logits, TOL, "fresh msfx init, saved, HF logits vs msfx",
                 DIFFS)


def test_more_tokens_than_n_positions_raise_a_clear_value_error(tied):
    _, path = tied
    model = GPT2LMHeadModel.from_pretrained(path)
    n = TINY_GPT2["n_positions"]
    model(random_ids(1, n))  # exactly n_positions tokens is fine
    with pytest.raises(ValueError, match=rf"{n + 1} tokens.*{n} positions only \(config.n_positions\)"):
        model(random_ids(1, n + 1))
    with pytest.raises(ValueError, match=rf"position {n} is out of range.*0\.\.{n - 1}"):
        model(random_ids(1, 4), position_ids=np.arange(n - 3, n + 1)[None])
    with pytest.raises(ValueError, match=rf"exceeds the model's max_position_embeddings \({n}\)"):
        model.generate(random_ids(1, n + 1), max_new_tokens=2, jit=False)
    with pytest.raises(ValueError, match=rf"exceeds the model's max_position_embeddings \({n}\)"):
        model.generate(random_ids(1, n - 1), max_new_tokens=2, jit=False)  # the prompt fits, the output would not
    with pytest.raises(ValueError, match=f"{n + 1} tokens"):
        gpt2_arch.forward(model.params, ms_ids(random_ids(1, n + 1)))


def test_auto_classes_and_package_exports_pick_the_gpt2_classes(tied):
    import transformers.models.auto.modeling_auto as hf_auto

    _, path = tied
    assert msfx.gpt2 is gpt2_arch
    assert type(msfx.AutoModelForCausalLM.from_pretrained(path)) is msfx.GPT2LMHeadModel is GPT2LMHeadModel
    assert type(msfx.AutoModel.from_pretrained(path)) is msfx.GPT2Model
    assert type(msfx.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)) \
        is msfx.GPT2ForSequenceClassification
    hf_names = {"AutoModel": hf_auto.MODEL_MAPPING_NAMES,
                "AutoModelForCausalLM": hf_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                "AutoModelForSequenceClassification": hf_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES}
    for auto, names in hf_names.items():
        assert dict(msfx.families.family("gpt2").auto)[auto] == names["gpt2"]


def test_old_checkpoints_with_causal_mask_buffers_load(tmp_path, tied):
    """Older GPT-2 checkpoints (e.g. openai-community/gpt2) also store each block's causal-mask
    buffers `attn.bias` / `attn.masked_bias`; HF ignores them, and so does msfx."""
    from safetensors.numpy import load_file, save_file

    torch_model, path = tied
    tensors = load_file(str(path / "model.safetensors"))
    n = torch_model.config.n_positions
    for i in range(torch_model.config.n_layer):
        tensors[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((n, n), np.float32))[None, None]
        tensors[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    for name in ("config.json", "generation_config.json"):
        (tmp_path / name).write_text((path / name).read_text())
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ids = np.random.default_rng(0).integers(0, torch_model.config.vocab_size, (1, 6))
    with torch.no_grad():
        expected = torch_model(torch.tensor(ids)).logits.numpy()
    assert_close(GPT2LMHeadModel.from_pretrained(tmp_path)(ms_ids(ids)).logits, expected, TOL,
                 "checkpoint with attn.bias buffers", DIFFS)
