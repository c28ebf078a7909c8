"""Numerical parity of msfx's T5 with HF transformers (PyTorch) as the oracle.

Two tiny random HF PyTorch T5s (fixed seed, random layer-norm weights, eager attention), saved to disk
and loaded into msfx: original T5 ("relu", head tied to `shared` with the `d_model ** -0.5` scale) and
T5 v1.1 / Flan style ("gated-gelu", an untied `lm_head`, no scale), with more decoder than encoder
blocks. In float32 msfx must match torch within 1e-4 (max abs) on a padded encoder batch: T5Model's
decoder and encoder outputs, T5EncoderModel, T5ForConditionalGeneration's logits and loss; greedy and
beam-search `generate` must give HF's tokens (and beam scores within 1e-4), compiled (`jit`, one graph per
decoder step shape) as eagerly; `save_pretrained` output must reload in HF with the same logits; bad inputs
give clear ValueErrors.

Run with `-s` to see the table of measured max abs diffs printed at the end of the module.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from mindspore import Tensor

from msfx.architectures import t5 as t5_arch
from msfx.decode.seq2seq import Seq2SeqDecodeState
from msfx.models.t5 import T5EncoderModel, T5ForConditionalGeneration, T5Model

from oracle import Diffs, assert_close, save_tiny

TOL = 1e-4
TINY = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20, initializer_factor=1.0,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
CONFIGS = {"relu": dict(feed_forward_proj="relu"),
           "gated-gelu": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)}
DIFFS = Diffs("msfx T5 vs HF torch, measured max abs diffs:")
_print_measured_diffs = DIFFS.report()

# 3 source rows of 12 tokens (row 1 right-padded, row 2 left-padded: T5's positions are relative) and
# 3 target rows of 6 tokens; labels with ignored (-100) positions.
_rng = np.random.default_rng(5)
IDS = _rng.integers(2, TINY["vocab_size"], (3, 12))
MASK = np.ones_like(IDS)
MASK[1, 8:] = MASK[2, :5] = 0
IDS[MASK == 0] = TINY["pad_token_id"]
LABELS = _rng.integers(2, TINY["vocab_size"], (3, 6))
LABELS[1, 4:] = LABELS[2, 5:] = -100


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf_t5(request, tmp_path_factory):
    """`(kind, torch T5ForConditionalGeneration, checkpoint path)`: random layer-norm weights (HF sets
    them to `initializer_factor`, which would hide a missed norm) and, for "gated-gelu", an lm_head of
    its own (HF 5.x ties it to `shared` at construction)."""
    kind = request.param
    config = transformers.T5Config(**TINY, **CONFIGS[kind])
    model, path = save_tiny(transformers.T5ForConditionalGeneration, config, tmp_path_factory.mktemp(kind))
    if kind == "gated-gelu":
        model.lm_head.weight = torch.nn.Parameter(torch.randn(TINY["vocab_size"], TINY["d_model"]))
        model.save_pretrained(path)
    return kind, model, path


@pytest.fixture(scope="module")
def ours(hf_t5):
    return T5ForConditionalGeneration.from_pretrained(hf_t5[2])


def test_relative_position_buckets_match_hf():
    relative = np.arange(-300, 300)[None]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            expected = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
                torch.tensor(relative), bidirectional, buckets, distance).numpy()
            np.testing.assert_array_equal(t5_arch.relative_position_bucket(relative, bidirectional, buckets,
                                                                           distance), expected)


def test_conditional_generation_logits_and_loss(hf_t5, ours):
    kind, hf, _ = hf_t5
    assert ("lm_head" in ours.params) == (kind == "gated-gelu")
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), labels=torch.tensor(LABELS))
    out = ours(input_ids=IDS, attention_mask=MASK, labels=LABELS)
    assert float(np.abs(ref.logits.numpy()).max()) > 1.0  # not tiny
    assert_close(out.logits, ref.logits, TOL, f"{kind} lm logits", DIFFS)
    assert_close(out.loss, ref.loss, TOL, f"{kind} lm loss", DIFFS)
    assert_close(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, TOL, f"{kind} lm encoder output", DIFFS)
    # encoder_outputs reuse, as a tuple
    again = ours(encoder_outputs=(out.encoder_last_hidden_state,), attention_mask=MASK, labels=LABELS)
    np.testing.assert_array_equal(again.logits.asnumpy(), out.logits.asnumpy())


def test_t5_model_and_encoder(hf_t5):
    kind, _, path = hf_t5
    hf = transformers.T5Model.from_pretrained(path, attn_implementation="eager").eval()
    hf_encoder = transformers.T5EncoderModel.from_pretrained(path, attn_implementation="eager").eval()
    model, encoder = T5Model.from_pretrained(path), T5EncoderModel.from_pretrained(path)
    assert "decoder" not in encoder.params and "lm_head" not in model.params
    decoder_ids = hf._shift_right(torch.tensor(np.where(LABELS == -100, 0, LABELS)))
    np.testing.assert_array_equal(model._shift_right(Tensor(LABELS)).asnumpy(),
                                  hf._shift_right(torch.tensor(LABELS)).numpy())
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), decoder_input_ids=decoder_ids)
        ref_encoder = hf_encoder(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK))
    out = model(input_ids=IDS, attention_mask=MASK, decoder_input_ids=decoder_ids.numpy())
    assert_close(out.last_hidden_state, ref.last_hidden_state, TOL, f"{kind} T5Model last_hidden_state", DIFFS)
    assert_close(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, TOL,
                 f"{kind} T5Model encoder_last_hidden_state", DIFFS)
    assert_close(encoder(input_ids=IDS, attention_mask=MASK).last_hidden_state, ref_encoder.last_hidden_state, TOL,
                 f"{kind} T5EncoderModel", DIFFS)


def test_generate_greedy_and_beams(hf_t5, ours):
    kind, hf, _ = hf_t5
    args = dict(attention_mask=MASK, max_new_tokens=8)
    # HF 5.x's decoding cache is sized by `num_layers`, too small with more decoder blocks: HF runs uncached
    hf_args = dict(attention_mask=torch.tensor(MASK), use_cache=False)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(IDS), **{**args, **hf_args})
    assert (ref.numpy()[:, 1:] > 1).sum() > 6  # not only eos / pad
    np.testing.assert_array_equal(ours.generate(IDS, **args), ref.numpy())
    beams = dict(num_beams=3, num_return_sequences=2, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(IDS), **{**args, **beams, **hf_args})
    out = ours.generate(IDS, **args, **beams)
    np.testing.assert_array_equal(out.sequences, ref.sequences.numpy())
    assert_close(out.sequences_scores, ref.sequences_scores, TOL, f"{kind} beam sequences_scores", DIFFS)


def test_compiled_generate_matches_hf_and_eager_and_compiles_once(hf_t5):
    """`jit=True` / "decode": one `mindspore.jit` graph per decoder step shape, tokens equal to HF's and to
    the eager decoder's, on a batch of two padded encoder rows (one right-, one left-padded)."""
    kind, hf, path = hf_t5
    model = T5ForConditionalGeneration.from_pretrained(path)  # a fresh model: its compile count starts at 0
    ids, mask = IDS[1:], MASK[1:]
    args = dict(attention_mask=mask, max_new_tokens=10)
    hf_args = dict(attention_mask=torch.tensor(mask), use_cache=False)  # see test_generate_greedy_and_beams
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), **{**args, **hf_args}).numpy()
    assert (ref[:, 1:] > 1).sum() > 6  # not only eos / pad
    np.testing.assert_array_equal(model.generate(ids, jit=False, **args), ref)
    for jit in (True, "decode"):
        np.testing.assert_array_equal(model.generate(ids, jit=jit, **args), ref, err_msg=f"jit={jit}")
    step = model.decoder_step
    assert step.compiles == 1  # both jit modes share the step's graph

    beams = dict(num_beams=3, num_return_sequences=2, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), **{**args, **beams, **hf_args})
    eager = model.generate(ids, jit=False, **args, **beams)
    for _ in range(2):  # the second call traces nothing new
        out = model.generate(ids, **args, **beams)
        np.testing.assert_array_equal(out.sequences, ref.sequences.numpy())
        np.testing.assert_array_equal(out.sequences, eager.sequences)
        assert_close(out.sequences_scores, ref.sequences_scores, TOL, f"{kind} compiled beam sequences_scores", DIFFS)
        np.testing.assert_allclose(out.sequences_scores, eager.sequences_scores, atol=1e-6)
        assert step.compiles == 3  # + the beams' first step (no reordering) and their reordering step

    # 63 new tokens fill the 64-slot cache bucket of the 10-token runs: the same graphs
    longer = dict(attention_mask=mask, max_new_tokens=63, eos_token_id=None)
    compiled = model.generate(ids, **longer)
    assert compiled.shape == (2, 64) and step.compiles == 3
    np.testing.assert_array_equal(compiled, model.generate(ids, jit=False, **longer))


