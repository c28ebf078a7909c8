"""Whisper's generation rules on the host (HF's `WhisperGenerationMixin`, `generation_whisper.py`, 5.x):
the start tokens (`<|startoftranscript|>`, language, task, `<|notimestamps|>`), the logits processors
Whisper adds, and the split of each generated window into timestamped segments. The decoding itself is
`msfx.generation`'s, over `msfx.decode.seq2seq`'s state.
"""
from __future__ import annotations

import copy

import numpy as np
from transformers.models.whisper.tokenization_whisper import TASK_IDS, TO_LANGUAGE_CODE

from msfx.decode.processors import (SuppressTokensAtBeginLogitsProcessor, SuppressTokensLogitsProcessor,
                                    WhisperTimeStampLogitsProcessor)

# seconds per timestamp token, and per mel frame (HF's `time_precision`, `time_precision_features`)
TIME_PRECISION = 0.02
FRAME_SECONDS = 0.01
INPUT_STRIDE = 2  # mel frames per encoder position (the second convolution's stride)


def set_language_and_task(config, language, task, is_multilingual) -> None:
    """HF's `_set_language_and_task` on the generation `config` (changed in place).

    Raises:
        ValueError: `language` / `task` for an English-only model, or a generation config without
            `lang_to_id` / `task_to_id`.
    """
    if is_multilingual is not None:
        if not hasattr(config, "is_multilingual"):
            raise ValueError("The generation config is outdated and is thus not compatible with the `is_multilingual` "
                             "argument to `generate`.")
        config.is_multilingual = is_multilingual
    if hasattr(config, "is_multilingual") and not config.is_multilingual and (task is not None or language is not None):
        raise ValueError("Cannot specify `task` or `language` for an English-only model. If the model is intended to "
                         "be multilingual, pass `is_multilingual=True` to generate, or update the generation config.")
    for name, value, table in (("language", language, "lang_to_id"), ("task", task, "task_to_id")):
        if value is not None:
            if not hasattr(config, table):
                raise ValueError(f"The generation config is outdated and is thus not compatible with the `{name}` "
                                 f"argument to `generate` (it has no `{table}`).")
            setattr(config, name, value)


def language_id(config, language: str) -> int:
    """The token id of `language` (a name, a code or a token such as "<|fr|>"), as HF's `language_to_id`.

    Raises:
        ValueError: an unknown language, or one the model's `lang_to_id` lacks.
    """
    language = language.lower()
    if language in config.lang_to_id:
        token = language
    elif language in TO_LANGUAGE_CODE:
        token = f"<|{TO_LANGUAGE_CODE[language]}|>"
    elif language in TO_LANGUAGE_CODE.values():
        token = f"<|{language}|>"
    else:
        known = list(TO_LANGUAGE_CODE.values()) if len(language) == 2 else list(TO_LANGUAGE_CODE.keys())
        raise ValueError(f"Unsupported language: {language}. Language should be one of: {known}.")
    if token not in config.lang_to_id:
        raise ValueError(f"{token} is not supported by this specific model as it is not in the "
                         "`generation_config.lang_to_id`. (You should just add it to the generation config)")
    return config.lang_to_id[token]


def _replace_or_add(tokens: list[int], token: int, group) -> list[int]:
    group = list(group)
    if any(t in tokens for t in group):
        return [token if t in group else t for t in tokens]
    return tokens + [token]


def start_tokens(config, model_config, batch: int, detect_language) -> np.ndarray:
    """HF's `_retrieve_init_tokens`: int64 `[batch, n]`, the decoder's prompt. `detect_language()` gives
    the language ids `[batch]` when a multilingual model is given no language (HF's `detect_language`).

    Raises:
        ValueError / TypeError: a bad `language` list, an unknown language or task, or malformed
            `forced_decoder_ids`, as HF.
    """
    task, language = getattr(config, "task", None), getattr(config, "language", None)
    tokens = [config.decoder_start_token_id]
    if task is None and language is None:
        forced = getattr(config, "forced_decoder_ids", None) or getattr(model_config, "forced_decoder_ids", None)
        if forced and forced[0][0] == 1:
            i = 1
            while forced and forced[0][0] == i:
                tokens.append(forced[0][1])
                forced, i = forced[1:], i + 1
            if forced:
                raise ValueError(f"You are using token ids in `forced_decoder_ids` that do not seem to correctly follow "
                                 f"the prompt pattern of Whisper. Make sure that {forced} has an entry for all indices "
                                 f">= 1 and < {forced[0][0]}.")
    lang_undefined = len(tokens) <= 1 or tokens[1] is None
    if isinstance(language, (list, tuple)):
        if any(x is None for x in language):
            raise TypeError("Expected `language` to be `None`, a single string (e.g. `'en'`), or a list of strings "
                            "with length equal to the batch size (e.g. `('en', 'fr')` for a batch size of 2). Got a "
                            "list containing `None`.")
        if len(language) != batch:
            raise ValueError("When passing a list of languages, the length of the list must match the batch size. "
                             f"Expected length of {batch}, but got {len(language)} languages.")
        languages = list(language)
    else:
        languages = [language] if language is not None else [None] * batch
    rows = [copy.copy(tokens) for _ in languages]
    lang_ids = None
    if language is not None:
        lang_ids = [language_id(config, x) for x in languages]
    elif hasattr(config, "lang_to_id") and lang_undefined:
        lang_ids = [int(x) for x in detect_language()]
    if lang_ids is not None:
        for row, lang in zip(rows, lang_ids):
            if len(row) > 1:
                row[1] = lang
            else:
                row.append(lang)
    for i, row in enumerate(rows):
        if task is not None:
            if task not in TASK_IDS:
                raise ValueError(f"The `{task}` task is not supported. The task should be one of `{TASK_IDS}`")
            row.append(config.task_to_id[task])
            row = _replace_or_add(row, config.task_to_id[task], config.task_to_id.values())
        elif language is not None and hasattr(config, "task_to_id"):
            if not any(t in row for t in config.task_to_id.values()):
                row.append(config.task_to_id["transcribe"])
        no_timestamps = getattr(config, "no_timestamps_token_id", None)
        if not config.return_timestamps and no_timestamps is not None and row[-1] != no_timestamps:
            row.append(no_timestamps)
        elif config.return_timestamps and row[-1] == no_timestamps:
            row = row[:-1]
        rows[i] = [t for t in row if t is not None]
    return np.broadcast_to(np.asarray(rows, np.int64), (batch, len(rows[0]))).copy()


