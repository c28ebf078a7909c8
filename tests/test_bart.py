"""Numerical parity of msfx's BART and mBART with HF transformers (PyTorch) as the oracle.

Two tiny random HF PyTorch checkpoints (fixed seed, `init_std` 0.2, random layer-norm weights and
biases, random `final_logits_bias`, eager attention), saved and loaded into msfx: BART (post-norm,
GELU, head tied to `model.shared`) and mBART (pre-norm with final layer norms, `scale_embedding`, ReLU,
untied embeddings and `lm_head`). In float32 msfx must match torch within 1e-4 (max abs) on a padded
batch: the conditional-generation logits, loss and encoder output, `BartModel`'s outputs with a decoder
padding mask, `BartForSequenceClassification`'s logits and loss; greedy and beam-search `generate` must
give HF's tokens (beam scores within 1e-4), compiled and eagerly; `save_pretrained` output must load in
HF with no missing or unexpected keys; bad inputs give clear errors.

Run with `-s` to see the table of measured max abs diffs printed at the end of the module.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers
from transformers.models.bart.modeling_bart import shift_tokens_right as bart_shift
from transformers.models.mbart.modeling_mbart import shift_tokens_right as mbart_shift

import msfx
from msfx.architectures import bart as bart_arch
from msfx.models.bart import BartForConditionalGeneration, BartForSequenceClassification, BartModel

from oracle import Diffs, assert_close, ms_ids, save_tiny, to_np

TOL = 1e-4
TINY = dict(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=48, max_position_embeddings=24,
            init_std=0.2, pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=3)
KINDS = {"bart": (transformers.BartConfig, "Bart", {}),
         "mbart": (transformers.MBartConfig, "MBart", dict(scale_embedding=True, tie_word_embeddings=False,
                                                           activation_function="relu"))}
DIFFS = Diffs("msfx BART / mBART vs HF torch, measured max abs diffs:")
_print_measured_diffs = DIFFS.report()

# 3 source rows of 10 tokens, each ending in eos (row 1 right-padded after it), 3 target rows of 6 tokens;
# labels with ignored (-100) positions.
_rng = np.random.default_rng(7)
IDS = _rng.integers(3, TINY["vocab_size"], (3, 10))
IDS[:, -1] = IDS[1, 6] = TINY["eos_token_id"]
MASK = np.ones_like(IDS)
MASK[1, 7:] = 0
IDS[MASK == 0] = TINY["pad_token_id"]
LABELS = _rng.integers(3, TINY["vocab_size"], (3, 6))
LABELS[1, 4:] = LABELS[2, 5:] = -100


def _config(kind: str):
    config_class, _, extra = KINDS[kind]
    return config_class(**TINY, **extra)


def _hf_class(kind: str, suffix: str) -> type:
    return getattr(transformers, KINDS[kind][1] + suffix)


@pytest.fixture(scope="module", params=list(KINDS))
def hf_bart(request, tmp_path_factory):
    """`(kind, torch ...ForConditionalGeneration, checkpoint path)` with a random `final_logits_bias` (HF
    zeroes it, which would hide a missed bias)."""
    kind = request.param
    path = tmp_path_factory.mktemp(kind)
    model, _ = save_tiny(_hf_class(kind, "ForConditionalGeneration"), _config(kind), path, biases=True)
    with torch.no_grad():
        model.final_logits_bias.normal_(0.0, 1.0)
    model.save_pretrained(path)
    return kind, model, path


@pytest.fixture(scope="module")
def ours(hf_bart):
    return msfx.AutoModelForSeq2SeqLM.from_pretrained(hf_bart[2])


def test_shift_tokens_right_matches_hf():
    for kind, theirs in (("bart", lambda x, c: bart_shift(x, c.pad_token_id, c.decoder_start_token_id)),
                         ("mbart", lambda x, c: mbart_shift(x, c.pad_token_id))):
        config = _config(kind)
        np.testing.assert_array_equal(bart_arch.shift_tokens_right(LABELS, config),
                                      theirs(torch.tensor(LABELS), config).numpy(), err_msg=kind)


def test_conditional_generation_logits_and_loss(hf_bart, ours):
    kind, hf, _ = hf_bart
    assert type(ours).__name__ == KINDS[kind][1] + "ForConditionalGeneration"
    assert ("lm_head" in ours.params) == (kind == "mbart")
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), labels=torch.tensor(LABELS))
    out = ours(input_ids=IDS, attention_mask=MASK, labels=LABELS)
    assert float(np.abs(ref.logits.numpy()).max()) > 1.0  # not tiny
    assert_close(out.logits, ref.logits, TOL, f"{kind} lm logits", DIFFS)
    assert_close(out.loss, ref.loss, TOL, f"{kind} lm loss", DIFFS)
    assert_close(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, TOL, f"{kind} encoder output", DIFFS)
    again = ours(encoder_outputs=(out.encoder_last_hidden_state,), attention_mask=MASK, labels=LABELS)
    np.testing.assert_array_equal(again.logits.asnumpy(), out.logits.asnumpy())


def test_model_with_decoder_mask_and_shifted_inputs(hf_bart):
    """`BartModel` with a padded decoder batch, and without decoder inputs (`input_ids` shifted right)."""
    kind, _, path = hf_bart
    hf = _hf_class(kind, "Model").from_pretrained(path, attn_implementation="eager").eval()
    model = msfx.AutoModel.from_pretrained(path)
    assert type(model).__name__ == KINDS[kind][1] + "Model" and "final_logits_bias" not in model.params
    decoder_ids = np.where(LABELS == -100, TINY["pad_token_id"], LABELS)
    decoder_mask = (LABELS != -100).astype(np.int64)
    for what, extra in (("decoder mask", dict(decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask)),
                        ("shifted inputs", {})):
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK),
                     **{k: torch.tensor(v) for k, v in extra.items()})
        out = model(input_ids=IDS, attention_mask=MASK, **extra)
        assert_close(out.last_hidden_state, ref.last_hidden_state, TOL, f"{kind} Model {what}", DIFFS)
        assert_close(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, TOL,
                     f"{kind} Model encoder {what}", DIFFS)


def test_sequence_classification(hf_bart, tmp_path):
    kind, _, _ = hf_bart
    hf, path = save_tiny(_hf_class(kind, "ForSequenceClassification"), _config(kind), tmp_path, seed=3, biases=True)
    model = msfx.AutoModelForSequenceClassification.from_pretrained(path)
    labels = np.array([0, 2, 1])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), labels=torch.tensor(labels))
    out = model(input_ids=IDS, attention_mask=MASK, labels=labels)
    assert_close(out.logits, ref.logits, TOL, f"{kind} sequence classification logits", DIFFS)
    assert_close(out.loss, ref.loss, TOL, f"{kind} sequence classification loss", DIFFS)
    with pytest.raises(ValueError, match="same number of <eos>"):
        model(input_ids=np.where((np.arange(3) == 0)[:, None] & (np.arange(10) == 3), 2, IDS))  # 2 eos in row 0
    with pytest.raises(ValueError, match="at least one <eos>"):
        model(input_ids=np.full((1, 4), 5))


def _model(kind: str, path):
    return BartForConditionalGeneration.from_pretrained(path) if kind == "bart" else \
        msfx.MBartForConditionalGeneration.from_pretrained(path)


def _generate_args(kind: str) -> dict:
    """8 new tokens for the padded batch; mBART with a language code forced first (`forced_bos_token_id`)."""
    return dict(attention_mask=MASK, max_new_tokens=8, **({"forced_bos_token_id": 50} if kind == "mbart" else {}))


BEAMS = dict(num_beams=3, num_return_sequences=2, return_dict_in_generate=True, output_scores=True)


def _check_beams(kind: str, hf, model, jit) -> None:
    args = _generate_args(kind)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(IDS), **{**args, **BEAMS, "attention_mask": torch.tensor(MASK)})
    out = model.generate(IDS, jit=jit, **args, **BEAMS)
    np.testing.assert_array_equal(out.sequences, ref.sequences.numpy(), err_msg=f"beams jit={jit}")
    assert_close(out.sequences_scores, ref.sequences_scores, TOL, f"{kind} beam sequences_scores", DIFFS)


def test_question_answering(hf_bart, tmp_path):
    kind, _, _ = hf_bart
    hf, path = save_tiny(_hf_class(kind, "ForQuestionAnswering"), _config(kind), tmp_path, seed=4, biases=True)
    model = msfx.AutoModelForQuestionAnswering.from_pretrained(path)
    assert type(model).__name__ == KINDS[kind][1] + "ForQuestionAnswering"
    starts, ends = np.array([1, 3, 40]), np.array([[4], [3], [2]])  # 40 is clamped to the ignored index
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), start_positions=torch.tensor(starts),
                 end_positions=torch.tensor(ends))
    out = model(input_ids=IDS, attention_mask=MASK, start_positions=starts, end_positions=ends)
    assert_close(out.start_logits, ref.start_logits, TOL, f"{kind} question answering start logits", DIFFS)
    assert_close(out.end_logits, ref.end_logits, TOL, f"{kind} question answering end logits", DIFFS)
    assert_close(out.loss, ref.loss, TOL, f"{kind} question answering loss", DIFFS)


def test_generate_greedy_and_beams_eager_and_compiled(hf_bart):
    """Greedy and beam search against HF, eagerly and with the compiled decoder step (one graph per step
    shape, shared by `jit` True and "decode"); mBART with a forced language code. (Compiled mBART beams:
    `test_compiled_mbart_beams`, slow.)"""
    kind, hf, path = hf_bart
    model, args = _model(kind, path), _generate_args(kind)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(IDS), **{**args, "attention_mask": torch.tensor(MASK)}).numpy()
    assert len(np.unique(ref[:, 2:])) > 3  # not one repeated token
    if kind == "mbart":
        assert (ref[:, 1] == 50).all()
    np.testing.assert_array_equal(model.generate(IDS, jit=False, **args), ref)
    for jit in (True, "decode"):
        np.testing.assert_array_equal(model.generate(IDS, jit=jit, **args), ref, err_msg=f"jit={jit}")
    assert model.decoder_step.compiles == 1
    for jit in (False, True) if kind == "bart" else (False,):
        _check_beams(kind, hf, model, jit)


@pytest.mark.slow
def test_compiled_mbart_beams(tmp_path):
    path = tmp_path / "mbart"
    hf, _ = save_tiny(transformers.MBartForConditionalGeneration, _config("mbart"), path, biases=True)
    _check_beams("mbart", hf, _model("mbart", path), True)


def test_save_pretrained_loads_in_hf_without_missing_keys(hf_bart, ours, tmp_path):
    kind = hf_bart[0]
    ours.save_pretrained(tmp_path / "lm")
    hf, info = _hf_class(kind, "ForConditionalGeneration").from_pretrained(
        tmp_path / "lm", attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        ref = hf.eval()(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), labels=torch.tensor(LABELS))
    assert_close(ours(input_ids=IDS, attention_mask=MASK, labels=LABELS).logits, ref.logits, TOL,
                 f"{kind} saved -> HF logits", DIFFS)
    base = msfx.AutoModel.from_pretrained(hf_bart[2])
    base.save_pretrained(tmp_path / "base")
    _, info = _hf_class(kind, "Model").from_pretrained(tmp_path / "base", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_bfloat16_error_within_hf_bfloat16_error(hf_bart):
    """bfloat16 logits against HF's float32 ones: msfx's error at most 1.5x (max) and 1.2x (mean) HF
    bfloat16's, the criterion of `test_bf16_encoders.py`; generation runs (eagerly: no CPU bf16 graphs)."""
    kind, hf, path = hf_bart
    inputs = dict(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), labels=torch.tensor(LABELS))
    with torch.no_grad():
        ref = hf(**inputs).logits.numpy()
        theirs = np.abs(copy.deepcopy(hf).to(torch.bfloat16)(**inputs).logits.float().numpy() - ref)
    model = msfx.AutoModelForSeq2SeqLM.from_pretrained(path, dtype="bfloat16")
    ours = np.abs(to_np(model(input_ids=IDS, attention_mask=MASK, labels=LABELS).logits) - ref)
    assert ours.max() <= 1.5 * theirs.max() and ours.mean() <= 1.2 * theirs.mean(), \
        (ours.max(), theirs.max(), ours.mean(), theirs.mean())
    DIFFS[f"{kind} bf16 logits vs fp32 (HF bf16: {theirs.max():.3g})"] = float(ours.max())
    assert model.generate(IDS, attention_mask=MASK, max_new_tokens=3).shape == (3, 4)


