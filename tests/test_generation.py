"""Logits processing and sampling in `generate`, with HF transformers (PyTorch) as the oracle.

1. Each numpy processor in `msfx.decode.processors` equals its HF torch twin on the same scores
   and input_ids (within 1e-5, -inf / +inf positions equal), on inputs where it changes something.
2. `generate` with processors gives HF's tokens on a tiny random Llama with a left-padded batch
   (repetition penalty, no-repeat n-grams, bad words, min_new_tokens against an early eos,
   several eos ids, user processors and stopping criteria, max_time).
3. Sampling: top_k=1 is greedy; a seed reproduces its samples, other seeds differ.
4. A chi-square test that `sample_tokens` draws from the softmax of the processed scores.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import transformers.generation.logits_process as hf
from transformers.generation.stopping_criteria import StoppingCriteria

import msfx.decode.processors as ours
from msfx import LlamaForCausalLM
from msfx.decode.processors import LogitsProcessorList, build_logits_processors
from msfx.decode.sampling import make_rng, sample_tokens

from conftest import TINY, left_padded

ms_seed = importlib.import_module("mindspore.common.seed")  # the module (`mindspore.common.seed` is also a function)
PAD = TINY["pad_token_id"]
VOCAB = 50

# ---------------------------------------------------------------- 1. processors vs HF torch

_rng = np.random.default_rng(0)
SCORES = (_rng.standard_normal((4, VOCAB)) * 3).astype(np.float32)
SCORES[:, :2] += 4  # a few likely tokens, so top-p / typical / epsilon cut a long tail
# ids from a small range, so tokens and n-grams repeat; the rows end so that [4, 5] and
# [1, 2, 7] bad-word prefixes match rows 0 and 1
IDS = _rng.integers(0, 8, (4, 16))
IDS[0, -1] = 4
IDS[1, -2:] = [1, 2]


def _case(make_ours, make_hf, ids=IDS, scores=SCORES):
    return make_ours, make_hf, ids, scores


def _with_inf(scores):
    s = scores.copy()
    s[0, 3], s[1, 5], s[2, 7] = np.inf, -np.inf, np.nan
    return s


def _chain(mod):
    """Several processors in a row: later warpers see -inf entries from earlier ones."""
    return lambda: mod.LogitsProcessorList([
        mod.RepetitionPenaltyLogitsProcessor(1.5), mod.NoRepeatNGramLogitsProcessor(2),
        mod.TopKLogitsWarper(20), mod.TemperatureLogitsWarper(0.7), mod.TopPLogitsWarper(0.9),
        mod.TypicalLogitsWarper(0.8), mod.MinPLogitsWarper(0.05)])


PROCESSOR_CASES = {
    "temperature": _case(lambda: ours.TemperatureLogitsWarper(0.7), lambda: hf.TemperatureLogitsWarper(0.7)),
    "top_k": _case(lambda: ours.TopKLogitsWarper(5), lambda: hf.TopKLogitsWarper(5)),
    "top_k_min_keep": _case(lambda: ours.TopKLogitsWarper(3, min_tokens_to_keep=8),
                            lambda: hf.TopKLogitsWarper(3, min_tokens_to_keep=8)),
    "top_k_ties": _case(lambda: ours.TopKLogitsWarper(3), lambda: hf.TopKLogitsWarper(3),
                        scores=np.round(SCORES)),  # ties with the 3rd best all stay
    "top_p": _case(lambda: ours.TopPLogitsWarper(0.8), lambda: hf.TopPLogitsWarper(0.8)),
    "top_p_min_keep": _case(lambda: ours.TopPLogitsWarper(0.3, min_tokens_to_keep=3),
                            lambda: hf.TopPLogitsWarper(0.3, min_tokens_to_keep=3)),
    "min_p": _case(lambda: ours.MinPLogitsWarper(0.1), lambda: hf.MinPLogitsWarper(0.1)),
    "min_p_min_keep": _case(lambda: ours.MinPLogitsWarper(0.5, min_tokens_to_keep=6),
                            lambda: hf.MinPLogitsWarper(0.5, min_tokens_to_keep=6)),
    "typical": _case(lambda: ours.TypicalLogitsWarper(0.9), lambda: hf.TypicalLogitsWarper(0.9)),
    "typical_min_keep": _case(lambda: ours.TypicalLogitsWarper(0.2, min_tokens_to_keep=4),
                              lambda: hf.TypicalLogitsWarper(0.2, min_tokens_to_keep=4)),
    "epsilon": _case(lambda: ours.EpsilonLogitsWarper(0.02), lambda: hf.EpsilonLogitsWarper(0.02)),
    "eta": _case(lambda: ours.EtaLogitsWarper(0.05), lambda: hf.EtaLogitsWarper(0.05)),
    "repetition_penalty": _case(lambda: ours.RepetitionPenaltyLogitsProcessor(1.5),
                                lambda: hf.RepetitionPenaltyLogitsProcessor(1.5)),
    "repetition_penalty_ignore_int": _case(lambda: ours.RepetitionPenaltyLogitsProcessor(0.6, prompt_ignore_length=9),
                                           lambda: hf.RepetitionPenaltyLogitsProcessor(0.6, prompt_ignore_length=9)),
    "repetition_penalty_ignore_rows": _case(
        lambda: ours.RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=np.array([0, 3, 12, 16])),
        lambda: hf.RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=torch.tensor([0, 3, 12, 16]))),
    "repetition_penalty_out_of_vocab_ids": _case(lambda: ours.RepetitionPenaltyLogitsProcessor(1.5),
                                                 lambda: hf.RepetitionPenaltyLogitsProcessor(1.5),
                                                 ids=np.where(IDS == 3, VOCAB + 4, IDS)),
    "no_repeat_ngram_1": _case(lambda: ours.NoRepeatNGramLogitsProcessor(1),
                               lambda: hf.NoRepeatNGramLogitsProcessor(1)),
    "no_repeat_ngram_2": _case(lambda: ours.NoRepeatNGramLogitsProcessor(2),
                               lambda: hf.NoRepeatNGramLogitsProcessor(2)),
    "no_repeat_ngram_3": _case(lambda: ours.NoRepeatNGramLogitsProcessor(3), lambda: hf.NoRepeatNGramLogitsProcessor(3),
                               ids=np.concatenate([IDS[:, :12], IDS[:, 10:12]], 1)),  # the suffix repeats
    "bad_words": _case(lambda: ours.NoBadWordsLogitsProcessor([[3], [4, 5], [1, 2, 7], [2], [9, 9, 9, 9, 9, 9, 9, 9]
                                                               ], eos_token_id=2),
                       lambda: hf.NoBadWordsLogitsProcessor([[3], [4, 5], [1, 2, 7], [2], [9, 9, 9, 9, 9, 9, 9, 9]
                                                             ], eos_token_id=2),
                       ids=IDS[:, -6:]),
    "sequence_bias": _case(lambda: ours.SequenceBiasLogitsProcessor([[[3], 2.5], [[4, 5], -1.5], [[2, 7], 4.0]]),
                           lambda: hf.SequenceBiasLogitsProcessor([[[3], 2.5], [[4, 5], -1.5], [[2, 7], 4.0]])),
    "min_length": _case(lambda: ours.MinLengthLogitsProcessor(20, [2, 5]),
                        lambda: hf.MinLengthLogitsProcessor(20, [2, 5])),
    "min_new_tokens": _case(lambda: ours.MinNewTokensLengthLogitsProcessor(10, 8, 2),
                            lambda: hf.MinNewTokensLengthLogitsProcessor(10, 8, 2)),
    "suppress_tokens": _case(lambda: ours.SuppressTokensLogitsProcessor([1, 3, 7]),
                             lambda: hf.SuppressTokensLogitsProcessor([1, 3, 7])),
    "suppress_tokens_at_begin": _case(lambda: ours.SuppressTokensAtBeginLogitsProcessor([4, 9], 16),
                                      lambda: hf.SuppressTokensAtBeginLogitsProcessor([4, 9], 16)),
    "forced_bos": _case(lambda: ours.ForcedBOSTokenLogitsProcessor(1), lambda: hf.ForcedBOSTokenLogitsProcessor(1),
                        ids=IDS[:, :1]),
    "forced_eos": _case(lambda: ours.ForcedEOSTokenLogitsProcessor(17, [2, 3]),
                        lambda: hf.ForcedEOSTokenLogitsProcessor(17, [2, 3])),
    "inf_nan_remove": _case(lambda: ours.InfNanRemoveLogitsProcessor(), lambda: hf.InfNanRemoveLogitsProcessor(),
                            scores=_with_inf(SCORES)),
    "logit_normalization": _case(lambda: ours.LogitNormalization(), lambda: hf.LogitNormalization()),
    "chain": _case(_chain(ours), _chain(hf)),
}


def assert_same_scores(actual: np.ndarray, expected: np.ndarray, tol: float = 1e-5) -> None:
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    assert np.array_equal(np.isposinf(actual), np.isposinf(expected))
    assert np.array_equal(np.isneginf(actual), np.isneginf(expected))
    assert np.array_equal(np.isnan(actual), np.isnan(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=0, atol=tol)


@pytest.mark.parametrize("case", list(PROCESSOR_CASES))
def test_processor_matches_hf(case):
    make_ours, make_hf, ids, scores = PROCESSOR_CASES[case]
    before = scores.copy()
    got = make_ours()(ids, scores)
    expected = make_hf()(torch.tensor(ids), torch.tensor(scores)).numpy()
    assert np.array_equal(scores, before, equal_nan=True)  # the input is left alone
    assert_same_scores(got, expected)
    assert not np.array_equal(got, scores, equal_nan=True), "the case must change something"


def test_processor_argument_errors_match_hf():
    for make in [lambda m: m.TemperatureLogitsWarper(1), lambda m: m.TemperatureLogitsWarper(0.0),
                 lambda m: m.TopKLogitsWarper(0), lambda m: m.TopPLogitsWarper(1.5),
                 lambda m: m.RepetitionPenaltyLogitsProcessor(2), lambda m: m.NoRepeatNGramLogitsProcessor(0),
                 lambda m: m.NoBadWordsLogitsProcessor([3]), lambda m: m.MinLengthLogitsProcessor(-1, 2),
                 lambda m: m.TypicalLogitsWarper(1.0), lambda m: m.MinPLogitsWarper(2.0)]:
        with pytest.raises(ValueError):
            make(hf)
        with pytest.raises(ValueError):
            make(ours)
    with pytest.raises(ValueError, match="vocabulary size"):  # a bad word beyond the vocabulary
        ours.NoBadWordsLogitsProcessor([[VOCAB]])(IDS, SCORES)
    # HF's quirk: bad words that are all the eos leave nothing to ban, silently
    only_eos = ours.NoBadWordsLogitsProcessor([[2]], eos_token_id=2)(IDS, SCORES)
    assert_same_scores(only_eos, hf.NoBadWordsLogitsProcessor([[2]], eos_token_id=2)(
        torch.tensor(IDS), torch.tensor(SCORES)).numpy())
    np.testing.assert_array_equal(only_eos, SCORES)


def test_build_logits_processors_follows_hf_order_and_sampling_rule():
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=10, top_p=0.9, min_p=0.05, typical_p=0.95,
                              repetition_penalty=1.2, no_repeat_ngram_size=3, bad_words_ids=[[5]], min_length=12,
                              min_new_tokens=2, suppress_tokens=[7], begin_suppress_tokens=[8], forced_eos_token_id=2,
                              max_length=20, eos_token_id=2)
    class Extra(ours.LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores

    custom = ours.SuppressTokensLogitsProcessor([9])  # replaces the built-in one of its type, in place
    extra = Extra()  # a new type: after the built-in processors, before the warpers
    names = [type(p).__name__ for p in build_logits_processors(config, 10, [custom, extra])]
    assert names == ["RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor", "NoBadWordsLogitsProcessor",
                     "MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor", "ForcedEOSTokenLogitsProcessor",
                     "SuppressTokensLogitsProcessor", "SuppressTokensAtBeginLogitsProcessor", "Extra",
                     "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper",
                     "TypicalLogitsWarper"]
    assert build_logits_processors(config, 10, [custom])[6] is custom
    config.do_sample = False  # warpers only apply when sampling
    assert [type(p).__name__ for p in build_logits_processors(config, 10)][-1] == "SuppressTokensAtBeginLogitsProcessor"
    # begin_suppress_tokens start one later behind a forced BOS when the prompt is a single token
    config.forced_bos_token_id = 1
    assert build_logits_processors(config, 1)[-1].begin_index == 2
    assert build_logits_processors(config, 5)[-1].begin_index == 5
    with pytest.raises(NotImplementedError, match="top_h"):
        build_logits_processors(GenerationConfig(top_h=0.5), 4)


# ---------------------------------------------------------------- 2. generate vs HF torch generate

PROMPT, NEW = 8, 12


def hf_generate(torch_model, ids, mask, **kwargs) -> np.ndarray:
    kwargs.setdefault("max_new_tokens", NEW)
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        return torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs).numpy()


@pytest.fixture
def tiny(hf_llama):
    torch_model, path = hf_llama()
    ids, mask = left_padded(3, PROMPT, [0, 2, 4], seed=2)  # seed 2: n-gram bans and the repetition penalty bite
    # the greedy reference without eos: its tokens pick the eos / bad-word cases below
    return torch_model, LlamaForCausalLM.from_pretrained(path), ids, mask, hf_generate(torch_model, ids, mask,
                                                                                        eos_token_id=None)


def _ours_generate(model, ids, mask, jit=False, **kwargs):
    kwargs.setdefault("max_new_tokens", NEW)
    return model.generate(ids, attention_mask=mask, jit=jit, **kwargs)


GENERATE_CASES = {  # name -> kwargs(greedy reference) for both generate calls
    "repetition_penalty": lambda g: dict(repetition_penalty=1.3),
    "no_repeat_ngram_size": lambda g: dict(no_repeat_ngram_size=2),
    # a single token row 0 would produce second, and a bigram row 2 produces
    "bad_words_ids": lambda g: dict(bad_words_ids=[[int(g[0, PROMPT + 1])],
                                                   [int(g[2, PROMPT + 2]), int(g[2, PROMPT + 3])]]),
    # eos = row 0's second token, held back until 5 new tokens
    "min_new_tokens": lambda g: dict(eos_token_id=int(g[0, PROMPT + 1]), min_new_tokens=5),
    "min_length": lambda g: dict(eos_token_id=int(g[0, PROMPT + 1]), min_length=PROMPT + 4),
    # rows finish at different steps and are padded afterwards
    "several_eos": lambda g: dict(eos_token_id=[int(g[0, PROMPT + 2]), int(g[1, PROMPT + 5])]),
    "suppress_and_forced_eos": lambda g: dict(suppress_tokens=[int(g[1, PROMPT])], forced_eos_token_id=5,
                                              begin_suppress_tokens=[int(g[2, PROMPT])]),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_generate_with_processors_matches_hf(tiny, case):
    torch_model, model, ids, mask, greedy = tiny
    kwargs = GENERATE_CASES[case](greedy)
    expected = hf_generate(torch_model, ids, mask, **kwargs)
    jit = case == "repetition_penalty"  # one compiled run; eager elsewhere (compiling dominates)
    got = _ours_generate(model, ids, mask, jit=jit, **kwargs)
    np.testing.assert_array_equal(got, expected)
    # the option changed HF's tokens, so the comparison can fail (the min-length cases against
    # the same eos firing early; the others against the checkpoint's defaults)
    plain = hf_generate(torch_model, ids, mask, **{k: v for k, v in kwargs.items()
                                                   if k == "eos_token_id" and case.startswith("min_")})
    assert plain.shape != expected.shape or (plain != expected).any()
    if case == "several_eos":  # after its first eos a row holds padding only; some row finished early
        new, eos = expected[:, PROMPT:], kwargs["eos_token_id"]
        finished = np.cumsum(np.isin(new, eos), 1) - np.isin(new, eos) > 0
        assert finished.any() and (new[finished] == PAD).all()


def test_repetition_penalty_ignores_left_padding_as_hf(tiny):
    torch_model, model, ids, mask, greedy = tiny
    # pad rows 1 and 2 with the token each would generate first: only HF's rule of skipping each
    # row's leading padding (taken from the attention mask) leaves that token unpenalized
    ids = ids.copy()
    ids[1, :2], ids[2, :4] = greedy[1, PROMPT], greedy[2, PROMPT]
    expected = hf_generate(torch_model, ids, mask, repetition_penalty=3.0)
    np.testing.assert_array_equal(_ours_generate(model, ids, mask, repetition_penalty=3.0), expected)
    penalizing_pads = hf_generate(torch_model, ids, mask, repetition_penalty=3.0,
                                  logits_processor=[hf.RepetitionPenaltyLogitsProcessor(3.0)])
    assert (penalizing_pads != expected).any()


def test_user_logits_processor_and_stopping_criteria_match_hf(tiny):
    torch_model, model, ids, mask, greedy = tiny
    banned = int(greedy[1, PROMPT + 1])

    class BanOurs:
        def __call__(self, input_ids, scores):
            scores = scores.copy()
            scores[:, banned] = -np.inf
            return scores

    class BanHF(hf.LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.index_fill(1, torch.tensor([banned]), -float("inf"))

    stop_at = PROMPT + 4  # row 1 stops after 4 new tokens; the others run on

    class StopRowHF(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            done[1] = input_ids.shape[1] >= stop_at
            return done

    def stop_row(input_ids, scores):
        return (np.arange(len(input_ids)) == 1) & (input_ids.shape[1] >= stop_at)

    # a user repetition penalty replaces the built-in one (HF's merge rule)
    expected = hf_generate(torch_model, ids, mask, logits_processor=[BanHF(), hf.RepetitionPenaltyLogitsProcessor(2.0)],
                           stopping_criteria=[StopRowHF()], repetition_penalty=1.3)
    got = _ours_generate(model, ids, mask, logits_processor=[BanOurs(), ours.RepetitionPenaltyLogitsProcessor(2.0)],
                         stopping_criteria=[stop_row], repetition_penalty=1.3)
    np.testing.assert_array_equal(got, expected)
    assert (expected[1, stop_at:] == PAD).all() and (expected[0, stop_at:] != PAD).any()

    # a criterion returning a plain bool stops every row; max_time=0 stops after one token, as in HF
    stop_all = _ours_generate(model, ids, mask, stopping_criteria=[lambda i, s: i.shape[1] >= PROMPT + 3])
    assert stop_all.shape[1] == PROMPT + 3
    assert hf_generate(torch_model, ids, mask, max_time=0.0).shape[1] == PROMPT + 1
    assert _ours_generate(model, ids, mask, max_time=0.0).shape[1] == PROMPT + 1


# ---------------------------------------------------------------- 3. sampling

def test_top_k_1_sampling_is_greedy_and_seeds_reproduce(tiny, monkeypatch):
    torch_model, model, ids, mask, _ = tiny
    greedy = hf_generate(torch_model, ids, mask)
    np.testing.assert_array_equal(_ours_generate(model, ids, mask, do_sample=True, top_k=1, seed=5), greedy)
    np.testing.assert_array_equal(_ours_generate(model, ids, mask, do_sample=True, top_k=1), greedy)

    hot = dict(do_sample=True, temperature=2.0, top_k=0, eos_token_id=None)
    first = _ours_generate(model, ids, mask, seed=7, **hot)
    np.testing.assert_array_equal(_ours_generate(model, ids, mask, seed=7, **hot), first)
    assert (_ours_generate(model, ids, mask, seed=8, **hot) != first).any()
    # without `seed`, MindSpore's global seed (what `mindspore.set_seed` sets) decides
    monkeypatch.setattr(ms_seed, "_GLOBAL_SEED", 7)
    np.testing.assert_array_equal(_ours_generate(model, ids, mask, **hot), first)
    monkeypatch.setattr(ms_seed, "_GLOBAL_SEED", None)  # fresh entropy each call
    assert (_ours_generate(model, ids, mask, **hot) != _ours_generate(model, ids, mask, **hot)).any()


def test_sampling_defaults_apply_hf_top_k_50():
    from transformers import GenerationConfig

    merged = {**GenerationConfig._get_default_generation_params(), "do_sample": True}
    names = [type(p).__name__ for p in build_logits_processors(GenerationConfig(**merged), 4)]
    assert names == ["TopKLogitsWarper"]


def test_sample_tokens_frequencies_match_softmax_chi_square():
    vocab = 16
    raw = np.random.default_rng(3).standard_normal((1, vocab)).astype(np.float32)
    ids = np.array([[1, 4, 4, 9]])
    processed = LogitsProcessorList([ours.RepetitionPenaltyLogitsProcessor(1.8),
                                     ours.TemperatureLogitsWarper(1.3)])(ids, raw)
    p = np.exp(processed[0].astype(np.float64) - processed.max())
    p /= p.sum()
    rng = make_rng(2024)
    draws = np.concatenate([sample_tokens(np.repeat(processed, 1000, 0), rng) for _ in range(20)])  # 20000
    assert draws.dtype == np.int64
    observed = np.bincount(draws, minlength=vocab)
    expected = p * len(draws)
    assert expected.min() > 5  # the chi-square approximation holds
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 37.70, chi2  # 15 degrees of freedom, p = 0.001

    # filtered tokens are never drawn; a row with nothing left is an error
    filtered = ours.TopKLogitsWarper(3)(ids, processed)
    picks = sample_tokens(np.repeat(filtered, 2000, 0), make_rng(1))
    assert set(picks.tolist()) == set(np.flatnonzero(np.isfinite(filtered[0])).tolist())
    with pytest.raises(ValueError):
        sample_tokens(np.full((1, vocab), -np.inf, np.float32), rng)
