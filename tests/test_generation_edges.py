"""`generate` at its edges vs HF transformers (PyTorch): lengths past `max_position_embeddings`, Phi-3's
LongRoPE switch mid-generation, encoder-decoder without `attention_mask`, and `use_cache=False`.

Each case builds a tiny random HF checkpoint (`initializer_range` 0.2, random norm weights), loads it
in msfx and compares the generated tokens one for one, and the raw logits of every step within 1e-4
where the case is about numbers (frequencies, recomputed caches).
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import msfx
from msfx.models.gpt2 import GPT2LMHeadModel
from msfx.models.t5 import T5ForConditionalGeneration

from conftest import left_padded, make_hf_llama, random_ids
from oracle import assert_close
from test_gpt2 import TINY_GPT2, make_hf_gpt2
from test_llama_family import make_hf
from test_t5 import IDS as T5_IDS, hf_t5  # noqa: F401 (a fixture)

TOL = 1e-4
ROPES = {"default": dict(rope_type="default", rope_theta=10000.0),
         "dynamic": dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)}


def hf_generate(torch_model, ids, mask=None, **kwargs):
    with torch.no_grad():
        return torch_model.generate(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
                                    do_sample=False, return_dict_in_generate=True, output_logits=True, **kwargs)


def assert_same_generation(got, expected, tol: float = TOL) -> None:
    """Tokens equal; every step's raw logits within `tol` (max abs)."""
    np.testing.assert_array_equal(got.sequences, expected.sequences.numpy())
    assert len(got.logits) == len(expected.logits)
    for step, (ours, theirs) in enumerate(zip(got.logits, expected.logits)):
        assert_close(ours, theirs, tol, f"step {step}: logits")


@pytest.fixture(scope="module", params=list(ROPES))
def short_llama(request, tmp_path_factory):
    """`(rope name, torch Llama, msfx Llama)` with `max_position_embeddings` 16."""
    torch_model, path = make_hf_llama(tmp_path_factory.mktemp(request.param), max_position_embeddings=16,
                                      rope_parameters=ROPES[request.param])
    return request.param, torch_model, msfx.LlamaForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("jit", [False, True])
def test_past_max_position_embeddings_warns_and_continues_as_hf(short_llama, jit, caplog):
    """HF 5.25 warns ("exceeded the model's predefined maximum length") and keeps generating; dynamic rope
    recomputes its frequencies as the length grows (the cached keys keep theirs)."""
    name, torch_model, model = short_llama
    ids, mask = left_padded(2, 8, [0, 3], seed=3)
    kwargs = dict(max_new_tokens=14, eos_token_id=None)  # 22 positions > 16
    expected = hf_generate(torch_model, ids, mask, **kwargs)
    with caplog.at_level(logging.WARNING, logger="msfx.generation"):
        got = model.generate(ids, attention_mask=mask, jit=jit, return_dict_in_generate=True, output_logits=True,
                             **kwargs)
    warned = [r.getMessage() for r in caplog.records if r.name == "msfx.generation"]
    assert any("exceeded the model's predefined maximum length (16)" in m for m in warned)
    assert_same_generation(got, expected)


@pytest.mark.parametrize("jit", [False, True])
def test_use_cache_false_recomputes_every_step_as_hf(short_llama, jit):
    """`use_cache=False` runs the whole sequence each step, as HF: past `max_position_embeddings` a
    dynamic rope then rotates every key with the current frequencies (the cache keeps the old ones)."""
    name, torch_model, model = short_llama
    ids, mask = left_padded(2, 8, [0, 3], seed=3)
    kwargs = dict(max_new_tokens=14, eos_token_id=None, use_cache=False)
    expected = hf_generate(torch_model, ids, mask, **kwargs)
    got = model.generate(ids, attention_mask=mask, jit=jit, return_dict_in_generate=True, output_logits=True,
                         **kwargs)
    assert_same_generation(got, expected)