def test_compiled_step_moves_cross_attention_rows_between_prompts(hf_t5, ours):
    """Beam search reorders rows among one prompt's copies only, so the compiled path leaves the
    cross-attention state in place then; a reordering across prompts must still move it, as eagerly."""
    ids, mask = np.repeat(IDS[:2], 2, 0), np.repeat(MASK[:2], 2, 0)
    start = np.zeros((4, 1), np.int64)
    eager = Seq2SeqDecodeState(t5_arch, ours.params, ours.config, ids, mask, start, 4)
    compiled = Seq2SeqDecodeState(t5_arch, ours.params, ours.config, ids, mask, start, 4, step=ours.decoder_step)
    np.testing.assert_allclose(compiled.prefill().asnumpy(), eager.prefill().asnumpy(), atol=1e-6)
    for tokens, beam_idx in (([5, 6, 7, 8], [1, 0, 0, 1]), ([9, 9, 4, 4], [2, 3, 0, 0]), ([3, 4, 5, 6], None)):
        tokens, beam_idx = np.array(tokens), None if beam_idx is None else np.array(beam_idx)
        np.testing.assert_allclose(compiled.step(tokens, beam_idx).asnumpy(), eager.step(tokens, beam_idx).asnumpy(),
                                   atol=1e-6)


