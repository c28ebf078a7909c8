"""The encoder-decoder path of the shared `generate` base, with a toy model whose next-token
logits are known: the encoder runs once per call, decoding starts from `decoder_start_token_id`
(or `bos_token_id`), lengths count decoder tokens as HF counts them, and beams and returned
sequences see the encoder's inputs repeated per copy."""
from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor
from transformers import GenerationConfig, PretrainedConfig

from msfx.generation import GenerateBeamEncoderDecoderOutput, GenerateEncoderDecoderOutput, GenerationMixin

VOCAB = 16


class ToyState:
    """Next token = (sum of the row's encoder ids + decoder length) % VOCAB, by a wide margin."""

    def __init__(self, encoder_ids, encoder_mask, decoder_ids):
        self.offsets = (encoder_ids * encoder_mask).sum(1)
        self.length = decoder_ids.shape[1]
        self.compiles = 0

    def _logits(self):
        logits = np.zeros((len(self.offsets), VOCAB), np.float32)
        logits[np.arange(len(self.offsets)), (self.offsets + self.length) % VOCAB] = 5.0
        return Tensor(logits)

    def prefill(self):
        return self._logits()

    def step(self, tokens, beam_idx=None):
        if beam_idx is not None:
            self.offsets = self.offsets[beam_idx]
        self.length += 1
        return self._logits()


class ToySeq2Seq(GenerationMixin):
    def __init__(self):
        self.config = PretrainedConfig(is_encoder_decoder=True, vocab_size=VOCAB, decoder_start_token_id=0,
                                       eos_token_id=1, pad_token_id=3)
        self.generation_config = GenerationConfig.from_model_config(self.config)
        self.encoder_calls = []

    def _decode_state(self, input_ids, attention_mask, max_new_tokens, jit, encoder_inputs=None, use_cache=True):
        self.encoder_calls.append(encoder_inputs)
        return ToyState(*encoder_inputs, input_ids)


def expected_tokens(encoder_ids, encoder_mask, new_tokens):
    offsets = (encoder_ids * encoder_mask).sum(1)
    return np.stack([(offsets + 1 + i) % VOCAB for i in range(new_tokens)], 1)


def test_encoder_decoder_greedy_starts_from_decoder_start_and_runs_the_encoder_once():
    model = ToySeq2Seq()
    ids = np.array([[3, 5, 7, 2], [3, 3, 4, 6]])
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None,
                         return_dict_in_generate=True)
    assert isinstance(out, GenerateEncoderDecoderOutput)
    assert len(model.encoder_calls) == 1
    np.testing.assert_array_equal(model.encoder_calls[0][1], mask)
    np.testing.assert_array_equal(out.sequences[:, 0], [0, 0])  # decoder_start_token_id
    np.testing.assert_array_equal(out.sequences[:, 1:], expected_tokens(ids, mask, 5))
    # HF 5.x's default length: 20 new tokens after the decoder's one start token
    assert model.generate(ids, attention_mask=mask, eos_token_id=None).shape == (2, 21)


def test_encoder_decoder_beams_and_bos_fallback():
    model = ToySeq2Seq()
    model.generation_config.decoder_start_token_id = None
    ids = np.array([[4, 5, 6]])
    out = model.generate(ids, max_new_tokens=4, num_beams=3, num_return_sequences=2, bos_token_id=7,
                         eos_token_id=None, return_dict_in_generate=True, output_scores=True)
    assert isinstance(out, GenerateBeamEncoderDecoderOutput)
    assert out.sequences.shape == (2, 5) and (out.sequences[:, 0] == 7).all()
    np.testing.assert_array_equal(out.sequences[0, 1:], expected_tokens(ids, np.ones_like(ids), 4)[0])
    assert model.encoder_calls[0][0].shape == (3, 3)  # the encoder inputs repeated per beam
    with pytest.raises(ValueError, match="`decoder_start_token_id` or `bos_token_id` has to be defined"):
        model.generate(ids, max_new_tokens=2)