def test_use_cache_false_with_beam_search_as_hf(short_llama):
    name, torch_model, model = short_llama
    ids, mask = left_padded(2, 8, [0, 3], seed=3)
    kwargs = dict(max_new_tokens=12, eos_token_id=None, use_cache=False, num_beams=3, num_return_sequences=2,
                  output_scores=True)
    expected = hf_generate(torch_model, ids, mask, **kwargs)
    got = model.generate(ids, attention_mask=mask, jit=False, return_dict_in_generate=True, **kwargs)
    np.testing.assert_array_equal(got.sequences, expected.sequences.numpy())
    np.testing.assert_allclose(got.sequences_scores, expected.sequences_scores.numpy(), atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """`(torch Phi-3, msfx Phi-3)` with LongRoPE and `original_max_position_embeddings` 16."""
    torch_model, path = make_hf(tmp_path_factory.mktemp("phi3"), "phi3", max_position_embeddings=64,
                                original_max_position_embeddings=16)
    return torch_model, msfx.AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("pads", [[0, 3], [4, 6]])
def test_phi3_longrope_switch_recomputes_the_cache_as_hf(phi3, jit, pads):
    """HF's Phi-3 drops its cache once the sequence reaches `original_max_position_embeddings + 1` tokens
    (padding included) and runs the whole sequence again, rotated with the long factors from then on
    when a position passes the original length. With pads [4, 6] no position has passed it at the switch."""
    torch_model, model = phi3
    ids, mask = left_padded(2, 10, pads, seed=4)
    kwargs = dict(max_new_tokens=12, eos_token_id=None)
    expected = hf_generate(torch_model, ids, mask, **kwargs)
    got = model.generate(ids, attention_mask=mask, jit=jit, return_dict_in_generate=True, output_logits=True,
                         **kwargs)
    assert_same_generation(got, expected)


def test_phi3_longrope_switch_in_beam_search_as_hf(phi3):
    torch_model, model = phi3
    ids, mask = left_padded(2, 10, [0, 3], seed=4)
    kwargs = dict(max_new_tokens=12, eos_token_id=None, num_beams=3, num_return_sequences=2)
    expected = hf_generate(torch_model, ids, mask, **kwargs)
    np.testing.assert_array_equal(model.generate(ids, attention_mask=mask, jit=False, **kwargs),
                                  expected.sequences.numpy())


@pytest.mark.parametrize("jit", [False, True])
def test_learned_positions_still_refuse_lengths_past_their_table(tmp_path, jit):
    """GPT-2's `wpe` has `n_positions` rows: HF fails there (an IndexError), msfx says why before running."""
    _, path = make_hf_gpt2(tmp_path)
    model = GPT2LMHeadModel.from_pretrained(path)
    n = TINY_GPT2["n_positions"]
    with pytest.raises(ValueError, match=rf"max_position_embeddings \({n}\): its learned position embeddings"):
        model.generate(random_ids(1, n - 4), max_new_tokens=5, jit=jit)
    assert model.generate(random_ids(1, n - 4), max_new_tokens=4, jit=jit).shape == (1, n)  # exactly the table


def test_encoder_decoder_without_attention_mask_attends_to_pads_as_hf(hf_t5):
    """HF 5.x infers a mask from pad ids for decoder-only models only: an encoder-decoder's source pads
    are attended to when no `attention_mask` is given. (HF runs uncached: its cache is sized by
    `num_layers`, too small for these T5s' extra decoder block; msfx runs both ways.)"""
    kind, torch_model, path = hf_t5
    model = T5ForConditionalGeneration.from_pretrained(path)
    assert (T5_IDS == torch_model.config.pad_token_id).any()
    for kwargs in (dict(max_new_tokens=6), dict(max_new_tokens=6, num_beams=2)):
        expected = hf_generate(torch_model, T5_IDS, use_cache=False, **kwargs)
        for jit, use_cache in ((False, True), (True, True), (False, False)):  # use_cache=False runs eagerly
            got = model.generate(T5_IDS, jit=jit, use_cache=use_cache, return_dict_in_generate=True,
                                 output_logits=True, **kwargs)
            np.testing.assert_array_equal(got.sequences, expected.sequences.numpy())
            if "num_beams" not in kwargs:
                assert_same_generation(got, expected)


def test_prefill_widths_pad_under_a_quarter_with_four_graphs_per_doubling():
    from msfx.decode.generate import prefill_width

    assert [prefill_width(n) for n in (1, 7, 8, 9, 37, 40, 64, 65, 297)] == [8, 8, 8, 16, 40, 40, 64, 80, 320]
    widths = [prefill_width(n) for n in range(1, 4097)]
    assert all(w >= n and (w - n < 8 or w - n < n / 4) for n, w in enumerate(widths, 1))
    assert len(set(w for w in widths if 1024 < w <= 2048)) == 4