def test_save_pretrained_reloads_in_hf(hf_t5, ours, tmp_path):
    kind = hf_t5[0]
    ours.save_pretrained(tmp_path)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), labels=torch.tensor(LABELS))
    assert_close(ours(input_ids=IDS, attention_mask=MASK, labels=LABELS).logits, ref.logits, TOL,
                 f"{kind} saved -> HF logits", DIFFS)


def test_bad_inputs_raise(ours):
    model = T5Model(ours.config)
    with pytest.raises(ValueError, match="decoder_input_ids or decoder_inputs_embeds"):
        model(input_ids=IDS, attention_mask=MASK)
    with pytest.raises(ValueError, match="decoder_input_ids or decoder_inputs_embeds"):
        ours(input_ids=IDS)
    with pytest.raises(ValueError, match="labels must be"):
        ours(input_ids=IDS, labels=LABELS[:, :4], decoder_input_ids=np.zeros((3, 6), np.int32))
    with pytest.raises(ValueError, match="labels must be"):
        ours(input_ids=IDS, labels=LABELS[0])
    with pytest.raises(ValueError, match="out of range"):
        ours(input_ids=IDS, decoder_input_ids=np.full((3, 2), 500))


def test_auto_classes(hf_t5):
    import msfx

    path = hf_t5[2]
    assert type(msfx.AutoModelForSeq2SeqLM.from_pretrained(path)) is msfx.T5ForConditionalGeneration
    assert type(msfx.AutoModel.from_pretrained(path)) is msfx.T5Model
    assert type(msfx.AutoModelForTextEncoding.from_pretrained(path)) is msfx.T5EncoderModel
