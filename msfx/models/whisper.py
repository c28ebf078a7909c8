"""HF-named Whisper classes: `WhisperModel`, `WhisperForConditionalGeneration`.

Each forwards to `msfx.architectures.whisper`; see `transformers.models.whisper.modeling_whisper` and
`generation_whisper` for the behaviour they reproduce. Hidden states and attentions are not returned.
"""
from __future__ import annotations

import numpy as np
from mindspore import Tensor

from msfx.architectures import whisper
from msfx.decode import whisper as rules
from msfx.decode.seq2seq import DecoderStep, Seq2SeqDecodeState
from msfx.decode.search import BeamSearchResult
from msfx.generation import GenerationMixin
from msfx.layers.basic import lacks_bf16_kernels
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


class WhisperForConditionalGeneration(GenerationMixin, _WhisperBase):
    """Whisper with its head (`proj_out`, tied to the decoder's embeddings unless the config unties it):
    `logits` `[batch, target_seq, vocab]`; `labels` `[batch, target_seq]` give the mean cross-entropy
    (-100 ignored) and, without decoder inputs, the decoder inputs (`shift_tokens_right`).

    `generate(input_features, ...)` follows HF's Whisper generation for one 30-second window: start tokens
    from `language=` / `task=` (language detected when a multilingual model is given none) or
    `forced_decoder_ids`, `<|notimestamps|>` unless `return_timestamps=True` (then the timestamp rules),
    `suppress_tokens`, `begin_suppress_tokens`; greedy, sampling or beam search as `msfx.generation`.
    The encoder runs once; the decoder runs one `mindspore.jit` step per token (`jit=False`: eagerly).

    Raises:
        ValueError: no decoder inputs and no labels, labels longer than `max_target_positions`, or bad inputs.
    """

    _decoder_step: DecoderStep | None = None

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
                 is_multilingual: bool | None = None, return_segments: bool = False, jit: bool | str = True,
                 seed: int | None = None, **kwargs):
        """HF's `WhisperForConditionalGeneration.generate` for audio up to 30 s (3000 mel frames; shorter
        input is zero-padded to that, as HF).

        Args:
            input_features: float `[batch, num_mel_bins, frames]`, `frames <= 2 * max_source_positions`.
            return_timestamps: predict `<|t|>` timestamp tokens (needs `no_timestamps_token_id` in the
                generation config).
            task: "transcribe" or "translate"; language: a name, code or token ("french", "fr",
                "<|fr|>"), or one per row.
            return_segments: also return the timestamped segments.
            Other arguments as `msfx.generation.GenerationMixin.generate` (`max_new_tokens`, `num_beams`, ...).

        Returns:
            int64 numpy `[batch, n]`: the generated tokens without the start tokens or the final eos,
            right-padded with `pad_token_id`, as HF; with `return_segments` (or `return_dict_in_generate`
            and `return_timestamps`), a dict with `sequences` and `segments` (per row, a list of
            `{"start", "end", "tokens"}`, seconds).

        Raises:
            ValueError: mis-shaped features, more than 30 s of features (long-form decoding is not
                implemented), timestamps without `no_timestamps_token_id`, a bad language or task, or more
                tokens than `max_target_positions` allows; and as `GenerationMixin.generate`.
        """
        features = whisper.check_features(input_features, self.config)
        window = whisper.input_frames(self.config)
        if features.shape[-1] > window:
            raise ValueError(f"input_features has {features.shape[-1]} frames: msfx decodes one {window}-frame "
                             "(30 s) window; long-form sequential decoding is not implemented yet")
        total_frames = features.shape[-1]
        features = np.pad(features, ((0, 0), (0, 0), (0, window - features.shape[-1])))
        config, _ = self._merge_generation_config(generation_config, kwargs)
        if return_timestamps is None:
            return_timestamps = getattr(config, "return_timestamps", None)
        if return_timestamps and not hasattr(config, "no_timestamps_token_id"):
            raise ValueError("You are trying to return timestamps, but the generation config is not properly set. "
                             "Make sure to initialize the generation config with the correct attributes that are "
                             "needed such as `no_timestamps_token_id`.")
        config.return_timestamps = return_timestamps
        rules.set_language_and_task(config, language, task, is_multilingual)
        start = rules.start_tokens(config, self.config, features.shape[0], lambda: self.detect_language(features, config))
        processors = rules.whisper_processors(config, start.shape[1], logits_processor)
        kwargs = {"suppress_tokens": None, "begin_suppress_tokens": None}  # now in `processors`
        self._set_max_new_tokens(config, start.shape[1])
        mask = np.ones((features.shape[0], 1), np.int32)
        prepared = self._prepare_generation(None, None, config, None, jit, processors, stopping_criteria, None, seed,
                                            kwargs, source=(features, mask, start))
        result = self._run_generation(prepared)
        sequences = result.sequences if isinstance(result, BeamSearchResult) else result
        timestamp_begin = getattr(config, "no_timestamps_token_id", self.config.vocab_size) + 1
        pad, eos = config.pad_token_id, config.eos_token_id
        rows, all_segments = [], []
        for sequence in sequences[:, start.shape[1]:]:
            found, _ = rules.segments(rules.trim(sequence, pad, eos), timestamp_begin, 0.0, total_frames)
            rows.append(np.concatenate([s["tokens"] for s in found]).astype(np.int64))
            all_segments.append(found)
        out = rules.pad_right(rows, pad)
        if return_segments or (config.return_dict_in_generate and return_timestamps):
            return {"sequences": out, "segments": all_segments}
        return out

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

    def _decode_state(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int,
                      jit: bool | str, encoder_inputs: tuple[np.ndarray, np.ndarray] | None = None,
                      use_cache: bool = True) -> Seq2SeqDecodeState:
        """The encoder-decoder state `generate` decodes with (see `msfx.decode.seq2seq`), as T5's."""
        compiled = bool(jit) and use_cache and not lacks_bf16_kernels(self.weights[0])
        return Seq2SeqDecodeState(whisper, self.params, self.config, *encoder_inputs, input_ids, max_new_tokens,
                                  step=self.decoder_step if compiled else None, use_cache=use_cache)

    @property
    def decoder_step(self) -> DecoderStep:
        """The model's compiled decoder step (built on first use)."""
        if self._decoder_step is None:
            self._decoder_step = DecoderStep(whisper, self.params, self.config)
        return self._decoder_step
