"""HF's logits processors and warpers in numpy, for the host side of the decode loop.

Each class has the name and constructor arguments of its `transformers.generation.logits_process`
(5.24) counterpart and the same semantics, over numpy instead of torch (msfx must not import
torch at runtime): `__call__(input_ids, scores)` takes `input_ids` int `[batch, cur_len]` (the
prompt, left padding included, then every generated token) and `scores` float32
`[batch, vocab]`, and returns new float32 scores (the input is never modified).

`build_logits_processors` assembles the list `GenerationMixin._get_logits_processor` builds for
a decoder-only model, in HF's order; warpers (temperature, top-k, top-p, ...) only when
`do_sample`.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Iterable

import numpy as np

NEG_INF = -math.inf


def _eos_list(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, (int, np.integer)):
        return [int(eos_token_id)]
    return [int(t) for t in np.asarray(eos_token_id).reshape(-1)]


def _f32(scores) -> np.ndarray:
    return np.asarray(scores, dtype=np.float32)


def _softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in the scores' precision (-inf entries get probability 0)."""
    shifted = scores - scores.max(-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(-1, keepdims=True)


def _log_softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _kth_largest(values: np.ndarray, k: int) -> np.ndarray:
    """`torch.topk(values, k)[0][..., -1, None]`: the k-th largest value of each row."""
    return -np.partition(-values, k - 1, axis=-1)[..., k - 1:k]


def _unsort(sorted_mask: np.ndarray, sorted_indices: np.ndarray) -> np.ndarray:
    """`sorted_mask.scatter(1, sorted_indices, sorted_mask)`: back to vocabulary order."""
    out = np.empty_like(sorted_mask)
    np.put_along_axis(out, sorted_indices, sorted_mask, axis=-1)
    return out


def _check_keep(min_tokens_to_keep) -> None:
    if not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
        raise ValueError(f"`min_tokens_to_keep` has to be a positive integer, but is {min_tokens_to_keep}")


class LogitsProcessor:
    """Base class: `__call__(input_ids [batch, cur_len] int, scores [batch, vocab] float32) -> scores`."""

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"{self.__class__} is an abstract class. Only classes inheriting this class "
                                  "can be called.")


class LogitsProcessorList(list):
    """A list of processors applied in order (HF's `LogitsProcessorList`; extra keyword arguments go to
    processors whose `__call__` takes more than `input_ids, scores`)."""

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray, **kwargs) -> np.ndarray:
        for processor in self:
            args = inspect.signature(processor.__call__).parameters
            if len(args) > 2:
                if not all(arg in kwargs for arg in list(args)[2:]):
                    raise ValueError(f"Make sure that all the required parameters: {list(args)} for "
                                     f"{processor.__class__} are passed to the logits processor.")
                scores = processor(input_ids, scores, **kwargs)
            else:
                scores = processor(input_ids, scores)
        return scores


# ---------------------------------------------------------------- length and token constraints

class MinLengthLogitsProcessor(LogitsProcessor):
    """Eos ids get -inf while `cur_len < min_length` (the prompt counts)."""

    def __init__(self, min_length: int, eos_token_id: int | list[int]):
        if not isinstance(min_length, int) or min_length < 0:
            raise ValueError(f"`min_length` has to be a non-negative integer, but is {min_length}")
        self.min_length = min_length
        self.eos_token_id = _eos_list(eos_token_id)

    def __call__(self, input_ids, scores):
        scores = _f32(scores)
        if input_ids.shape[-1] < self.min_length:
            return np.where(np.isin(np.arange(scores.shape[-1]), self.eos_token_id), np.float32(NEG_INF), scores)
        return scores.copy()