def whisper_processors(config, begin_index: int, user_processors) -> list:
    """HF's `_retrieve_logit_processors`: begin-suppression, suppression, then (with `return_timestamps`) the
    timestamp rules, ahead of the user's; clears `suppress_tokens` / `begin_suppress_tokens` on `config`
    so that generate's own list does not add them twice."""
    processors = list(user_processors or [])
    if config.return_timestamps is True:
        processors.insert(0, WhisperTimeStampLogitsProcessor(config, begin_index=begin_index))
    if config.suppress_tokens is not None:
        processors.insert(0, SuppressTokensLogitsProcessor(config.suppress_tokens))
        config.suppress_tokens = None
    if config.begin_suppress_tokens is not None:
        processors.insert(0, SuppressTokensAtBeginLogitsProcessor(config.begin_suppress_tokens, begin_index))
        config.begin_suppress_tokens = None
    return processors


def trim(sequence: np.ndarray, pad: int | None, eos: int | None) -> np.ndarray:
    """One window's generated tokens as HF's `generate_with_fallback` keeps them: when the row ends in
    padding, as many tokens as it holds pad ids (one fewer when pad is eos) cut from the end, then a
    final eos dropped."""
    if len(sequence) and sequence[-1] == pad:
        paddings = int((sequence == pad).sum()) - (1 if pad == eos else 0)
        if paddings:
            sequence = sequence[:-paddings]
    if len(sequence) and sequence[-1] == eos:
        sequence = sequence[:-1]
    return sequence


def segments(sequence: np.ndarray, timestamp_begin: int, time_offset: float,
             window_frames: int) -> tuple[list[dict], int]:
    """HF's `_retrieve_segment`: a window's tokens split at each pair of timestamps into segments
    `{"start", "end" (seconds), "tokens"}`, and how many mel frames to move on (`window_frames` when the
    window ended on a single timestamp or has no pair, else up to the last pair's timestamp)."""
    is_ts = [int(t) >= timestamp_begin for t in sequence]
    single_ending = is_ts[-2:] == [False, True]
    cuts = [i + 1 for i in range(len(is_ts) - 1) if is_ts[i] and is_ts[i + 1]]
    if not cuts:
        stamps = [i for i, t in enumerate(is_ts) if t]
        end = int(window_frames * FRAME_SECONDS / TIME_PRECISION)
        if stamps and sequence[stamps[-1]] != timestamp_begin:
            end = int(sequence[stamps[-1]]) - timestamp_begin
        return [{"start": time_offset, "end": time_offset + end * TIME_PRECISION, "tokens": sequence}], window_frames
    if single_ending:
        cuts.append(len(sequence))
    else:
        cuts[-1] += 1  # the last segment keeps its closing timestamp
    out, last = [], 0
    for i, cut in enumerate(cuts):
        tokens = sequence[last:cut]
        end_index = -1 if i < len(cuts) - 1 or single_ending else -2
        out.append({"start": time_offset + (int(tokens[0]) - timestamp_begin) * TIME_PRECISION,
                    "end": time_offset + (int(tokens[end_index]) - timestamp_begin) * TIME_PRECISION,
                    "tokens": tokens})
        last = cut
    if single_ending:
        return out, window_frames
    return out, (int(sequence[last - 2]) - timestamp_begin) * INPUT_STRIDE


def pad_right(rows: list[np.ndarray], pad: int) -> np.ndarray:
    """HF's `_pad_to_max_length` at the end of generation: rows right-padded with `pad` to the longest,
    int64 `[batch, longest]`."""
    longest = max((len(r) for r in rows), default=0)
    return np.stack([np.pad(np.asarray(r, np.int64), (0, longest - len(r)), constant_values=pad) for r in rows])
