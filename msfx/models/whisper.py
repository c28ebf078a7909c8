"""HF-named Whisper classes: `WhisperModel`, `WhisperForConditionalGeneration`.

Each forwards to `msfx.architectures.whisper`; see `transformers.models.whisper.modeling_whisper` and
`generation_whisper` for the behaviour they reproduce. Hidden states and attentions are not returned.
"""
from __future__ import annotations

import numpy as np
from mindspore import Tensor

from msfx.architectures import whisper
from msfx.decode import whisper as rules
from msfx.decode.search import BeamSearchResult
from msfx.generation import Seq2SeqGenerationMixin, _Hooks
from msfx.layers.losses import masked_cross_entropy
from msfx.modeling import PreTrainedModel, token_ids
from msfx.models.t5 import Seq2SeqLMOutput, Seq2SeqModelOutput


class _WhisperBase(PreTrainedModel):
    arch = whisper
    model_type = whisper.MODEL_TYPE
    base_model_prefix = whisper.PREFIX
    main_input_name = "input_features"

    def _encoder_states(self, input_features, encoder_outputs) -> Tensor:
        """The encoder's last hidden state: from `encoder_outputs` (an output object or a tuple) or by
        running the encoder on `input_features` `[batch, num_mel_bins, frames]`."""
        if encoder_outputs is not None:
            return encoder_outputs[0] if isinstance(encoder_outputs, (tuple, list)) else \
                encoder_outputs.last_hidden_state
        if input_features is None:
            raise ValueError("Whisper needs input_features (or encoder_outputs)")
        features = whisper.check_features(input_features, self.config)
        return whisper.encoder_forward(self.params, Tensor(features.astype(np.float32)),
                                       config=self.config).last_hidden_state

    def _decode(self, encoded: Tensor, decoder_input_ids, decoder_attention_mask) -> Tensor:
        if decoder_input_ids is None:
            raise ValueError("Whisper needs decoder_input_ids (or labels, for WhisperForConditionalGeneration)")
        mask = None if decoder_attention_mask is None else Tensor(np.asarray(decoder_attention_mask, np.int32))
        return whisper.decoder_forward(self.params, token_ids(decoder_input_ids, self.config.vocab_size), encoded,
                                       mask, config=self.config, check_ids=False).last_hidden_state


class WhisperModel(_WhisperBase):
    """The encoder-decoder without a head: `last_hidden_state` (the decoder's) `[batch, target_seq, d_model]`
    and `encoder_last_hidden_state` `[batch, max_source_positions, d_model]`, for `input_features`
    `[batch, num_mel_bins, 2 * max_source_positions]` (from `transformers.WhisperFeatureExtractor`) and
    `decoder_input_ids` `[batch, target_seq]`.

    Raises:
        ValueError: no decoder inputs, mis-shaped features (the frame count the encoder needs named) or bad ids.
    """

    @classmethod
    def param_shapes(cls, config):
        return whisper.param_shapes(config, lm_head=False)

    def state_tree(self) -> dict:
        return self.params["model"]  # HF saves the base model without the `model.` prefix

    def construct(self, input_features=None, attention_mask=None, decoder_input_ids=None,
                  decoder_attention_mask=None, encoder_outputs=None, return_dict=True):
        encoded = self._encoder_states(input_features, encoder_outputs)
        hidden = self._decode(encoded, decoder_input_ids, decoder_attention_mask)
        out = Seq2SeqModelOutput(last_hidden_state=hidden, encoder_last_hidden_state=encoded)
        return out if return_dict else out.to_tuple()


def shift_tokens_right(labels: np.ndarray, pad_token_id: int, decoder_start_token_id: int) -> np.ndarray:
    """HF's `shift_tokens_right`: decoder inputs from labels `[batch, seq]` (-100 becomes `pad_token_id`)."""
    shifted = np.empty_like(labels)
    shifted[:, 0], shifted[:, 1:] = decoder_start_token_id, labels[:, :-1]
    return np.where(shifted == -100, pad_token_id, shifted)


