"""Encoder tasks: HF's `FillMaskPipeline`, `FeatureExtractionPipeline` and `TextClassificationPipeline`
(`transformers/pipelines/fill_mask.py`, `feature_extraction.py`, `text_classification.py`) over msfx models."""
from __future__ import annotations

import logging

import numpy as np
from mindspore import Tensor

from msfx.pipelines.base import Pipeline, to_numpy

logger = logging.getLogger(__name__)


def softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class _EncoderPipeline(Pipeline):
    """Tokenize one text as numpy, run the model, keep its outputs as numpy."""

    def _encode(self, inputs, **tokenizer_kwargs) -> dict:
        return dict(self.tokenizer(inputs, return_tensors="np", **tokenizer_kwargs))

    def _forward(self, model_inputs: dict) -> dict:
        outputs = self.model(**self._model_inputs(model_inputs))
        return {k: to_numpy(v) for k, v in outputs.items() if v is not None}


class FillMaskPipeline(_EncoderPipeline):
    """Predict the tokens at the tokenizer's mask token: per mask, the `top_k` (default 5) records
    `{"score", "token", "token_str", "sequence"}` (a list per mask when the text has several);
    `targets` restricts the candidates to those tokens."""

    def _sanitize_parameters(self, top_k=None, targets=None, tokenizer_kwargs=None):
        if self.tokenizer.mask_token_id is None:
            raise ValueError("fill-mask: the tokenizer does not define a `mask_token`")
        preprocess = {} if tokenizer_kwargs is None else {"tokenizer_kwargs": tokenizer_kwargs}
        postprocess = {}
        if targets is not None:
            postprocess["target_ids"] = self._target_ids(targets)
        if top_k is not None:
            postprocess["top_k"] = top_k
        return preprocess, {}, postprocess

    def _target_ids(self, targets) -> np.ndarray:
        """HF's `get_target_ids`: vocabulary ids of `targets`, else the first token each tokenizes to."""
        ids = []
        vocab = self.tokenizer.get_vocab()
        for target in [targets] if isinstance(targets, str) else targets:
            id_ = vocab.get(target)
            if id_ is None:
                tokens = self.tokenizer(target, add_special_tokens=False, return_attention_mask=False,
                                        return_token_type_ids=False, max_length=1, truncation=True)["input_ids"]
                if not tokens:
                    logger.warning("The specified target token `%s` does not exist in the model vocabulary; "
                                   "ignoring it", target)
                    continue
                id_ = tokens[0]
                logger.warning("The specified target token `%s` does not exist in the model vocabulary. "
                               "Replacing with `%s`.", target, self.tokenizer.convert_ids_to_tokens(id_))
            ids.append(id_)
        ids = list(set(ids))
        if not ids:
            raise ValueError("At least one target must be provided when passed.")
        return np.array(ids)

    def preprocess(self, inputs, tokenizer_kwargs=None) -> dict:
        model_inputs = self._encode(inputs, **(tokenizer_kwargs or {}))
        for row in model_inputs["input_ids"]:
            if not (row == self.tokenizer.mask_token_id).any():
                raise ValueError(f"fill-mask: no mask_token ({self.tokenizer.mask_token}) found on the input")
        return model_inputs

    def _forward(self, model_inputs: dict) -> dict:
        return {"logits": super()._forward(model_inputs)["logits"], "input_ids": model_inputs["input_ids"]}

    def postprocess(self, model_outputs: dict, top_k: int = 5, target_ids=None):
        if target_ids is not None and target_ids.shape[0] < top_k:
            top_k = target_ids.shape[0]
        input_ids = model_outputs["input_ids"][0]
        masked_index = np.flatnonzero(input_ids == self.tokenizer.mask_token_id)
        probs = softmax(model_outputs["logits"][0, masked_index].astype(np.float32))
        if target_ids is not None:
            probs = probs[..., target_ids]
        predictions = np.argsort(-probs, axis=-1, kind="stable")[..., :top_k]
        single_mask = len(masked_index) == 1
        result = []
        for i, row_predictions in enumerate(predictions):
            row = []
            for p in row_predictions.tolist():
                token = int(target_ids[p]) if target_ids is not None else p
                tokens = input_ids.copy()
                tokens[masked_index[i]] = token
                tokens = tokens[tokens != self.tokenizer.pad_token_id]
                row.append({"score": float(probs[i, p]), "token": token, "token_str": self.tokenizer.decode([token]),
                            "sequence": self.tokenizer.decode(tokens, skip_special_tokens=single_mask)})
            result.append(row)
        return result[0] if single_mask else result

    def __call__(self, inputs, **kwargs):
        outputs = super().__call__(inputs, **kwargs)
        return outputs[0] if isinstance(inputs, list) and len(inputs) == 1 else outputs


