"""msfx.decode.stopping.StopStringCriteria against transformers' torch `StopStringCriteria`.

Three tokenizers cover HF's three matching modes: SmolLM2's byte-level BPE ("byte_level"), a
small Unigram with a Metaspace pre-tokenizer/decoder (text), and a small llama-style BPE with
`<0xNN>` byte-fallback tokens ("byte_fallback"); the last two are trained here, offline.
Sequences are random token ids, and texts around the stop strings cut into random vocabulary
tokens, so stop strings are split across tokens with overhangs at either end, or just miss.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

from msfx.decode.stopping import StopStringCriteria
from msfx.params.gguf import gguf_tokenizer, read_gguf, smollm2_gguf_path

CORPUS = [
    "the cat sat on the mat and then it had to stop.",
    "stop the bus, stopped the car, stopping at last: the end.",
    "User: hello there! Assistant: general kenobi, the end is near.",
    "abcdef ghijkl mnopqr stuvwx yz, laptop topper, desktop pop.",
    "naïve café é! 日本語のテキスト 日本 and some more words for the end",
    "one two three four five six seven eight nine ten.",
    "we stopped, we stop; you stop! they stop? stop stop stop",
]


def _sentencepiece_unigram():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tk.train_from_iterator(CORPUS * 4, trainers.UnigramTrainer(vocab_size=180, unk_token="<unk>",
                                                               special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _sentencepiece_byte_fallback():
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=520, special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


_BUILDERS = {
    "smollm2": lambda: gguf_tokenizer(read_gguf(smollm2_gguf_path())),
    "unigram": _sentencepiece_unigram,
    "byte_fallback": _sentencepiece_byte_fallback,
}
_MODES = {"smollm2": "byte_level", "unigram": None, "byte_fallback": "byte_fallback"}

STOP_STRINGS = {
    "smollm2": ["stop", [" the end", "\n\n", "User:"], ["日本", "é!", "top"], "a", "<|im_end|>"],
    "unigram": ["stop", [" the end", "cat sat", "."], "s", ["topper", "p pop"]],
    "byte_fallback": ["stop", [" the end", "e!", "日本"], ["o", "we stop"]],
}


@pytest.fixture(scope="module", params=list(_BUILDERS))
def tokenizer(request):
    try:
        tok = _BUILDERS[request.param]()
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    return request.param, tok


def _hf(tok, stop_strings):
    from transformers.generation import stopping_criteria

    return stopping_criteria.StopStringCriteria(tok, stop_strings)


def _hf_stops(hf, input_ids: np.ndarray) -> np.ndarray:
    import torch

    return hf(torch.tensor(input_ids, dtype=torch.long), None).numpy()


def _segment(text, pieces: dict, longest: int, rng: np.random.Generator) -> list[int] | None:
    """`text` cut into randomly chosen vocabulary pieces (cleaned strings -> id, at most `longest`
    long); None if impossible."""
    ids, i = [], 0
    while i < len(text):
        options = [text[i:j] for j in range(i + 1, min(len(text), i + longest) + 1) if text[i:j] in pieces]
        if not options:
            return None
        piece = options[rng.integers(len(options))]
        ids.append(pieces[piece])
        i += len(piece)
    return ids


def _left_pad(rows: list[list[int]], filler: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    width = max(map(len, rows))
    return np.array([list(rng.choice(filler, width - len(r))) + r for r in rows], dtype=np.int64)


def _crafted_rows(stops: list[str], pieces: dict, as_bytes: bool, rng: np.random.Generator) -> list[list[int]]:
    alphabet = sorted(set("".join(stops)) | set("xyz op"))
    rows, longest = [], max(map(len, pieces))
    for _ in range(240):
        stop = stops[rng.integers(len(stops))]
        if rng.random() < 0.2:  # a near miss: one character changed
            k = rng.integers(len(stop))
            stop = stop[:k] + alphabet[rng.integers(len(alphabet))] + stop[k + 1:]
        before = "".join(rng.choice(alphabet, rng.integers(0, 5)))
        after = "".join(rng.choice(alphabet, rng.choice([0, 0, 0, 1, 2, 3])))
        text = before + stop + after
        ids = _segment(text.encode("utf-8") if as_bytes else text, pieces, longest, rng)
        if ids is not None:
            rows.append(ids)
    return rows


def test_matches_hf_stop_string_criteria(tokenizer):
    from transformers.generation import stopping_criteria

    HFCriteria = stopping_criteria.StopStringCriteria
    name, tok = tokenizer
    mode = HFCriteria._get_stop_string_matching_mode(tok)
    assert mode == _MODES[name]
    clean, clean_ids = HFCriteria.clean_tokenizer_vocab(tok, stop_string_matching_mode=mode)
    pieces = {s: i for s, i in zip(clean, clean_ids) if s}
    vocab_ids = np.array(sorted(tok.get_vocab().values()))
    out_of_vocab = int(vocab_ids.max()) + 3
    rng = np.random.default_rng(0)
    fired = []
    for stop_strings in STOP_STRINGS[name]:
        stops = [stop_strings] if isinstance(stop_strings, str) else stop_strings
        ours, hf = StopStringCriteria(tok, stop_strings), _hf(tok, stop_strings)
        crafted = _crafted_rows(stops, pieces, mode is not None, rng)
        assert len(crafted) > 150, stop_strings
        used = np.unique(np.concatenate(crafted))
        batches = [_left_pad(crafted, used, rng)]
        # random ids from the tokens around the stop strings, mixed with any vocabulary id or an
        # id past the vocabulary, at lengths below and above the criterion's window
        filler = np.concatenate([used, used, rng.choice(vocab_ids, 20), [out_of_vocab]])
        for length in (1, 2, 3, 5, 8, 13):
            batches.append(rng.choice(filler, (60, length)))
        for ids in batches:
            expected = _hf_stops(hf, ids)
            got = ours(ids, None)
            assert got.dtype == np.bool_ and got.shape == (len(ids),)
            mismatched = np.flatnonzero(got != expected)
            assert not mismatched.size, (stop_strings, ids[mismatched[:5]].tolist(), expected[mismatched[:5]])
            fired.append(expected)
    fired = np.concatenate(fired)
    assert 0.1 < fired.mean() < 0.9  # both outcomes are well represented


class _ToyTokenizer:
    """Duck-typed tokenizer with what a real vocabulary rarely has: a token that decodes to nothing
    (so HF's window of one token per stop-string character can cut a match off) and a hole in the ids.
    No `backend_tokenizer`, so HF matches text."""

    _vocab: ClassVar[dict[str, int]] = {"s": 0, "t": 1, "o": 2, "p": 3, "st": 4, "op": 5, "top": 6, "<nothing>": 7,
                                        "stopx": 9, " ": 10, "p s": 11, "abcdef": 12}

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        assert text == "abcdef"
        return {"input_ids": [12]}

    def _convert_id_to_token(self, index: int) -> str:
        return {i: t for t, i in self._vocab.items()}[index]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self._convert_id_to_token(i) for i in ids]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join("" if t == "<nothing>" else t for t in tokens)


def test_window_empty_tokens_and_id_holes():
    tok = _ToyTokenizer()
    rng = np.random.default_rng(1)
    ids = np.array([*tok.get_vocab().values(), 8, 13])  # 8: a hole, 13: past the vocabulary
    weights = np.where(ids == 7, 6.0, 1.0)
    fired = []
    for stop_strings in (["stop", "p s", "tt"], "st", ["x", "abcdef"]):
        ours, hf = StopStringCriteria(tok, stop_strings), _hf(tok, stop_strings)
        for length in (1, 2, 3, 4, 5, 6, 9):
            batch = rng.choice(ids, (400, length), p=weights / weights.sum())
            expected = _hf_stops(hf, batch)
            np.testing.assert_array_equal(ours(batch), expected, err_msg=str(stop_strings))
            fired.append(expected)
    assert 0.05 < np.concatenate(fired).mean() < 0.95
    # "s", "t", "o", "p" then nothing: five tokens, past the four HF looks at
    np.testing.assert_array_equal(StopStringCriteria(tok, "stop")(np.array([[0, 1, 7, 2, 3], [7, 0, 1, 2, 3]])),
                                  [False, True])


def test_split_and_overhang_examples(tokenizer):
    """HF's docstring examples (where the tokenizer has these tokens), one batch with mixed outcomes."""
    name, tok = tokenizer
    if name != "smollm2":
        pytest.skip("uses SmolLM2's vocabulary")
    rows = [["st", "op"], ["stop"], ["st", "opted"], ["s", "to", "pped"], ["las", "tops"],
            ["stop", "at"], ["st", "op", "at"], ["Ġst", "op"], ["Ġsto", "pp"], ["Ġsto", "ck"]]
    ids = [tok.convert_tokens_to_ids(r) for r in rows]
    assert all(tok.unk_token_id not in r and None not in r for r in ids)
    ids = _left_pad(ids, np.array(tok.convert_tokens_to_ids(["x"])), np.random.default_rng(0))
    expected = [True, True, True, True, True, False, False, True, True, False]
    np.testing.assert_array_equal(_hf_stops(_hf(tok, "stop"), ids), expected)
    np.testing.assert_array_equal(StopStringCriteria(tok, "stop")(ids), expected)
    # a stop string with a leading space needs the space: "Ġst" has it, "st" does not
    np.testing.assert_array_equal(StopStringCriteria(tok, [" stop", "zzz"])(ids), [False] * 7 + [True] * 2 + [False])


def test_bad_stop_strings(tokenizer):
    _, tok = tokenizer
    for bad in ([], (), "", ["stop", ""]):
        with pytest.raises(ValueError, match="stop string"):
            StopStringCriteria(tok, bad)
    with pytest.raises(TypeError):
        StopStringCriteria(tok, ["stop", 3])
    with pytest.raises(ValueError):
        StopStringCriteria(tok, "stop")(np.zeros(4, np.int64))


def test_unreachable_stop_string_raises_like_hf():
    tok = _sentencepiece_unigram()
    with pytest.raises(ValueError, match="unable to identify"):
        _hf(tok, "\u2603")
    with pytest.raises(ValueError, match="no token"):
        StopStringCriteria(tok, "\u2603")
    # one reachable stop string is enough, for both
    assert _hf(tok, ["\u2603", "stop"]) is not None
    assert StopStringCriteria(tok, ["\u2603", "stop"]) is not None


def test_empty_and_short_sequences(tokenizer):
    _, tok = tokenizer
    criterion = StopStringCriteria(tok, ["stop", " the end"])
    assert criterion(np.zeros((0, 5), np.int64)).shape == (0,)
    assert criterion(np.zeros((3, 0), np.int64)).tolist() == [False] * 3


# ---------------------------------------------------------------- in generate, against HF's generate

@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_with_stop_strings_matches_hf(tmp_path, num_beams):
    import torch

    from msfx import LlamaForCausalLM

    from conftest import make_hf_llama

    tok = _sentencepiece_unigram()
    torch_model, path = make_hf_llama(tmp_path, vocab_size=len(tok), pad_token_id=0, eos_token_id=2)
    model = LlamaForCausalLM.from_pretrained(path)
    ids = np.random.default_rng(4).integers(3, len(tok), (3, 6))
    mask = np.ones_like(ids)
    ids[1, :1] = ids[2, :3] = mask[1, :1] = mask[2, :3] = 0
    kwargs = dict(max_new_tokens=12, do_sample=False, num_beams=num_beams)

    def hf_generate(**extra):
        with torch.no_grad():
            return torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs,
                                        **extra).numpy()

    plain = hf_generate()
    # stop on the text row 1 generates at its 3rd and 4th tokens: it fires mid-generation
    stop = tok.decode(plain[1, 8:10]).strip()
    expected = hf_generate(stop_strings=stop, tokenizer=tok)
    assert expected.shape[1] < plain.shape[1] or (expected != plain).any()
    got = model.generate(ids, attention_mask=mask, jit=False, stop_strings=stop, tokenizer=tok, **kwargs)
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="could not locate a tokenizer"):
        model.generate(ids, attention_mask=mask, stop_strings=stop, **kwargs)
