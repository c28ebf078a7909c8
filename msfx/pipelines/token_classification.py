"""HF's `TokenClassificationPipeline` (`transformers/pipelines/token_classification.py`, "ner") over
msfx models: per-token labels, or entities grouped by an `aggregation_strategy`."""
from __future__ import annotations

import warnings

import numpy as np

from msfx.pipelines.base import Pipeline, to_numpy
from msfx.pipelines.text import softmax

STRATEGIES = ("none", "simple", "first", "average", "max")


def _tag(label: str) -> tuple[str, str]:
    """HF's `get_tag`: ("B" or "I", entity type) of an IOB label; a bare label counts as "I"."""
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label


def _resolve_overlaps(entities: list[dict]) -> list[dict]:
    """HF's `aggregate_overlapping_entities`: of entities (from overlapping chunks) that overlap, the
    longer one is kept, or the higher-scored of two as long."""
    kept = []
    for entity in sorted(entities, key=lambda e: e["start"]):
        last = kept[-1] if kept else None
        if last is not None and last["start"] <= entity["start"] < last["end"]:
            length, last_length = entity["end"] - entity["start"], last["end"] - last["start"]
            if length > last_length or (length == last_length and entity["score"] > last["score"]):
                kept[-1] = entity
        else:
            kept.append(entity)
    return kept