def test_bad_inputs_raise(ours):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(input_ids=np.full((1, TINY["max_position_embeddings"] + 1), 5))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours.generate(np.full((1, TINY["max_position_embeddings"] + 1), 5), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours.generate(IDS, max_new_tokens=TINY["max_position_embeddings"])
    with pytest.raises(ValueError, match="input_ids.*cannot"):
        BartModel(ours.config)(attention_mask=MASK)
    with pytest.raises(ValueError, match="labels must be"):
        ours(input_ids=IDS, labels=LABELS[:, :4], decoder_input_ids=np.zeros((3, 6), np.int32))
    with pytest.raises(ValueError, match="out of range"):
        ours(input_ids=IDS, decoder_input_ids=np.full((3, 2), 500))
    with pytest.raises(NotImplementedError, match="input embeddings"):
        BartForSequenceClassification(ours.config)(inputs_embeds=np.zeros((1, 3, TINY["d_model"]), np.float32))


def test_each_switch_changes_the_numbers(hf_bart, ours, monkeypatch):
    """Negative controls: mBART's weights read post-norm, or BART's with `scale_embedding`, miss HF's logits."""
    kind, hf, _ = hf_bart
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), labels=torch.tensor(LABELS)).logits
    config = ours.config
    if kind == "mbart":
        monkeypatch.setitem(bart_arch.SPECS, "mbart", bart_arch.BartSpec(pre_norm=False))
    else:
        config = type(config)(**{**config.to_dict(), "scale_embedding": True})
    logits = bart_arch.forward(ours.params, ms_ids(IDS), ms_ids(MASK), ms_ids(LABELS.clip(3)), config=config).logits
    assert float(np.abs(logits.asnumpy() - ref.numpy()).max()) > 1e-2


