"""Extractive question answering: transformers 4.x's `QuestionAnsweringPipeline`
(`transformers/pipelines/question_answering.py`, v4.53; transformers 5 removed the task) over
msfx models, for fast tokenizers.

A long context is split into spans of `max_seq_len` tokens overlapping by `doc_stride`; each span's
start and end logits are softmaxed over its context tokens (and [CLS]), every span `(s, e)` with
`s <= e < s + max_answer_len` scores `p_start(s) * p_end(e)`, and the best spans map back to
characters of the context (whole words with `align_to_words`).
"""
from __future__ import annotations

import numpy as np

from msfx.pipelines.base import Pipeline, to_numpy

_NULL = 1_000_000.0  # HF's starting `min_null_score`: "large and positive"


def _examples(args: tuple, kwargs: dict) -> tuple[list[dict], bool]:
    """HF's `QuestionAnsweringArgumentHandler`: the `{"question", "context"}` examples and whether one
    was given (one result) rather than a list.

    Raises:
        ValueError / KeyError: arguments that name no question and context, or an empty one.
    """
    if len(args) == 2 and all(isinstance(a, str) for a in args):
        items, single = [{"question": args[0], "context": args[1]}], True
    elif len(args) == 1:
        items, single = (args[0], False) if isinstance(args[0], list) else ([args[0]], True)
    elif args:
        items, single = list(args), False
    elif "question" in kwargs and "context" in kwargs:
        question, context = kwargs.pop("question"), kwargs.pop("context")
        if isinstance(question, str) and isinstance(context, str):
            items, single = [{"question": question, "context": context}], True
        elif isinstance(question, list) and isinstance(context, str):
            items, single = [{"question": q, "context": context} for q in question], False
        elif isinstance(question, list) and isinstance(context, list):
            if len(question) != len(context):
                raise ValueError("Questions and contexts don't have the same lengths")
            items, single = [{"question": q, "context": c} for q, c in zip(question, context)], False
        else:
            raise ValueError("Arguments can't be understood")
    else:
        raise ValueError(f"Unknown arguments {kwargs}")
    for item in items:
        if not isinstance(item, dict):
            raise ValueError(f"{item} argument needs to be of type (SquadExample, dict)")
        for key in ("question", "context"):
            if key not in item:
                raise KeyError("You need to provide a dictionary with keys {question:..., context:...}")
            if item[key] is None:
                raise ValueError(f"`{key}` cannot be None")
            if isinstance(item[key], str) and not item[key]:
                raise ValueError(f"`{key}` cannot be empty")
    return items, single and len(items) == 1


