"""`automatic-speech-recognition`: HF's `AutomaticSpeechRecognitionPipeline`
(`transformers/pipelines/automatic_speech_recognition.py`) over msfx's Whisper, on numpy audio."""
from __future__ import annotations

import numpy as np

from msfx.pipelines.base import Pipeline


class AutomaticSpeechRecognitionPipeline(Pipeline):
    """Transcribe audio: `{"text": ...}`, with `return_timestamps=True` also `"chunks"`: one
    `{"timestamp": (start, end), "text"}` per Whisper segment (seconds). Audio: a float numpy array
    `[samples]` at the feature extractor's sampling rate (16 kHz for Whisper), or a dict with `"raw"` /
    `"array"` and `"sampling_rate"`. Audio over 30 s is decoded long-form (Whisper's sequential windows).
    Generation arguments (`language`, `task`, `max_new_tokens`, ...) go to `generate` (`generate_kwargs=`
    too, as HF).

    Raises:
        ValueError: a sampling rate other than the feature extractor's (HF resamples with torchaudio; msfx
            asks for 16 kHz audio, e.g. `sox in.wav -r 16000 out.wav`), a dict without those keys, or
            audio that is not 1-D.
        TypeError: a file name or bytes (HF decodes them with ffmpeg; msfx takes arrays).
    """

    calls_generate = True

    def __init__(self, model, tokenizer=None, feature_extractor=None, **kwargs):
        if feature_extractor is None:
            raise ValueError("automatic-speech-recognition needs feature_extractor= (e.g. "
                             "transformers.WhisperFeatureExtractor.from_pretrained(path))")
        self.feature_extractor = feature_extractor
        super().__init__(model, tokenizer=tokenizer, **kwargs)

    def _sanitize_parameters(self, return_timestamps=None, generate_kwargs=None, **kwargs):
        forward = {**(generate_kwargs or {}), **kwargs}
        if return_timestamps is not None:
            forward["return_timestamps"] = return_timestamps
        return {}, forward, ({} if return_timestamps is None else {"return_timestamps": return_timestamps})

    def _audio(self, inputs) -> np.ndarray:
        rate = self.feature_extractor.sampling_rate
        if isinstance(inputs, (str, bytes)):
            raise TypeError("msfx's automatic-speech-recognition takes audio as a numpy array (or a dict with 'raw' "
                            f"and 'sampling_rate'), not {type(inputs).__name__}: decode the file to {rate} Hz first")
        if isinstance(inputs, dict):
            if "sampling_rate" not in inputs or not ("raw" in inputs or "array" in inputs):
                raise ValueError("When passing a dictionary to AutomaticSpeechRecognitionPipeline, the dict needs to "
                                 'contain a "raw" key containing the numpy array representing the audio and a '
                                 '"sampling_rate" key, containing the sampling_rate associated with that array')
            if inputs["sampling_rate"] != rate:
                raise ValueError(f"the audio is sampled at {inputs['sampling_rate']} Hz; this model's feature "
                                 f"extractor takes {rate} Hz: resample it first (e.g. `sox in.wav -r {rate} out.wav`)")
            inputs = inputs["raw"] if "raw" in inputs else inputs["array"]
        audio = np.asarray(inputs, np.float32)
        if audio.ndim != 1:
            raise ValueError(f"We expect a single channel audio input for AutomaticSpeechRecognitionPipeline, got "
                             f"shape {list(audio.shape)}")
        return audio

    def preprocess(self, inputs) -> dict:
        audio = self._audio(inputs)
        fe = self.feature_extractor
        if audio.shape[0] > fe.n_samples:  # long-form: every frame, with the mask generate needs
            out = fe(audio, sampling_rate=fe.sampling_rate, truncation=False, padding="longest",
                     return_attention_mask=True, return_tensors="np")
            return {"input_features": out.input_features, "attention_mask": out.attention_mask}
        return {"input_features": fe(audio, sampling_rate=fe.sampling_rate, return_tensors="np").input_features}

    def _forward(self, model_inputs: dict, **generate_kwargs) -> dict:
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        out = self.model.generate(model_inputs["input_features"], attention_mask=model_inputs.get("attention_mask"),
                                  return_segments=True, **generate_kwargs)
        return {"tokens": out["sequences"], "segments": out["segments"]}

    def postprocess(self, model_outputs: dict, return_timestamps=None) -> dict:
        text = self.tokenizer.decode(model_outputs["tokens"][0], skip_special_tokens=True)
        if not return_timestamps:
            return {"text": text}
        chunks = [{"timestamp": (round(s["start"], 2), round(s["end"], 2)),
                   "text": self.tokenizer.decode(s["tokens"], skip_special_tokens=True)}
                  for s in model_outputs["segments"][0]]
        return {"text": text, "chunks": chunks}
