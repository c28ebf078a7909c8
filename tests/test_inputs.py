"""Bad inputs to the functional core and to `generate` get specific errors, as in HF."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mindspore import Tensor, tensor

import msfx
from msfx import LlamaForCausalLM

from conftest import random_ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_hf_llama

    torch_model, path = make_hf_llama(tmp_path_factory.mktemp("tiny"))
    return torch_model, path, msfx.llama.load(path), LlamaForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("ids, message", [
    (np.array([[5, 6]]), "mindspore Tensor"),
    (Tensor(np.array([[5.0, 6.0]], np.float32)), "int32/int64"),
    (Tensor(np.array([[[5, 6]]], np.int64)), r"\[batch, seq\]"),
    (Tensor(np.zeros((1, 0), np.int64)), "empty"),
    (Tensor(np.array([[5, -1]], np.int64)), "token id -1"),
    (Tensor(np.array([[5, 99]], np.int64)), "token id 99"),
])
def test_functional_forward_rejects_bad_ids(tiny, ids, message):
    with pytest.raises(ValueError, match=message):
        msfx.llama.forward(tiny[2], ids)


def test_functional_forward_shape_checks(tiny):
    params, ids = tiny[2], tensor(random_ids(2, 6))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        msfx.llama.forward(params)
    with pytest.raises(ValueError, match=r"attention_mask has shape \[2, 5\]"):
        msfx.llama.forward(params, ids, tensor(np.ones((2, 5), np.int32)))
    with pytest.raises(ValueError, match=r"position_ids has shape \[1, 5\]"):
        msfx.llama.forward(params, ids, position_ids=tensor(np.arange(5)[None]))
    with pytest.raises(ValueError, match="pass config="):
        msfx.llama.forward(dict(params), ids)
    assert msfx.llama.forward(dict(params), ids, config=params.config).logits.shape == (2, 6, 99)


def test_generate_rejects_what_hf_rejects(tiny):
    model, ids = tiny[3], tensor(random_ids(1, 8))
    with pytest.raises(ValueError, match=r"not used by the model: \['temperatur'\]"):
        model.generate(input_ids=ids, max_new_tokens=2, temperatur=0.5)
    with pytest.raises(ValueError, match=r"attention_mask has shape \[8, 1\]"):
        model.generate(input_ids=ids, attention_mask=np.ones((8, 1)), max_new_tokens=2)
    with pytest.raises(ValueError, match="`max_length` is set to 4"):
        model.generate(input_ids=ids, max_length=4)
    with pytest.raises(ValueError, match="empty"):
        model.generate(input_ids=np.zeros((1, 0), np.int64), max_new_tokens=2)


def test_torch_dtype_spelling_is_honoured(tiny):
    assert LlamaForCausalLM.from_pretrained(tiny[1], torch_dtype=torch.float16).dtype == msfx.llama.ms.float16


def test_right_padded_batch_matches_hf(tiny):
    """With right padding HF 5.x puts pad slots at position 0 and each new token at the last
    position + 1; msfx does the same (so row 1's tokens follow a position-0 pad)."""
    torch_model, _, _, model = tiny
    ids = random_ids(2, 7, seed=3)
    mask = np.ones_like(ids)
    mask[1, 4:] = 0
    ids[1, 4:] = 0
    with torch.no_grad():
        expected = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6,
                                        do_sample=False).numpy()
    got = model.generate(input_ids=tensor(ids), attention_mask=tensor(mask), max_new_tokens=6, jit=False)
    np.testing.assert_array_equal(got, expected)


def test_generate_length_beyond_max_position_embeddings_warns_as_hf(tiny, caplog):
    """HF warns past `max_position_embeddings` and goes on (rope extends; tests/test_generation_edges.py
    compares the tokens); GPT-2's learned positions are refused there (tests/test_gpt2.py)."""
    model = tiny[3]
    out = model.generate(input_ids=random_ids(1, 126), max_new_tokens=4, jit=False, eos_token_id=None)
    assert out.shape == (1, 130)
    assert "exceeded the model's predefined maximum length (128)" in caplog.text
    # HF's default length (20 new tokens) is capped at max_position_embeddings
    assert model.generate(input_ids=random_ids(1, 120), jit=False).shape == (1, 128)


@pytest.mark.parametrize("eos, num_beams", [(2, 1), (None, 1), (None, 3), (2, 3)])
def test_padded_batch_without_pad_token_follows_hf(tiny, eos, num_beams):
    """No pad_token_id anywhere: HF pads finished rows with eos[0] (with eos) or, in beam search
    without eos, fills with -1; msfx gives the same sequences."""
    torch_model, path = tiny[0], tiny[1]
    model = LlamaForCausalLM.from_pretrained(path)
    ids = random_ids(3, 6, seed=9)
    mask = np.ones_like(ids)
    mask[1, :2] = mask[2, :4] = 0
    kwargs = dict(max_new_tokens=8, do_sample=False, num_beams=num_beams, eos_token_id=eos, pad_token_id=None)
    model.generation_config.pad_token_id = None
    saved = torch_model.generation_config.pad_token_id
    torch_model.generation_config.pad_token_id = None
    try:
        with torch.no_grad():
            expected = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs).numpy()
    finally:
        torch_model.generation_config.pad_token_id = saved
    np.testing.assert_array_equal(model.generate(ids, attention_mask=mask, jit=False, **kwargs), expected)


def test_generate_refuses_what_it_would_otherwise_ignore_or_crash_on(tiny):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    model, ids = tiny[3], random_ids(2, 5)
    with pytest.raises(ValueError, match="empty batch"):
        model.generate(input_ids=np.zeros((0, 4), np.int64), max_new_tokens=2)
    with pytest.raises(ValueError, match="jit must be True, False or 'decode'"):
        model.generate(input_ids=ids, max_new_tokens=2, jit="no")
    with pytest.raises(ValueError, match="num_beams must be at least 1"):
        model.generate(input_ids=ids, max_new_tokens=2, num_beams=0)
    with pytest.raises(TypeError, match="transformers' torch classes"):
        model.generate(input_ids=ids, max_new_tokens=2, logits_processor=[RepetitionPenaltyLogitsProcessor(1.2)])
    for mode in (dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0), dict(penalty_alpha=0.6, top_k=4),
                 dict(dola_layers="low")):
        with pytest.raises(NotImplementedError):
            model.generate(input_ids=ids, max_new_tokens=2, **mode)


def test_unsupported_activation_is_refused_at_load(tmp_path):
    from conftest import make_hf_llama

    _, path = make_hf_llama(tmp_path, hidden_act="tanh")
    with pytest.raises(ValueError, match="unsupported activation 'tanh'"):
        LlamaForCausalLM.from_pretrained(path)


def test_cli_reports_user_errors_without_a_traceback(tmp_path, capsys):
    from msfx.cli import main

    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "msfx generate: error:" in err and "Traceback" not in err