class WhisperForConditionalGeneration(Seq2SeqGenerationMixin, _WhisperBase):
    """Whisper with its head (`proj_out`, tied to the decoder's embeddings unless the config unties it):
    `logits` `[batch, target_seq, vocab]`; `labels` `[batch, target_seq]` give the mean cross-entropy
    (-100 ignored) and, without decoder inputs, the decoder inputs (`shift_tokens_right`).

    `generate(input_features, ...)` follows HF's Whisper generation, 30-second window after window: start tokens
    from `language=` / `task=` (language detected when a multilingual model is given none) or
    `forced_decoder_ids`, `<|notimestamps|>` unless `return_timestamps=True` (then the timestamp rules),
    `suppress_tokens`, `begin_suppress_tokens`; greedy, sampling or beam search as `msfx.generation`.
    The encoder runs once; the decoder runs one `mindspore.jit` step per token (`jit=False`: eagerly).

    Raises:
        ValueError: no decoder inputs and no labels, labels longer than `max_target_positions`, or bad inputs.
    """


    def construct(self, input_features=None, attention_mask=None, decoder_input_ids=None,
                  decoder_attention_mask=None, encoder_outputs=None, labels=None, return_dict=True):
        if labels is not None:
            labels = labels.asnumpy() if isinstance(labels, Tensor) else np.asarray(labels)
            if labels.ndim != 2 or labels.shape[1] > self.config.max_target_positions:
                raise ValueError(f"labels must be [batch, seq] with seq <= max_target_positions "
                                 f"({self.config.max_target_positions}), got {list(labels.shape)}")
            if decoder_input_ids is None:
                decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id,
                                                       self.config.decoder_start_token_id)
        encoded = self._encoder_states(input_features, encoder_outputs)
        logits = whisper.lm_head(self.params, self._decode(encoded, decoder_input_ids, decoder_attention_mask))
        loss = None if labels is None else masked_cross_entropy(logits, Tensor(labels.astype(np.int32)))
        out = Seq2SeqLMOutput(loss=loss, logits=logits, encoder_last_hidden_state=encoded)
        return out if return_dict else out.to_tuple()

    def generate(self, input_features=None, generation_config=None, logits_processor=None, stopping_criteria=None,
                 return_timestamps: bool | None = None, task: str | None = None, language=None,
                 is_multilingual: bool | None = None, attention_mask=None, return_segments: bool = False,
                 force_unique_generate_call: bool | None = None, jit: bool | str = True, seed: int | None = None,
                 **kwargs):
        """HF's `WhisperForConditionalGeneration.generate`: sequential decoding over 30-second windows
        (`2 * max_source_positions` mel frames, the last zero-padded). Each window is decoded from the start
        tokens; with timestamps, the next window starts at the last complete segment's end timestamp (so
        even audio under 30 s may take several windows, as in HF), else at the window's end.

        Args:
            input_features: float `[batch, num_mel_bins, frames]`; over one window is long-form, which HF
                decodes with timestamps (`return_timestamps=False` is refused then).
            attention_mask: `[batch, frames]`, each row's real frames (needed for batched long-form).
            return_timestamps: predict `<|t|>` timestamp tokens (needs `no_timestamps_token_id` in the
                generation config).
            task: "transcribe" or "translate"; language: a name, code or token ("french", "fr", "<|fr|>"),
                or one per row.
            return_segments: also return the timestamped segments.
            force_unique_generate_call: decode the first window only and return its sequences whole
                (start tokens included), as HF.
            Other arguments as `msfx.generation.GenerationMixin.generate` (`max_new_tokens`, `num_beams`, ...).

        Returns:
            int64 numpy `[batch, n]`: each row's segments' tokens (no start tokens, no final eos),
            right-padded with `pad_token_id`, as HF; with `return_segments` (or `return_dict_in_generate`
            with timestamps), a dict with `sequences` and `segments` (per row, a list of
            `{"start", "end", "tokens"}`, seconds).

        Raises:
            ValueError: mis-shaped features, long-form input without timestamps or (batched) without
                `attention_mask`, timestamps without `no_timestamps_token_id`, a bad language or task,
                more tokens than `max_target_positions` allows; and as `GenerationMixin.generate`.
        """
        features = whisper.check_features(input_features, self.config)
        batch, total = features.shape[0], features.shape[-1]
        window = whisper.input_frames(self.config)
        config, _ = self._merge_generation_config(generation_config, kwargs)
        if return_timestamps is None:
            return_timestamps = getattr(config, "return_timestamps", None)
        if total > window:
            if return_timestamps is False:
                raise ValueError(f"You have passed more than {window} mel input features (> 30 seconds) which "
                                 "automatically enables long-form generation which requires the model to predict "
                                 "timestamp tokens. Please either pass `return_timestamps=True` or make sure to pass "
                                 f"no more than {window} mel input features.")
            return_timestamps = True
        if return_timestamps and not hasattr(config, "no_timestamps_token_id"):
            raise ValueError("You are trying to return timestamps, but the generation config is not properly set. "
                             "Make sure to initialize the generation config with the correct attributes that are "
                             "needed such as `no_timestamps_token_id`.")
        config.return_timestamps = return_timestamps
        rules.set_language_and_task(config, language, task, is_multilingual)
        max_frames = self._frames_per_row(features, attention_mask, window)
        start = rules.start_tokens(config, self.config, batch,
                                   lambda: self.detect_language(self._window(features, 0, window, window), config))
        processors = rules.whisper_processors(config, start.shape[1], logits_processor)
        self._set_max_new_tokens(config, start.shape[1])
        timestamp_begin = getattr(config, "no_timestamps_token_id", self.config.vocab_size) + 1
        if force_unique_generate_call is None:
            force_unique_generate_call = getattr(config, "force_unique_generate_call", False)
        seek, found = np.zeros(batch, np.int64), [[] for _ in range(batch)]
        while (seek < max_frames).any():
            rows = np.flatnonzero(seek < max_frames)  # HF's `_maybe_reduce_batch`
            frames = np.minimum(max_frames[rows] - seek[rows], window)
            segment_input = np.concatenate([self._window(features[i:i + 1], seek[i], n, window)
                                            for i, n in zip(rows, frames)])
            sequences = self._generate_window(segment_input, start[rows], config, processors, stopping_criteria,
                                              jit, seed)
            for i, n, sequence in zip(rows, frames, sequences[:, start.shape[1]:]):
                tokens = rules.trim(sequence, config.pad_token_id, config.eos_token_id)
                segments, offset = rules.segments(tokens, timestamp_begin, seek[i] * rules.FRAME_SECONDS, int(n))
                found[i] += segments
                seek[i] += offset
            if force_unique_generate_call:  # HF returns that window's sequences as generated (start tokens first)
                break
        out = sequences if force_unique_generate_call else rules.pad_right(
            [np.concatenate([s["tokens"] for s in row] or [np.zeros(0, np.int64)]) for row in found],
            config.pad_token_id)
        if return_segments or (config.return_dict_in_generate and return_timestamps):
            return {"sequences": out, "segments": found}
        return out

    @staticmethod
    def _window(features: np.ndarray, seek: int, frames: int, window: int) -> np.ndarray:
        """`frames` mel frames from `seek`, zero-padded to `window` (HF's `_get_input_segment`)."""
        part = features[:, :, seek:seek + frames]
        return np.pad(part, ((0, 0), (0, 0), (0, window - part.shape[-1])))

    @staticmethod
    def _frames_per_row(features: np.ndarray, attention_mask, window: int) -> np.ndarray:
        """Each row's frame count: all of them, or for batched long-form `attention_mask`'s sums (HF's
        `_retrieve_max_frames_and_seek`).

        Raises:
            ValueError: batched long-form input without `attention_mask`.
        """
        batch, total = features.shape[0], features.shape[-1]
        if batch == 1 or total <= window:
            return np.full(batch, total, np.int64)
        if attention_mask is None:
            raise ValueError("When doing batched long-form audio transcription, make sure to pass an `attention_mask`. "
                             "You can retrieve the `attention_mask` by doing `processor(audio, ..., "
                             "return_attention_mask=True)` ")
        mask = attention_mask.asnumpy() if isinstance(attention_mask, Tensor) else np.asarray(attention_mask)
        return mask.sum(-1).astype(np.int64)

    def _generate_window(self, segment_input: np.ndarray, start: np.ndarray, config, processors, stopping_criteria,
                         jit, seed) -> np.ndarray:
        """One window's decoding (the generic loop over `Seq2SeqDecodeState`): int64 `[rows, start + new]`."""
        suppressed = {"suppress_tokens": None, "begin_suppress_tokens": None}  # applied by `processors`
        mask = np.ones((segment_input.shape[0], 1), np.int32)
        hooks = _Hooks(logits_processor=processors, stopping_criteria=stopping_criteria, seed=seed)
        prepared = self._prepare_generation(None, None, config, jit, hooks, suppressed,
                                            source=(segment_input, mask, start))
        result = self._run_generation(prepared)
        return result.sequences if isinstance(result, BeamSearchResult) else result

    def _set_max_new_tokens(self, config, start_len: int) -> None:
        """HF's `_set_max_new_tokens_and_length`: `max_new_tokens` from `max_length` counted after the start
        tokens, within `max_target_positions`.

        Raises:
            ValueError: `max_new_tokens` plus the start tokens beyond `max_target_positions`.
        """
        limit = self.config.max_target_positions
        if config.max_new_tokens is not None and config.max_new_tokens + start_len > limit:
            raise ValueError(f"The length of `decoder_input_ids`, including special start tokens, prompt tokens, and "
                             f"previous tokens, is {start_len}, and `max_new_tokens` is {config.max_new_tokens}. "
                             f"Thus, the combined length of `decoder_input_ids` and `max_new_tokens` is: "
                             f"{config.max_new_tokens + start_len}. This exceeds the `max_target_positions` of the "
                             f"Whisper model: {limit}.")
        if config.max_new_tokens is None:
            config.max_new_tokens = min(config.max_length + min(limit // 2 - 1, start_len), limit) - start_len

    def detect_language(self, input_features: np.ndarray, generation_config=None) -> np.ndarray:
        """HF's `detect_language`: the language token id per row (int64 `[batch]`), the most likely of
        `lang_to_id`'s after `<|startoftranscript|>`, for features `[batch, num_mel_bins, frames]`."""
        config = generation_config or self.generation_config
        start = np.full((input_features.shape[0], 1), config.decoder_start_token_id, np.int64)
        logits = self(input_features, decoder_input_ids=start).logits[:, -1].asnumpy()
        languages = np.asarray(list(config.lang_to_id.values()))
        return languages[np.argmax(logits[:, languages], -1)]
