"""Beam search and `num_return_sequences` in `generate`, with HF transformers (PyTorch) as the oracle.

Token-for-token equality of `sequences` and `beam_indices`, `sequences_scores` and per-step
`scores` within 1e-4, on a tiny random Llama with a left-padded batch of 3, across length
penalties, `early_stopping` modes, several eos ids, processors and user stopping criteria; the
compiled step (which reorders the cache inside its graph) against the eager one; the errors HF
raises for impossible settings.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import TextStreamer
from transformers.generation.stopping_criteria import StoppingCriteria

from msfx import LlamaForCausalLM

from conftest import left_padded, make_hf_llama

PROMPT = 7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch_model, path = make_hf_llama(tmp_path_factory.mktemp("beam"))
    ids, mask = left_padded(3, PROMPT, [0, 2, 4])
    return torch_model, LlamaForCausalLM.from_pretrained(path), ids, mask


def hf_generate(torch_model, ids, mask, **kwargs):
    with torch.no_grad():
        return torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs)


def assert_same_beams(got, expected, tol: float = 1e-4):
    np.testing.assert_array_equal(got.sequences, expected.sequences.numpy())
    np.testing.assert_array_equal(got.beam_indices, expected.beam_indices.numpy())
    assert got.sequences_scores.dtype == np.float32
    np.testing.assert_allclose(got.sequences_scores, expected.sequences_scores.numpy(), atol=tol, rtol=0)
    assert len(got.scores) == len(expected.scores)
    for ours, theirs in zip(got.scores, expected.scores):
        theirs = theirs.numpy()
        finite = np.isfinite(theirs)
        np.testing.assert_array_equal(np.isfinite(ours), finite)
        np.testing.assert_allclose(ours[finite], theirs[finite], atol=tol, rtol=0)


BEAM_CASES = {  # name -> generate kwargs besides the outputs
    # the acceptance case; three eos ids finish beams at different steps
    "acceptance": dict(num_beams=4, num_return_sequences=2, length_penalty=0.8, eos_token_id=[2, 5, 7]),
    "early_stopping": dict(num_beams=3, num_return_sequences=3, early_stopping=True, eos_token_id=[2, 5, 7]),
    "never": dict(num_beams=3, early_stopping="never", length_penalty=1.5, eos_token_id=[2, 5, 7]),
    "no_eos": dict(num_beams=2, num_return_sequences=2, eos_token_id=None, length_penalty=0.0),
    "processors": dict(num_beams=4, num_return_sequences=2, repetition_penalty=1.4, no_repeat_ngram_size=2,
                       min_new_tokens=4, eos_token_id=[2, 5, 7]),
}


@pytest.mark.parametrize("case", list(BEAM_CASES))
def test_beam_search_matches_hf(tiny, case):
    torch_model, model, ids, mask = tiny
    kwargs = dict(BEAM_CASES[case], max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
                  output_scores=True)
    expected = hf_generate(torch_model, ids, mask, **kwargs)
    got = model.generate(ids, attention_mask=mask, jit=False, **kwargs)
    assert_same_beams(got, expected)
    assert np.array_equal(model.generate(ids, attention_mask=mask, jit=False, **BEAM_CASES[case], max_new_tokens=12),
                          got.sequences)  # the plain call returns the same sequences


def test_beam_search_finishes_early_and_pads(tiny):
    """Some hypotheses end on an eos before the limit: the rest of their row is the fill token."""
    torch_model, model, ids, mask = tiny
    got = model.generate(ids, attention_mask=mask, jit=False, max_new_tokens=12, return_dict_in_generate=True,
                         output_scores=True, **BEAM_CASES["acceptance"])
    ended = (got.beam_indices == -1).any(1)
    assert ended.any() and not ended.all()
    assert (got.sequences[ended, -1] == 2).all()  # HF fills with `pad or eos[0]`: pad is 0 here, so eos 2


def test_compiled_beam_step_matches_eager_and_compiles_once(tiny):
    torch_model, model, ids, mask = tiny
    kwargs = dict(max_new_tokens=12, return_dict_in_generate=True, output_scores=True, **BEAM_CASES["acceptance"])
    eager = model.generate(ids, attention_mask=mask, jit=False, **kwargs)
    step = model._compiled_step(True)
    before = step.compiles
    compiled = model.generate(ids, attention_mask=mask, jit=True, **kwargs)
    np.testing.assert_array_equal(compiled.sequences, eager.sequences)
    np.testing.assert_allclose(compiled.sequences_scores, eager.sequences_scores, atol=1e-5)
    # one graph for the prompt bucket and one for the reordering step at this (batch * beams, cache
    # bucket); a second call, also with a longer prompt in the same buckets, reuses them
    assert step.compiles - before == 2
    longer, longer_mask = left_padded(3, PROMPT + 1, [1, 0, 3], seed=1)  # the same 8-token prefill width
    model.generate(longer, attention_mask=longer_mask, jit=True, **kwargs)
    assert step.compiles - before == 2


def test_user_stopping_criterion_in_beam_search_matches_hf(tiny):
    torch_model, model, ids, mask = tiny
    plain = hf_generate(torch_model, ids, mask, num_beams=3, max_new_tokens=10, eos_token_id=None)
    stop_token = int(plain[0, PROMPT + 2])  # a token the best beam of row 0 produces

    class StopOnTokenHF(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == stop_token

    kwargs = dict(num_beams=3, max_new_tokens=10, eos_token_id=None, return_dict_in_generate=True,
                  output_scores=True)
    expected = hf_generate(torch_model, ids, mask, stopping_criteria=[StopOnTokenHF()], **kwargs)
    got = model.generate(ids, attention_mask=mask, jit=False, stopping_criteria=[lambda i, s: i[:, -1] == stop_token],
                         **kwargs)
    assert_same_beams(got, expected)
    assert expected.sequences.shape != plain.shape or (expected.sequences.numpy() != plain.numpy()).any()


def test_sampled_num_return_sequences_and_beam_sample(tiny):
    torch_model, model, ids, mask = tiny
    first = model.generate(ids, attention_mask=mask, jit=False, do_sample=True, num_return_sequences=3,
                           max_new_tokens=6, seed=3)
    assert first.shape == (9, PROMPT + 6)
    np.testing.assert_array_equal(first[:, :PROMPT], np.repeat(ids, 3, 0))
    np.testing.assert_array_equal(first, model.generate(ids, attention_mask=mask, jit=False, do_sample=True,
                                                        num_return_sequences=3, max_new_tokens=6, seed=3))
    assert len({tuple(row) for row in first[:3, PROMPT:]}) > 1  # copies of a prompt sample apart
    beams = model.generate(ids, attention_mask=mask, jit=False, do_sample=True, num_beams=3, num_return_sequences=2,
                           max_new_tokens=6, seed=3, return_dict_in_generate=True, output_scores=True)
    assert beams.sequences.shape[0] == 6 and beams.sequences_scores.shape == (6,)
    assert (np.diff(beams.sequences_scores.reshape(3, 2), axis=1) <= 0).all()  # best first
    # top_k=1 leaves fewer candidates than beams need: filled with zero-probability ones, as torch's CPU
    # multinomial does (HF runs this too), and the beams stay finite
    few = model.generate(ids, attention_mask=mask, jit=False, do_sample=True, top_k=1, num_beams=3, max_new_tokens=6,
                         return_dict_in_generate=True, output_scores=True, seed=1)
    assert few.sequences.shape == (3, PROMPT + 6) and np.isfinite(few.sequences_scores).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_beams=2, num_return_sequences=3), "has to be smaller or equal to `num_beams`"),
    (dict(num_return_sequences=2, do_sample=False), "Greedy methods"),
    (dict(num_beams=2, streamer="streamer"), "cannot be used with beam search"),
])
def test_beam_argument_errors_as_hf(tiny, kwargs, message):
    torch_model, model, ids, mask = tiny
    if kwargs.get("streamer"):
        kwargs["streamer"] = TextStreamer(tokenizer=None)
    with pytest.raises(ValueError, match=message):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, **kwargs)
    with pytest.raises(ValueError, match=message):
        hf_generate(torch_model, ids, mask, max_new_tokens=3, **kwargs)

