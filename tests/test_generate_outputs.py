"""`generate`'s HF-style outputs beyond the token array, with HF transformers (PyTorch) as the oracle.

1. `return_dict_in_generate=True` with `output_scores` / `output_logits`: HF's sequences, and
   each step's processed scores and raw logits (within 1e-4, -inf positions equal).
2. Streamers: `transformers.TextIteratorStreamer` with `generate` in a thread (as HF's docs show)
   yields the decoded text; a recording streamer gets the prompt, each new token column, one end().
"""
from __future__ import annotations

from threading import Thread

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY, left_padded

from msfx import LlamaForCausalLM
from msfx.generation import GenerateDecoderOnlyOutput

PAD, PROMPT, NEW = TINY["pad_token_id"], 8, 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_hf_llama

    torch_model, path = make_hf_llama(tmp_path_factory.mktemp("tiny"))
    return torch_model, LlamaForCausalLM.from_pretrained(path)


def assert_close_with_inf(actual: np.ndarray, expected: np.ndarray, tol: float = 1e-4) -> None:
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=tol, atol=tol)


# ---------------------------------------------------------------- 1. scores and logits

@pytest.mark.parametrize("jit", [False, True])
def test_return_dict_scores_and_logits_match_hf(tiny, jit):
    torch_model, model = tiny
    ids, mask = left_padded(3, PROMPT, [0, 2, 4], seed=2)
    # suppress_tokens puts -inf in the processed scores (but not in the raw logits)
    kwargs = dict(max_new_tokens=NEW, do_sample=False, repetition_penalty=1.2, suppress_tokens=[5],
                  return_dict_in_generate=True, output_scores=True, output_logits=True)
    with torch.no_grad():
        expected = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs)
    got = model.generate(ids, attention_mask=mask, jit=jit, **kwargs)

    assert isinstance(got, GenerateDecoderOnlyOutput)
    assert got.sequences.dtype == np.int64
    np.testing.assert_array_equal(got.sequences, expected.sequences.numpy())
    new = got.sequences.shape[1] - PROMPT
    assert len(got.scores) == len(got.logits) == len(expected.scores) == new
    for ours, theirs in zip(got.scores, expected.scores):
        assert_close_with_inf(ours, theirs.float().numpy())
        assert np.isneginf(ours[:, 5]).all()
    for ours, theirs in zip(got.logits, expected.logits):
        assert_close_with_inf(ours, theirs.float().numpy())
        assert np.isfinite(ours).all()
    assert got.attentions is None and got.hidden_states is None and got.cache is None
    assert got["sequences"] is got.sequences and got[0] is got.sequences  # ModelOutput access


def test_return_dict_defaults(tiny):
    _, model = tiny
    ids, mask = left_padded(3, PROMPT, [0, 2, 4], seed=2)
    plain = model.generate(ids, attention_mask=mask, jit=False, max_new_tokens=4)
    assert isinstance(plain, np.ndarray)
    only_seq = model.generate(ids, attention_mask=mask, jit=False, max_new_tokens=4, return_dict_in_generate=True)
    np.testing.assert_array_equal(only_seq.sequences, plain)
    assert only_seq.scores is None and only_seq.logits is None
    scores_only = model.generate(ids, attention_mask=mask, jit=False, max_new_tokens=4,
                                 return_dict_in_generate=True, output_scores=True)
    assert len(scores_only.scores) == scores_only.sequences.shape[1] - PROMPT and scores_only.logits is None
    # without return_dict_in_generate the flags change nothing, as in HF
    np.testing.assert_array_equal(model.generate(ids, attention_mask=mask, jit=False, max_new_tokens=4,
                                                 output_scores=True), plain)
    with pytest.raises(NotImplementedError, match="attentions"):
        model.generate(ids, attention_mask=mask, jit=False, max_new_tokens=4, return_dict_in_generate=True,
                       output_attentions=True)


# ---------------------------------------------------------------- 2. streamers

def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny model's whole vocabulary, with Llama's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab += [f"w{i}" for i in range(TINY["vocab_size"] - len(vocab))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>", padding_side="left")


def test_text_iterator_streamer_in_a_thread(tiny):
    _, model = tiny
    tokenizer = tiny_tokenizer()
    assert len(tokenizer) == model.config.vocab_size
    inputs = tokenizer(["w7 w12 w3 w40 w41"], return_tensors="np")
    prompt_len = inputs["input_ids"].shape[1]
    for skip_prompt in (True, False):
        streamer = transformers.TextIteratorStreamer(tokenizer, skip_prompt=skip_prompt, timeout=120)
        result = []
        thread = Thread(target=lambda s=streamer, r=result: r.append(
            model.generate(**inputs, streamer=s, max_new_tokens=NEW, jit=False)))
        thread.start()
        text = "".join(streamer)
        thread.join()
        ids = result[0][0]
        assert len(ids) > prompt_len
        assert text == tokenizer.decode(ids[prompt_len:] if skip_prompt else ids)


def test_custom_streamer_gets_prompt_then_each_column_then_end(tiny):
    _, model = tiny
    ids, mask = left_padded(3, PROMPT, [0, 2, 4], seed=2)

    class Recorder:
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(("put", np.array(value)))

        def end(self):
            self.calls.append(("end", None))

    recorder = Recorder()
    out = model.generate(ids, attention_mask=mask, streamer=recorder, max_new_tokens=NEW, jit=False)
    new = out.shape[1] - PROMPT
    assert new >= 1
    assert [kind for kind, _ in recorder.calls] == ["put"] * (1 + new) + ["end"]
    np.testing.assert_array_equal(recorder.calls[0][1], ids)
    for i, (_, column) in enumerate(recorder.calls[1:-1]):
        assert column.shape == (3,)
        np.testing.assert_array_equal(column, out[:, PROMPT + i])