class MinNewTokensLengthLogitsProcessor(LogitsProcessor):
    """Eos ids get -inf while fewer than `min_new_tokens` tokens follow the first `prompt_length_to_skip`."""

    def __init__(self, prompt_length_to_skip: int, min_new_tokens: int, eos_token_id: int | list[int]):
        for name, value in [("prompt_length_to_skip", prompt_length_to_skip), ("min_new_tokens", min_new_tokens)]:
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` has to be a positive integer, but is {value}")
        self.prompt_length_to_skip = prompt_length_to_skip
        self.min_new_tokens = min_new_tokens
        self.eos_token_id = _eos_list(eos_token_id)

    def __call__(self, input_ids, scores):
        scores = _f32(scores)
        if input_ids.shape[-1] - self.prompt_length_to_skip < self.min_new_tokens:
            return np.where(np.isin(np.arange(scores.shape[-1]), self.eos_token_id), np.float32(NEG_INF), scores)
        return scores.copy()


class TemperatureLogitsWarper(LogitsProcessor):
    """`scores / temperature`. As in HF, `temperature` must be a float > 0 (an int is rejected)."""

    def __init__(self, temperature: float):
        if not isinstance(temperature, float) or not temperature > 0:
            message = (f"`temperature` (={temperature}) has to be a strictly positive float, otherwise your next token "
                       "scores will be invalid.")
            if isinstance(temperature, float) and temperature == 0.0:
                message += " If you're looking for greedy decoding strategies, set `do_sample=False`."
            raise ValueError(message)
        self.temperature = temperature

    def __call__(self, input_ids, scores):
        return (_f32(scores) / np.float32(self.temperature)).astype(np.float32)


class RepetitionPenaltyLogitsProcessor(LogitsProcessor):
    """Each token present in `input_ids` has its score divided by `penalty` (positive scores) or
    multiplied by it (negative ones), once however often it occurs.

    `prompt_ignore_length`: an int (the first columns of `input_ids` are ignored for every row) or
    an int array `[batch]` (per row; `generate` passes each row's count of leading padding, so
    left padding is not penalized). Ids >= vocab are ignored.
    """

    def __init__(self, penalty: float, prompt_ignore_length: int | np.ndarray | None = None):
        if not isinstance(penalty, float) or not penalty > 0:
            raise ValueError(f"`penalty` has to be a strictly positive float, but is {penalty}")
        if prompt_ignore_length is not None:
            if isinstance(prompt_ignore_length, int) and prompt_ignore_length < 0:
                raise ValueError(f"`prompt_ignore_length` has to be a positive integer, but is {prompt_ignore_length}")
            if isinstance(prompt_ignore_length, np.ndarray) and prompt_ignore_length.ndim != 1:
                raise ValueError("`prompt_ignore_length` must be 1D")
        self.penalty = penalty
        self.prompt_ignore_length = prompt_ignore_length

    def __call__(self, input_ids, scores):
        scores = _f32(scores)
        vocab = scores.shape[-1]
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[:, None]
        if isinstance(self.prompt_ignore_length, (int, np.integer)):
            ids = ids[:, int(self.prompt_ignore_length):]
        elif isinstance(self.prompt_ignore_length, np.ndarray):
            if ids.shape[0] != self.prompt_ignore_length.shape[0]:
                raise ValueError("Incompatible `prompt_ignore_length` batch size")
            positions = np.arange(ids.shape[1])
            ids = np.where(positions[None, :] < self.prompt_ignore_length[:, None], vocab, ids)
        ids = np.minimum(ids, vocab)  # out-of-vocab ids land in a spare column that is dropped
        padded = np.concatenate([scores, np.zeros((scores.shape[0], 1), np.float32)], 1)
        score = np.take_along_axis(padded, ids, 1)
        score = np.where(score < 0, score * np.float32(self.penalty), score / np.float32(self.penalty))
        np.put_along_axis(padded, ids, score.astype(np.float32), 1)
        return padded[:, :vocab]


class NoRepeatNGramLogitsProcessor(LogitsProcessor):
    """Bans every token that would complete an n-gram (of `ngram_size`) already present in
    `input_ids`, prompt included."""

    def __init__(self, ngram_size: int):
        if not isinstance(ngram_size, int) or ngram_size <= 0:
            raise ValueError(f"`ngram_size` has to be a strictly positive integer, but is {ngram_size}")
        self.ngram_size = ngram_size

    def __call__(self, input_ids, scores):
        scores = _f32(scores)
        n = self.ngram_size
        cur_len = input_ids.shape[-1]
        if cur_len < n:
            return scores.copy()
        prefix = input_ids[:, cur_len + 1 - n:]                                   # [b, n-1]
        windows = np.lib.stride_tricks.sliding_window_view(input_ids, n, axis=1)  # [b, w, n]
        matches = (windows[..., :-1] == prefix[:, None, :]).all(-1)                # [b, w]
        vocab = scores.shape[-1]
        banned = np.zeros((scores.shape[0], vocab + 1), bool)
        target = np.where(matches, np.minimum(windows[..., -1], vocab), vocab)
        np.put_along_axis(banned, target, True, 1)
        return np.where(banned[:, :vocab], np.float32(NEG_INF), scores)


class SequenceBiasLogitsProcessor(LogitsProcessor):
    """Adds a bias to the last token of each given sequence when the rest of it ends `input_ids`
    (single-token sequences always). `sequence_bias`: `[[token_ids, bias], ...]` or
    `{tuple(token_ids): bias}`."""

    def __init__(self, sequence_bias):
        self.sequence_bias = sequence_bias
        self._validate_arguments()
        if isinstance(self.sequence_bias, list):
            self.sequence_bias = {tuple(ids): bias for ids, bias in self.sequence_bias}
        self._prepared = None

    def _validate_arguments(self):
        bias = self.sequence_bias
        if not isinstance(bias, (dict, list)) or len(bias) == 0:
            raise ValueError("`sequence_bias` has to be a non-empty dictionary, or non-empty list of lists but is "
                             f"{bias}.")
        if isinstance(bias, dict):
            if any(not isinstance(ids, tuple) for ids in bias):
                raise ValueError(f"`sequence_bias` has to be a dict with tuples as keys, but is {bias}.")
            if any(len(ids) == 0 or any(not isinstance(t, (int, np.integer)) or t < 0 for t in ids) for ids in bias):
                raise ValueError("Each key in `sequence_bias` has to be a non-empty tuple of positive integers, "
                                 f"but is {bias}.")
            if any(not isinstance(v, float) for v in bias.values()):
                raise ValueError(f"`sequence_bias` has to be a dict with floats as values, but is {bias}.")
        elif any(len(item) == 0 or not isinstance(item[0], list) or not isinstance(item[1], float)
                 or any(not isinstance(t, (int, np.integer)) or t < 0 for t in item[0]) for item in bias):
            raise ValueError("Each element in `sequence_bias` has to be a non-empty list of lists of positive integers "
                             f"and float, but is {bias}.")

    def _prepare(self, vocab: int):
        invalid = [t for ids in self.sequence_bias for t in ids if t >= vocab]
        if invalid:
            raise ValueError(f"The model vocabulary size is {vocab}, but the following tokens were being biased: "
                             f"{invalid}")
        single = np.zeros(vocab, np.float32)
        for ids, bias in self.sequence_bias.items():
            if len(ids) == 1:
                single[ids[0]] = bias
        multi = [(np.array(ids[:-1]), ids[-1], np.float32(bias))
                 for ids, bias in self.sequence_bias.items() if len(ids) > 1]
        self._prepared = (vocab, single, multi)

    def __call__(self, input_ids, scores):
        scores = _f32(scores)
        if self._prepared is None:  # HF infers the vocabulary size on the first call
            self._prepare(scores.shape[-1])
        _, single, multi = self._prepared
        bias = np.zeros_like(scores) + single
        for prefix, last, value in multi:
            if len(prefix) > input_ids.shape[1]:
                continue
            rows = (input_ids[:, -len(prefix):] == prefix).all(-1)
            bias[:, last] += np.where(rows, value, np.float32(0.0))
        return scores + bias


class NoBadWordsLogitsProcessor(SequenceBiasLogitsProcessor):
    """Never completes a sequence of `bad_words_ids` (a single-token one is banned outright). A
    single-token entry equal to an eos id is dropped (if that drops them all, nothing is banned,
    as in HF)."""

    def __init__(self, bad_words_ids: list[list[int]], eos_token_id: int | list[int] | None = None):
        self.bad_word_ids = bad_words_ids
        self._validate_arguments()
        if eos_token_id is not None:
            eos = _eos_list(eos_token_id)
            bad_words_ids = [ids for ids in bad_words_ids if all(ids != [i] for i in eos)]
        super().__init__({tuple(ids): NEG_INF for ids in bad_words_ids})

    def _validate_arguments(self):  # replaces the base check, in HF too (so an empty dict passes)
        bad = self.bad_word_ids
        if not isinstance(bad, list) or len(bad) == 0:
            raise ValueError(f"`bad_words_ids` has to be a non-empty list, but is {bad}.")
        if any(not isinstance(ids, list) for ids in bad):
            raise ValueError(f"`bad_words_ids` has to be a list of lists, but is {bad}.")
        if any(any(not isinstance(t, (int, np.integer)) or t < 0 for t in ids) for ids in bad):
            raise ValueError(f"Each list in `bad_words_ids` has to be a list of positive integers, but is {bad}.")


class SuppressTokensLogitsProcessor(LogitsProcessor):
    """`suppress_tokens` always get -inf."""

    def __init__(self, suppress_tokens):
        self.suppress_tokens = [int(t) for t in suppress_tokens]

    def __call__(self, input_ids, scores):
        scores = _f32(scores)
        return np.where(np.isin(np.arange(scores.shape[-1]), self.suppress_tokens), np.float32(NEG_INF), scores)


class SuppressTokensAtBeginLogitsProcessor(LogitsProcessor):
    """`begin_suppress_tokens` get -inf at the step where `cur_len == begin_index`."""

    def __init__(self, begin_suppress_tokens, begin_index: int):
        self.begin_suppress_tokens = [int(t) for t in begin_suppress_tokens]
        self.begin_index = begin_index

    def set_begin_index(self, begin_index: int) -> None:
        self.begin_index = begin_index

    def __call__(self, input_ids, scores):
        scores = _f32(scores)
        if input_ids.shape[-1] == self.begin_index:
            suppress = np.isin(np.arange(scores.shape[-1]), self.begin_suppress_tokens)
            return np.where(suppress, np.float32(NEG_INF), scores)
        return scores


class ForcedBOSTokenLogitsProcessor(LogitsProcessor):
    """When `cur_len == 1`, everything but `bos_token_id` gets -inf (it gets 0)."""

    def __init__(self, bos_token_id: int):
        self.bos_token_id = bos_token_id

    def __call__(self, input_ids, scores):
        scores = _f32(scores)
        if input_ids.shape[-1] == 1:
            scores = np.full_like(scores, NEG_INF)
            scores[:, self.bos_token_id] = 0
        return scores


class ForcedEOSTokenLogitsProcessor(LogitsProcessor):
    """When `cur_len == max_length - 1` (the last step), everything but the eos id(s) gets -inf
    (they get 0)."""

    def __init__(self, max_length: int, eos_token_id: int | list[int]):
        self.max_length = max_length
        if any(isinstance(t, float) for t in (eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])):
            raise ValueError(f"`eos_token_id` has to be a list of positive integers, but is {eos_token_id}")
        self.eos_token_id = _eos_list(eos_token_id)
        if any(t < 0 for t in self.eos_token_id):
            raise ValueError(f"`eos_token_id` has to be a list of positive integers, but is {eos_token_id}")

    def __call__(self, input_ids, scores):
        scores = _f32(scores)
        if input_ids.shape[-1] == self.max_length - 1:
            scores = np.full_like(scores, NEG_INF)
            scores[:, self.eos_token_id] = 0
        return scores


class InfNanRemoveLogitsProcessor(LogitsProcessor):
    """nan -> 0, +-inf -> the float32 max / min."""

    def __call__(self, input_ids, scores):
        scores = _f32(scores)
        info = np.finfo(np.float32)
        out = np.where(np.isnan(scores), np.float32(0), scores)
        out = np.where(scores == np.inf, info.max, out)
        return np.where(scores == -np.inf, info.min, out).astype(np.float32)


class LogitNormalization(LogitsProcessor):
    """`log_softmax(scores)` (HF's `renormalize_logits=True`)."""

    def __call__(self, input_ids, scores):
        return _log_softmax(_f32(scores)).astype(np.float32)


# ---------------------------------------------------------------- warpers (sampling only)

class TopKLogitsWarper(LogitsProcessor):
    """Keeps the `max(top_k, min_tokens_to_keep)` highest scores (and every score tied with the
    last of them); the rest get `filter_value`."""

    def __init__(self, top_k: int, filter_value: float = -float("Inf"), min_tokens_to_keep: int = 1):
        if not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(f"`top_k` has to be a strictly positive integer, but is {top_k}")
        self.top_k = max(top_k, min_tokens_to_keep)
        self.filter_value = filter_value
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids, scores):
        scores = _f32(scores)
        k = min(self.top_k, scores.shape[-1])
        return np.where(scores < _kth_largest(scores, k), np.float32(self.filter_value), scores)


class TopPLogitsWarper(LogitsProcessor):
    """Nucleus filtering: drops the least likely tokens whose cumulative probability (ascending
    order) is at most `1 - top_p`; the `min_tokens_to_keep` most likely always stay."""

    def __init__(self, top_p: float, filter_value: float = -float("Inf"), min_tokens_to_keep: int = 1):
        top_p = float(top_p)
        if top_p < 0 or top_p > 1.0:
            raise ValueError(f"`top_p` has to be a float > 0 and < 1, but is {top_p}")
        _check_keep(min_tokens_to_keep)
        self.top_p = top_p
        self.filter_value = filter_value
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids, scores):
        scores = _f32(scores)
        order = np.argsort(scores, -1, kind="stable")
        cumulative = np.cumsum(_softmax(np.take_along_axis(scores, order, -1)), -1, dtype=np.float32)
        remove = cumulative <= np.float32(1 - self.top_p)
        remove[..., -self.min_tokens_to_keep:] = False
        return np.where(_unsort(remove, order), np.float32(self.filter_value), scores)


class MinPLogitsWarper(LogitsProcessor):
    """Drops tokens whose probability is below `min_p` times the most likely token's."""

    def __init__(self, min_p: float, filter_value: float = -float("Inf"), min_tokens_to_keep: int = 1):
        if not 0 <= min_p <= 1.0:
            raise ValueError(f"`min_p` has to be a float in the [0, 1] interval, but is {min_p}")
        _check_keep(min_tokens_to_keep)
        self.min_p = min_p
        self.filter_value = filter_value
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids, scores):
        scores = _f32(scores)
        probs = _softmax(scores)
        remove = probs < np.float32(self.min_p) * probs.max(-1, keepdims=True)
        k = min(self.min_tokens_to_keep, probs.shape[-1])
        top = np.argsort(-probs, -1, kind="stable")[:, :k]
        np.put_along_axis(remove, top, False, -1)
        return np.where(remove, np.float32(self.filter_value), scores)


class TypicalLogitsWarper(LogitsProcessor):
    """Locally typical sampling: keeps the tokens whose surprisal is closest to the entropy until
    their probability mass reaches `mass`."""

    def __init__(self, mass: float = 0.9, filter_value: float = -float("Inf"), min_tokens_to_keep: int = 1):
        mass = float(mass)
        if not 0 < mass < 1:
            raise ValueError(f"`typical_p` has to be a float > 0 and < 1, but is {mass}")
        _check_keep(min_tokens_to_keep)
        self.filter_value = filter_value
        self.mass = mass
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids, scores):
        scores = _f32(scores)
        normalized = _log_softmax(scores)
        p = np.exp(normalized)
        with np.errstate(invalid="ignore"):
            ent = -np.nansum(normalized * p, -1, keepdims=True)  # -inf * 0 = nan is skipped, as torch's nansum
        shifted = np.abs(-normalized - ent)
        order = np.argsort(shifted, -1, kind="stable")
        sorted_scores = np.take_along_axis(shifted, order, -1)
        cumulative = np.cumsum(_softmax(np.take_along_axis(scores, order, -1)), -1, dtype=np.float32)
        last = np.minimum((cumulative < np.float32(self.mass)).sum(1), sorted_scores.shape[-1] - 1)
        remove = sorted_scores > np.take_along_axis(sorted_scores, last[:, None], 1)
        remove[..., :self.min_tokens_to_keep] = False
        return np.where(_unsort(remove, order), np.float32(self.filter_value), scores)


class EpsilonLogitsWarper(LogitsProcessor):
    """Drops tokens with probability below `epsilon` (keeping the `min_tokens_to_keep` best)."""

    def __init__(self, epsilon: float, filter_value: float = -float("Inf"), min_tokens_to_keep: int = 1):
        epsilon = float(epsilon)
        if epsilon <= 0 or epsilon >= 1:
            raise ValueError(f"`epsilon_cutoff` has to be a float > 0 and < 1, but is {epsilon}")
        if int(min_tokens_to_keep) < 1:
            raise ValueError(f"`min_tokens_to_keep` has to be a strictly positive integer, but is {min_tokens_to_keep}")
        self.epsilon = epsilon
        self.filter_value = filter_value
        self.min_tokens_to_keep = int(min_tokens_to_keep)

    def _threshold(self, scores):
        return np.float32(self.epsilon)

    def __call__(self, input_ids, scores):
        scores = _f32(scores)
        remove = _softmax(scores) < self._threshold(scores)
        k = min(self.min_tokens_to_keep, scores.shape[-1])
        remove &= scores < _kth_largest(scores, k)
        return np.where(remove, np.float32(self.filter_value), scores)


class EtaLogitsWarper(EpsilonLogitsWarper):
    """Eta sampling: the cutoff is `min(epsilon, sqrt(epsilon) * exp(-entropy))`."""

    def __init__(self, epsilon: float, filter_value: float = -float("Inf"), min_tokens_to_keep: int = 1):
        epsilon = float(epsilon)
        if epsilon <= 0 or epsilon >= 1:
            raise ValueError(f"`eta_cutoff` has to be a float > 0 and < 1, but is {epsilon}")
        super().__init__(epsilon, filter_value, min_tokens_to_keep)

    def _threshold(self, scores):
        logp = np.maximum(_log_softmax(scores), np.finfo(np.float32).min)  # torch Categorical.entropy clamps -inf
        entropy = -(logp * np.exp(logp)).sum(-1)
        eps = np.float32(self.epsilon)
        return np.minimum(eps, np.sqrt(eps) * np.exp(-entropy)).astype(np.float32)[..., None]


class WhisperTimeStampLogitsProcessor(LogitsProcessor):
    """Whisper's timestamp rules (HF's `WhisperTimeStampLogitsProcessor`, after openai/whisper): never
    `<|notimestamps|>`; timestamps come in pairs and never decrease; the first generated token (at
    `begin_index`) is a timestamp, at most `max_initial_timestamp_index` steps in; and when the
    timestamps' total probability beats every text token, a timestamp is forced."""

    def __init__(self, generate_config, begin_index: int, _detect_timestamp_from_logprob: bool | None = None):
        self.no_timestamps_token_id = generate_config.no_timestamps_token_id
        self.timestamp_begin = generate_config.no_timestamps_token_id + 1
        self.eos_token_id = generate_config.eos_token_id or generate_config.bos_token_id
        self._detect_timestamp_from_logprob = _detect_timestamp_from_logprob if _detect_timestamp_from_logprob \
            is not None else getattr(generate_config, "_detect_timestamp_from_logprob", True)
        self.begin_index = begin_index
        self.max_initial_timestamp_index = getattr(generate_config, "max_initial_timestamp_index", None)

    def set_begin_index(self, begin_index: int) -> None:
        self.begin_index = begin_index

    def __call__(self, input_ids, scores):
        scores = _f32(scores).copy()
        begin = self.timestamp_begin
        scores[:, self.no_timestamps_token_id] = NEG_INF
        vocab = np.arange(scores.shape[-1])
        for k, seq in enumerate(np.asarray(input_ids)[:, self.begin_index:].tolist()):
            last_was_timestamp = len(seq) >= 1 and seq[-1] >= begin
            penultimate_was_timestamp = len(seq) < 2 or seq[-2] >= begin
            if last_was_timestamp:
                if penultimate_was_timestamp:  # a pair closed: a text token next
                    scores[k, begin:] = NEG_INF
                else:  # an open timestamp: its closing timestamp or the end next
                    scores[k, :self.eos_token_id] = NEG_INF
            timestamps = [t for t in seq if t >= begin]
            last = begin  # timestamps never decrease (and `<|0.00|>` comes once)
            if timestamps:
                last = timestamps[-1] if last_was_timestamp and not penultimate_was_timestamp else timestamps[-1] + 1
            scores[k, (vocab >= begin) & (vocab < last)] = NEG_INF
        if np.asarray(input_ids).shape[1] == self.begin_index:
            scores[:, :begin] = NEG_INF
            if self.max_initial_timestamp_index is not None:
                scores[:, begin + self.max_initial_timestamp_index + 1:] = NEG_INF
        if self._detect_timestamp_from_logprob:
            logprobs = _log_softmax(scores)
            peak = logprobs[:, begin:].max(-1, keepdims=True)
            peak = np.where(np.isfinite(peak), peak, 0.0)
            with np.errstate(divide="ignore"):  # a row whose timestamps are all -inf
                timestamp_logprob = np.log(np.exp(logprobs[:, begin:] - peak).sum(-1)) + peak[:, 0]
            sample_timestamp = timestamp_logprob > logprobs[:, :begin].max(-1)
            scores[sample_timestamp, :begin] = NEG_INF
        return scores


# ---------------------------------------------------------------- the list generate builds

UNSUPPORTED = {  # generation options whose processors msfx does not implement: refused, not ignored
    "top_h": lambda v: v is not None,
    "guidance_scale": lambda v: v is not None and v != 1,
    "encoder_repetition_penalty": lambda v: v is not None and v != 1.0,
    "encoder_no_repeat_ngram_size": lambda v: v is not None and v > 0,
    "exponential_decay_length_penalty": lambda v: v is not None,
    "watermarking_config": lambda v: v is not None,
    # decoding modes msfx does not implement (HF dispatches to other loops for them)
    "num_beam_groups": lambda v: v is not None and v > 1,
    "diversity_penalty": lambda v: v is not None and v != 0.0,
    "penalty_alpha": lambda v: v is not None and v > 0,
    "dola_layers": lambda v: v is not None,
    "token_healing": lambda v: bool(v),
    "assistant_early_exit": lambda v: v is not None,
    "prompt_lookup_num_tokens": lambda v: v is not None,
}


def merge_processor_lists(defaults: list, custom: Iterable | None) -> list:
    """HF's `_merge_criteria_processor_list`: a custom entry of the same type as a default one
    replaces it in place; the other custom entries follow the defaults."""
    custom = list(custom or [])
    if not custom:
        return defaults
    merged = type(defaults)()
    for default in defaults:
        merged.append(next((c for c in custom if type(c) is type(default)), default))
    merged.extend(c for c in custom if c not in merged)
    return merged


def build_logits_processors(generation_config, prompt_len: int, user_processors: Iterable[Callable] | None = None,
                            attention_mask: np.ndarray | None = None) -> LogitsProcessorList:
    """The processors HF's `GenerationMixin._get_logits_processor` builds for a decoder-only model, in its order.

    `generation_config` must carry HF's *prepared* lengths, as inside `generate`: `max_length` the
    absolute limit (prompt + max_new_tokens; used by `forced_eos_token_id`) and `min_length`
    absolute (`min_new_tokens + prompt_len` when `min_new_tokens` is set). `prompt_len` is the
    prompt's column count (padding included). `attention_mask` `[batch, prompt_len]`: each row's
    leading zeros are excluded from the repetition penalty, as HF does; None means none.
    `user_processors` (numpy callables) are merged as HF merges `logits_processor=`: one of the
    same type as a built-in replaces it, the others run after the built-in processors and before
    the sampling warpers. Warpers (temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff,
    eta_cutoff) are added only when `do_sample`.

    Raises:
        NotImplementedError: an option whose processor msfx lacks (see `UNSUPPORTED`).
    """
    g = generation_config
    for name, active in UNSUPPORTED.items():
        if active(getattr(g, name, None)):
            raise NotImplementedError(f"msfx generate does not support `{name}` (={getattr(g, name)!r}) yet")
    eos = _eos_list(g.eos_token_id) or None
    processors = LogitsProcessorList()
    if g.sequence_bias is not None:
        processors.append(SequenceBiasLogitsProcessor(g.sequence_bias))
    if g.repetition_penalty is not None and g.repetition_penalty != 1.0:
        padding = None
        if attention_mask is not None and not (np.asarray(attention_mask) == 1).all():  # HF drops an all-ones mask
            padding = np.argmax(np.asarray(attention_mask) != 0, 1)
        processors.append(RepetitionPenaltyLogitsProcessor(g.repetition_penalty, prompt_ignore_length=padding))
    if g.no_repeat_ngram_size is not None and g.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(g.no_repeat_ngram_size))
    if g.bad_words_ids is not None:
        processors.append(NoBadWordsLogitsProcessor(g.bad_words_ids, eos))
    if g.min_length is not None and eos is not None and g.min_length > 0:
        processors.append(MinLengthLogitsProcessor(g.min_length, eos))
    if g.min_new_tokens is not None and eos is not None and g.min_new_tokens > 0:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_len, g.min_new_tokens, eos))
    if g.forced_bos_token_id is not None:
        processors.append(ForcedBOSTokenLogitsProcessor(g.forced_bos_token_id))
    if g.forced_eos_token_id is not None:
        processors.append(ForcedEOSTokenLogitsProcessor(g.max_length, g.forced_eos_token_id))
    if g.remove_invalid_values is True:
        processors.append(InfNanRemoveLogitsProcessor())
    if g.suppress_tokens is not None:
        processors.append(SuppressTokensLogitsProcessor(g.suppress_tokens))
    if g.begin_suppress_tokens is not None:
        begin = prompt_len if (prompt_len > 1 or g.forced_bos_token_id is None) else prompt_len + 1
        processors.append(SuppressTokensAtBeginLogitsProcessor(g.begin_suppress_tokens, begin))
    processors = merge_processor_lists(processors, user_processors)

    if g.do_sample:
        keep = (len(eos or []) + 1 if eos else 2) if (g.num_beams or 1) > 1 else 1
        if g.temperature is not None and g.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(g.temperature))
        if g.top_k is not None and g.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=g.top_k, min_tokens_to_keep=keep))
        if g.top_p is not None and g.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=g.top_p, min_tokens_to_keep=keep))
        if g.min_p is not None:
            processors.append(MinPLogitsWarper(min_p=g.min_p, min_tokens_to_keep=keep))
        if g.typical_p is not None and g.typical_p < 1.0:
            processors.append(TypicalLogitsWarper(mass=g.typical_p, min_tokens_to_keep=keep))
        if g.epsilon_cutoff is not None and 0.0 < g.epsilon_cutoff < 1.0:
            processors.append(EpsilonLogitsWarper(epsilon=g.epsilon_cutoff, min_tokens_to_keep=keep))
        if g.eta_cutoff is not None and 0.0 < g.eta_cutoff < 1.0:
            processors.append(EtaLogitsWarper(epsilon=g.eta_cutoff, min_tokens_to_keep=keep))
    if g.renormalize_logits is True:
        processors.append(LogitNormalization())
    return processors