def decode_spans(start: np.ndarray, end: np.ndarray, top_k: int, max_answer_len: int,
                 allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HF's `decode_spans`: the `top_k` best `(start, end, score)` over `start` and `end`
    probabilities `[seq]`, spans no longer than `max_answer_len`, both ends on `allowed` tokens."""
    candidates = np.tril(np.triu(np.outer(start, end)), max_answer_len - 1)
    flat = candidates.flatten()
    if top_k == 1:
        order = np.array([np.argmax(flat)])
    elif len(flat) < top_k:
        order = np.argsort(-flat)
    else:
        order = np.argpartition(-flat, top_k)[:top_k]
        order = order[np.argsort(-flat[order])]
    starts, ends = np.unravel_index(order, candidates.shape)
    keep = allowed[starts].astype(bool) & allowed[ends].astype(bool)
    starts, ends = starts[keep], ends[keep]
    return starts, ends, candidates[starts, ends]


def _normalized(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Softmax over `allowed` tokens (others at -10000, as HF)."""
    x = np.where(allowed, logits, -10000.0)
    x = np.exp(x - x.max())
    return x / x.sum()


class QuestionAnsweringPipeline(Pipeline):
    """Answer a question from a context: `{"score", "start", "end", "answer"}` (characters of the
    context), or a list of the `top_k` best.

    Inputs as HF's: `pipe(question=..., context=...)` (lists too), `pipe({"question", "context"})` or
    a list of such dicts, `pipe(question, context)`. Arguments: `top_k` (1), `doc_stride`
    (`max_seq_len // 2`, at most 128), `max_answer_len` (15), `max_seq_len` (384, at most the
    tokenizer's `model_max_length`), `max_question_len`, `padding`, `handle_impossible_answer`
    (False: also the empty answer, scored by [CLS]), `align_to_words` (True).

    Raises:
        ValueError: `top_k` or `max_answer_len` below 1, `doc_stride` above `max_seq_len`, a slow tokenizer.
    """

    def _sanitize_parameters(self, padding=None, top_k=None, doc_stride=None, max_answer_len=None, max_seq_len=None,
                             max_question_len=None, handle_impossible_answer=None, align_to_words=None):
        preprocess = {k: v for k, v in dict(padding=padding, doc_stride=doc_stride, max_question_len=max_question_len,
                                            max_seq_len=max_seq_len).items() if v is not None}
        postprocess = {}
        if top_k is not None:
            if top_k < 1:
                raise ValueError(f"top_k parameter should be >= 1 (got {top_k})")
            postprocess["top_k"] = top_k
        if max_answer_len is not None:
            if max_answer_len < 1:
                raise ValueError(f"max_answer_len parameter should be >= 1 (got {max_answer_len}")
            postprocess["max_answer_len"] = max_answer_len
        if handle_impossible_answer is not None:
            postprocess["handle_impossible_answer"] = handle_impossible_answer
        if align_to_words is not None:
            postprocess["align_to_words"] = align_to_words
        return preprocess, {}, postprocess

    def __call__(self, *args, **kwargs):
        kwargs.pop("batch_size", None)  # each example runs on its own (its spans are one model call each)
        examples, single = _examples(args, kwargs)
        results = super().__call__(examples, batch_size=1, **kwargs)
        return results[0] if single else results

    def preprocess(self, example: dict, padding="do_not_pad", doc_stride=None, max_question_len=64,
                   max_seq_len=None) -> dict:
        tokenizer = self.tokenizer
        if not tokenizer.is_fast:
            raise ValueError("question-answering in msfx needs a fast tokenizer (offsets map answers to characters)")
        if max_seq_len is None:
            max_seq_len = min(tokenizer.model_max_length, 384)
        if doc_stride is None:
            doc_stride = min(max_seq_len // 2, 128)
        if doc_stride > max_seq_len:
            raise ValueError(f"`doc_stride` ({doc_stride}) is larger than `max_seq_len` ({max_seq_len})")
        question_first = tokenizer.padding_side == "right"
        question, context = example["question"], example["context"]
        encoded = tokenizer(text=question if question_first else context,
                            text_pair=context if question_first else question, padding=padding,
                            truncation="only_second" if question_first else "only_first", max_length=max_seq_len,
                            stride=doc_stride, return_token_type_ids=True, return_overflowing_tokens=True,
                            return_offsets_mapping=True, return_special_tokens_mask=True)
        spans = []
        for i in range(len(encoded["input_ids"])):
            ids = np.asarray(encoded["input_ids"][i])
            # p_mask: 1 where the answer cannot be (question and special tokens), 0 on the context and [CLS]
            p_mask = np.array([s != 1 if question_first else 0 for s in encoded.sequence_ids(i)], np.int64)
            if tokenizer.cls_token_id is not None:
                p_mask[ids == tokenizer.cls_token_id] = 0
            inputs = {k: np.asarray(encoded[k][i])[None] for k in tokenizer.model_input_names + ["token_type_ids"]
                      if k in encoded}
            spans.append({"inputs": inputs, "p_mask": p_mask, "encoding": encoded[i]})
        return {"spans": spans, "context": context}

    def _forward(self, item: dict) -> dict:
        for span in item["spans"]:
            out = self.model(**self._model_inputs(span["inputs"]))
            span["start"], span["end"] = (to_numpy(t)[0].astype(np.float32) for t in (out.start_logits, out.end_logits))
        return item

    def postprocess(self, item: dict, top_k: int = 1, handle_impossible_answer: bool = False, max_answer_len: int = 15,
                    align_to_words: bool = True):
        tokenizer, context = self.tokenizer, item["context"]
        null_score, answers = _NULL, []
        for span in item["spans"]:
            mask = span["inputs"].get("attention_mask")
            allowed = 1 - span["p_mask"]
            if mask is not None:
                allowed = allowed & mask[0]
            start, end = _normalized(span["start"], allowed == 1), _normalized(span["end"], allowed == 1)
            if handle_impossible_answer:
                null_score = min(null_score, float(start[0] * end[0]))
            start[0] = end[0] = 0.0  # [CLS] is the empty answer, never a span
            ids = span["inputs"]["input_ids"][0]
            offset = int((ids == tokenizer.pad_token_id).sum()) if tokenizer.padding_side == "left" else 0
            for s, e, score in zip(*decode_spans(start, end, top_k, max_answer_len, allowed)):
                first, last = self._characters(span["encoding"], int(s) - offset, int(e) - offset,
                                               1 if tokenizer.padding_side == "right" else 0, align_to_words)
                text = context[first:last]
                same = next((a for a in answers if a["answer"].lower() == text.lower()), None)
                if same is not None:  # one answer found in several spans adds up its scores
                    same["score"] += float(score)
                else:
                    answers.append({"score": float(score), "start": first, "end": last, "answer": text})
        if handle_impossible_answer:
            answers.append({"score": null_score, "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda a: a["score"], reverse=True)[:top_k]
        return answers[0] if len(answers) == 1 else answers

    @staticmethod
    def _characters(encoding, s: int, e: int, sequence: int, align_to_words: bool) -> tuple[int, int]:
        """HF's `get_indices`: the characters of tokens `s..e` (widened to whole words with
        `align_to_words` when the tokenizer knows words)."""
        if align_to_words:
            try:
                return (encoding.word_to_chars(encoding.token_to_word(s), sequence_index=sequence)[0],
                        encoding.word_to_chars(encoding.token_to_word(e), sequence_index=sequence)[1])
            except Exception:  # as HF: tokenizers without words keep to the token offsets
                pass
        return encoding.offsets[s][0], encoding.offsets[e][1]
