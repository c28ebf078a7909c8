"""Numerical parity of msfx's BERT with HF transformers (PyTorch) as the oracle.

Every model is a tiny random HF PyTorch BERT (fixed seed, initializer_range 0.2, random LayerNorm
weights and random biases everywhere, eager attention) saved to disk and loaded into msfx. In
float32 msfx must match torch within 1e-4 (max abs) on a padded batch with token_type_ids: the last
hidden state, the pooler output, every hidden state, the MLM logits and loss (tied and untied
decoder), the classification logits and each of HF's three losses. `save_pretrained` output must
reload in HF PyTorch with the same tensors and outputs; bad inputs give clear ValueErrors.

Run with `-s` to see the table of measured max abs diffs printed at the end of the module.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from mindspore import Tensor
from safetensors.numpy import load_file, save_file

import msfx
from msfx.architectures import bert as bert_arch
from msfx.models.bert import BertForMaskedLM, BertForSequenceClassification, BertModel

from oracle import Diffs, assert_close, max_abs_diff, save_tiny, to_np

TOL = 1e-4
TINY = dict(vocab_size=99, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=24, type_vocab_size=2, initializer_range=0.2, pad_token_id=0)
DIFFS = Diffs("msfx BERT vs HF torch, measured max abs diffs:")
_print_measured_diffs = DIFFS.report()

# A batch of 3 rows of 10 tokens, rows 1 and 2 right-padded (3 and 6 pads); two segments per row.
_rng = np.random.default_rng(7)
IDS = _rng.integers(3, TINY["vocab_size"], (3, 10))
MASK = np.ones_like(IDS)
MASK[1, 7:] = MASK[2, 4:] = 0
IDS[MASK == 0] = TINY["pad_token_id"]
TOKEN_TYPES = np.zeros_like(IDS)
TOKEN_TYPES[0, 5:] = TOKEN_TYPES[1, 4:7] = TOKEN_TYPES[2, 2:4] = 1
MLM_LABELS = np.where(_rng.random(IDS.shape) < 0.4, IDS, -100)
MLM_LABELS[0, 0] = IDS[0, 0]  # at least one label
INPUTS = dict(attention_mask=MASK, token_type_ids=TOKEN_TYPES)


def make_hf_bert(path, cls_name: str, seed: int = 0, **overrides):
    """A tiny HF PyTorch BERT of class `cls_name` with random weights, LayerNorm weights and biases
    (`oracle.save_tiny`), saved to `path`; returns `(torch_model, path)`."""
    config = transformers.BertConfig(**{**TINY, **overrides})
    return save_tiny(getattr(transformers, cls_name), config, path, seed, biases=True)


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
    """Factory with a per-module cache: `hf_bert(cls_name, **overrides) -> (torch_model, path)`."""
    built = {}

    def build(cls_name: str = "BertModel", **overrides):
        key = (cls_name, tuple(sorted(overrides.items())))
        if key not in built:
            built[key] = make_hf_bert(tmp_path_factory.mktemp(cls_name), cls_name, **overrides)
        return built[key]

    return build


def hf_run(model, ids=IDS, **kwargs):
    with torch.no_grad():
        return model(torch.tensor(ids), **{k: torch.tensor(v) if isinstance(v, np.ndarray) else v
                                           for k, v in kwargs.items()})


def loss_tol(expected) -> float:
    """1e-5 relative (at least 1e-5 absolute): a float32 mean of terms as large as the loss."""
    return 1e-5 * max(1.0, abs(float(expected)))


# ---------------------------------------------------------------- parity

def test_base_model_every_output_matches_hf(hf_bert):
    torch_model, path = hf_bert("BertModel")
    expected = hf_run(torch_model, **INPUTS, output_hidden_states=True)
    out = BertModel.from_pretrained(path)(IDS, **INPUTS, output_hidden_states=True)
    assert_close(out.last_hidden_state, expected.last_hidden_state, TOL, "BertModel: last_hidden_state", DIFFS)
    assert_close(out.pooler_output, expected.pooler_output, TOL, "BertModel: pooler_output", DIFFS)
    assert len(out.hidden_states) == len(expected.hidden_states) == TINY["num_hidden_layers"] + 1
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, expected.hidden_states)):
        assert_close(ours, theirs, TOL, f"BertModel: hidden_states[{i}]", DIFFS)
    # the mask and the segments matter, so ignoring either would fail above
    assert max_abs_diff(hf_run(torch_model).last_hidden_state, expected.last_hidden_state) > 1e-2


def test_functional_core_and_inputs_embeds_match_hf(hf_bert):
    torch_model, path = hf_bert("BertModel")
    expected = hf_run(torch_model, **INPUTS)
    params = bert_arch.load(path)
    out = bert_arch.model_forward(params, Tensor(IDS), Tensor(MASK), Tensor(TOKEN_TYPES))
    assert_close(out.last_hidden_state, expected.last_hidden_state, TOL, "functional model_forward: last_hidden_state",
                 DIFFS)
    embeds = params["bert"]["embeddings"]["word_embeddings"]["weight"][Tensor(IDS)]
    out = BertModel.from_pretrained(path)(inputs_embeds=embeds, **INPUTS)
    assert_close(out.last_hidden_state, expected.last_hidden_state, TOL,
                 "BertModel(inputs_embeds=): last_hidden_state", DIFFS)


def test_decoder_config_is_causal_as_hf(hf_bert):
    torch_model, path = hf_bert("BertModel", is_decoder=True)
    expected = hf_run(torch_model, **INPUTS, use_cache=False)
    out = BertModel.from_pretrained(path)(IDS, **INPUTS)
    assert_close(out.last_hidden_state, expected.last_hidden_state, TOL, "BertModel(is_decoder): last_hidden_state",
                 DIFFS)


@pytest.mark.parametrize("tied", [True, False])
def test_masked_lm_logits_and_loss_match_hf(hf_bert, tied):
    torch_model, path = hf_bert("BertForMaskedLM", tie_word_embeddings=tied)
    expected = hf_run(torch_model, **INPUTS, labels=MLM_LABELS, output_hidden_states=True)
    model = BertForMaskedLM.from_pretrained(path)
    assert "pooler" not in model.params["bert"]  # as HF's add_pooling_layer=False
    assert ("decoder" in model.params["cls"]["predictions"]) is not tied
    out = model(IDS, **INPUTS, labels=MLM_LABELS, output_hidden_states=True)
    name = "tied" if tied else "untied"
    assert_close(out.logits, expected.logits, TOL, f"BertForMaskedLM ({name}): logits", DIFFS)
    assert_close(out.loss, expected.loss, loss_tol(expected.loss), f"BertForMaskedLM ({name}): loss", DIFFS)
    assert_close(out.hidden_states[-1], expected.hidden_states[-1], TOL,
                 f"BertForMaskedLM ({name}): hidden_states[-1]", DIFFS)
    functional = bert_arch.forward(bert_arch.load(path, with_pooler=False, with_mlm_head=True), Tensor(IDS),
                                   Tensor(MASK), Tensor(TOKEN_TYPES))
    assert_close(functional.logits, expected.logits, TOL, f"functional forward ({name}): logits", DIFFS)


@pytest.mark.parametrize("problem, num_labels, labels", [
    ("single_label", 3, np.array([2, 0, 1])),
    ("multi_label", 3, np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]], np.float32)),
    ("regression", 1, np.array([0.5, -1.0, 2.0], np.float32)),
])
def test_sequence_classification_logits_and_loss_match_hf(hf_bert, problem, num_labels, labels):
    torch_model, path = hf_bert("BertForSequenceClassification", num_labels=num_labels)
    expected = hf_run(torch_model, **INPUTS, labels=labels)
    assert torch_model.config.problem_type.startswith(problem)
    torch_model.config.problem_type = None  # HF stores the inferred type: let the next case infer its own
    out = BertForSequenceClassification.from_pretrained(path)(IDS, **INPUTS, labels=labels)
    assert_close(out.logits, expected.logits, TOL, f"BertForSequenceClassification ({problem}): logits", DIFFS)
    assert_close(out.loss, expected.loss, loss_tol(expected.loss), f"BertForSequenceClassification ({problem}): loss",
                 DIFFS)


# ---------------------------------------------------------------- checkpoints

def test_bare_base_model_checkpoint_with_saved_buffers_loads(hf_bert, tmp_path):
    """A `BertModel` checkpoint has no `bert.` prefix; older transformers also saved the
    `embeddings.position_ids` buffer (sentence-transformers checkpoints carry it)."""
    torch_model, path = hf_bert("BertModel")
    tensors = load_file(path / "model.safetensors")
    assert not any(k.startswith("bert.") for k in tensors)
    tensors["embeddings.position_ids"] = np.arange(TINY["max_position_embeddings"])[None]
    save_file(tensors, tmp_path / "model.safetensors")
    torch_model.config.save_pretrained(tmp_path)
    expected = hf_run(torch_model, **INPUTS)
    out = msfx.AutoModel.from_pretrained(tmp_path)(IDS, **INPUTS)
    assert_close(out.last_hidden_state, expected.last_hidden_state, TOL,
                 "old-style bare BertModel checkpoint: last_hidden_state", DIFFS)
    classifier = msfx.AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    assert type(classifier) is BertForSequenceClassification  # fresh classifier on the loaded encoder
    assert_close(classifier.params["bert"]["pooler"]["dense"]["weight"], torch_model.pooler.dense.weight, 0,
                 "classifier body from a bare BertModel checkpoint: pooler", DIFFS)


def test_pretraining_checkpoint_loads_into_masked_lm_and_mlm_checkpoint_into_base_model(hf_bert):
    """bert-base-uncased's layout (`BertForPreTraining`: pooler, MLM and next-sentence heads) loads into
    `BertForMaskedLM` (pooler and NSP head dropped); a `BertForMaskedLM` checkpoint (no pooler) loads
    into `BertModel` with a freshly initialized pooler; both as HF."""
    torch_model, path = hf_bert("BertForPreTraining")
    expected = hf_run(torch_model, **INPUTS)
    out = msfx.AutoModelForMaskedLM.from_pretrained(path)(IDS, **INPUTS)
    assert_close(out.logits, expected.prediction_logits, TOL,
                 "BertForPreTraining checkpoint -> BertForMaskedLM: logits", DIFFS)
    torch_model, path = hf_bert("BertForMaskedLM", tie_word_embeddings=True)
    expected = hf_run(torch_model.bert, **INPUTS)
    model = msfx.AutoModel.from_pretrained(path)
    assert type(model) is BertModel and model.params["bert"]["pooler"]["dense"]["weight"].shape == (64, 64)
    assert_close(model(IDS, **INPUTS).last_hidden_state, expected.last_hidden_state, TOL,
                 "BertForMaskedLM checkpoint -> BertModel: last_hidden_state", DIFFS)


@pytest.mark.parametrize("cls, hf_cls", [(BertModel, "BertModel"), (BertForMaskedLM, "BertForMaskedLM"),
                                         (BertForSequenceClassification, "BertForSequenceClassification")])
def test_save_pretrained_reloads_in_hf_with_the_same_outputs(tmp_path, cls, hf_cls):
    config = transformers.BertConfig(**TINY, num_labels=3)
    model = cls(config, cls.init_params(config, seed=3))
    model.save_pretrained(tmp_path)
    reloaded, info = getattr(transformers, hf_cls).from_pretrained(tmp_path, attn_implementation="eager",
                                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ours = {k: to_np(v) for k, v in zip(model._param_keys, model.weights)}
    prefix = "bert." if cls is BertModel else ""
    theirs = {prefix + k: v.detach().numpy() for k, v in reloaded.state_dict().items()}
    for key, value in ours.items():
        np.testing.assert_array_equal(theirs[key], value, err_msg=key)
    expected = hf_run(reloaded.eval(), **INPUTS)
    out = model(IDS, **INPUTS)
    assert_close(out[0], expected[0], TOL, f"save_pretrained -> HF {hf_cls}: first output", DIFFS)
    assert type(msfx.AutoModel.from_pretrained(tmp_path)) is BertModel


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, message", [
    (dict(input_ids=IDS, attention_mask=MASK[:, :5]),
     r"attention_mask has shape \[3, 5\], expected \[batch, keys\] = \[3, 10\]"),
    (dict(input_ids=np.full((1, 4), TINY["vocab_size"])), r"token id 99 in input_ids is out of range for vocab_size"),
    (dict(input_ids=IDS, token_type_ids=TOKEN_TYPES + 1), r"token_type_ids holds 2, out of range for type_vocab_size"),
    (dict(input_ids=np.ones((1, TINY["max_position_embeddings"] + 1), np.int64)),
     r"sequence length 25 exceeds max_position_embeddings 24"),
    (dict(input_ids=IDS, position_ids=np.full(IDS.shape, 24)), r"position_ids holds 24, out of range"),
    (dict(), r"exactly one of input_ids or inputs_embeds"),
])
def test_bad_inputs_raise_clear_value_errors(hf_bert, kwargs, message):
    model = BertModel.from_pretrained(hf_bert("BertModel")[1])
    with pytest.raises(ValueError, match=message):
        model(**kwargs)
