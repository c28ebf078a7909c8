"""Parity of msfx's encoder families with HF transformers (PyTorch): RoBERTa, XLM-RoBERTa,
DistilBERT, ModernBERT (every head) and BERT's token-classification and question-answering heads.

Every model is a tiny random HF PyTorch checkpoint (fixed seed, initializer_range 0.2, random norm
weights and biases, eager attention) loaded with msfx's Auto class for its task. In float32 msfx
must match torch within 1e-4 (max abs) on a right-padded batch: every output of every head and its
loss. The ModernBERT configs alternate global and local attention (`global_attn_every_n_layers`
2) with a local window (4: two positions either side) shorter than the 10-token batch, with and
without its biases, with "cls" and "mean" pooling. `save_pretrained` output must load into HF
with no missing or unexpected keys and the same outputs.

Run with `-s` to see the table of measured max abs diffs printed at the end of the module.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from mindspore import Tensor

import msfx
from msfx.architectures import bert as bert_arch

from oracle import Diffs, assert_close, max_abs_diff, save_tiny

TOL = 1e-4
DIFFS = Diffs("msfx encoders vs HF torch, measured max abs diffs:")
_print_measured_diffs = DIFFS.report()

_COMMON = dict(vocab_size=99, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
               initializer_range=0.2)
_MODERN = dict(vocab_size=99, hidden_size=64, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
               initializer_range=0.2, local_attention=4, global_attn_every_n_layers=2, pad_token_id=0,
               bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
# name -> (HF class prefix, config class, config kwargs)
FAMILIES = {
    "bert": ("Bert", transformers.BertConfig, dict(_COMMON, max_position_embeddings=24, pad_token_id=0)),
    # RoBERTa's positions start at pad_token_id + 1 = 2: 10 tokens need 12 rows
    "roberta": ("Roberta", transformers.RobertaConfig, dict(_COMMON, max_position_embeddings=14, pad_token_id=1,
                                                            type_vocab_size=1)),
    "xlm-roberta": ("XLMRoberta", transformers.XLMRobertaConfig, dict(_COMMON, max_position_embeddings=14,
                                                                      pad_token_id=1, type_vocab_size=1)),
    "distilbert": ("DistilBert", transformers.DistilBertConfig,
                   dict(vocab_size=99, dim=64, hidden_dim=112, n_layers=2, n_heads=4, initializer_range=0.2,
                        max_position_embeddings=24, pad_token_id=0)),
    "modernbert": ("ModernBert", transformers.ModernBertConfig, _MODERN),
    # every bias ModernBERT can have, mean pooling, tanh-GELU in the layers, SiLU in the head
    "modernbert_biases": ("ModernBert", transformers.ModernBertConfig,
                          dict(_MODERN, attention_bias=True, mlp_bias=True, norm_bias=True, classifier_bias=True,
                               classifier_pooling="mean", hidden_activation="gelu_pytorch_tanh",
                               classifier_activation="silu")),
}
HEADS = ["Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering"]
HEAD_LABELS = {"ForSequenceClassification": 3, "ForTokenClassification": 5, "ForQuestionAnswering": 2}

# 3 rows of 10 tokens, rows 1 and 2 right-padded (3 and 6 pads) with the family's pad id
_rng = np.random.default_rng(7)
_IDS = _rng.integers(3, 99, (3, 10))
MASK = np.ones_like(_IDS)
MASK[1, 7:] = MASK[2, 4:] = 0
MLM_LABELS = np.where((_rng.random(_IDS.shape) < 0.4) & (MASK == 1), _IDS, -100)
MLM_LABELS[0, 0] = _IDS[0, 0]
TOKEN_LABELS = np.where(MASK == 1, _rng.integers(0, 5, _IDS.shape), -100)
SEQUENCE_LABELS = np.array([2, 0, 1])
STARTS, ENDS = np.array([1, 4, 2]), np.array([3, 40, 2])  # 40: outside the input, ignored as HF


def ids_for(family: str) -> np.ndarray:
    ids = _IDS.copy()
    ids[MASK == 0] = FAMILIES[family][2]["pad_token_id"]
    return ids


def labels_for(head: str) -> dict:
    if head == "ForMaskedLM":
        return dict(labels=MLM_LABELS)
    if head == "ForSequenceClassification":
        return dict(labels=SEQUENCE_LABELS)
    if head == "ForTokenClassification":
        return dict(labels=TOKEN_LABELS)
    if head == "ForQuestionAnswering":
        return dict(start_positions=STARTS, end_positions=ENDS)
    return {}


def hf_config(family: str, head: str = "Model", **overrides):
    _, config_class, kwargs = FAMILIES[family]
    return config_class(**{**kwargs, "num_labels": HEAD_LABELS.get(head, 2), **overrides})


@pytest.fixture(scope="module")
def hf_encoder(tmp_path_factory):
    """Factory with a per-module cache: `hf_encoder(family, head, **overrides) -> (torch_model, path)`."""
    built = {}

    def build(family: str, head: str, **overrides):
        key = (family, head, tuple(sorted(overrides.items())))
        if key not in built:
            cls = getattr(transformers, FAMILIES[family][0] + head)
            built[key] = save_tiny(cls, hf_config(family, head, **overrides), tmp_path_factory.mktemp(head), 0,
                                   biases=True)
        return built[key]

    return build


def hf_run(model, ids, **kwargs):
    with torch.no_grad():
        return model(torch.tensor(ids), **{k: torch.tensor(v) if isinstance(v, np.ndarray) else v
                                           for k, v in kwargs.items()})


def outputs(out) -> dict:
    """The float outputs of an HF / msfx output object, by name (hidden states one by one)."""
    found = {}
    for name in ("last_hidden_state", "pooler_output", "logits", "start_logits", "end_logits", "loss"):
        if getattr(out, name, None) is not None:
            found[name] = getattr(out, name)
    for i, h in enumerate(getattr(out, "hidden_states", None) or ()):
        found[f"hidden_states[{i}]"] = h
    return found


AUTO = {"Model": "AutoModel", "ForMaskedLM": "AutoModelForMaskedLM",
        "ForSequenceClassification": "AutoModelForSequenceClassification",
        "ForTokenClassification": "AutoModelForTokenClassification",
        "ForQuestionAnswering": "AutoModelForQuestionAnswering"}

def cases(pairs, default) -> list:
    """`(family, head)` parameters, those not in `default` marked slow (the default suite keeps one
    of each code path: XLM-RoBERTa's classes are RoBERTa's under other names)."""
    return [pytest.param(f, h, id=f"{f}-{h}", marks=() if (f, h) in default or (f, "*") in default
                         else pytest.mark.slow) for f, h in pairs]


CASES = cases([(f, h) for f in FAMILIES for h in HEADS
               if f != "bert" or h in ("ForTokenClassification", "ForQuestionAnswering")],  # test_bert: the others
              {("bert", "*"), ("modernbert", "*"), ("roberta", "Model"), ("roberta", "ForMaskedLM"),
               ("roberta", "ForSequenceClassification"), ("distilbert", "Model"), ("distilbert", "ForMaskedLM"),
               ("distilbert", "ForSequenceClassification"), ("distilbert", "ForQuestionAnswering"),
               ("xlm-roberta", "Model"), ("modernbert_biases", "Model"), ("modernbert_biases", "ForSequenceClassification")})


@pytest.mark.parametrize("family, head", CASES)
def test_every_head_matches_hf(hf_encoder, family, head):
    torch_model, path = hf_encoder(family, head)
    ids = ids_for(family)
    kwargs = dict(attention_mask=MASK, **labels_for(head))
    expected = outputs(hf_run(torch_model, ids, output_hidden_states=True, **kwargs))
    model = getattr(msfx, AUTO[head]).from_pretrained(path)
    name = FAMILIES[family][0] + head
    assert type(model).__name__ == name
    got = outputs(model(ids, output_hidden_states=True, **kwargs))
    assert got.keys() == expected.keys(), (sorted(got), sorted(expected))
    for key, value in expected.items():
        tol = TOL * max(1.0, abs(float(value))) if key == "loss" else TOL
        assert_close(got[key], value, tol, f"{family} {name}: {key}", DIFFS)


@pytest.mark.parametrize("family", ["roberta", "distilbert", "modernbert"])
def test_untied_masked_lm_matches_hf(hf_encoder, family):
    torch_model, path = hf_encoder(family, "ForMaskedLM", tie_word_embeddings=False)
    ids = ids_for(family)
    expected = hf_run(torch_model, ids, attention_mask=MASK)
    assert_close(msfx.AutoModelForMaskedLM.from_pretrained(path)(ids, attention_mask=MASK).logits, expected.logits,
                 TOL, f"{family} untied MLM: logits", DIFFS)


def test_masks_and_windows_matter(hf_encoder):
    """Negative controls: RoBERTa's positions, the padding mask and ModernBERT's local window each
    change the output, so the parity above would catch them being ignored."""
    torch_model, path = hf_encoder("roberta", "Model")
    ids = ids_for("roberta")
    expected = hf_run(torch_model, ids, attention_mask=MASK).last_hidden_state
    bert_positions = np.broadcast_to(np.arange(10), ids.shape)
    ours = msfx.AutoModel.from_pretrained(path)(ids, attention_mask=MASK, position_ids=bert_positions)
    assert max_abs_diff(ours.last_hidden_state[0], expected[0]) > 1e-2
    torch_model, path = hf_encoder("modernbert", "Model")
    expected = hf_run(torch_model, ids_for("modernbert"), attention_mask=MASK).last_hidden_state
    assert max_abs_diff(hf_run(torch_model, ids_for("modernbert")).last_hidden_state[2, :4], expected[2, :4]) > 1e-2
    model = msfx.AutoModel.from_pretrained(path)
    model.config.layer_types = ["full_attention"] * 3  # no local window
    assert max_abs_diff(model(ids_for("modernbert"), attention_mask=MASK).last_hidden_state[0], expected[0]) > 1e-2


def test_sparse_prediction_masked_lm_matches_hf(hf_encoder):
    torch_model, path = hf_encoder("modernbert", "ForMaskedLM", sparse_prediction=True)
    ids = ids_for("modernbert")
    expected = hf_run(torch_model, ids, attention_mask=MASK, labels=MLM_LABELS)
    got = msfx.AutoModelForMaskedLM.from_pretrained(path)(ids, attention_mask=MASK, labels=MLM_LABELS)
    assert_close(got.logits, expected.logits, TOL, "modernbert sparse MLM: logits", DIFFS)
    assert_close(got.loss, expected.loss, TOL * max(1.0, float(expected.loss)), "modernbert sparse MLM: loss", DIFFS)


SAVE_CASES = cases([(f, h) for f in ("roberta", "xlm-roberta", "distilbert", "modernbert_biases") for h in HEADS]
                   + [("bert", "ForTokenClassification"), ("bert", "ForQuestionAnswering"),
                      ("modernbert", "ForMaskedLM")],
                   {("roberta", "ForSequenceClassification"), ("xlm-roberta", "ForMaskedLM"),
                    ("distilbert", "ForSequenceClassification"), ("distilbert", "ForQuestionAnswering"),
                    ("modernbert_biases", "Model"), ("modernbert_biases", "ForMaskedLM"),
                    ("bert", "ForTokenClassification")})


@pytest.mark.parametrize("family, head", SAVE_CASES)
def test_save_pretrained_loads_in_hf_without_missing_keys(tmp_path, family, head):
    name = FAMILIES[family][0] + head
    config = hf_config(family, head)
    cls = getattr(msfx, name)
    model = cls(config, cls.init_params(config, seed=3))
    model.save_pretrained(tmp_path)
    reloaded, info = getattr(transformers, name).from_pretrained(tmp_path, attn_implementation="eager",
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = ids_for(family)
    expected = outputs(hf_run(reloaded.eval(), ids, attention_mask=MASK))
    got = outputs(model(ids, attention_mask=MASK))
    for key in expected:
        assert_close(got[key], expected[key], TOL, f"save_pretrained -> HF {name}: {key}", DIFFS)


def test_functional_core_runs_roberta_and_distilbert(hf_encoder):
    for family in ("roberta", "distilbert"):
        torch_model, path = hf_encoder(family, "ForMaskedLM")
        ids = ids_for(family)
        expected = hf_run(torch_model, ids, attention_mask=MASK).logits
        params = bert_arch.load(path, model_type=family, with_pooler=False, with_mlm_head=True)
        got = bert_arch.forward(params, Tensor(ids.astype(np.int32)), Tensor(MASK.astype(np.int32)))
        assert_close(got.logits, expected, TOL, f"functional bert.forward ({family}): logits", DIFFS)


@pytest.mark.parametrize("family, kwargs, message", [
    ("roberta", dict(input_ids=np.full((1, 13), 5)), r"sequence length 13 exceeds max_position_embeddings 14 "
                                                     r"\(positions start at pad_token_id \+ 1 = 2\)"),
    ("distilbert", dict(input_ids=_IDS, token_type_ids=np.ones_like(_IDS)), "token_type_ids"),
    ("modernbert", dict(input_ids=_IDS, attention_mask=MASK[:, :4]), r"attention_mask has shape \[3, 4\]"),
    ("modernbert", dict(input_ids=np.full((1, 3), 99)), "token id 99 in input_ids is out of range"),
])
def test_bad_inputs_raise_clear_errors(hf_encoder, family, kwargs, message):
    model = msfx.AutoModel.from_pretrained(hf_encoder(family, "Model")[1])
    with pytest.raises((ValueError, NotImplementedError), match=message):
        model(**kwargs)
    with pytest.raises(ValueError, match="num_labels should be 2"):
        msfx.DistilBertForQuestionAnswering(hf_config("distilbert", num_labels=3))


# ---------------------------------------------------------------- training with msfx.Trainer

NO_DROPOUT = {"roberta": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
              "distilbert": dict(dropout=0.0, attention_dropout=0.0, qa_dropout=0.0), "modernbert": {}}
TRAIN_CASES = [("roberta", "ForTokenClassification"), ("distilbert", "ForQuestionAnswering"),
               ("modernbert", "ForTokenClassification")]


def train_rows(family: str, head: str) -> list[dict]:
    """The padded batch as 3 training rows (all one length: the default collator stacks them)."""
    ids = ids_for(family)
    labels = [dict(labels=TOKEN_LABELS[i].tolist()) if head == "ForTokenClassification"
              else dict(start_positions=int(STARTS[i]), end_positions=int(ENDS[i])) for i in range(3)]
    return [{"input_ids": ids[i].tolist(), "attention_mask": MASK[i].tolist(), **labels[i]} for i in range(3)]


@pytest.mark.parametrize("family, head", cases(TRAIN_CASES, {("distilbert", "ForQuestionAnswering")}))
def test_trainer_trains_token_classification_and_question_answering(hf_encoder, tmp_path, family, head):
    """msfx.Trainer's first logged loss (the whole 3-row batch, before any update) equals HF torch's
    loss; the loss falls; evaluation gives HF's predictions layout (QA: start and end logits)."""
    torch_model, path = hf_encoder(family, head, **NO_DROPOUT[family])
    rows = train_rows(family, head)
    expected = hf_run(torch_model, ids_for(family), attention_mask=MASK, **labels_for(head)).loss
    model = getattr(msfx, AUTO[head]).from_pretrained(path)
    args = msfx.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, learning_rate=3e-3,
                                  max_steps=4, logging_steps=1, report_to="none", save_strategy="no",
                                  disable_tqdm=True, per_device_eval_batch_size=2)
    trainer = msfx.Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert_close(losses[0], float(expected), 1e-5 * max(1.0, float(expected)),
                 f"Trainer {family} {head}: loss at step 0", DIFFS)
    assert losses[-1] < losses[0]
    prediction = trainer.predict(rows)
    if head == "ForQuestionAnswering":
        starts, ends = prediction.predictions
        assert starts.shape == ends.shape == (3, 10) and prediction.label_ids[0].tolist() == STARTS.tolist()
    else:
        assert prediction.predictions.shape == (3, 10, 5)
    assert np.isfinite(prediction.metrics["test_loss"])


# ---------------------------------------------------------------- bfloat16

@pytest.mark.parametrize("family", ["roberta", "xlm-roberta", "distilbert", "modernbert", "modernbert_biases"])
def test_bf16_error_within_torch_bf16_error(hf_encoder, family):
    """bfloat16 msfx against the float32 torch reference: at most 1.5x (max) / 1.2x (mean) the
    error of torch's own bfloat16 run (see `test_bf16_encoders`), over the real tokens."""
    from test_bf16_encoders import _check, _torch_runs

    _, path = hf_encoder(family, "Model")
    cls = getattr(transformers, FAMILIES[family][0] + "Model")
    ids = ids_for(family)
    ref, bf16 = _torch_runs(cls, path, input_ids=ids, attention_mask=MASK)
    out = msfx.AutoModel.from_pretrained(path, dtype="bfloat16")(ids, attention_mask=MASK)
    _check(f"{family} last_hidden_state", out.last_hidden_state, bf16.last_hidden_state, ref.last_hidden_state,
           MASK.astype(bool))