class TokenClassificationPipeline(Pipeline):
    """Classify each token of a text (HF's "token-classification" / "ner").

    Call arguments (HF's): `aggregation_strategy` ("none": one record per token with `entity`,
    `score`, `index`, `word`, `start`, `end`; "simple": adjacent tokens of one entity grouped into
    `entity_group` records; "first" / "average" / "max": words' subword tokens agree first, fast
    tokenizers only), `ignore_labels` (default `["O"]`), `is_split_into_words` (a list of words,
    joined by `delimiter`, default " "), `offset_mapping` (for a slow tokenizer), `stride` (a text
    longer than the tokenizer's `model_max_length` runs in chunks overlapping by `stride` tokens,
    overlapping entities resolved as HF: the longer, then the higher score, wins).

    Raises:
        ValueError: an unknown strategy, a word strategy with a slow tokenizer, a non-string input
            (or a non-list with `is_split_into_words`), `stride` not below `model_max_length`, with
            `aggregation_strategy="none"` or with a slow tokenizer.
    """

    def _sanitize_parameters(self, ignore_labels=None, aggregation_strategy=None, offset_mapping=None,
                             is_split_into_words: bool = False, stride=None, delimiter=None):
        preprocess = {"is_split_into_words": is_split_into_words}
        if is_split_into_words:
            preprocess["delimiter"] = " " if delimiter is None else delimiter
        if offset_mapping is not None:
            preprocess["offset_mapping"] = offset_mapping
        postprocess = {}
        if aggregation_strategy is not None:
            strategy = str(getattr(aggregation_strategy, "value", aggregation_strategy)).lower()
            if strategy not in STRATEGIES:
                raise ValueError(f"aggregation_strategy must be one of {list(STRATEGIES)}, got {aggregation_strategy!r}")
            if strategy in ("first", "average", "max") and not self.tokenizer.is_fast:
                raise ValueError('Slow tokenizers cannot handle subwords. Please set the `aggregation_strategy` option'
                                 ' to `"simple"` or use a fast tokenizer.')
            postprocess["aggregation_strategy"] = strategy
        if ignore_labels is not None:
            postprocess["ignore_labels"] = ignore_labels
        if stride is not None:
            if stride >= self.tokenizer.model_max_length:
                raise ValueError("`stride` must be less than `tokenizer.model_max_length` (or even lower if the "
                                 "tokenizer adds special tokens)")
            if postprocess.get("aggregation_strategy") == "none":
                raise ValueError('`stride` was provided to process all the text but `aggregation_strategy="none"`, '
                                 "please select another one instead.")
            if not self.tokenizer.is_fast:
                raise ValueError("`stride` was provided to process all the text but you're using a slow tokenizer. "
                                 "Please use a fast tokenizer.")
            preprocess["tokenizer_params"] = {"return_overflowing_tokens": True, "padding": True, "stride": stride}
        return preprocess, {}, postprocess

    def __call__(self, inputs, **kwargs):
        """One text (a list of records) or a list of texts (a list of lists); with
        `is_split_into_words=True`, one list of words or a list of such lists."""
        if kwargs.get("is_split_into_words") and not all(isinstance(item, list) for item in inputs):
            return super().__call__([inputs], **kwargs)  # one list of words: a list of one result, as HF
        offsets = kwargs.pop("offset_mapping", None)
        if offsets:  # HF's argument handler: one list of (start, end) per text
            offsets = [offsets] if isinstance(offsets[0], tuple) else offsets
            texts = inputs if isinstance(inputs, list) else [inputs]
            if len(offsets) != len(texts):
                raise ValueError("offset_mapping should have the same batch size as the input")
            results = [super(TokenClassificationPipeline, self).__call__(text, offset_mapping=o, **kwargs)
                       for text, o in zip(texts, offsets)]
            return results if isinstance(inputs, list) else results[0]
        if kwargs.get("stride") is not None or "tokenizer_params" in self._preprocess_params:
            kwargs["batch_size"] = 1  # a text's chunks are its batch
        return super().__call__(inputs, **kwargs)

    def preprocess(self, sentence, is_split_into_words: bool = False, delimiter: str | None = None,
                   offset_mapping=None, tokenizer_params: dict | None = None) -> dict:
        """The text's tokens `[chunks, seq]` (one chunk without `stride`) with their special-token mask
        and character offsets, and the text itself."""
        tokenizer = self.tokenizer
        params = dict(tokenizer_params or {})
        word_to_chars = None
        if is_split_into_words:
            if not isinstance(sentence, list):
                raise ValueError("When `is_split_into_words=True`, `sentence` must be a list of tokens.")
            if not tokenizer.is_fast:
                raise ValueError("is_split_into_words=True is only supported with fast tokenizers.")
            words, sentence, word_to_chars, start = sentence, delimiter.join(sentence), [], 0
            for word in words:
                word_to_chars.append((start, start + len(word)))
                start += len(word) + len(delimiter)
            text, params["is_split_into_words"] = words, True
        elif not isinstance(sentence, str):
            raise ValueError("When `is_split_into_words=False`, `sentence` must be an untokenized string.")
        else:
            text = sentence
        truncation = bool(tokenizer.model_max_length and tokenizer.model_max_length > 0)
        encoded = tokenizer(text, return_tensors="np", truncation=truncation, return_special_tokens_mask=True,
                            return_offsets_mapping=tokenizer.is_fast, **params)
        inputs = {k: v for k, v in encoded.items() if k != "overflow_to_sample_mapping"}
        if offset_mapping is not None:
            inputs["offset_mapping"] = np.asarray(offset_mapping)[None]
        inputs["sentence"] = sentence
        chunks = len(inputs["input_ids"])
        inputs["word_ids"] = [encoded.word_ids(i) for i in range(chunks)] if word_to_chars is not None else None
        inputs["word_to_chars"] = word_to_chars
        return inputs

    def _forward(self, model_inputs: dict) -> dict:
        logits = to_numpy(self.model(**self._model_inputs(model_inputs)).logits)
        keep = ("input_ids", "special_tokens_mask", "offset_mapping", "sentence", "word_ids", "word_to_chars")
        return {"logits": logits, **{k: model_inputs.get(k) for k in keep}}

    def postprocess(self, outputs: dict, aggregation_strategy: str = "none", ignore_labels=None) -> list[dict]:
        ignore_labels = ["O"] if ignore_labels is None else ignore_labels
        offsets, word_ids, found = outputs["offset_mapping"], outputs["word_ids"], []
        for i, logits in enumerate(outputs["logits"]):  # padding (of a batch or the last chunk) is marked special
            pre = self._pre_entities(outputs["sentence"], outputs["input_ids"][i], softmax(logits.astype(np.float32)),
                                     None if offsets is None else offsets[min(i, len(offsets) - 1)],
                                     outputs["special_tokens_mask"][i], aggregation_strategy,
                                     None if word_ids is None else word_ids[i], outputs["word_to_chars"])
            found += [e for e in self._aggregate(pre, aggregation_strategy)
                      if e.get("entity") not in ignore_labels and e.get("entity_group") not in ignore_labels]
        return found if len(outputs["logits"]) == 1 else _resolve_overlaps(found)

    def _pre_entities(self, sentence, input_ids, scores, offsets, special, strategy, word_ids, word_to_chars):
        """HF's `gather_pre_entities`: the non-special tokens with their scores, characters and
        whether each continues a word (the tokenizer's subword prefix, else a no-space heuristic)."""
        tokenizer, found = self.tokenizer, []
        prefix = getattr(getattr(getattr(tokenizer, "_tokenizer", None), "model", None), "continuing_subword_prefix",
                         None)
        for idx, token_scores in enumerate(scores):
            if special[idx]:
                continue
            word = tokenizer.convert_ids_to_tokens(int(input_ids[idx]))
            start = end = None
            is_subword = False
            if offsets is not None:
                start, end = int(offsets[idx][0]), int(offsets[idx][1])
                if word_ids is not None and word_ids[idx] is not None:
                    start, end = start + word_to_chars[word_ids[idx]][0], end + word_to_chars[word_ids[idx]][0]
                reference = sentence[start:end]
                if prefix:
                    is_subword = len(word) != len(reference)
                else:
                    if strategy in ("first", "average", "max"):
                        warnings.warn("Tokenizer does not support real words, using fallback heuristic", UserWarning)
                    is_subword = start > 0 and " " not in sentence[start - 1:start + 1]
                if int(input_ids[idx]) == tokenizer.unk_token_id:
                    word, is_subword = reference, False
            found.append({"word": word, "scores": token_scores, "start": start, "end": end, "index": idx,
                          "is_subword": is_subword})
        return found

    def _aggregate(self, pre: list[dict], strategy: str) -> list[dict]:
        labels = self.model.config.id2label
        if strategy in ("none", "simple"):
            entities = []
            for p in pre:
                best = int(p["scores"].argmax())
                entities.append({"entity": labels[best], "score": p["scores"][best], "index": p["index"],
                                 "word": p["word"], "start": p["start"], "end": p["end"]})
        else:
            entities = self._aggregate_words(pre, strategy)
        return entities if strategy == "none" else self._group(entities)

    def _aggregate_words(self, pre: list[dict], strategy: str) -> list[dict]:
        """HF's `aggregate_words`: one entity per word, from its subword tokens' scores by `strategy`."""
        groups: list[list[dict]] = []
        for p in pre:
            if groups and p["is_subword"]:
                groups[-1].append(p)
            else:
                groups.append([p])
        labels, words = self.model.config.id2label, []
        for group in groups:
            if strategy == "first":
                scores = group[0]["scores"]
            elif strategy == "max":
                scores = max(group, key=lambda p: p["scores"].max())["scores"]
            else:
                scores = np.nanmean(np.stack([p["scores"] for p in group]), axis=0)
            best = int(scores.argmax())
            words.append({"entity": labels[best], "score": scores[best],
                          "word": self.tokenizer.convert_tokens_to_string([p["word"] for p in group]),
                          "start": group[0]["start"], "end": group[-1]["end"]})
        return words

    def _group(self, entities: list[dict]) -> list[dict]:
        """HF's `group_entities`: adjacent entities of one type (a "B-" label starts a new one) merged,
        with the mean score and the words joined."""
        runs: list[list[dict]] = []
        for entity in entities:
            bi, tag = _tag(entity["entity"])
            if runs and bi != "B" and tag == _tag(runs[-1][-1]["entity"])[1]:
                runs[-1].append(entity)
            else:
                runs.append([entity])
        return [{"entity_group": run[0]["entity"].split("-", 1)[-1],
                 "score": np.mean(np.nanmean([e["score"] for e in run])),
                 "word": self.tokenizer.convert_tokens_to_string([e["word"] for e in run]),
                 "start": run[0]["start"], "end": run[-1]["end"]} for run in runs]