class FeatureExtractionPipeline(_EncoderPipeline):
    """The model's first output (the last hidden state `[1, seq, hidden]`) as nested lists, or as a
    MindSpore tensor with `return_tensors=True`."""

    def _sanitize_parameters(self, truncation=None, tokenize_kwargs=None, return_tensors=None):
        tokenize_kwargs = dict(tokenize_kwargs or {})
        if truncation is not None:
            if "truncation" in tokenize_kwargs:
                raise ValueError("truncation parameter defined twice (given as keyword argument as well as in "
                                 "tokenize_kwargs)")
            tokenize_kwargs["truncation"] = truncation
        return tokenize_kwargs, {}, ({} if return_tensors is None else {"return_tensors": return_tensors})

    def preprocess(self, inputs, **tokenize_kwargs) -> dict:
        return self._encode(inputs, **tokenize_kwargs)

    def _forward(self, model_inputs: dict) -> dict:
        outputs = self.model(**self._model_inputs(model_inputs))
        return {"features": to_numpy(outputs[0])}

    def postprocess(self, model_outputs: dict, return_tensors: bool = False):
        features = model_outputs["features"]
        return Tensor(features) if return_tensors else features.tolist()


class TextClassificationPipeline(_EncoderPipeline):
    """Sequence classification: `{"label", "score"}` with labels from `config.id2label`; `top_k`
    (None: every label) returns sorted lists; `function_to_apply` "sigmoid", "softmax" or "none"
    (default: HF's choice by `problem_type` / `num_labels`). Texts, `{"text", "text_pair"}` dicts."""

    def _sanitize_parameters(self, function_to_apply=None, top_k="", **tokenizer_kwargs):
        postprocess = {}
        if isinstance(top_k, int) or top_k is None:
            postprocess.update(top_k=top_k, _legacy=False)
        if isinstance(function_to_apply, str):
            if function_to_apply.lower() not in ("sigmoid", "softmax", "none"):
                raise ValueError(f"Unrecognized `function_to_apply` argument: {function_to_apply}")
            function_to_apply = function_to_apply.lower()
        if function_to_apply is not None:
            postprocess["function_to_apply"] = function_to_apply
        return tokenizer_kwargs, {}, postprocess

    def __call__(self, inputs, **kwargs):
        result = super().__call__(inputs, **kwargs)
        return [result] if isinstance(inputs, str) and "top_k" not in kwargs else result

    def preprocess(self, inputs, **tokenizer_kwargs) -> dict:
        if isinstance(inputs, dict):
            return dict(self.tokenizer(**inputs, return_tensors="np", **tokenizer_kwargs))
        if isinstance(inputs, list) and len(inputs) == 1 and isinstance(inputs[0], list) and len(inputs[0]) == 2:
            return self._encode(inputs[0][0], text_pair=inputs[0][1], **tokenizer_kwargs)
        if isinstance(inputs, list):
            raise ValueError("The pipeline received invalid inputs, if you are trying to send text pairs, you can try "
                             'to send a dictionary `{"text": "My text", "text_pair": "My pair"}` in order to send a '
                             "text pair.")
        return self._encode(inputs, **tokenizer_kwargs)

    def _default_function(self) -> str:
        config = self.model.config
        if config.problem_type == "regression":
            return "none"
        if config.problem_type == "multi_label_classification" or config.num_labels == 1:
            return "sigmoid"
        return "softmax"

    def postprocess(self, model_outputs: dict, function_to_apply=None, top_k=1, _legacy=True):
        function_to_apply = function_to_apply or self._default_function()
        outputs = model_outputs["logits"][0].astype(np.float32)
        scores = {"sigmoid": sigmoid, "softmax": softmax, "none": lambda x: x}[function_to_apply](outputs)
        id2label = self.model.config.id2label
        if top_k == 1 and _legacy:
            return {"label": id2label[int(scores.argmax())], "score": float(scores.max())}
        records = [{"label": id2label[i], "score": float(score)} for i, score in enumerate(scores)]
        if not _legacy:
            records.sort(key=lambda x: x["score"], reverse=True)
            records = records if top_k is None else records[:top_k]
        return records