def bart_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary with BART's special ids (<s> 0, <pad> 1, </s> 2,
    <unk> 3), wrapping each text in <s> ... </s> as BART's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = ["<s>", "<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(TINY["vocab_size"] - 4)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0),
                                                                                                ("</s>", 2)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>")


def test_summarization_and_text2text_pipelines_match_hf_generate(hf_bart):
    """transformers 5 has no summarization pipeline: the oracle is HF torch `generate` on the tokenized text
    with the pipeline's defaults (4 beams where the call sets none), special tokens dropped."""
    kind, hf, path = hf_bart
    if kind == "mbart":
        pytest.skip("the pipelines are generic: one family suffices (each run compiles its decoder step)")
    tokenizer = bart_tokenizer()
    tokenizer.save_pretrained(path)
    texts = ["w5 w9 w13 w40 w7", "w7 w70 w3"]
    for task, key, kwargs in (("summarization", "summary_text", dict(max_new_tokens=5)),
                              ("text2text-generation", "generated_text", dict(max_new_tokens=4, num_beams=1))):
        expected = []
        for text in texts:
            with torch.no_grad():
                ids = hf.generate(**tokenizer(text, return_tensors="pt"), **{"num_beams": 4, **kwargs})
            expected.append({key: tokenizer.decode(ids[0], skip_special_tokens=True)})
        assert all(len(record[key].split()) >= 2 for record in expected)  # words, not only specials
        assert msfx.pipeline(task, model=str(path))(texts, **kwargs) == expected, task
