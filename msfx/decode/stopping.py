"""Stop strings for the decode loop: HF's `StopStringCriteria` (transformers 5.24) in plain Python and numpy.

A row stops once the text of its last tokens contains one of the stop strings ending inside the
final token; the string may start inside an earlier token and the final token may run past its
end ("st" + "opper" stops on "stop", "stop" + "at" does not). Tokens are compared as the text each
one decodes to, cleaned as HF's `StopStringCriteria.clean_tokenizer_vocab` cleans them (no `Ġ` /
`▁` markers, `<0xNN>` byte tokens as their byte), and for byte-level and byte-fallback
vocabularies as UTF-8 bytes, so a stop string can also end inside a multi-byte character.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

# HF decodes every token behind this prefix and keeps what follows it, so tokenizers that add or
# drop a space at the start of a decoded text clean every token the same way.
_STATIC_PREFIX = "abcdef"
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte (the inverse of `bytes_to_unicode`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in table.values())
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


def _has_decoder_type(config: Any, name: str) -> bool:
    if isinstance(config, dict):
        return config.get("type") == name or any(_has_decoder_type(v, name) for v in config.values())
    if isinstance(config, list):
        return any(_has_decoder_type(v, name) for v in config)
    return False


def _matching_mode(tokenizer) -> str | None:
    """HF's `_get_stop_string_matching_mode`: "byte_level", "byte_fallback", or None (match as text)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return None
    if type(decoder).__name__ == "ByteLevel":
        return "byte_level"
    state = getattr(decoder, "__getstate__", lambda: None)()
    try:
        config = json.loads(state) if isinstance(state, (str, bytes)) else None
    except json.JSONDecodeError:
        config = None
    if _has_decoder_type(config, "ByteFallback"):
        return "byte_fallback"
    if _has_decoder_type(config, "ByteLevel"):
        return "byte_level"
    return None


def _clean_vocab(tokenizer, mode: str | None) -> dict[int, str | bytes]:
    """Token id -> the text (bytes when `mode` is set) that token contributes to a decoded sequence."""
    byte_decoder = _byte_level_decoder() if mode == "byte_level" else None
    prefix_tokens = tokenizer.convert_ids_to_tokens(tokenizer(_STATIC_PREFIX, add_special_tokens=False)["input_ids"])
    cleaned: dict[int, str | bytes] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if byte_decoder is not None and all(c in byte_decoder for c in token):
            cleaned[token_id] = bytes(byte_decoder[c] for c in token)
            continue
        if mode == "byte_fallback" and len(token) == 6 and token.startswith("<0x") and token.endswith(">") \
                and _HEX_DIGITS.issuperset(token[3:5]):
            cleaned[token_id] = bytes([int(token[3:5], 16)])
            continue
        text = tokenizer.convert_tokens_to_string(prefix_tokens + [token])
        text = text[text.index(_STATIC_PREFIX) + len(_STATIC_PREFIX):]
        cleaned[token_id] = text.encode("utf-8") if mode is not None else text
    return cleaned


def _can_end_in(token: str | bytes, target: str | bytes) -> bool:
    """Whether `target` can end inside `token`: contained in it, or a suffix of `target` starts it."""
    if target in token:
        return True
    return any(token.startswith(target[-n:]) for n in range(1, min(len(token), len(target) - 1) + 1))


class StopStringCriteria:
    """Stops a row once it has generated one of `stop_strings`, as HF's
    `transformers.generation.stopping_criteria.StopStringCriteria` (5.24) decides it.

    A stop string fires when the cleaned strings of the row's last tokens, joined, contain it
    ending inside the final token (see the module docstring); like HF, only the last
    `max(len(stop string))` tokens are looked at (lengths in UTF-8 bytes for byte-level and
    byte-fallback tokenizers), and an id outside the tokenizer's vocabulary never matches nor lets
    a match reach past it. The vocabulary is cleaned once here (about 0.1 s for 50k tokens).

    Args:
        tokenizer: a transformers tokenizer (`get_vocab`, `convert_ids_to_tokens`,
            `convert_tokens_to_string`; `backend_tokenizer.decoder` picks the matching mode).
        stop_strings: one stop string or a sequence of them.

    Raises:
        ValueError: no stop strings, an empty one, or (HF's check) none of them can end in any
            token of the vocabulary.
        TypeError: a stop string that is not a `str`.
    """

    def __init__(self, tokenizer, stop_strings: str | Sequence[str]):
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        self.stop_strings: tuple[str, ...] = tuple(stop_strings)
        if not self.stop_strings:
            raise ValueError("StopStringCriteria needs at least one stop string")
        for s in self.stop_strings:
            if not isinstance(s, str):
                raise TypeError(f"stop strings must be str, got {type(s).__name__}: {s!r}")
            if not s:
                # HF accepts "" and then stops every row at once; reject it instead.
                raise ValueError("stop strings must not be empty")
        mode = _matching_mode(tokenizer)
        self._targets: tuple[str | bytes, ...] = tuple(s.encode("utf-8") for s in self.stop_strings) \
            if mode is not None else self.stop_strings
        self._joiner: str | bytes = b"" if mode is not None else ""
        cleaned = _clean_vocab(tokenizer, mode)
        self._tokens: list[str | bytes | None] = [None] * (max(cleaned) + 1)
        for token_id, text in cleaned.items():
            self._tokens[token_id] = text
        if not any(_can_end_in(text, target) for target in self._targets for text in cleaned.values()
                   if target[-1:] in text):
            raise ValueError(f"no token of the vocabulary can end any of the stop strings {self.stop_strings!r} "
                             "(they likely contain characters the tokenizer does not have)")
        # HF's window: one token per character of the longest stop string.
        self._window = max(len(t) for t in self._targets)

    def __call__(self, input_ids: np.ndarray, scores: Any = None) -> np.ndarray:
        """`input_ids` int `[batch, cur_len]` -> bool `[batch]`, True where the row should stop.
        `scores` is ignored."""
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, cur_len], got shape {input_ids.shape}")
        return np.array([self._row_stops(tail) for tail in input_ids[:, -self._window:].tolist()], dtype=bool)

    def _row_stops(self, tail: list[int]) -> bool:
        pieces: list[str | bytes] = []
        before_last = 0
        for token_id in reversed(tail):
            text = self._tokens[token_id] if 0 <= token_id < len(self._tokens) else None
            if text is None:
                break
            pieces.append(text)
            if len(pieces) > 1:
                before_last += len(text)
                # A match ends in the last token, so it starts at most `window - 1` characters before it.
                if before_last >= self._window - 1:
                    break
        if not pieces:
            return False
        joined = self._joiner.join(reversed(pieces))
        boundary = len(joined) - len(pieces[0])
        return any(joined.find(t, max(0, boundary - len(t) + 1)) >= 0 for t in self._targets)
